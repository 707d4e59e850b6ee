"""End-to-end: the demo runs every stage on digits at toy size, writes its report, and resumes."""

from __future__ import annotations

import json

from csm.cli import main
from csm.synthetic import load_synthetic_tensors, read_manifest


def test_demo_end_to_end_and_resume(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "demo", "--out", str(out), "--cache-dir", str(cache), "--preset", "tiny",
        "--diffusion-steps", "3", "--groups", "9", "--group-size", "3", "--sample-steps", "2",
        "--seeds", "1", "--epochs", "1", "--methods", "ce", "csm",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| ce |" in printed and "| csm |" in printed
    report = (out / "report.md").read_text()
    for needle in (
        "figures/lambda_sweep.png",
        "confidence_vs_lambda.png",
        "| csm |",
        "reliability",
    ):
        assert needle in report
    assert (out / "figures" / "lambda_sweep.png").stat().st_size > 0
    # the synthetic images match the real size (16 px) and were annotated by the CE classifier
    syn = load_synthetic_tensors(out / "synthetic")
    assert tuple(syn.images.shape) == (27, 1, 16, 16)
    ann = read_manifest(out / "synthetic")["annotation"]
    assert ann["encoder"].startswith("classifier:") and ann["squash"] == 4.0
    bench = json.loads((out / "benchmark" / "benchmark.json").read_text())
    assert {r["method"] for r in bench["runs"]} == {"ce", "csm"}
    assert (out / "config.yaml").is_file() and (out / "demo.json").is_file()

    # a second run reuses every finished stage: no retraining, the same leaderboard
    board = (out / "benchmark" / "leaderboard.md").read_text()
    weights = (out / "benchmark" / "runs" / "csm" / "seed0" / "model.safetensors").read_bytes()
    assert main(args) == 0
    assert "trained 0, reused 2" in capsys.readouterr().out
    assert (out / "benchmark" / "leaderboard.md").read_text() == board
    assert (
        out / "benchmark" / "runs" / "csm" / "seed0" / "model.safetensors"
    ).read_bytes() == weights
