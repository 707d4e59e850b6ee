"""End-to-end: the demo runs every stage on digits at toy size, writes its report, and resumes."""

from __future__ import annotations

import json

import matplotlib.image as mpimg

from csm.cli import main
from csm.synthetic import load_synthetic_tensors, read_manifest


def test_demo_end_to_end_and_resume(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "demo", "--out", str(out), "--cache-dir", str(cache), "--preset", "tiny",
        "--diffusion-steps", "3", "--groups", "9", "--group-size", "3", "--sample-steps", "2",
        "--seeds", "1", "--epochs", "1", "--methods", "ce", "csm", "--corruptions", "blur",
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
    figures = (
        "lambda_sweep",
        "examples",
        "real_vs_generated",
        "confidence_vs_lambda",
        "training_curves",
    )
    for name in figures:
        assert f"figures/{name}.png" in report
        assert mpimg.imread(out / "figures" / f"{name}.png").shape[0] > 100
    # 9 groups over digits' 45 pairs: the first 9 pairs, one row each, 3 λ columns
    sweep = mpimg.imread(out / "figures" / "lambda_sweep.png")
    assert sweep.shape[0] > sweep.shape[1]  # one row per pair (9), 3 columns of λ
    assert (
        "## Under distribution shift" in report and "Under shift: mean over corruptions" in report
    )
    assert str(tmp_path) not in report
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
