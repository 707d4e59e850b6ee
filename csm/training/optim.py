"""Optimisers and learning-rate schedules of ``csm train``.

SGD (momentum, weight decay on every parameter) or AdamW (no decay on biases and norms), and
``multistep`` (x ``lr_decay`` at ``milestones``, default 0.4 and 0.6 of the epochs), ``cosine`` or
``constant`` schedules after an optional linear warm-up. The functions read the fields they need
from any object shaped like :class:`csm.training.config.TrainConfig`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # config imports SCHEDULES from here
    from csm.training.config import TrainConfig

__all__ = ["SCHEDULES", "lr_at", "make_optimizer"]


def lr_at(
    cfg: TrainConfig,
    epoch: int,
    step_in_epoch: int,
    steps_per_epoch: int,
    total_epochs: int | None = None,
) -> float:
    """Learning rate at a step (epoch is 0-based; warm-up then multistep/cosine/constant)."""
    total = cfg.epochs if total_epochs is None else total_epochs
    t = epoch + step_in_epoch / max(1, steps_per_epoch)
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        return cfg.lr * (t + 1.0 / max(1, steps_per_epoch)) / cfg.warmup_epochs
    return cfg.lr * SCHEDULES[cfg.schedule](cfg, epoch, t, total)


def _multistep(cfg: TrainConfig, epoch: int, t: float, total: int) -> float:
    milestones = cfg.milestones or [max(1, round(0.4 * total)), max(1, round(0.6 * total))]
    return cfg.lr_decay ** sum(epoch >= m for m in milestones)


def _cosine(cfg: TrainConfig, epoch: int, t: float, total: int) -> float:
    w = cfg.warmup_epochs
    frac = (t - w) / max(1e-8, total - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, frac))))


SCHEDULES = {
    "multistep": _multistep,
    "cosine": _cosine,
    "constant": lambda cfg, epoch, t, total: 1.0,
}


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0 if cfg.optimizer == "adamw" else cfg.weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    factories = {
        "sgd": lambda: torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
        ),
        "adamw": lambda: torch.optim.AdamW(groups, lr=cfg.lr),
    }
    return factories[cfg.optimizer]()
