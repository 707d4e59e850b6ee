"""eval/cifar10.sh, the CSM paper's CIFAR-10 protocol, end to end at toy size on a CPU.

The script runs its real code paths (``load_dataset`` on a folder, ``from_pretrained`` on a CLIP
tower) on inputs built here: a CIFAR-shaped ``imagefolder`` (10 class folders of random 32x32 RGB
PNGs, train and test splits) and a 2-layer CLIP vision tower saved with ``save_pretrained``.
Every paper size is shrunk through the script's variables (tiny generator, 9 groups x 4, a small
CNN for one epoch, one seed, ce and csm). A rerun must skip every step and write nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.helpers import tiny_clip

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "eval" / "cifar10.sh"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_folder(root: Path, train: int = 12, test: int = 4) -> Path:
    """``root/{train,test}/<class>/<i>.png``: random 32x32 RGB images, CIFAR-10's class names."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _toy_env(tmp: Path, data: Path, clip: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GROUPS"}
    env.update(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp / "hf-datasets"),
        DATASET=str(data),
        GEN_PRESET="tiny",
        GEN_STEPS="4",
        FIT_BATCH="8",
        NUM_GROUPS="9",  # pairs (0, 1) ... (0, 9): every class is in a group
        GROUP_SIZE="4",
        SAMPLE_STEPS="2",
        GEN_BATCH="36",
        ENCODER=f"clip:{clip}",
        ANNOTATE_WORKERS="0",
        MODEL="cnn",
        TRAIN_OPTIONS="batch_size=64 'model_options=width=4'",
        EPOCHS="1",
        SEEDS="1",
        METHODS="ce csm",
        CALIBRATORS="ts",
        CORRUPTIONS="none",
        PLOTS="false",
        DEVICE="cpu",
        WORK=str(tmp / "work"),
        OUT=str(tmp / "out"),
    )
    return env


def _run(env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    return proc, time.monotonic() - start


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_mtime_ns, p.stat().st_size)
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("cifar10.sh: [")]


def test_cifar10_protocol_end_to_end_then_every_step_is_skipped(tmp_path):
    from csm.evaluation.leaderboard import read_results
    from csm.synthetic import load_synthetic, load_synthetic_tensors

    data = _cifar_folder(tmp_path / "cifar")
    clip = tiny_clip(tmp_path / "clip")
    env = _toy_env(tmp_path, data, clip)
    work, out = Path(env["WORK"]), Path(env["OUT"])

    # a bad size is refused in one line naming the variable, before anything is written
    bad = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**env, "NUM_GROUPS": "0"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "cifar10.sh: NUM_GROUPS=0: must be >= 1; e.g. NUM_GROUPS=19980"
    )
    assert not work.exists() and not out.exists()

    first, first_s = _run(env, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = _lines(first.stdout)
    for i, name in enumerate(["fit-diffusion", "generate", "annotate", "benchmark"], 1):
        assert any(f"[{i}/4] {name}: running (new): csm {name} " in x for x in lines), lines
        assert any(x.startswith(f"cifar10.sh: [{i}/4] {name}: done in ") for x in lines), lines
    assert "--data-seed 0" in first.stdout and "--model cnn --epochs 1" in first.stdout

    # 1. the generator was fitted on the folder's train split
    gen = json.loads(next(work.glob("diffusion-tiny-4steps/training_config.json")).read_text())
    assert (gen["dataset"], gen["image_shape"], gen["steps_done"]) == (str(data), [3, 32, 32], 4)
    # 2-3. a finished synthetic dataset with the CLIP annotation s4, reloadable without csm
    syn = next(work.glob("syn-tiny-4steps-9x4-heun2"))
    manifest = json.loads((syn / "csm_synthetic.json").read_text())
    assert manifest["finalized"] and manifest["params"]["info"]["groups"] == 9
    s4 = manifest["annotations"]["s4"]
    assert (s4["encoder"], s4["squash"], s4["real_dataset"]) == (f"clip:{clip}", 4.0, str(data))
    rows = load_synthetic(syn)
    assert rows.num_rows == 36 and len(rows[0]["soft_label"]) == 10
    tensors = load_synthetic_tensors(f"{syn}:s4")
    assert tuple(tensors.images.shape) == (36, 3, 32, 32) and tensors.annotation == "s4"
    assert torch.allclose(tensors.soft_labels.sum(1), torch.ones(36))
    # 4-5. both methods trained on the shared split and evaluated
    results = read_results(out / "results.csv")
    assert {(r["method"], r["calibrator"]) for r in results} == {
        (m, c) for m in ("ce", "csm") for c in ("none", "ts")
    }
    board = (out / "leaderboard.md").read_text()
    assert "| ce |" in board and "| csm |" in board
    csm_run = (out / "runs" / "csm" / "seed0" / "config.yaml").read_text()
    assert "data_seed: 0" in csm_run and f"synthetic: {syn}:s4" in csm_run
    # every seed recorded, beside the results
    record = json.loads((out / "protocol" / "cifar10_protocol.json").read_text())
    seeds = record["seeds"]
    assert seeds["training seeds (csm benchmark: run seed k)"] == [0]
    assert seeds["generate --seed"] == 0 and record["settings"]["groups"] == 9
    assert (out / "protocol" / "annotation_report.json").is_file()

    # the rerun skips every step, says why, and writes nothing
    before = _snapshot(work, out)
    second, second_s = _run(env, tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = _lines(second.stdout)
    assert len(lines) == 4 and all(": skipped (" in x for x in lines), lines
    assert "finished: 0 step(s) run, 4 skipped" in second.stdout
    assert _snapshot(work, out) == before
    assert second_s < first_s
