"""Benchmark: trains through csm.training.trainer, evaluates, and resumes where a killed run
stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import csm.training.trainer
from csm.errors import CSMError
from csm.evaluation.leaderboard import read_results
from csm.workflows.benchmark import (
    BenchmarkConfig,
    benchmark,
    run_dir_for,
    select_methods,
    train_config_for,
)


def _cfg(out: Path, **kw) -> BenchmarkConfig:
    base = dict(
        dataset="digits",
        methods=["ce", "ls"],
        seeds=1,
        out=str(out),
        epochs=1,
        # one epoch of two steps: every run ends with a checkpoint, as a real one does
        train_options=["batch_size=1024", "model_options=width=4 norm=none"],
        calibrators=["ts"],
        corruptions=["none"],
        plots=False,
    )
    base.update(kw)
    return BenchmarkConfig(**base)


REAL_TRAIN = csm.training.trainer.train


class Killed(Exception):
    """Stands in for the benchmark process being killed mid-run."""


class Spy:
    """Wraps csm.training.trainer.train: records each call's (method, seed, resume, overwrite)."""

    def __init__(self, fail_on: tuple[str, int] | None = None) -> None:
        self.calls: list[tuple[str, int, bool, bool]] = []
        self.fail_on = fail_on

    def __call__(self, cfg):
        self.calls.append((cfg.method, cfg.seed, cfg.resume, cfg.overwrite))
        if self.fail_on == (cfg.method, cfg.seed):
            raise Killed  # the benchmark is killed while training this run
        return REAL_TRAIN(cfg)


def test_benchmark_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    cfg = _cfg(out)
    spy = Spy(fail_on=("ls", 0))
    monkeypatch.setattr(csm.training.trainer, "train", spy)
    with pytest.raises(Killed):
        benchmark(cfg)
    manifest = json.loads((out / "benchmark.json").read_text())
    assert [(e["method"], e["status"]) for e in manifest["runs"]] == [
        ("ce", "complete"),
        ("ls", "new"),
    ]
    assert not (out / "results.csv").exists()

    # restart: ce is reused, only ls is trained
    spy2 = Spy()
    monkeypatch.setattr(csm.training.trainer, "train", spy2)
    text = benchmark(cfg)
    assert spy2.calls == [("ls", 0, False, False)]
    assert "trained 1, reused 1" in text and "# Leaderboard" in text
    rows = read_results(out / "results.csv")
    assert {(r["method"], r["calibrator"]) for r in rows} == {
        ("ce", "none"),
        ("ce", "ts"),
        ("ls", "none"),
        ("ls", "ts"),
    }
    assert (out / "leaderboard.md").is_file() and (out / "config.yaml").is_file()
    run = run_dir_for(cfg, "ls", 0)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"

    # a run killed after its first checkpoint (no run.json yet) continues with --resume;
    # one killed before its first checkpoint (config.yaml only) is retrained (overwrite)
    (run / "run.json").unlink()
    broken = run_dir_for(cfg, "ce", 0)
    shutil.rmtree(broken / "checkpoints")
    (broken / "run.json").unlink()
    spy3 = Spy()
    monkeypatch.setattr(csm.training.trainer, "train", spy3)
    benchmark(cfg)
    assert sorted(spy3.calls) == [("ce", 0, False, True), ("ls", 0, True, False)]
    assert json.loads((broken / "run.json").read_text())["status"] == "complete"

    # a folder that is not a training run is never deleted: one clear error
    shutil.rmtree(broken)
    broken.mkdir()
    (broken / "notes.txt").write_text("mine")
    with pytest.raises(CSMError, match="holds files not written by csm"):
        benchmark(cfg)
    assert (broken / "notes.txt").is_file()


def test_finished_run_with_other_settings_is_an_error(tmp_path):
    out = tmp_path / "b"
    benchmark(_cfg(out, methods=["ce"]))
    with pytest.raises(CSMError, match=r"different settings \(epochs\)"):
        benchmark(_cfg(out, methods=["ce"], epochs=2))


def test_train_config_layers_and_fixed_fields(tmp_path):
    cfg = _cfg(tmp_path, train_options=["lr=0.05"], data_seed=4)
    t = train_config_for(cfg, "focal", 2)
    assert (t.method, t.seed, t.data_seed, t.lr, t.epochs) == ("focal", 2, 4, 0.05, 1)
    assert Path(t.out) == tmp_path / "runs" / "focal" / "seed2"
    with pytest.raises(CSMError, match="--train-options seed: set by the benchmark"):
        train_config_for(_cfg(tmp_path, train_options=["seed=3"]), "ce", 0)
    # only methods that train on synthetic data get (and record) --synthetic
    syn_cfg = _cfg(tmp_path, synthetic=str(tmp_path / "syn"))
    assert train_config_for(syn_cfg, "ce", 0).synthetic is None
    assert train_config_for(syn_cfg, "csm", 0).synthetic == str(tmp_path / "syn")
    # the model comes from --train-config unless --model is given
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet18\n")
    assert train_config_for(_cfg(tmp_path, train_config=str(recipe)), "ce", 0).model == "resnet18"
    assert (
        train_config_for(_cfg(tmp_path, model="cnn", train_config=str(recipe)), "ce", 0).model
        == "cnn"
    )
    # by default every seed draws its own split; a {data_seed} template gives each its dataset
    assert train_config_for(_cfg(tmp_path), "ce", 3).data_seed == 3
    per_seed = _cfg(tmp_path, synthetic=str(tmp_path / "syn{data_seed}") + ":s4")
    assert train_config_for(per_seed, "csm", 3).synthetic == str(tmp_path / "syn3") + ":s4"
    with pytest.raises(CSMError, match="expected key=value"):
        train_config_for(_cfg(tmp_path, train_options=["lr"]), "ce", 0)
    with pytest.raises(CSMError, match="unknown option 'nope'"):
        train_config_for(_cfg(tmp_path, train_options=["nope=1"]), "ce", 0)


def test_method_selection():
    from csm.training.methods import METHODS

    chosen = select_methods(BenchmarkConfig(methods=["all"]))
    assert "csm" not in chosen and "ce" in chosen  # no --synthetic: csm skipped
    assert select_methods(BenchmarkConfig(methods=["ce,ls", "focal"])) == ["ce", "ls", "focal"]
    assert chosen == [m for m in METHODS if not getattr(METHODS[m], "needs_synthetic", False)]
    with pytest.raises(CSMError, match="--methods csm: needs a synthetic dataset"):
        select_methods(BenchmarkConfig(methods=["ce", "csm"]))
    with pytest.raises(CSMError, match="--methods bogus: unknown"):
        select_methods(BenchmarkConfig(methods=["bogus"]))
    with pytest.raises(CSMError, match="--seeds 0"):
        benchmark(BenchmarkConfig(seeds=0))


def test_cli_benchmark(tmp_path, capsys):
    from csm.cli import main

    code = main(
        [
            "benchmark",
            "--dataset",
            "digits",
            "--methods",
            "ce",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "c"),
            "--epochs",
            "1",
            "--train-options",
            "max_steps=1",
            "model_options=width=4",
            "--calibrators",
            "ts",
            "--corruptions",
            "none",
        ]
    )
    assert code == 0
    assert "trained 1, reused 0" in capsys.readouterr().out
    assert (tmp_path / "c" / "reliability" / "ce.png").is_file()
    assert (tmp_path / "c" / "runs" / "ce" / "seed0" / "model.safetensors").is_file()
    code = main(["benchmark", "--methods", "csm", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("csm: error: --methods csm") and "\n" not in err


def test_one_synthetic_dataset_for_per_seed_splits_is_refused_before_any_write(tmp_path):
    out = tmp_path / "b"
    cfg = _cfg(out, methods=["csm"], seeds=2, synthetic=str(tmp_path / "syn"))
    with pytest.raises(CSMError, match="one dataset for every seed.*--data-seed 0"):
        benchmark(cfg)
    assert not out.exists()
    # a template whose datasets do not exist names the first missing one
    cfg = _cfg(out, methods=["csm"], seeds=2, synthetic=str(tmp_path / "syn{data_seed}"))
    with pytest.raises(CSMError, match=f"--synthetic {tmp_path / 'syn0'}"):
        benchmark(cfg)
    assert not out.exists()


def test_train_only_then_evaluate_reuses_the_runs(tmp_path):
    out = tmp_path / "b"
    summary = benchmark(_cfg(out, methods=["ce"], evaluate=False))
    assert summary.endswith("trained 1, reused 0 finished run(s); not evaluated (--evaluate false)")
    run = json.loads((out / "runs" / "ce" / "seed0" / "run.json").read_text())
    assert run["status"] == "complete" and "val/cal/ECE" in run["val"]  # what a choice reads
    assert not (out / "results.csv").exists() and not (out / "evaluation.json").exists()
    report = benchmark(_cfg(out, methods=["ce"]))
    assert "trained 0, reused 1 finished run(s)" in report
    assert (out / "results.csv").is_file()
