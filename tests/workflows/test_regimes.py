"""eval/regimes.sh end to end at toy size: the issue-15 protocol on one split of digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from csm.data.real import load_real
from csm.evaluation.leaderboard import read_paired, read_results
from csm.training.sampler import synthetic_splits

REPO = Path(__file__).resolve().parents[2]
# the regimes.sh command of these tests
DIGITS_OVERCONFIDENT = ["bash", str(REPO / "eval" / "regimes.sh"), "digits", "overconfident"]


def offline_env() -> dict[str, str]:
    """The environment of a regimes.sh run: this Python's csm first on PATH, the Hub offline."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_regimes_script_runs_the_protocol_on_per_split_models(tmp_path: Path):
    out = tmp_path / "results" / "digits-overconfident"
    work = tmp_path / "work"
    env = {
        **offline_env(),
        "OUT": str(out),
        "WORK": str(work),
        "SEEDS": "1",
        "METHODS": "ce csm",
        "GEN_STEPS": "2",
        "NGROUPS": "45",
        "EPOCHS": "1",
        "SAMPLE_STEPS": "2",
        "CSM_LABEL": "pair-fit",
    }
    cmd = DIGITS_OVERCONFIDENT
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # the generator and the annotation encoder of split 0 saw exactly the runs' training images
    want = load_real("digits", seed=0, val_fraction=0.3, train_per_class=15).split_record()
    syn = work / "digits-overconfident" / "d0" / "syn"
    assert synthetic_splits(f"{syn}:pair-fit") == {"generator": want, "annotation encoder": want}
    rows = read_results(out / "results.csv")
    assert {r["method"] for r in rows} == {"ce", "csm"}
    assert {r["calibrator"] for r in rows} >= {"none", "ts"}
    assert any(r["condition"] != "clean" for r in rows)  # shifted test sets too
    paired = read_paired(out / "paired.csv")
    assert {(r["method"], r["reference"]) for r in paired} == {("csm", "ce")}
    run = json.loads((out / "runs" / "csm" / "seed0" / "run.json").read_text())
    assert run["num_synthetic"] == 45 * 8 and run["num_train"] == 150
    head = (out.parent / "headline.md").read_text()
    assert "## digits, overconfident regime (2 methods x 1 seeds" in head
    assert "Does CSM calibrate, and against whom:" in head
    assert (out.parent / "README.md").is_file() is False  # the repository README is untouched
    choose_then_rerun(cmd, env, out, work / "digits-overconfident")


def choose_then_rerun(cmd: list[str], env: dict[str, str], out: Path, work: Path) -> None:
    """STAGE=choose picks CSM's label mode on validation; CSM_LABEL=auto then benchmarks it."""
    env = {**env, "CSM_CHOICES": "s4 pair-fit"}
    auto = subprocess.run(cmd, cwd=REPO, env={**env, "CSM_LABEL": "auto"}, capture_output=True)
    assert auto.returncode == 2 and b"needs the choice on validation first" in auto.stderr
    choose = {**env, "STAGE": "choose", "CSM_LABEL": "auto"}
    done = subprocess.run(cmd, cwd=REPO, env=choose, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    choice = json.loads((work / "choice" / "choice.json").read_text())
    # pair-fit is answered by the regime's own CSM run, s4 by a train-only run (no test scores)
    assert not (work / "choice" / "csm-pair-fit").exists()
    s4 = work / "choice" / "csm-s4"
    assert not (s4 / "results.csv").exists()
    val = {
        "pair-fit": json.loads((out / "runs" / "csm" / "seed0" / "run.json").read_text()),
        "s4": json.loads((s4 / "runs" / "csm" / "seed0" / "run.json").read_text()),
    }
    ece = {k: v["val"]["val/cal/ECE"] for k, v in val.items()}
    assert choice["chosen"] == min(ece, key=ece.get)  # the lowest validation ECE, nothing else
    assert choice["candidates"]["s4"]["0"]["val/cal/ECE"] == ece["s4"]
    # one candidate left: s4 is chosen whatever the values, so the pair-fit runs must move out
    choose["CSM_CHOICES"] = env["CSM_CHOICES"] = "s4"
    done = subprocess.run(cmd, cwd=REPO, env=choose, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    choice = json.loads((work / "choice" / "choice.json").read_text())
    assert choice["chosen"] == "s4" and list(choice["candidates"]) == ["s4"]
    done = subprocess.run(
        cmd, cwd=REPO, env={**env, "CSM_LABEL": "auto"}, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = yaml.safe_load((out / "runs" / "csm" / "seed0" / "config.yaml").read_text())
    assert config["synthetic"].endswith(":" + choice["chosen"])
    assert json.loads((out / "csm_choice.json").read_text()) == choice
    kept = work / "choice" / "superseded" / "csm-pair-fit" / "runs" / "csm" / "seed0"
    assert json.loads((kept / "run.json").read_text()) == val["pair-fit"]  # kept, not deleted
    assert "the CSM runs of label mode pair-fit moved to" in done.stderr
    # the chosen mode's run of STAGE=choose is the benchmark's CSM run: copied, not trained again
    assert "the CSM runs of label mode s4 copied from" in done.stderr
    assert "trained 0, reused 2 finished run(s)" in done.stderr
    run = out / "runs" / "csm" / "seed0"
    assert (run / "model.safetensors").read_bytes() == (
        s4 / "runs" / "csm" / "seed0" / "model.safetensors"
    ).read_bytes()
    assert json.loads((run / "run.json").read_text()) == val["s4"]
    assert {r["method"] for r in read_results(out / "results.csv")} == {"ce", "csm"}


def test_fit_and_build_stages_make_only_the_named_splits(tmp_path: Path):
    work = tmp_path / "work"
    env = {**offline_env(), "WORK": str(work), "STAGE": "fit", "SPLITS": "1"}
    env |= {"GEN_STEPS": "2", "EPOCHS": "1"}
    cmd = DIGITS_OVERCONFIDENT
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fitted = work / "digits-overconfident"
    assert sorted(p.name for p in fitted.iterdir()) == ["d1"]
    assert (fitted / "d1" / "gen" / "model_index.json").is_file()
    assert (fitted / "d1" / "encoder-ce-seed100" / "model.safetensors").is_file()
    # the encoder was trained on split 1 (data seed 1), as the runs of seed 1 are
    config = yaml.safe_load((fitted / "d1" / "encoder-ce-seed100" / "config.yaml").read_text())
    assert (config["data_seed"], config["seed"]) == (1, 100)
    # STAGE=build adds split 1's synthetic data with the label of every candidate mode
    env |= {"STAGE": "build", "CSM_CHOICES": "s4 pair-fit", "NGROUPS": "45", "SAMPLE_STEPS": "2"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in fitted.iterdir()) == ["d1"]
    record = json.loads((fitted / "d1" / "syn" / "csm_synthetic.json").read_text())
    assert record["finalized"] and sorted(record["annotations"]) == ["pair-fit", "s4"]
    want = load_real("digits", seed=1, val_fraction=0.3, train_per_class=15).split_record()
    assert synthetic_splits(f"{fitted / 'd1' / 'syn'}:s4")["annotation encoder"] == want


def test_a_mistyped_stage_is_refused_before_any_work(tmp_path: Path):
    env = {**offline_env(), "WORK": str(tmp_path / "work"), "STAGE": "biuld"}
    cmd = DIGITS_OVERCONFIDENT
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "STAGE=biuld; use fit, build, choose" in done.stderr
    assert not (tmp_path / "work").exists()
