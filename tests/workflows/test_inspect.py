"""Tests for ``csm inspect``: a tiny random generator judged by a tiny random classifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from csm.cli import main
from csm.generation.mixing import num_pairs
from csm.generation.pipeline import CSMMixingPipeline, build_unet
from csm.generation.schedule import ks_uniform
from csm.synthetic import load_synthetic_tensors
from csm.utils import OWNER_FILE
from csm.workflows.inspect import (
    PICTURES,
    REPORT_NAME,
    flipped_share,
    mean_pairwise_distance,
    monotone_groups,
)
from tests.helpers import make_run

NAMES = [str(i) for i in range(10)]  # digits' class names, so --real digits matches
OPTS = ["--real", "digits", "--groups-per-pair", "1", "--group-size", "3", "--steps", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    unet = build_unet(
        10, image_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = DDIMScheduler(num_train_timesteps=50, beta_schedule="linear", clip_sample=False)
    CSMMixingPipeline(unet=unet, scheduler=sched, class_names=NAMES).save_pretrained(root / "gen")
    make_run(root / "judge", NAMES, width=4)
    return root / "gen", root / "judge"


@pytest.fixture(scope="module")
def model_report(inputs, tmp_path_factory) -> Path:
    gen, judge = inputs
    out = tmp_path_factory.mktemp("report") / "rep"
    args = ["inspect", str(gen), "--judge", f"classifier:{judge}", "--out", str(out), *OPTS]
    assert main([*args, "--device", "cpu"]) == 0
    return out


def _check_report(out: Path, groups: int, group_size: int, uniform: bool = True) -> dict:
    rep = json.loads((out / REPORT_NAME).read_text())
    assert rep["num_groups"] == groups and rep["num_images"] == groups * group_size
    assert rep["class_names"] == NAMES and set(rep["recognition"]) == set(NAMES)
    # every group has one pure sample at each end: 2 per group over the 10 classes
    assert sum(r["n"] for r in rep["recognition"].values()) == 2 * groups
    for r in rep["recognition"].values():
        assert 0 <= r["generated"] <= 1 and 0 <= r["real_test"] <= 1
    assert len(rep["pairs"]) == num_pairs(10)
    if uniform:
        assert rep["lambda"] == [0.0, 0.5, 1.0] and len(rep["soft_a_mean"]) == 3
    shares = [p["monotone_share"] for p in rep["pairs"].values()]
    assert rep["monotone_share"] == pytest.approx(np.mean(shares))  # one group per pair here
    assert 0 <= rep["flipped_share"] <= 1
    for d in rep["diversity"].values():
        assert d["pixel_generated"] >= 0 and d["feature_real"] >= 0
    spread = rep["spread"]
    for key in ("annotated", "judge"):
        part = spread[key]
        assert part["n"] == rep["num_images"] and sum(part["histogram"]["counts"]) == part["n"]
        assert [r["rank"] for r in part["per_rank"]] == list(range(group_size))
        assert sum(r["n"] for r in part["per_rank"]) == part["n"] and 0 <= part["ks"] <= 1
    for name in PICTURES:
        assert (out / name).stat().st_size > 1000, name
    return rep


def test_model_report_is_consistent(model_report):
    rep = _check_report(model_report, num_pairs(10), 3)
    # the samples are not annotated: soft[a] = λ on the uniform grid 0, 0.5, 1
    spread = rep["spread"]
    assert spread["annotation"] == "lambda" and spread["lambda_schedule"] == "uniform"
    assert spread["annotated"]["ks"] == pytest.approx(ks_uniform([0.0, 0.5, 1.0]))
    assert [r["lam_mean"] for r in spread["annotated"]["per_rank"]] == [0.0, 0.5, 1.0]
    assert rep["source"]["kind"] == "model" and rep["generation"]["steps"] == 2
    assert json.loads((model_report / OWNER_FILE).read_text())["kind"] == "inspect"
    # the monotone share is recomputed from the generated images and the judge's soft labels
    syn = load_synthetic_tensors(model_report / "samples")
    assert len(syn.lam) == rep["num_images"]


def test_dataset_report_equals_model_report(model_report, inputs, tmp_path):
    _, judge = inputs
    out = tmp_path / "again"
    args = ["inspect", str(model_report / "samples"), "--judge", f"classifier:{judge}"]
    assert main([*args, "--out", str(out), "--real", "digits", "--device", "cpu"]) == 0
    rep = _check_report(out, num_pairs(10), 3)
    first = json.loads((model_report / REPORT_NAME).read_text())
    assert rep["source"]["kind"] == "dataset" and "generation" not in rep
    for key in ("recognition", "monotone_share", "flipped_share", "pairs", "diversity"):
        assert rep[key] == first[key], key


def test_measures():
    gid = np.array([0, 0, 0, 1, 1, 1])
    lam = np.array([0.0, 0.5, 1.0, 1.0, 0.5, 0.0])
    soft = np.array([0.1, 0.08, 0.9, 0.2, 0.5, 0.4])  # group 1: 0.4, 0.5, 0.2 along λ
    assert monotone_groups(gid, lam, soft, 0.05) == {0: True, 1: False}  # 0.02 drop tolerated
    assert monotone_groups(gid, lam, soft, 0.0) == {0: False, 1: False}
    assert monotone_groups(gid, lam, soft, 0.35) == {0: True, 1: True}
    # λ = 0.5 is left out; flipped: group 1 at λ=1 (0.2 < 0.5) -> 1 of 4
    assert flipped_share(lam, soft) == pytest.approx(0.25)
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert mean_pairwise_distance(x) == pytest.approx(5.0)
    assert mean_pairwise_distance(x[:1]) is None


def test_bad_inputs_exit_2_with_one_line(inputs, model_report, tmp_path, capsys):
    gen, judge = inputs
    j = f"classifier:{judge}"
    user = tmp_path / "notes"
    user.mkdir()
    (user / "mine.txt").write_text("keep")
    fresh = tmp_path / "fresh"
    cases = [
        (["inspect", str(tmp_path), "--judge", j], "neither a generator"),
        (["inspect", str(gen), "--judge", "clip:x"], "--judge"),
        (
            ["inspect", f"{model_report / 'samples'}:nope", "--judge", j, "--out", str(fresh)],
            "no annotation named 'nope'; available: lambda",
        ),
        (["inspect", str(gen), "--judge", j, "--out", str(model_report)], "--overwrite"),
        (["inspect", str(gen), "--judge", j, "--out", str(gen)], "holds the output of csm fit"),
        (["inspect", str(gen), "--judge", j, "--out", str(user)], "not written by csm"),
    ]
    for args, needle in cases:
        assert main([*args, *OPTS]) == 2, args
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "error" in ln]
        assert len(lines) == 1 and needle in lines[0], (args, err)
    assert (model_report / REPORT_NAME).is_file()  # a refused run leaves the report alone
    assert [p.name for p in user.iterdir()] == ["mine.txt"] and not fresh.exists()


def test_spread_compares_a_uniform_and_a_targeted_dataset(model_report, inputs, tmp_path):
    from csm.generation.generate import GenerateConfig, generate
    from tests.generation.test_schedule import s_curve, toy_annotate

    gen, judge = inputs
    pilot = tmp_path / "uniform"
    shutil.copytree(model_report / "samples", pilot)
    toy_annotate(pilot, s_curve)  # a known S-shaped λ -> soft[a] curve
    targeted = tmp_path / "targeted"
    opts = dict(groups=num_pairs(10), group_size=3, steps=2, device="cpu")
    generate(GenerateConfig(model=str(gen), out=str(targeted), **opts,
                            lambda_schedule="targeted", pilot=str(pilot)))  # fmt: skip
    toy_annotate(targeted, s_curve, name="toy", active=False)
    reps = {}
    for name, spec in (("uniform", str(pilot)), ("targeted", f"{targeted}:toy")):
        out = tmp_path / f"rep-{name}"
        args = ["inspect", spec, "--judge", f"classifier:{judge}", "--out", str(out)]
        assert main([*args, "--real", "digits", "--device", "cpu"]) == 0
        reps[name] = _check_report(out, num_pairs(10), 3, uniform=name == "uniform")
    uni, tgt = reps["uniform"]["spread"], reps["targeted"]["spread"]
    assert (uni["annotation"], tgt["annotation"]) == ("toy", "toy")
    assert (uni["lambda_schedule"], tgt["lambda_schedule"]) == ("uniform", "targeted")
    assert tgt["pilot"] == "uniform:toy" and uni["pilot"] is None
    assert tgt["annotated"]["ks"] < uni["annotated"]["ks"] - 0.1, (uni, tgt)
    middle = [s["annotated"]["per_rank"][1]["mean"] for s in (uni, tgt)]
    assert abs(middle[1] - 0.5) < abs(middle[0] - 0.5)  # the middle image is now near 0.5


def test_a_dataset_without_pure_images_is_inspected(model_report, inputs, tmp_path):
    """--lambda-ends targeted leaves no λ = 0 or 1: recognition and diversity have no samples
    (None), the spread is still reported."""
    from csm.generation.generate import GenerateConfig, generate
    from tests.generation.test_schedule import s_curve, toy_annotate

    gen, judge = inputs
    pilot = tmp_path / "uniform"
    shutil.copytree(model_report / "samples", pilot)
    toy_annotate(pilot, s_curve)
    free = tmp_path / "free"
    opts = dict(groups=num_pairs(10), group_size=3, steps=2, device="cpu", pilot=str(pilot))
    generate(GenerateConfig(model=str(gen), out=str(free), **opts,
                            lambda_schedule="targeted", lambda_ends="targeted"))  # fmt: skip
    toy_annotate(free, s_curve)
    out = tmp_path / "rep"
    args = ["inspect", str(free), "--judge", f"classifier:{judge}", "--out", str(out)]
    assert main([*args, "--real", "digits", "--device", "cpu"]) == 0
    rep = json.loads((out / REPORT_NAME).read_text())
    assert all(r["n"] == 0 and r["generated"] is None for r in rep["recognition"].values())
    assert rep["recognition_mean"] is None
    assert all(d["pixel_generated"] is None for d in rep["diversity"].values())
    assert rep["spread"]["annotated"]["n"] == rep["num_images"] == 3 * num_pairs(10)
