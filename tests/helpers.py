"""Fakes shared by the tests: run folders written by the real :func:`csm.training.runs.save_run`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from csm.training.config import TrainConfig
from csm.training.models import build_model_from_spec, model_spec
from csm.training.runs import save_run


def make_run(
    path: Path,
    class_names: list[str],
    *,
    in_channels: int = 1,
    image_size: int = 8,
    seed: int = 0,
    model: nn.Module | None = None,
    spec: dict[str, Any] | None = None,
    cfg: TrainConfig | None = None,
    info: dict[str, Any] | None = None,
    **spec_kwargs: Any,
) -> Path:
    """A ``csm train`` run folder holding ``model`` (default: a random small CNN).

    Args:
        path: The run folder to write.
        class_names: Class names, index = label.
        in_channels: Image channels of the default CNN.
        image_size: Image side of the default CNN.
        seed: Seed of the default CNN's initialisation.
        model: A trained model to save instead of the random CNN (pass its ``spec`` too).
        spec: The model's :func:`model_spec` (default: the CNN's).
        cfg: The run's config (default: ``TrainConfig(dataset="digits", out=path)``).
        info: ``run.json`` contents (default: none written).
        **spec_kwargs: Extra :func:`model_spec` options of the default CNN (e.g. ``width=4``).
    """
    if spec is None:
        spec = model_spec(
            "cnn",
            len(class_names),
            in_channels,
            image_size,
            [0.5] * in_channels,
            [0.25] * in_channels,
            **spec_kwargs,
        )
    if model is None:
        torch.manual_seed(seed)
        model = build_model_from_spec(spec)
    cfg = cfg or TrainConfig(dataset="digits", out=str(path))
    return save_run(path, cfg, class_names, spec, model=model, info=info)


# The README's multi-process prefix: `accelerate launch --multi_gpu --num_processes 2 ...`
# (on a CPU-only machine that starts 2 gloo processes; `--cpu` would start only one).
TWO_PROCESSES = ("--multi_gpu", "--num_processes", "2")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free local TCP port, so concurrent launches never share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_two(
    *args: str, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``accelerate launch --multi_gpu --num_processes 2 ARGS`` (e.g. ``-m csm generate ...``).

    The launch is pinned to this checkout (``PYTHONPATH``), one thread per process and a free
    port; it returns the finished process (stdout and stderr captured), asserting exit code 0.
    """
    launch = [sys.executable, "-m", "accelerate.commands.launch", *TWO_PROCESSES]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(
        [*launch, *args], env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def tiny_clip(path: Path) -> Path:
    """A random 2-layer CLIP vision tower (32 px) with its image processor, saved to ``path``
    with ``save_pretrained`` (what ``clip:<path>`` loads offline)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path
