"""The trainer: CSM batches, schedules, every method on digits, resume, run dirs, bad input, DDP."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csm.cli import main
from csm.config import resolve_config
from csm.errors import CSMError
from csm.synthetic import SyntheticTensors, SyntheticWriter
from csm.training.config import TrainConfig
from csm.training.methods import METHODS
from csm.training.optim import lr_at
from csm.training.runs import load_run, real_data_for
from csm.training.sampler import SyntheticSampler, check_synthetic_matches
from csm.training.trainer import train
from tests.helpers import launch_two

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared CPU
    yield
    torch.set_num_threads(n)


def tiny(out: Path, **overrides) -> TrainConfig:
    """digits at 8x8 with an 8-channel CNN: one epoch is a handful of steps."""
    values = {
        "dataset": "digits",
        "image_size": 8,
        "model": "cnn",
        "model_options": ["width=8"],
        "epochs": 1,
        "batch_size": 256,
        "optimizer": "adamw",
        "lr": 0.01,
        "out": str(out),
    }
    values.update(overrides)
    return resolve_config(TrainConfig, overrides=values)


def read_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def write_synthetic(
    out: Path,
    class_names: list[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    group_size: int = 4,
    info: dict | None = None,
) -> Path:
    """A synthetic dataset in csm's format: one group per class pair, pixel blends of class means.

    (A stand-in for diffusion samples; the trainer only cares about groups, λ and soft labels.)
    """
    k = len(class_names)
    means = torch.stack([images[labels == c].float().mean(0) for c in range(k)])
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    lams = np.linspace(0.0, 1.0, group_size)
    imgs, ca, cb, lam, gid, seed = [], [], [], [], [], []
    for g, (a, b) in enumerate(pairs):
        for value in lams:
            imgs.append((value * means[a] + (1 - value) * means[b]).round().to(torch.uint8))
            ca.append(a), cb.append(b), lam.append(float(value)), gid.append(g), seed.append(g)
    params = {"group_size": group_size, **(info or {})}
    writer = SyntheticWriter(out, class_names, params, len(pairs), len(pairs))
    writer.write_shard(0, torch.stack(imgs), ca, cb, lam, gid, seed)
    writer.finalize()
    return out


@pytest.fixture(scope="module")
def digits8():
    return real_data_for(tiny(Path("unused")))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory, digits8):
    out = tmp_path_factory.mktemp("syn") / "digits-syn"
    return write_synthetic(out, digits8.class_names, digits8.train.images, digits8.train.labels)


# ------------------------------------------------------------------------------ CSM batches
def _groups() -> tuple[torch.Tensor, ...]:
    """3 classes, groups (0,1), (0,2), (1,2) of 4 members, rows shuffled."""
    pairs = [(0, 1), (0, 2), (1, 2)]
    gid = torch.arange(3).repeat_interleave(4)
    lam = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).repeat(3)
    a = torch.tensor([p[0] for p in pairs]).repeat_interleave(4)
    b = torch.tensor([p[1] for p in pairs]).repeat_interleave(4)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    return gid[order], lam[order], a[order], b[order]


def test_sampler_takes_the_endpoint_dominated_by_the_real_class_and_one_interior_member():
    gid, lam, a, b = _groups()
    sampler = SyntheticSampler(gid, lam, a, b, num_classes=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2] * 20)
    idx = sampler.sample(labels, torch.Generator().manual_seed(1))
    assert idx.shape == (2 * labels.numel(),) and sampler.per_image == 2
    ends, inner = idx[: labels.numel()], idx[labels.numel() :]
    for y, e, i in zip(labels.tolist(), ends.tolist(), inner.tolist()):
        assert y in (int(a[e]), int(b[e]))  # a group that contains y
        pure_y = 1.0 if int(a[e]) == y else 0.0
        assert float(lam[e]) == pure_y  # the endpoint dominated by y
        assert int(gid[i]) == int(gid[e]) and 0.0 < float(lam[i]) < 1.0  # same group, interior
    # both groups of class 0 and both interior members get drawn
    assert {int(gid[e]) for e, y in zip(ends, labels) if y == 0} == {0, 1}
    assert {round(float(lam[i]), 4) for i in inner} == {0.3333, 0.6667}


def test_sampler_counts_are_parameters_and_draws_replay():
    gid, lam, a, b = _groups()
    sampler = SyntheticSampler(gid, lam, a, b, 3, groups=2, endpoint=False, interior=2)
    labels = torch.tensor([0, 1, 2])
    idx = sampler.sample(labels, torch.Generator().manual_seed(4))
    assert sampler.per_image == 4 and idx.shape == (12,)
    for draw in range(2):
        block = idx[draw * 6 : (draw + 1) * 6].view(2, 3)  # [member, image]
        assert (block[0] != block[1]).all()  # distinct interior members
        assert (gid[block[0]] == gid[block[1]]).all()
    again = sampler.sample(labels, torch.Generator().manual_seed(4))
    assert torch.equal(idx, again)


def test_sampler_errors_name_the_problem():
    gid, lam, a, b = _groups()
    keep = gid != 2  # drop group (1, 2): still every class paired
    SyntheticSampler(gid[keep], lam[keep], a[keep], b[keep], 3)
    with pytest.raises(CSMError, match=r"classes \[3\] appear in no synthetic group"):
        SyntheticSampler(gid, lam, a, b, 4)
    with pytest.raises(CSMError, match="--syn-interior 3"):
        SyntheticSampler(gid, lam, a, b, 3, interior=3)


def test_synthetic_classes_must_match_the_real_ones():
    syn = SyntheticTensors(
        torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
        torch.zeros(2, 2),
        torch.zeros(2),
        torch.ones(2),
        torch.zeros(2),
        torch.zeros(2),
        ["cat", "dog"],
    )
    with pytest.raises(CSMError, match="--synthetic syn: classes"):
        check_synthetic_matches(syn, ["0", "1"], (1, 8, 8), "syn")
    with pytest.raises(CSMError, match="--image-size"):
        check_synthetic_matches(syn, ["cat", "dog"], (1, 16, 16), "syn")


# ------------------------------------------------------------------------------ schedules
def test_paper_multistep_and_cosine_schedules():
    cfg = resolve_config(TrainConfig, overrides={"epochs": 200, "lr": 0.1})
    assert lr_at(cfg, 79, 390, 391) == pytest.approx(0.1)
    assert lr_at(cfg, 80, 0, 391) == pytest.approx(0.01)
    assert lr_at(cfg, 119, 0, 391) == pytest.approx(0.01)
    assert lr_at(cfg, 120, 0, 391) == pytest.approx(0.001)
    cos = resolve_config(TrainConfig, overrides={"epochs": 10, "lr": 0.2, "schedule": "cosine"})
    assert lr_at(cos, 0, 0, 5) == pytest.approx(0.2)
    assert lr_at(cos, 5, 0, 5) == pytest.approx(0.1)
    assert lr_at(cos, 7, 2, 5) == pytest.approx(0.1 * (1 + math.cos(math.pi * 7.4 / 10)))
    warm = resolve_config(TrainConfig, overrides={"epochs": 10, "warmup_epochs": 2})
    assert lr_at(warm, 0, 0, 4) == pytest.approx(0.1 * 0.25 / 2)


# ------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_an_epoch_on_digits(method, tmp_path, synthetic_dir):
    extra = {"synthetic": str(synthetic_dir)} if method == "csm" else {}
    if method == "refcal":
        extra["epochs"] = 2  # one SupCon epoch, one head epoch
    if method == "clue":
        extra["model_options"] = ["width=8", "dropout=0.2"]  # MC-dropout path
    run = train(tiny(tmp_path / method, method=method, **extra))
    rows = read_rows(run)
    assert len(rows) == (2 if method == "refcal" else 1)
    for row in rows:
        assert math.isfinite(float(row["train/loss"]))
    assert math.isfinite(float(rows[-1]["val/cls/NLL"]))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["method"] == method
    loaded = load_run(run)
    assert loaded.class_names == [str(i) for i in range(10)]
    assert not loaded.model.training
    with torch.no_grad():
        assert torch.isfinite(loaded.model(torch.rand(2, 1, 8, 8))).all()


def test_refcal_freezes_the_encoder_in_stage_two(tmp_path):
    run = train(tiny(tmp_path / "r", method="refcal", epochs=2, checkpoint_every=1))
    rows = read_rows(run)
    assert [r["stage"] for r in rows] == ["1", "2"]
    assert rows[0].get("val/cls/Acc", "") == ""  # no classifier yet in stage 1
    assert json.loads((run / "run.json").read_text())["best_epoch"] == 2


def test_csm_batches_use_synthetic_images(tmp_path, synthetic_dir):
    run = train(
        tiny(
            tmp_path / "c",
            method="csm",
            synthetic=str(synthetic_dir),
            csm_loss="kl",
            joint_forward=True,
        )
    )
    info = json.loads((run / "run.json").read_text())
    assert info["num_synthetic"] == 45 * 4
    assert info["method_params"]["csm_loss"] == "kl"
    assert info["method_params"]["joint_forward"] is True


def test_synthetic_is_ignored_by_methods_that_do_not_use_it(tmp_path, synthetic_dir, caplog):
    plain = train(tiny(tmp_path / "plain", epochs=1))
    with caplog.at_level("WARNING"):
        given = train(tiny(tmp_path / "given", epochs=1, synthetic=str(synthetic_dir)))
    assert "ignored, method ce does not train on synthetic data" in caplog.text
    assert json.loads((given / "run.json").read_text())["num_synthetic"] == 0
    # the synthetic sampler never touches the shared random streams: identical weights
    assert (plain / "model.safetensors").read_bytes() == (given / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------ run dirs
def test_run_directory_layout_and_load_run(tmp_path):
    run = train(tiny(tmp_path / "run", epochs=2, select_metric="cls/NLL"))
    names = {p.name for p in run.iterdir()}
    assert {
        "config.yaml",
        "class_names.json",
        "model.json",
        "model.safetensors",
        "metrics.csv",
        "run.json",
        "checkpoints",
    } <= names
    rows = read_rows(run)
    info = json.loads((run / "run.json").read_text())
    nll = [float(r["val/cls/NLL"]) for r in rows]
    assert info["best_epoch"] == 1 + int(np.argmin(nll))  # selected on val, never test
    assert info["val"]["val/cls/NLL"] == pytest.approx(min(nll))
    loaded = load_run(run)
    assert loaded.config.epochs == 2 and loaded.config.select_metric == "cls/NLL"
    real = real_data_for(loaded.config)
    with torch.no_grad():
        logits = loaded.model(real.val.images.float() / 255)
    from csm.calibration.metrics import compute_all

    assert compute_all(logits, real.val.labels)["cls/NLL"] == pytest.approx(min(nll), rel=1e-5)


@pytest.mark.parametrize("name", ["sc/Risk@80", "sc/Risk@80Cov"])  # ours, torch-uncertainty's
def test_select_metric_risk_keeps_the_epoch_with_the_lowest_risk(tmp_path, name):
    """sc/Risk@80 is lower-is-better (METRIC_INFO): selection must keep the minimum."""
    cfg = tiny(tmp_path / "risk", epochs=3, batch_size=128, schedule="constant", lr=0.03)
    run = train(dataclasses.replace(cfg, select_metric=name))
    risks = [float(r["val/sc/Risk@80"]) for r in read_rows(run)]
    assert len(set(risks)) > 1  # the epochs differ, so the choice is a real one
    info = json.loads((run / "run.json").read_text())
    assert info["best_epoch"] == 1 + int(np.argmin(risks))
    assert info["val"]["val/sc/Risk@80"] == min(risks)


def test_select_metric_last_keeps_the_final_epoch(tmp_path):
    cfg = tiny(tmp_path / "last", epochs=3, batch_size=128, schedule="constant", lr=0.03)
    run = train(dataclasses.replace(cfg, select_metric="last"))
    rows = read_rows(run)
    info = json.loads((run / "run.json").read_text())
    assert info["best_epoch"] == 3 == len(rows)
    assert info["val"]["val/cls/Acc"] == float(rows[-1]["val/cls/Acc"])


def test_val_every_validates_every_nth_and_the_last_epoch(tmp_path):
    """--val-every 2 over 5 epochs: val metrics at epochs 2, 4 and 5 only, selection among them;
    the trained weights are those of a run validating every epoch (validation draws nothing)."""
    cfg = tiny(tmp_path / "every", epochs=5, batch_size=128, schedule="constant", lr=0.03)
    run = train(dataclasses.replace(cfg, val_every=2))
    rows = read_rows(run)
    assert [r["epoch"] for r in rows if r.get("val/cls/Acc")] == ["2", "4", "5"]
    info = json.loads((run / "run.json").read_text())
    assert info["best_epoch"] in (2, 4, 5)
    full = train(dataclasses.replace(cfg, out=str(tmp_path / "full"), select_metric="last"))
    last = train(
        dataclasses.replace(cfg, out=str(tmp_path / "lastonly"), select_metric="last", val_every=5)
    )
    assert read_rows(last)[-1]["val/cls/Acc"] == read_rows(full)[-1]["val/cls/Acc"]
    assert [r["epoch"] for r in read_rows(last) if r.get("val/cls/Acc")] == ["5"]
    with pytest.raises(CSMError, match="--val-every 0: out of range; give at least 1"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "bad"), val_every=0))


def test_checkpoint_is_accelerate_state_plus_loop_and_method_state(tmp_path):
    run = train(tiny(tmp_path / "c", method="crl", epochs=1))
    names = {p.name for p in (run / "checkpoints" / "last").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "loop.json", "method_0.safetensors"} <= names
    crl = load_file(str(run / "checkpoints" / "last" / "method_0.safetensors"))
    assert float(crl["seen"].sum()) == json.loads((run / "run.json").read_text())["num_train"]


def test_load_run_errors_name_the_folder(tmp_path):
    with pytest.raises(CSMError, match="run directory not found"):
        load_run(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("method: ce\n")
    with pytest.raises(CSMError, match="half: class_names.json missing"):
        load_run(tmp_path / "half")


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    common = {"method": "crl", "epochs": 3, "batch_size": 128}  # crl keeps per-sample state
    full = train(tiny(tmp_path / "full", **common))
    # 11 steps per epoch: stop 4 steps into epoch 2; resume replays epoch 2 from its start
    part = train(tiny(tmp_path / "part", max_steps=15, **common))
    assert json.loads((part / "run.json").read_text())["status"] == "stopped"
    assert [r["partial"] for r in read_rows(part)] == ["", "True"]
    resumed = train(tiny(tmp_path / "part", resume=True, **common))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(full)]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(resumed)]
    assert json.loads((resumed / "run.json").read_text())["status"] == "complete"


def test_refuses_a_different_run_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    train(tiny(out))
    with pytest.raises(CSMError, match="already holds a different run.*--overwrite"):
        train(tiny(out, method="ls"))
    with pytest.raises(CSMError, match="already holds the same run"):
        train(tiny(out))
    with pytest.raises(CSMError, match="--resume with different settings \\(method\\)"):
        train(tiny(out, method="ls", resume=True))
    # one identity list (runs.NOT_IDENTITY): epochs change the schedule, max_steps does not
    with pytest.raises(CSMError, match="--resume with different settings \\(epochs\\)"):
        train(tiny(out, epochs=2, resume=True))
    train(tiny(out, resume=True, max_steps=1, eval_batch_size=64))  # nothing left to train
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    train(tiny(out, method="ls", overwrite=True))
    assert load_run(out).config.method == "ls"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CSMError, match="not written by csm"):
        train(tiny(tmp_path / "other"))
    with pytest.raises(CSMError, match="not written by csm"):
        train(tiny(tmp_path / "other", overwrite=True))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"  # never deleted


# ------------------------------------------------------------------------------ bad input / CLI
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "dropout"], "--method 'dropout': unknown method"),
        (["--model", "vgg11"], "--model 'vgg11': unknown architecture"),
        (["--method", "focal", "--gamma", "-1"], "gamma=-1.0: out of range"),
        (["--method", "ls", "--alpha", "1.5"], "alpha=1.5: out of range"),
        (["--method", "csm"], "--method csm: needs a synthetic dataset"),
        (["--lr", "-0.1"], "--lr -0.1: out of range"),
        (["--optimizer", "lbfgs"], "--optimizer lbfgs"),
        (["--select-metric", "test/acc"], "--select-metric test/acc: not a validation metric"),
        (["--resume", "--overwrite"], "--resume and --overwrite: contradictory"),
        (["--gamma", "3"], "--gamma 3.0: not an option of method ce; its options are: none"),
        (["--method", "focal", "--margin", "2"], "--margin 2.0: not an option of method focal"),
    ],
)
def test_cli_bad_input_is_one_clear_line(flags, message, tmp_path, capsys):
    code = main(["train", "--dataset", "digits", "--out", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("csm: error: ") and "\n" not in err
    assert message in err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_cli_synthetic_with_other_classes(tmp_path, digits8, capsys):
    names = [f"c{i}" for i in range(10)]
    syn = write_synthetic(tmp_path / "syn", names, digits8.train.images, digits8.train.labels)
    code = main(
        [
            "train",
            "--dataset",
            "digits",
            "--image-size",
            "8",
            "--method",
            "csm",
            "--synthetic",
            str(syn),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    assert "differ from the real dataset" in capsys.readouterr().err


def test_cli_refuses_synthetic_from_a_generator_of_another_split(tmp_path, digits8, capsys):
    """A generator fitted on split seed 1 saw test images of split 0: refused before any write,
    unless --allow-split-mismatch; a --train-per-class run refuses a generator of the whole
    split (it saw more real images than the run)."""
    from csm.data.real import split_record

    imgs, labels = digits8.train.images, digits8.train.labels
    other = {"train_split": split_record("digits", 1)}
    syn = write_synthetic(tmp_path / "syn", digits8.class_names, imgs, labels, info=other)
    flags = ["train", "--dataset", "digits", "--image-size", "8", "--method", "csm"]
    flags += ["--model-options", "width=8", "--epochs", "1", "--synthetic", str(syn)]
    assert main([*flags, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"--synthetic {syn}: its generator was trained on another split of digits" in err
    assert "seed 1 (this run: 0)" in err and "--allow-split-mismatch" in err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "allowed"
    assert main([*flags, "--out", str(out), "--allow-split-mismatch"]) == 0
    assert (out / "model.safetensors").is_file()
    whole = {"train_split": split_record("digits", 0)}
    syn0 = write_synthetic(tmp_path / "syn0", digits8.class_names, imgs, labels, info=whole)
    flags[-1] = str(syn0)
    assert main([*flags, "--train-per-class", "5", "--out", str(tmp_path / "sub")]) == 2
    assert "train_per_class None (this run: 5)" in capsys.readouterr().err
    assert main([*flags, "--out", str(tmp_path / "same")]) == 0


def test_cli_trains_and_prints_a_summary(tmp_path, capsys):
    code = main(
        [
            "train",
            "--dataset",
            "digits",
            "--image-size",
            "8",
            "--model-options",
            "width=8",
            "--epochs",
            "1",
            "--batch-size",
            "256",
            "--optimizer",
            "adamw",
            "--lr",
            "0.01",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    assert "best epoch 1 on val" in capsys.readouterr().out


# ------------------------------------------------------------------------------ accelerate
# The README's multi-process commands are exactly these (plus --out).
TINY_ARGS = [
    "--dataset",
    "digits",
    "--image-size",
    "8",
    "--model-options",
    "width=8",
    "norm=group",
    "--epochs",
    "2",
    "--batch-size",
    "200",
    "--optimizer",
    "adamw",
    "--lr",
    "0.01",
]
TWO_PROCESS_RUNS = """
# What `accelerate launch --multi_gpu --num_processes 2 -m csm train ARGS` runs (csm.cli.main),
# three times in ONE launch (each launch costs seconds): uninterrupted, stopped, resumed.
import json, os, shutil, sys
from pathlib import Path
from csm.cli import main
args, base = sys.argv[1:], Path(os.environ["CSM_TEST_OUT"])
assert main(["train", *args, "--out", str(base / "two")]) == 0
part = ["train", *args, "--out", str(base / "part")]
assert main([*part, "--max-steps", "10"]) == 0  # 7 steps per epoch: stops inside epoch 2
if os.environ["RANK"] == "0":
    shutil.copy(base / "part" / "run.json", base / "stopped-run.json")
assert main([*part, "--resume"]) == 0
"""


def _launch(out: Path, *args: str) -> None:
    """``accelerate launch --multi_gpu --num_processes 2 ARGS`` (2 gloo processes on CPU)."""
    launch_two(*args, env={"HF_HUB_OFFLINE": "1", "CSM_TEST_OUT": str(out)})


def test_two_processes_train_match_one_process_and_resume(tmp_path):
    """Two real processes: world_size 2 is recorded and both ranks wrote their checkpoint
    files; val metrics match one process (GroupNorm: the update does not depend on the split);
    a 2-process run stopped by --max-steps and resumed equals the uninterrupted one."""
    if torch.cuda.is_available():
        pytest.skip("the CPU/gloo equivalence test runs on CPU-only machines")
    two, part = tmp_path / "two", tmp_path / "part"
    script = tmp_path / "two_process_runs.py"
    script.write_text(TWO_PROCESS_RUNS)
    _launch(tmp_path, str(script), *TINY_ARGS)
    assert main(["train", *TINY_ARGS, "--out", str(tmp_path / "one")]) == 0
    info = json.loads((two / "run.json").read_text())
    one = json.loads((tmp_path / "one" / "run.json").read_text())
    assert info["world_size"] == 2 and one["world_size"] == 1 and info["status"] == "complete"
    ckpt = {p.name for p in (two / "checkpoints" / "last").iterdir()}
    assert {"method_0.safetensors", "method_1.safetensors", "random_states_1.pkl"} <= ckpt
    for key, value in one["val"].items():
        assert info["val"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(two / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # stopped, then resumed: equals the uninterrupted 2-process run
    stopped = json.loads((tmp_path / "stopped-run.json").read_text())
    assert stopped["status"] == "stopped" and stopped["world_size"] == 2 and stopped["steps"] == 10
    resumed = json.loads((part / "run.json").read_text())
    assert resumed["status"] == "complete" and resumed["world_size"] == 2
    assert (part / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(two)]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(part)]
