"""Kill ``csm`` at random and targeted moments, resume, and compare with a clean run (issue 18).

Every case runs a real ``python -m csm`` process and ends it with SIGKILL after a random (seeded)
delay or with ``os._exit(137)`` at a named kill point (``CSM_KILL_AT``, see
:func:`csm.utils.kill_point`), then resumes it (``--resume`` for generate and train, the same
command for annotate and benchmark) and checks that the result is byte-identical to a clean run
written to the same path, and that no temporary file is left. Files that record the options
(``config.yaml``: ``--resume``) or wall-clock time (``metrics.csv``, ``loop.json``) are left out
of the comparison; everything else (weights, checkpoints with accelerate's RNG states, shards,
label files, caches, cards, results) must match byte for byte. Usage (about 5 minutes on 2
cores)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python eval/kill_resume.py [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csm.utils import KILL_ENV  # noqa: E402

logger = logging.getLogger("kill_resume")
SKIP = ("config.yaml", "generate_config.yaml", "annotate_config.yaml", "metrics.csv", "loop.json")
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every result file under ``root`` (not the ones in :data:`SKIP`)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in SKIP
    }


def temp_files(root: Path) -> list[Path]:
    """Temporary files of atomic writes left under ``root``."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


def csm(args: list[str], kill_at: str | None = None, delay: float | None = None) -> int:
    """Run ``python -m csm ARGS``; killed at ``kill_at`` or with SIGKILL after ``delay`` s."""
    env = {**os.environ, **ENV, **({KILL_ENV: kill_at} if kill_at else {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "csm", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=delay if delay is not None else 600)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL: what kill -9 does
        _, err = proc.communicate()
    if proc.returncode not in (0, -9, 137):
        raise RuntimeError(f"csm {' '.join(args)} failed (rc {proc.returncode}): {err[-2000:]}")
    return proc.returncode


def make_model(path: Path) -> None:
    """A tiny random class-conditional pipeline on digits' class names (8x8)."""
    import torch
    from diffusers import DDIMScheduler

    from csm.generation.pipeline import CSMMixingPipeline, build_unet

    torch.manual_seed(0)
    unet = build_unet(
        10, image_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4
    )
    sched = DDIMScheduler(num_train_timesteps=50, beta_schedule="linear", clip_sample=False)
    names = [str(i) for i in range(10)]
    CSMMixingPipeline(unet=unet, scheduler=sched, class_names=names).save_pretrained(path)


def plans(w: Path) -> dict[str, dict]:
    """Per command: its arguments, the resume arguments, the input it needs and kill points."""
    train = ["train", "--dataset", "digits", "--image-size", "8", "--model", "cnn"]
    train += ["--model-options", "width=8", "--epochs", "2", "--batch-size", "256"]
    train += ["--checkpoint-every", "3"]
    gen = ["generate", "--model", str(w / "model"), "--groups", "8", "--group-size", "2"]
    gen += ["--steps", "2", "--groups-per-shard", "2", "--device", "cpu"]
    ann = ["annotate", str(w / "annotate" / "out"), "--real", "digits"]
    ann += ["--encoder", f"classifier:{w / 'encoder'}", "--device", "cpu"]
    bench = ["benchmark", "--dataset", "digits", "--methods", "ce", "ls", "--seeds", "1"]
    bench += ["--epochs", "1", "--train-options", "batch_size=1024", "model_options=width=4"]
    bench += ["--calibrators", "ts", "--corruptions", "none", "--plots", "false"]
    return {
        "generate": {
            "args": [*gen, "--out", str(w / "generate" / "out")],
            "resume": ["--resume"],
            "points": ["write:data-00001-of-00004.arrow", "write:csm_synthetic.json#2"],
            "random": 3,
        },
        "annotate": {
            "args": ann,
            "resume": [],
            "points": [
                "write:labels-*#2",
                "write:csm_synthetic.json",
                "activate:staged",
                "write:csm_synthetic.json#2",
                "activate:committed",
                "write:state.json",
            ],
            "random": 2,
        },
        "train": {
            "args": [*train, "--out", str(w / "train" / "out")],
            "resume": ["--resume"],
            "points": ["write:config.yaml", "write:model.safetensors"],
            "random": 2,
        },
        "benchmark": {
            "args": [*bench, "--out", str(w / "benchmark" / "out")],
            "resume": [],
            "points": ["write:config.yaml#2"],
            "random": 2,
        },
    }


def prepare(w: Path, name: str) -> Path:
    """Empty the output folder of ``name``; annotate's is a copy of the unannotated dataset."""
    out = w / name / "out"
    shutil.rmtree(out, ignore_errors=True)
    if name == "annotate":
        shutil.copytree(w / "syn", out)
    return out


def run_plan(w: Path, name: str, plan: dict, rng: random.Random) -> list[dict]:
    """The clean run of ``name``, then every kill of its plan; one result dict per kill."""
    out = prepare(w, name)
    start = time.monotonic()
    csm(plan["args"])
    took = time.monotonic() - start
    clean = hashes(out)
    shutil.move(out, w / name / "clean")
    kills = [(p, None) for p in plan["points"]]
    kills += [(None, rng.uniform(2.0, max(2.5, took))) for _ in range(plan["random"])]
    results = []
    for point, delay in kills:
        out = prepare(w, name)
        rc = csm(plan["args"], kill_at=point, delay=delay)
        csm(plan["args"] + plan["resume"])
        got = hashes(out)
        result = {
            "command": name,
            "at": point or f"{delay:.2f}s",
            "killed": rc != 0,
            "identical": got == clean,
            "no_temp": not temp_files(out),
            "differ": sorted(k for k in set(got) | set(clean) if got.get(k) != clean.get(k))[:5],
        }
        logger.info("%s", result)
        results.append(result)
    return results


def main() -> int:
    """Run every plan; print one line per kill and the counts; exit 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    parser.add_argument("--only", nargs="*", default=None, help="commands to test (default all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="csm-kill-") as tmp:
        w = Path(tmp)
        make_model(w / "model")
        csm(plans(w)["train"]["args"][:-1] + [str(w / "encoder")])  # annotate's encoder
        gen = plans(w)["generate"]["args"]
        csm(gen[:-1] + [str(w / "syn")])  # annotate's input
        results = []
        for name, plan in plans(w).items():
            if args.only and name not in args.only:
                continue
            results += run_plan(w, name, plan, rng)
    killed = [r for r in results if r["killed"]]
    ok = [r for r in results if r["identical"] and r["no_temp"]]
    print(
        f"kills {len(results)} (delivered {len(killed)}), resumed byte-identical: "
        f"{sum(r['identical'] for r in results)}, no temp files: "
        f"{sum(r['no_temp'] for r in results)}"
    )
    for r in results:
        if r not in ok:
            print(f"FAILED {r}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
