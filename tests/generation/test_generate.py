"""Tests for ``csm generate``: tiny random pipeline in tmp_path, kill + resume, multi-process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from csm.cli import main
from csm.errors import CSMError
from csm.generation.generate import GenerateConfig, generate
from csm.generation.mixing import lambdas, pair_for_group, seed_for_group
from csm.generation.pipeline import CSMMixingPipeline, build_unet
from csm.synthetic import (
    SyntheticWriter,
    load_synthetic,
    load_synthetic_tensors,
    read_manifest,
)
from csm.utils import KILL_ENV
from tests.helpers import launch_two

NAMES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    unet = build_unet(3, image_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = DDIMScheduler(num_train_timesteps=50, beta_schedule="linear", clip_sample=False)
    out = tmp_path_factory.mktemp("model") / "pipe"
    CSMMixingPipeline(unet=unet, scheduler=sched, class_names=NAMES).save_pretrained(out)
    return out


def _cfg(model_dir: Path, out: Path, **kw) -> GenerateConfig:
    base = dict(
        model=str(model_dir),
        out=str(out),
        groups=7,
        group_size=4,
        steps=2,
        groups_per_shard=2,
        batch_size=6,
        device="cpu",
    )
    base.update(kw)
    return GenerateConfig(**base)


def _rows(out: Path) -> tuple[dict, np.ndarray]:
    ds = load_synthetic(out)
    cols = {c: ds[c] for c in ds.column_names if c != "image"}
    return cols, load_synthetic_tensors(out).images.numpy()


@pytest.fixture(scope="module")
def clean_run(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "syn"
    generate(_cfg(model_dir, out))
    return out


def test_generate_rows_follow_the_schedule(clean_run, model_dir):
    cols, pixels = _rows(clean_run)
    g = 4
    assert len(cols["lam"]) == 7 * g and pixels.shape == (28, 1, 8, 8)
    assert cols["group_id"] == list(np.repeat(np.arange(7), g))
    assert np.allclose(cols["lam"], np.tile(lambdas(g), 7))
    for k in range(7):
        assert (cols["class_a"][k * g], cols["class_b"][k * g]) == pair_for_group(k, 3)
        assert cols["seed"][k * g] == seed_for_group(k, 0)
    # images of a group differ (the condition moves) but equal a direct pipeline call
    pipe = CSMMixingPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    a, b = pair_for_group(3, 3)
    gens = [torch.Generator().manual_seed(seed_for_group(3, 0)) for _ in range(g)]
    ref = pipe(
        class_a=[a] * g, class_b=[b] * g, lam=lambdas(g), generator=gens, num_inference_steps=2
    ).images
    ref = (ref.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels[3 * g : 4 * g], ref)
    info = read_manifest(clean_run)["params"]["info"]
    assert info["steps"] == 2 and info["group_size"] == 4 and info["scheduler"] == "ddim"
    assert "steps" in (clean_run / "README.md").read_text()


def test_kill_and_resume_equals_clean_run(clean_run, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "syn"
    calls = {"n": 0}
    original = SyntheticWriter.write_shard

    def dying(self, index, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            # die while the third shard is being written: leave a partial temp file behind
            (self.shard_path(index).parent / f".{self.shard_path(index).name}.x.tmp").write_bytes(
                b"partial"
            )
            raise KeyboardInterrupt
        return original(self, index, *args, **kw)

    monkeypatch.setattr(SyntheticWriter, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        generate(_cfg(model_dir, out))
    monkeypatch.setattr(SyntheticWriter, "write_shard", original)
    with pytest.raises(CSMError, match="not finished"):
        load_synthetic(out)
    with pytest.raises(CSMError, match="--resume"):
        generate(_cfg(model_dir, out))
    with pytest.raises(CSMError, match="different parameters"):
        generate(_cfg(model_dir, out, resume=True, steps=3))
    generate(_cfg(model_dir, out, resume=True))
    a_cols, a_pix = _rows(clean_run)
    b_cols, b_pix = _rows(out)
    assert a_cols.keys() == b_cols.keys()
    for c in a_cols:
        np.testing.assert_array_equal(np.asarray(a_cols[c]), np.asarray(b_cols[c]))
    assert np.array_equal(a_pix, b_pix)


def test_cli_generate_and_bad_input(model_dir, tmp_path, capsys):
    out = tmp_path / "syn"
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--out",
                str(out),
                "--groups",
                "2",
                "--group-size",
                "3",
                "--steps",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert len(load_synthetic(out)) == 6
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "x"),
                "--groups",
                "2",
                "--group-size",
                "1",
            ]
        )
        == 2
    )
    assert "group_size=1" in capsys.readouterr().err
    assert (
        main(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "y"), "--groups", "2"])
        == 2
    )
    assert "model_index.json" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    missing = str(tmp_path / "no-such-model")
    args = ["generate", "--model", missing, "--out", str(tmp_path / "y"), "--groups", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such folder" in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()


def _files(out: Path) -> dict[str, bytes]:
    """Every file of a finished dataset (the run's own ``.csm/`` config aside), as bytes."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".csm" not in p.relative_to(out).parts
    }


@pytest.mark.skipif(sys.platform != "linux", reason="accelerate launch multi-process on linux")
def test_two_processes_split_the_shards_and_equal_one(clean_run, model_dir, tmp_path):
    out = tmp_path / "syn"
    proc = launch_two(
        "-m", "csm", "generate", "--model", str(model_dir), "--out", str(out), "--groups", "7",
        "--group-size", "4", "--steps", "2", "--groups-per-shard", "2", "--batch-size", "6",
        "--device", "cpu", env={"CSM_LOG_ALL_RANKS": "1"},
    )  # fmt: skip
    # both processes ran, each on its own shards (i mod 2)
    assert "process 0 of 2: shards [0, 2] of 4" in proc.stderr
    assert "process 1 of 2: shards [1, 3] of 4" in proc.stderr
    assert read_manifest(out)["finalized"] is True
    a_cols, a_pix = _rows(clean_run)
    b_cols, b_pix = _rows(out)
    for c in a_cols:
        np.testing.assert_array_equal(np.asarray(a_cols[c]), np.asarray(b_cols[c]))
    assert np.array_equal(a_pix, b_pix)
    ref, got = _files(clean_run), _files(out)
    assert ref.keys() == got.keys()
    assert [name for name in ref if ref[name] != got[name]] == []  # byte-identical dataset


def test_from_card_regenerates_the_dataset_bit_for_bit(model_dir, tmp_path, capsys):
    from csm.generation.card import generator_sha256

    first = tmp_path / "first"
    opts = dict(groups=3, group_size=3, steps=1, seed=5, groups_per_shard=2, batch_size=4)
    generate(_cfg(model_dir, first, guidance=1.5, license="mit", **opts))
    info = read_manifest(first)["params"]["info"]
    assert info["model"] == "pipe" and info["model_sha256"] == generator_sha256(model_dir)
    assert (info["license"], info["device"], info["guidance"]) == ("mit", "cpu", 1.5)
    assert str(model_dir) not in (first / "README.md").read_text()  # no local path on the card
    again = tmp_path / "again"
    args = ["generate", "--from-card", str(first), "--model", str(model_dir), "--out", str(again)]
    assert main([*args, "--device", "cpu"]) == 0  # every other option comes from the card
    ref, got = _files(first), _files(again)
    assert ref.keys() == got.keys() and len(ref) > 3
    assert [name for name in ref if ref[name] != got[name]] == []  # byte-identical dataset
    # a folder generator must be named, and it must be the card's (same sha256)
    with pytest.raises(CSMError, match="--model: missing.*'pipe'"):
        generate(GenerateConfig(from_card=str(first), out=str(tmp_path / "x")))
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    cfg_file = other / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(cfg_file.read_text() + "\n")
    with pytest.raises(CSMError, match="--model .*differs from the card's generator 'pipe'"):
        generate(GenerateConfig(from_card=str(first), model=str(other), out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------ targeted λ
def _fake_dataset(out: Path, names: list[str], side: int = 8, groups: int = 3, **info) -> Path:
    """A finished synthetic dataset of blank images (uniform grid, G = 4), annotated by a toy."""
    from tests.generation.test_schedule import s_curve, toy_annotate

    w = SyntheticWriter(out, names, {"group_size": 4, "model": "pipe", **info}, 2, groups)
    for i in w.pending_shards():
        groups = list(w.shard_groups(i))
        pairs = [pair_for_group(g, len(names)) for g in groups]
        a = np.repeat([p[0] for p in pairs], 4)
        b = np.repeat([p[1] for p in pairs], 4)
        pixels = np.zeros((len(a), 1, side, side), dtype=np.uint8)
        w.write_shard(i, pixels, a, b, lambdas(4) * len(groups), np.repeat(groups, 4), a)
    w.finalize()
    toy_annotate(out, s_curve)
    return out


@pytest.fixture(scope="module")
def pilot(clean_run, tmp_path_factory) -> Path:
    """The uniform clean run, annotated by two toy annotators of known curves."""
    from tests.generation.test_schedule import s_curve, toy_annotate

    out = tmp_path_factory.mktemp("pilot") / "pilot"
    shutil.copytree(clean_run, out)
    toy_annotate(out, s_curve, name="toy")  # the active one
    toy_annotate(out, lambda lam: lam**3, name="cube", active=False)
    return out


@pytest.fixture(scope="module")
def targeted_run(model_dir, pilot, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("targeted") / "syn"
    generate(_cfg(model_dir, out, lambda_schedule="targeted", pilot=str(pilot)))
    return out


def test_targeted_rows_follow_the_fitted_schedule_and_the_card_records_it(
    targeted_run, clean_run, pilot, model_dir, tmp_path
):
    from huggingface_hub import DatasetCard

    from csm.generation.schedule import confidence_spread
    from tests.generation.test_schedule import s_curve, toy_annotate

    info = read_manifest(targeted_run)["params"]["info"]
    rec = info["lambda_schedule"]
    assert rec["mode"] == "targeted" and rec["fallback"] == {} and rec["group_size"] == 4
    assert rec["pilot"]["name"] == "pilot" and rec["pilot"]["annotation"] == "toy"
    assert rec["pilot"]["model_sha256"] == info["model_sha256"]
    cols, pixels = _rows(targeted_run)
    for k in range(7):
        a, b = pair_for_group(k, 3)
        lam = cols["lam"][4 * k : 4 * k + 4]
        np.testing.assert_allclose(lam, rec["pairs"][f"{a}-{b}"], atol=1e-7)
        assert lam[0] == 0.0 and lam[-1] == 1.0 and not np.allclose(lam, lambdas(4))
        assert cols["seed"][4 * k] == seed_for_group(k, 0)  # seeds and pairs as before
    # a group's images equal a direct pipeline call at the schedule's λ
    pipe = CSMMixingPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    a, b = pair_for_group(3, 3)
    gens = [torch.Generator().manual_seed(seed_for_group(3, 0)) for _ in range(4)]
    ref = pipe(
        class_a=[a] * 4, class_b=[b] * 4, lam=rec["pairs"][f"{a}-{b}"], generator=gens,
        num_inference_steps=2,
    ).images  # fmt: skip
    ref = (ref.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels[12:16], ref)
    # the card: a paragraph, and the whole record in the YAML csm block
    text = (targeted_run / "README.md").read_text()
    assert "λ schedule: targeted" in text and "`pilot`" in text and str(pilot) not in text
    card = DatasetCard.load(targeted_run / "README.md").data.to_dict()
    assert card["csm"]["generation"]["lambda_schedule"] == rec
    assert "lambda_schedule" not in read_manifest(clean_run)["params"]["info"]
    assert "λ schedule" not in (clean_run / "README.md").read_text()
    # the toy annotator (the pilot's curve) spreads the targeted images' confidences more evenly
    annotated = tmp_path / "annotated"
    shutil.copytree(targeted_run, annotated)
    toy_annotate(annotated, s_curve, name="toy", active=False)
    spread = {}
    for name, ds in (("uniform", pilot), ("targeted", annotated)):
        syn = load_synthetic_tensors(f"{ds}:toy")
        soft = syn.soft_labels[torch.arange(len(syn.lam)), syn.class_a].numpy()
        spread[name] = confidence_spread(soft, syn.group_id.numpy(), syn.lam.numpy())
    assert spread["targeted"]["ks"] < spread["uniform"]["ks"] - 0.05, spread
    assert spread["targeted"]["interior"]["ks"] < spread["uniform"]["interior"]["ks"]


def test_targeted_run_is_deterministic_resumable_and_rebuilt_from_its_card(
    targeted_run, model_dir, pilot, tmp_path
):
    ref = _files(targeted_run)
    cfg = dict(lambda_schedule="targeted", pilot=str(pilot))
    out = tmp_path / "killed"
    # kill -9 (os._exit, no cleanup) while the third shard is in its temporary file
    opts = {**vars(_cfg(model_dir, out, **cfg))}
    code = f"from csm.generation.generate import *; generate(GenerateConfig(**{opts!r}))"
    env = {**os.environ, KILL_ENV: "write:data-00002-of-00004.arrow"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert not (out / "train" / "data-00002-of-00004.arrow").exists()
    # the schedule is part of the run's identity: another pilot or schedule is refused
    with pytest.raises(CSMError, match=r"--pilot .*:cube: differs from the pilot of the run"):
        generate(
            _cfg(model_dir, out, resume=True, lambda_schedule="targeted", pilot=f"{pilot}:cube")
        )
    with pytest.raises(CSMError, match="--lambda-schedule uniform: the run being resumed"):
        generate(_cfg(model_dir, out, resume=True))
    generate(_cfg(model_dir, out, resume=True, **cfg))
    got = _files(out)
    assert ref.keys() == got.keys() and len(ref) > 3
    assert [k for k in ref if ref[k] != got[k]] == []  # byte-identical to the clean run
    fresh = tmp_path / "fresh"
    generate(_cfg(model_dir, fresh, **cfg))
    assert _files(fresh) == got  # deterministic
    # --from-card rebuilds it bit-for-bit from the card's record, without the pilot
    again = tmp_path / "again"
    args = ["generate", "--from-card", str(fresh), "--model", str(model_dir), "--out", str(again)]
    assert main([*args, "--device", "cpu"]) == 0
    assert _files(again) == got


def test_bad_pilot_is_one_line_before_any_write(model_dir, clean_run, pilot, tmp_path, capsys):
    other_classes = _fake_dataset(tmp_path / "abc", ["a", "b", "c"])
    other_shape = _fake_dataset(tmp_path / "small", NAMES, side=4)
    other_model = _fake_dataset(tmp_path / "other", NAMES, model_sha256="ab" * 32)
    out = tmp_path / "out"
    base = ["generate", "--model", str(model_dir), "--out", str(out), "--groups", "3"]
    targeted = [*base, "--lambda-schedule", "targeted", "--device", "cpu", "--pilot"]
    cases = [
        ([*targeted, str(tmp_path / "nope")], "no such folder"),
        ([*targeted, str(model_dir)], "not a csm synthetic dataset"),
        ([*targeted, str(clean_run)], "not annotated"),
        ([*targeted, f"{clean_run}:lambda"], "not annotated"),
        ([*targeted, f"{pilot}:nope"], "no annotation named 'nope'; available: lambda, cube, toy"),
        ([*targeted, str(other_classes)], "class names ['a', 'b', 'c'] differ"),
        ([*targeted, str(other_shape)], "images of shape (1, 4, 4)"),
        ([*targeted, str(other_model)], "not by this --model"),
        ([*base, "--lambda-schedule", "targeted"], "--pilot: missing"),
        ([*base, "--pilot", str(pilot)], "only used by --lambda-schedule targeted"),
        ([*base, "--lambda-schedule", "steep"], "--lambda-schedule 'steep'"),
        (
            [*base, "--from-card", str(clean_run), "--pilot", str(pilot)],
            "not used with --from-card",
        ),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("csm: error")]
        assert len(lines) == 1 and needle in lines[0], (needle, err)
        assert "Traceback" not in err and not out.exists(), args
    # a pair missing from the pilot: an error with --pilot-strict, else uniform with a warning
    few = _fake_dataset(tmp_path / "few", NAMES, groups=2)  # pairs (0, 1) and (0, 2) only
    args = [*targeted, str(few), "--group-size", "4", "--steps", "1"]
    assert main([*args, "--pilot-strict"]) == 2
    err = capsys.readouterr().err
    assert "pair one|two (1-2) cannot be targeted" in err and not out.exists()
    assert main(args) == 0
    assert "pair one|two (1-2) keeps the uniform λ grid" in capsys.readouterr().err
    rec = read_manifest(out)["params"]["info"]["lambda_schedule"]
    assert list(rec["fallback"]) == ["1-2"] and rec["pairs"]["1-2"] == lambdas(4)
    np.testing.assert_allclose(load_synthetic_tensors(out).lam[8:12], lambdas(4))  # pair (1, 2)


@pytest.mark.skipif(sys.platform != "linux", reason="accelerate launch multi-process on linux")
def test_two_processes_targeted_equal_one(targeted_run, model_dir, pilot, tmp_path):
    out = tmp_path / "syn"
    launch_two(
        "-m", "csm", "generate", "--model", str(model_dir), "--out", str(out), "--groups", "7",
        "--group-size", "4", "--steps", "2", "--groups-per-shard", "2", "--batch-size", "6",
        "--device", "cpu", "--lambda-schedule", "targeted", "--pilot", str(pilot),
    )  # fmt: skip
    assert _files(out) == _files(targeted_run)  # each process fits the same schedule


def test_targeted_ends_move_every_member_and_are_refused_without_a_fit(model_dir, pilot, tmp_path):
    out = tmp_path / "free"
    generate(
        _cfg(model_dir, out, lambda_schedule="targeted", pilot=str(pilot), lambda_ends="targeted")
    )
    rec = read_manifest(out)["params"]["info"]["lambda_schedule"]
    assert rec["ends"] == "targeted"
    cols, _ = _rows(out)
    lam = np.asarray(cols["lam"])
    assert lam.min() > 0.0 and lam.max() < 1.0  # no pure end left
    np.testing.assert_allclose(lam[:4], rec["pairs"]["{}-{}".format(*pair_for_group(0, 3))])
    with pytest.raises(CSMError, match="--lambda-ends targeted: only used when fitting"):
        generate(_cfg(model_dir, tmp_path / "u", lambda_ends="targeted"))
    assert not (tmp_path / "u").exists()
