"""Never lose a user's data (issue 18): output ownership, validation before any write, kills.

Each destroyed-output case of the issue is a regression test that hashes the folder before and
after; the kill tests inject the kill at a named moment (a patched write that raises), then
resume and compare byte-for-byte with a clean run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csm.errors import CSMError
from csm.utils import KILL_ENV, OWNER_FILE, check_output, claim_output, output_owner
from tests.helpers import make_run
from tests.training.test_trainer import tiny

NAMES = [str(i) for i in range(10)]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def temp_files(root: Path) -> list[Path]:
    """Temporary files of atomic writes under ``root`` (none may survive a resume)."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


def killed_at(point: str, code: str) -> None:
    """Run ``code`` in a fresh Python that dies with ``os._exit(137)`` at kill point ``point``
    (:func:`csm.utils.kill_point`: no cleanup runs, as under ``kill -9``)."""
    env = {**os.environ, KILL_ENV: point}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 137, f"not killed at {point}: rc {proc.returncode}\n{proc.stderr}"


def test_kill_point_matches_the_nth_hit(tmp_path):
    code = (
        "from pathlib import Path; from csm.utils import atomic_write_text as w; "
        f"[w(Path({str(tmp_path)!r}) / f'f{{i}}.txt', 'x') for i in range(4)]"
    )
    killed_at("write:f*.txt#3", code)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "f0.txt",
        "f1.txt",
    ]
    assert len(temp_files(tmp_path)) == 1  # the third write: complete, never renamed


def test_claim_marks_and_refuses_foreign_and_other_kinds(tmp_path):
    mine = claim_output(tmp_path / "a", "evaluation")
    assert json.loads((mine / OWNER_FILE).read_text())["kind"] == "evaluation"
    assert check_output(mine, "evaluation") is False  # only the marker: still empty
    (mine / "results.csv").write_text("x")
    assert check_output(mine, "evaluation") is True
    with pytest.raises(CSMError, match="holds the output of csm evaluate"):
        check_output(mine, "run")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    before = tree_hashes(user)
    for kind in ("run", "generator", "synthetic", "evaluation", "benchmark", "demo"):
        with pytest.raises(CSMError, match="not written by csm"):
            claim_output(user, kind, overwrite=True)
    assert tree_hashes(user) == before
    (tmp_path / "f").write_text("")
    with pytest.raises(CSMError, match="is a file"):
        check_output(tmp_path / "f", "run")
    with pytest.raises(CSMError, match="contradictory"):
        check_output(tmp_path / "new", "run", resume=True, overwrite=True)


def test_folders_written_before_markers_are_recognised_by_their_files(tmp_path):
    from csm.utils import output_owner

    bench = tmp_path / "bench"  # a benchmark also holds its evaluation's evaluation.json
    bench.mkdir()
    for name in ("benchmark.json", "evaluation.json", "results.csv"):
        (bench / name).write_text("{}")
    assert output_owner(bench) == "benchmark" and check_output(bench, "benchmark") is True
    with pytest.raises(CSMError, match="holds the output of csm benchmark"):
        check_output(bench, "evaluation")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "evaluation.json").write_text("{}")
    assert output_owner(tmp_path / "ev") == "evaluation"


def test_overwrite_keeps_marker_and_cleans_temp_files(tmp_path):
    out = claim_output(tmp_path / "r", "run")
    (out / "model.json").write_text("{}")
    (out / ".config.yaml.abcd1234.tmp.yaml").write_text("half")
    claim_output(out, "run", resume=True)
    assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE, "model.json"]
    claim_output(out, "run", overwrite=True)
    assert [p.name for p in out.iterdir()] == [OWNER_FILE]
    assert output_owner(out) == "run"


def test_fit_diffusion_never_touches_a_run_or_user_folder(tmp_path):
    from csm.generation.fit import FitDiffusionConfig, fit_diffusion

    run = make_run(tmp_path / "run", NAMES)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"state")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for out, overwrite in ((run, False), (run, True), (user, True)):
        before = tree_hashes(out)
        cfg = FitDiffusionConfig(dataset="digits", preset="tiny", out=str(out), overwrite=overwrite)
        with pytest.raises(CSMError, match="csm train|not written by csm"):
            fit_diffusion(cfg)
        assert tree_hashes(out) == before


def test_train_overwrite_validates_synthetic_before_deleting(tmp_path):
    from csm.training.trainer import train

    run = make_run(tmp_path / "run", NAMES, cfg=tiny(tmp_path / "run"))
    before = tree_hashes(run)
    bad = tmp_path / "not-a-dataset"
    bad.mkdir()
    for spec in (str(bad), str(tmp_path / "missing")):
        cfg = tiny(run, method="csm", synthetic=spec, overwrite=True)
        with pytest.raises(CSMError, match="synthetic"):
            train(cfg)
        assert tree_hashes(run) == before
    with pytest.raises(CSMError):
        train(tiny(run, dataset=str(tmp_path / "missing"), overwrite=True))
    assert tree_hashes(run) == before


def test_evaluate_refuses_its_run_and_finished_results(tmp_path):
    from csm.evaluation.evaluate import EvaluateConfig, check_out

    run = make_run(tmp_path / "run", NAMES)
    before = tree_hashes(run)
    with pytest.raises(CSMError, match="run directory"):
        check_out(EvaluateConfig(runs=[str(run)], out=str(run)))
    with pytest.raises(CSMError, match="csm train"):
        check_out(EvaluateConfig(runs=[], out=str(run)))
    assert tree_hashes(run) == before
    ev = claim_output(tmp_path / "ev", "evaluation")
    (ev / "evaluation.json").write_text("{}")
    with pytest.raises(CSMError, match="--overwrite"):
        check_out(EvaluateConfig(runs=[str(run)], out=str(ev)))
    check_out(EvaluateConfig(runs=[str(run)], out=str(ev), overwrite=True))


def test_generate_refuses_non_finite_guidance_and_file_out(tmp_path):
    from csm.generation.generate import GenerateConfig, generate

    (tmp_path / "f").write_text("")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    for kwargs, match in (
        ({"guidance": float("nan")}, "finite"),
        ({"guidance": float("inf")}, "finite"),
        ({"out": str(tmp_path / "f")}, "is a file"),
    ):
        values = {"model": str(model), "out": str(tmp_path / "syn"), "groups": 1} | kwargs
        with pytest.raises(CSMError, match=match):
            generate(GenerateConfig(**values))
    assert not (tmp_path / "syn").exists()


def test_kill_during_first_config_write_then_resume_equals_clean_run(tmp_path, monkeypatch):
    import csm.training.runs as runs
    from csm.training.trainer import train

    clean = train(tiny(tmp_path / "clean"))
    out = tmp_path / "killed"

    def killed(*args, **kwargs):
        (out / ".config.yaml.killedxx.tmp.yaml").write_text("half")  # what a kill leaves
        raise KeyboardInterrupt("kill -9 while writing config.yaml")

    monkeypatch.setattr(runs, "save_config", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(out))
    monkeypatch.undo()
    assert output_owner(out) == "run" and not (out / "config.yaml").exists()
    train(tiny(out, resume=True))  # neither --resume nor --overwrite is refused
    assert not list(out.rglob("*.tmp*"))
    assert (out / "model.safetensors").read_bytes() == (clean / "model.safetensors").read_bytes()
    assert (out / "class_names.json").read_bytes() == (clean / "class_names.json").read_bytes()
    assert (out / "model.json").read_bytes() == (clean / "model.json").read_bytes()


def test_failed_first_epoch_leaves_nothing_behind(tmp_path):
    from csm.training.trainer import train

    out = tmp_path / "diverged"
    with pytest.raises(CSMError, match="diverged"):
        train(tiny(out, lr=1e30, grad_clip=0.0))
    assert not out.exists()
    train(tiny(out))  # a retry with another lr is not refused
    assert (out / "run.json").is_file()


def test_reader_rejects_same_size_label_tampering(tmp_path):
    import pyarrow as pa

    from csm.synthetic.storage import file_sha256, read_verified_table, write_table_atomic

    path = tmp_path / "t.arrow"
    write_table_atomic(pa.table({"x": [1.0, 2.0]}), path)
    record = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    assert read_verified_table(path, record).column("x").to_pylist() == [1.0, 2.0]
    data = bytearray(path.read_bytes())
    data[len(data) - 16] ^= 0xFF  # a byte of the values, same file size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == record["bytes"]
    with pytest.raises(CSMError, match="differs from what was written"):
        read_verified_table(path, record)


# they record the command line (--resume) or wall-clock time (metrics.csv's time_s, loop.json)
RESULT_SKIP = ("config.yaml", "generate_config.yaml", "metrics.csv", "loop.json")


def result_hashes(root: Path) -> dict[str, str]:
    """:func:`tree_hashes` of a result, without the files that record options or timings."""
    return {k: v for k, v in tree_hashes(root).items() if Path(k).name not in RESULT_SKIP}


def test_os_exit_during_first_config_write_then_resume(tmp_path):
    from csm.training.trainer import train

    clean = train(tiny(tmp_path / "clean"))
    out = tmp_path / "killed"
    setup = "from tests.training.test_trainer import tiny; from csm.training.trainer import train"
    killed_at("write:config.yaml", f"{setup}; train(tiny({str(out)!r}))")
    assert temp_files(out) and not (out / "config.yaml").exists()
    train(tiny(out, resume=True))
    assert not temp_files(out) and result_hashes(out) == result_hashes(clean)


def tiny_pipeline(tmp_path: Path) -> Path:
    """A 3-class 8-px CSM mixing pipeline saved under ``tmp_path/pipe``."""
    import torch
    from diffusers import DDIMScheduler

    from csm.generation.pipeline import CSMMixingPipeline, build_unet

    torch.manual_seed(0)
    unet = build_unet(3, image_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    sched = DDIMScheduler(num_train_timesteps=50, beta_schedule="linear", clip_sample=False)
    model = tmp_path / "pipe"
    CSMMixingPipeline(unet=unet, scheduler=sched, class_names=["a", "b", "c"]).save_pretrained(
        model
    )
    return model


def test_os_exit_during_a_shard_write_then_resume(tmp_path):
    from csm.generation.generate import GenerateConfig, generate

    model = tiny_pipeline(tmp_path)
    opts = dict(model=str(model), groups=3, group_size=2, steps=1, groups_per_shard=1)
    opts |= dict(device="cpu")
    generate(GenerateConfig(out=str(tmp_path / "clean"), **opts))
    out = tmp_path / "killed"
    code = (
        "from csm.generation.generate import GenerateConfig, generate; "
        f"generate(GenerateConfig(out={str(out)!r}, **{opts!r}))"
    )
    killed_at("write:data-00001-of-00003.arrow", code)
    assert temp_files(out) and not (out / "train" / "data-00001-of-00003.arrow").exists()
    generate(GenerateConfig(out=str(out), resume=True, **opts))
    assert not temp_files(out) and result_hashes(out) == result_hashes(tmp_path / "clean")


def test_uncached_hub_model_offline_is_one_short_line(tmp_path, capsys):
    from csm.cli import main

    out = tmp_path / "syn"
    args = ["generate", "--model", "someone/not-a-model", "--out", str(out), "--groups", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("csm: error: someone/not-a-model: no such folder, and not in the")
    assert "\n" not in err and len(err) < 300 and "Couldn't connect" not in err
    assert not out.exists()


HOLD = """
import sys, time
from csm.utils import claim_output, output_locks
out = sys.argv[1]
with output_locks():
    claim_output(out, sys.argv[2])
    print("held", flush=True)
    time.sleep(300)
"""


def hold_lock(out: Path, kind: str) -> subprocess.Popen:
    """A process that owns ``out`` as ``kind`` and holds its lock, as a writing csm command."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), kind], cwd=root, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_stops_before_it_touches_the_first_ones_files(tmp_path):
    model = tiny_pipeline(tmp_path)
    out = tmp_path / "syn"
    first = hold_lock(out, "synthetic")  # a csm generate writing `out`, mid-shard
    partial = out / ".data-00000-of-00003.arrow.abcd1234.tmp.arrow"
    partial.write_text("the first writer's shard, half written")
    before = tree_hashes(out)
    cmd = [sys.executable, "-m", "csm", "generate", "--model", str(model), "--out", str(out)]
    cmd += ["--groups", "3", "--group-size", "2", "--steps", "1", "--groups-per-shard", "1"]
    cmd += ["--device", "cpu", "--resume"]
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        first.kill()  # as kill -9: the kernel drops its lock
        first.wait()
    assert second.returncode == 2
    assert "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"csm: error: --out {out}: another csm process is writing this folder (csm generate "
        "cannot write it now); wait for that process to end, or stop it, then run the command again"
    )
    assert tree_hashes(out) == before  # its temporary file was not deleted
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # no stale lock
    assert done.returncode == 0, done.stderr
    assert not partial.exists() and (out / "csm_synthetic.json").is_file()


def test_output_locks_are_reentrant_released_at_the_end_and_off_outside(tmp_path):
    from csm.utils import output_locks

    free = tmp_path / "free"
    claim_output(free, "run")  # outside output_locks (a notebook call): no lock is kept
    hold_lock_or_fail(free, expect_held=True).kill()
    out = tmp_path / "run"
    with output_locks():
        claim_output(out, "run")
        claim_output(out, "run", resume=True)  # the same process again: no error
        with pytest.raises(subprocess.TimeoutExpired):  # another process cannot take it
            hold_lock_or_fail(out)
    hold_lock_or_fail(out, expect_held=True).kill()  # released when the block ended


def hold_lock_or_fail(out: Path, expect_held: bool = False) -> subprocess.Popen:
    """``hold_lock``, bounded: a process refused the lock exits at once with its error."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), "run"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if line != "held":
        err = proc.stderr.read()
        proc.wait()
        assert "another csm process is writing this folder" in err
        raise subprocess.TimeoutExpired(proc.args, 0)  # refused, as the caller expects
    assert expect_held
    return proc


def test_cleaning_skips_the_folders_another_process_writes(tmp_path):
    from csm.utils import clean_temp_files, output_locks

    bench = claim_output(tmp_path / "bench", "benchmark")
    run = bench / "runs" / "ls" / "seed0"
    worker = hold_lock(run, "run")  # a second benchmark worker, training this run
    theirs = run / ".model.safetensors.abcd1234.tmp.safetensors"
    theirs.write_text("their checkpoint, half written")
    ours = bench / ".results.csv.abcd1234.tmp.csv"
    ours.write_text("an interrupted write of this folder")
    try:
        with output_locks():
            claim_output(bench, "benchmark")  # its folder is shared by the workers, not locked
        assert not ours.exists() and theirs.exists()
    finally:
        worker.kill()
        worker.wait()
    assert clean_temp_files(bench) == [theirs]  # once its writer is gone, it is debris


def test_benchmark_workers_share_their_folder_and_keep_each_others_writes(tmp_path):
    from csm.utils import lock_output, output_locks

    bench = tmp_path / "bench"
    worker = hold_lock(bench, "benchmark")  # a first worker of `csm benchmark --out bench`
    theirs = bench / ".results.csv.abcd1234.tmp.csv"
    theirs.write_text("the first worker's results table, half written")
    try:
        with output_locks():
            claim_output(bench, "benchmark")  # a second worker joins: shared, nothing deleted
            assert theirs.exists()
        with output_locks(), pytest.raises(CSMError, match="another csm process is writing"):
            lock_output(bench, "csm evaluate")  # an exclusive writer is still refused
    finally:
        worker.kill()
        worker.wait()
    with output_locks():
        claim_output(bench, "benchmark")  # alone now: the first worker's write is debris
    assert not theirs.exists()
