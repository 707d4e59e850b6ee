"""Fakes shared by the tests: run folders written by the real :func:`csm.training.runs.save_run`."""

from __future__ import annotations

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
