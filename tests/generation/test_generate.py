"""Tests for ``csm generate``: tiny random pipeline in tmp_path, kill + resume, multi-process."""

from __future__ import annotations

import shutil
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
