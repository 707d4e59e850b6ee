"""Lazy synthetic images in training: the same batches as the eager tensor, on 1 or 2 processes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csm.cli import main
from csm.errors import CSMError
from csm.synthetic import SyntheticImages
from csm.synthetic import reader as reader_module
from csm.training.config import TrainConfig, validate_config
from csm.training.runs import identity_diffs, real_data_for
from csm.training.sampler import load_synthetic_for, take_images
from csm.training.sharding import synthetic_rows
from csm.training.trainer import train
from tests.helpers import launch_two
from tests.training.test_trainer import read_rows, tiny, write_synthetic


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits8():
    return real_data_for(tiny(Path("unused")))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory, digits8) -> Path:
    out = tmp_path_factory.mktemp("syn") / "digits-syn"
    return write_synthetic(out, digits8.class_names, digits8.train.images, digits8.train.labels)


def test_each_rank_decodes_only_its_rows_and_gets_the_eager_bytes(
    digits8, synthetic_dir, monkeypatch
):
    cfg = tiny(Path("unused"), method="csm", synthetic=str(synthetic_dir))
    eager, sampler = load_synthetic_for(cfg, digits8, lazy=False)
    lazy, lazy_sampler = load_synthetic_for(cfg, digits8, lazy=True)
    assert isinstance(lazy.images, SyntheticImages) and isinstance(eager.images, torch.Tensor)
    labels = digits8.train.labels[:37]
    sidx = sampler.sample(labels, torch.Generator().manual_seed(5))
    again = lazy_sampler.sample(labels, torch.Generator().manual_seed(5))
    assert torch.equal(sidx, again)  # same metadata: the same draws
    whole = eager.images[sidx]
    calls = []
    real = reader_module.png_to_array
    monkeypatch.setattr(reader_module, "png_to_array", lambda b: calls.append(1) or real(b))
    for world in (1, 2):
        parts = []
        for rank in range(world):
            rows = synthetic_rows(int(sidx.numel()), 37, rank, world)
            calls.clear()
            got = take_images(lazy.images, sidx[rows], torch.device("cpu"))
            assert len(calls) == rows.numel()  # this rank's share, nothing else
            assert torch.equal(got, take_images(eager.images, sidx[rows], torch.device("cpu")))
            parts.append((rows, got))
        rebuilt = torch.empty_like(whole)
        for rows, got in parts:
            rebuilt[rows] = got
        assert torch.equal(rebuilt, whole), world


def test_lazy_and_eager_runs_train_the_same_weights(tmp_path, synthetic_dir):
    runs = {}
    for reader in ("lazy", "eager"):
        cfg = tiny(tmp_path / reader, method="csm", synthetic=str(synthetic_dir), epochs=2)
        runs[reader] = train(dataclasses.replace(cfg, syn_reader=reader))
    lazy, eager = runs["lazy"], runs["eager"]
    assert (lazy / "model.safetensors").read_bytes() == (eager / "model.safetensors").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(lazy)]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(eager)]
    assert json.loads((lazy / "run.json").read_text())["num_synthetic"] == 45 * 4


def test_syn_reader_is_validated_and_not_part_of_a_runs_identity():
    assert TrainConfig().syn_reader == "lazy"
    validate_config(TrainConfig(syn_reader="eager"))
    with pytest.raises(CSMError, match="--syn-reader mmap: out of range; use one of lazy, eager"):
        validate_config(TrainConfig(syn_reader="mmap"))
    assert identity_diffs(TrainConfig(), TrainConfig(syn_reader="eager")) == []


TWO_ARGS = [
    "--dataset", "digits", "--image-size", "8", "--model-options", "width=8", "norm=group",
    "--epochs", "1", "--batch-size", "200", "--optimizer", "adamw", "--lr", "0.01",
    "--method", "csm",
]  # fmt: skip
BOTH_READERS = """
# `csm train ARGS --syn-reader R` under `accelerate launch --multi_gpu --num_processes 2`, for
# both readers in ONE launch (each launch costs seconds).
import sys
from csm.cli import main
out, args = sys.argv[1], sys.argv[2:]
for reader in ("lazy", "eager"):
    assert main(["train", *args, "--syn-reader", reader, "--out", f"{out}/two-{reader}"]) == 0
"""


def test_two_lazy_processes_train_what_two_eager_processes_and_one_process_train(
    tmp_path, synthetic_dir
):
    """Two gloo processes, each decoding only its share of the synthetic rows, train exactly
    what two processes with every image decoded train, and what one process trains (GroupNorm:
    the update does not depend on the split; the reduction order differs in the last bits)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU/gloo equivalence test runs on CPU-only machines")
    script = tmp_path / "both_readers.py"
    script.write_text(BOTH_READERS)
    args = [*TWO_ARGS, "--synthetic", str(synthetic_dir)]
    launch_two(str(script), str(tmp_path), *args, env={"HF_HUB_OFFLINE": "1"})
    lazy, eager, one = tmp_path / "two-lazy", tmp_path / "two-eager", tmp_path / "one"
    assert (lazy / "model.safetensors").read_bytes() == (eager / "model.safetensors").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(lazy)]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(eager)]
    assert json.loads((lazy / "run.json").read_text())["world_size"] == 2
    assert main(["train", *args, "--out", str(one)]) == 0
    a, b = load_file(str(one / "model.safetensors")), load_file(str(lazy / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    rows_one, rows_two = read_rows(one), read_rows(lazy)
    for key in ("train/loss", "val/cls/NLL"):
        assert np.isclose(float(rows_one[0][key]), float(rows_two[0][key]), rtol=1e-4), key
