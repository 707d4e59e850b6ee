"""``csm train``: one training loop for CSM and every competing train-time calibration method.

The loop (:func:`train`) trains a classifier from :mod:`csm.models` on a real dataset
(:func:`csm.data.load_real`), optionally with a synthetic soft-labelled dataset
(:func:`csm.synthetic.load_synthetic_tensors`), with any method of :data:`csm.methods.METHODS`.
A method turns a :class:`~csm.methods.Batch` into a loss (``loss, logs =
method.compute_loss(model, batch, state)``); the loop owns everything else:

- SGD (momentum, weight decay) or AdamW; ``multistep`` (x ``lr_decay`` at ``milestones``) or
  ``cosine`` learning-rate schedules; gradient-norm clipping;
- torch augmentation (:mod:`csm.augment`): random crop with zero padding; horizontal flips only
  where the dataset allows them (never for digits);
- bf16 autocast and ``channels_last`` on CUDA only; on CPU every step is float32 and
  deterministic from the recorded seed;
- model selection on the ``val`` split only (``select_metric``), never on ``test``;
- a per-epoch ``metrics.csv``, checkpoints after every epoch and ``--resume`` (a resumed run equals
  an uninterrupted one: every random draw of epoch ``e`` comes from generators seeded by
  ``(seed, e)``, and the checkpoint holds model, optimizer and method state);
- ``accelerate launch`` on several processes or GPUs: each process takes its share of every global
  batch and gradients are averaged weighted by share, so a run on P processes computes the same
  update as one process whenever the loss is a per-sample mean and the model has no batch
  statistics (BatchNorm layers normalise per process, as in plain DDP; their running statistics
  are averaged across processes after each epoch). On CUDA machines use
  ``accelerate launch --multi_gpu --num_processes P -m csm train ...``; on a CPU-only machine the
  same command starts P gloo processes. (``accelerate launch --cpu --num_processes P`` starts
  only ONE process: accelerate's simple launcher ignores ``num_processes`` on CPU without MPI.)
  The whole training split lives on the device as uint8 (CIFAR-10: 150 MB).

CSM batches (Luo et al., ICML 2025, section 3 of ``csm-method.md``): for each real image of class
``y`` the sampler draws ``syn_groups`` synthetic groups whose pair contains ``y`` and takes from
each the endpoint dominated by ``y`` (``syn_endpoint``) plus ``syn_interior`` random interior
members, so the paper's batch is 128 real + 256 synthetic images. Synthetic images are augmented
like real ones.

Run directory (``out``)::

    config.yaml         resolved TrainConfig
    class_names.json    class names, index = label
    model.json          architecture + build kwargs (csm.models.model_spec)
    model.safetensors   weights of the best epoch on val
    metrics.csv         one row per epoch: stage, step, lr, train loss, val metrics, time
    run.json            method, model, dataset, seed, status, best_epoch, best val metrics
    checkpoints/last.pt resume state (torch.load(weights_only=True))

:func:`load_run` reloads a finished run (model in eval mode on the CPU).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from csm.augment import Augment
from csm.config import atomic_path, atomic_write_text, config_to_dict, load_config, save_config
from csm.errors import CSMError
from csm.models import MODELS, ImageClassifier, build_model_from_spec, model_spec

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedRun",
    "SyntheticSampler",
    "TrainConfig",
    "build_augment",
    "method_params",
    "predict_logits",
    "load_run",
    "lr_at",
    "real_data_for",
    "train",
    "train_command",
    "training_step",
]

RUN_FILES = (
    "config.yaml",
    "class_names.json",
    "model.json",
    "model.safetensors",
    "metrics.csv",
    "run.json",
)
_MINIMISE = ("NLL", "ECE", "Brier", "MCE", "AURC", "OE", "UE", "KS", "loss")


@dataclass
class TrainConfig:
    """Configuration of ``csm train`` (every field is a ``--flag``)."""

    dataset: str = field(default="digits", metadata={"help": "real dataset spec (csm data info)"})
    synthetic: str | None = field(
        default=None, metadata={"help": "synthetic dataset folder (csm generate/annotate)"}
    )
    method: str = field(default="ce", metadata={"help": "training method (csm.methods.METHODS)"})
    model: str = field(
        default="cnn", metadata={"help": "architecture (csm.models.MODELS or hf:CFG)"}
    )
    model_options: list[str] = field(
        default_factory=list,
        metadata={"help": "architecture options as key=value (e.g. norm=group dropout=0.1)"},
    )
    out: str = field(default="runs/train", metadata={"help": "run directory"})
    seed: int = field(
        default=0, metadata={"help": "seed of initialisation, order and augmentation"}
    )
    data_seed: int | None = field(
        default=None, metadata={"help": "seed of the train/val/test split (default: seed)"}
    )
    image_size: int | None = field(default=None, metadata={"help": "resize real images to this"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of train held out as val"})
    test_fraction: float = field(
        default=0.2, metadata={"help": "share held out as test when the data has no test split"}
    )
    epochs: int = field(default=30, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "real images per (global) batch"})
    eval_batch_size: int = field(default=512, metadata={"help": "images per evaluation batch"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd or adamw"})
    lr: float = field(default=0.1, metadata={"help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum (SGD)"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    schedule: str = field(default="multistep", metadata={"help": "multistep, cosine or constant"})
    milestones: list[int] = field(
        default_factory=list,
        metadata={
            "help": "multistep epochs (default: 0.4 and 0.6 x epochs; paper: 80, 120 of 200)"
        },
    )
    lr_decay: float = field(default=0.1, metadata={"help": "multistep factor"})
    warmup_epochs: int = field(default=0, metadata={"help": "linear warm-up epochs"})
    grad_clip: float = field(default=2.0, metadata={"help": "max gradient norm (0 disables)"})
    augment: bool = field(default=True, metadata={"help": "random crop (+ flip if allowed)"})
    crop_padding: int = field(default=4, metadata={"help": "zero padding of the random crop"})
    hflip: bool = field(
        default=True, metadata={"help": "horizontal flips where the dataset allows them"}
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (CUDA only)"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last (CUDA only)"})
    select_metric: str = field(
        default="cls/Acc", metadata={"help": "val metric for model selection (ties: lower NLL)"}
    )
    syn_groups: int = field(
        default=1, metadata={"help": "synthetic groups drawn per real image (CSM batches)"}
    )
    syn_endpoint: bool = field(
        default=True, metadata={"help": "take each group's endpoint dominated by the real class"}
    )
    syn_interior: int = field(
        default=1, metadata={"help": "random interior members taken per drawn group"}
    )
    # Method hyper-parameters: None means the method's own default (csm.methods); each method
    # reads only the keys it accepts (csm.methods.method_param_names).
    alpha: float | None = field(
        default=None, metadata={"help": "ls smoothing / mixup family Beta(alpha) / clue alpha"}
    )
    gamma: float | None = field(default=None, metadata={"help": "focal, dual_focal, bsce_gra"})
    gamma_low: float | None = field(default=None, metadata={"help": "flsd53 gamma if p_y >= thr"})
    gamma_high: float | None = field(default=None, metadata={"help": "flsd53 gamma if p_y < thr"})
    threshold: float | None = field(default=None, metadata={"help": "flsd53 threshold"})
    beta: float | None = field(default=None, metadata={"help": "bsce_gra norm order"})
    weight: float | None = field(
        default=None, metadata={"help": "mmce/mbls/crl/regmixup/rankmixup regulariser weight"}
    )
    margin: float | None = field(default=None, metadata={"help": "mbls / rankmixup margin"})
    bandwidth: float | None = field(default=None, metadata={"help": "mmce kernel bandwidth"})
    class_reduction: str | None = field(default=None, metadata={"help": "mbls: sum or mean"})
    mode: str | None = field(default=None, metadata={"help": "clue: batch_mean or per_sample"})
    mc_samples: int | None = field(default=None, metadata={"help": "clue MC-dropout passes"})
    temperature: float | None = field(default=None, metadata={"help": "refcal SupCon tau"})
    proj_dim: int | None = field(default=None, metadata={"help": "refcal projection size"})
    stage2_method: str | None = field(default=None, metadata={"help": "refcal stage-2 method"})
    pretrain_fraction: float | None = field(
        default=None, metadata={"help": "refcal share of epochs in stage 1"}
    )
    csm_loss: str = field(default="l2", metadata={"help": "csm synthetic loss: l2, soft_ce, kl"})
    synthetic_weight: float | None = field(
        default=None, metadata={"help": "csm weight of the synthetic term (paper: 1)"}
    )
    joint_forward: bool = field(
        default=False, metadata={"help": "csm: real and synthetic in one forward pass"}
    )
    checkpoint_every: int = field(default=1, metadata={"help": "epochs between checkpoints"})
    max_steps: int | None = field(
        default=None, metadata={"help": "stop after this many steps in total (smoke tests)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in out"})
    overwrite: bool = field(default=False, metadata={"help": "replace a different run in out"})


# ------------------------------------------------------------------------------------------
# Run directory
# ------------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A finished training run.

    Attributes:
        model: The best-on-val model, in eval mode, on the CPU.
        config: The resolved :class:`TrainConfig` the run was trained with.
        class_names: Class names, index = label.
        run_dir: The run directory.
        info: Contents of ``run.json`` (method, best_epoch, val metrics, ...).
    """

    model: ImageClassifier
    config: TrainConfig
    class_names: list[str]
    run_dir: Path = Path(".")
    info: dict[str, Any] = field(default_factory=dict)


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Reload a run directory written by :func:`train`.

    Args:
        run_dir: The ``out`` folder of a training run.

    Returns:
        A :class:`LoadedRun` whose model is in eval mode on the CPU.

    Raises:
        CSMError: The folder, its weights or its model description are missing or unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CSMError(f"{run_dir}: run directory not found; pass the --out folder of csm train")
    for name in ("config.yaml", "class_names.json", "model.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise CSMError(
                f"{run_dir}: {name} missing; the run did not finish an epoch - "
                "finish it with `csm train --resume` or retrain"
            )
    config = load_config(TrainConfig, run_dir / "config.yaml")
    class_names = _read_json(run_dir / "class_names.json")
    spec = _read_json(run_dir / "model.json")
    model = build_model_from_spec(spec)
    try:
        state = load_file(str(run_dir / "model.safetensors"))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise CSMError(f"{run_dir / 'model.safetensors'}: unreadable ({err}); retrain") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CSMError(
            f"{run_dir / 'model.safetensors'}: weights do not match model.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); retrain the run"
        )
    info = _read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    return LoadedRun(model.eval(), config, list(class_names), run_dir, info)


def real_data_for(cfg: TrainConfig):
    """Load the real dataset exactly as the run with config ``cfg`` saw it (same splits)."""
    from csm.data import load_real

    return load_real(
        cfg.dataset,
        image_size=cfg.image_size,
        seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CSMError(f"{path}: unreadable ({err}); retrain the run") from err


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def _write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


_RUN_IDENTITY = (
    "dataset",
    "synthetic",
    "method",
    "model",
    "model_options",
    "seed",
    "data_seed",
    "image_size",
    "val_fraction",
    "test_fraction",
)


def _prepare_run_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """Check ``out`` against ``resume``/``overwrite``; returns (dir, resuming)."""
    out = Path(cfg.out)
    ckpt = out / "checkpoints" / "last.pt"
    existing = out.is_dir() and any(out.iterdir())
    if not existing:
        return out, False
    if not (out / "config.yaml").is_file():
        raise CSMError(
            f"--out {out}: folder is not empty and holds no training run; choose another --out "
            "(--overwrite only replaces a training run)"
        )
    if cfg.overwrite:
        return out, False
    old = load_config(TrainConfig, out / "config.yaml")
    if cfg.resume:
        diffs = [
            k
            for k in config_to_dict(cfg)
            if k
            not in (
                "resume",
                "overwrite",
                "epochs",
                "max_steps",
                "checkpoint_every",
                "eval_batch_size",
            )
            and getattr(old, k) != getattr(cfg, k)
        ]
        if diffs:
            raise CSMError(
                f"--out {out}: --resume with different settings ({', '.join(diffs)}); "
                "resume with the original options or pass --overwrite"
            )
        return out, ckpt.is_file()
    same = all(getattr(old, k) == getattr(cfg, k) for k in _RUN_IDENTITY)
    what = "the same run" if same else "a different run"
    raise CSMError(
        f"--out {out}: already holds {what} ({old.method}/{old.model} on {old.dataset}); "
        "pass --resume to continue it or --overwrite to replace it"
    )


def _remove_run(out: Path) -> None:
    """Delete the files of a training run (only those; other files in ``out`` stay)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------
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
    return cfg.lr * _SCHEDULES[cfg.schedule](cfg, epoch, t, total)


def _multistep(cfg: TrainConfig, epoch: int, t: float, total: int) -> float:
    milestones = cfg.milestones or [max(1, round(0.4 * total)), max(1, round(0.6 * total))]
    return cfg.lr_decay ** sum(epoch >= m for m in milestones)


def _cosine(cfg: TrainConfig, epoch: int, t: float, total: int) -> float:
    w = cfg.warmup_epochs
    frac = (t - w) / max(1e-8, total - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, frac))))


_SCHEDULES = {
    "multistep": _multistep,
    "cosine": _cosine,
    "constant": lambda cfg, epoch, t, total: 1.0,
}


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
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


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.epochs >= 1, "--epochs", cfg.epochs, "give at least 1"),
        (cfg.batch_size >= 1, "--batch-size", cfg.batch_size, "give at least 1"),
        (cfg.eval_batch_size >= 1, "--eval-batch-size", cfg.eval_batch_size, "give at least 1"),
        (cfg.optimizer in ("sgd", "adamw"), "--optimizer", cfg.optimizer, "use sgd or adamw"),
        (
            cfg.schedule in _SCHEDULES,
            "--schedule",
            cfg.schedule,
            f"use one of {', '.join(_SCHEDULES)}",
        ),
        (cfg.lr > 0 and math.isfinite(cfg.lr), "--lr", cfg.lr, "give a positive number"),
        (0 <= cfg.momentum < 1, "--momentum", cfg.momentum, "give a value in [0, 1)"),
        (cfg.weight_decay >= 0, "--weight-decay", cfg.weight_decay, "give a value >= 0"),
        (0 < cfg.lr_decay <= 1, "--lr-decay", cfg.lr_decay, "give a value in (0, 1]"),
        (cfg.warmup_epochs >= 0, "--warmup-epochs", cfg.warmup_epochs, "give a value >= 0"),
        (cfg.grad_clip >= 0, "--grad-clip", cfg.grad_clip, "give a value >= 0 (0 disables)"),
        (cfg.crop_padding >= 0, "--crop-padding", cfg.crop_padding, "give a value >= 0"),
        (cfg.syn_groups >= 1, "--syn-groups", cfg.syn_groups, "give at least 1"),
        (cfg.syn_interior >= 0, "--syn-interior", cfg.syn_interior, "give a value >= 0"),
        (
            cfg.syn_endpoint or cfg.syn_interior > 0,
            "--syn-endpoint",
            cfg.syn_endpoint,
            "take the endpoint or at least one interior member",
        ),
        (cfg.checkpoint_every >= 1, "--checkpoint-every", cfg.checkpoint_every, "give >= 1"),
        (cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps", cfg.max_steps, "give >= 1"),
    ]
    for ok, flag, value, fix in checks:
        if not ok:
            raise CSMError(f"{flag} {value}: out of range; {fix}")
    from csm.metrics import METRIC_NAMES

    if cfg.select_metric not in METRIC_NAMES or cfg.select_metric.startswith("ood/"):
        raise CSMError(
            f"--select-metric {cfg.select_metric}: not a validation metric; use one of "
            f"{', '.join(m for m in METRIC_NAMES if not m.startswith('ood/'))}"
        )
    if cfg.resume and cfg.overwrite:
        raise CSMError("--resume and --overwrite: contradictory; pass only one of them")


def _parse_model_options(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CSMError(f"--model-options {item!r}: expected key=value; e.g. norm=group")
        options[key.strip()] = yaml.safe_load(value)
    return options


# ------------------------------------------------------------------------------------------
# Synthetic batches
# ------------------------------------------------------------------------------------------
class SyntheticSampler:
    """Draw the synthetic part of CSM batches (Luo et al., ICML 2025, section 3).

    For every real image of class ``y``: ``groups`` synthetic groups whose pair ``(a, b)``
    contains ``y`` are drawn uniformly (with replacement); from each, the endpoint dominated by
    ``y`` (the member with the largest λ if ``y == a``, the smallest if ``y == b``) when
    ``endpoint`` is set, plus ``interior`` distinct random interior members (0 < rank < G-1 in
    λ order). The paper uses one group, the endpoint and one interior member.

    Args:
        group_id: ``(N,)`` group of every synthetic image.
        lam: ``(N,)`` generation ratio (weight of ``class_a``).
        class_a: ``(N,)`` first class of the pair.
        class_b: ``(N,)`` second class of the pair.
        num_classes: K.
        groups: Groups drawn per real image.
        endpoint: Take the endpoint dominated by the real image's class.
        interior: Interior members taken per drawn group.

    Raises:
        CSMError: A class appears in no group, or groups have too few interior members.
    """

    def __init__(
        self,
        group_id: torch.Tensor,
        lam: torch.Tensor,
        class_a: torch.Tensor,
        class_b: torch.Tensor,
        num_classes: int,
        groups: int = 1,
        endpoint: bool = True,
        interior: int = 1,
    ) -> None:
        self.groups, self.endpoint, self.interior = groups, endpoint, interior
        # sort rows by (group, lam): lam first, then a stable sort by group
        order = torch.argsort(lam, stable=True)
        order = order[torch.argsort(group_id[order], stable=True)]
        uniq, inverse, counts = torch.unique_consecutive(
            group_id[order], return_inverse=True, return_counts=True
        )
        n_groups = uniq.numel()
        max_size = int(counts.max()) if n_groups else 0
        starts = torch.cumsum(counts, 0) - counts
        members = torch.full((n_groups, max_size), -1, dtype=torch.long)
        members[inverse, torch.arange(order.numel()) - starts[inverse]] = order
        first = members[:, 0]
        self.class_a = class_a[first]
        self.class_b = class_b[first]
        sizes = counts.long()
        self.end_b = first  # smallest lam: pure class b
        self.end_a = members[torch.arange(n_groups), sizes - 1]  # largest lam: pure class a
        self.n_interior = (sizes - 2).clamp(min=0)
        self.interior_members = (
            members[:, 1 : max(1, max_size - 1)]
            if max_size > 2
            else torch.empty((n_groups, 0), dtype=torch.long)
        )
        if interior > 0 and n_groups and int(self.n_interior.min()) < interior:
            raise CSMError(
                f"--syn-interior {interior}: some synthetic groups have only "
                f"{int(self.n_interior.min())} interior members; lower --syn-interior or "
                "generate with a larger group size"
            )
        class_groups = [
            torch.nonzero((self.class_a == k) | (self.class_b == k)).flatten()
            for k in range(num_classes)
        ]
        missing = [k for k, g in enumerate(class_groups) if g.numel() == 0]
        if missing:
            raise CSMError(
                f"synthetic dataset: classes {missing[:5]} appear in no synthetic group; "
                f"generate at least {num_classes - 1} groups so every class is paired"
            )
        width = max(g.numel() for g in class_groups)
        self.class_groups = torch.stack(
            [torch.cat([g, g.new_zeros(width - g.numel())]) for g in class_groups]
        )
        self.class_counts = torch.tensor([g.numel() for g in class_groups])

    @property
    def per_image(self) -> int:
        """Synthetic images drawn per real image."""
        return self.groups * (int(self.endpoint) + self.interior)

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Indices of synthetic images for real ``labels`` (B,); shape ``(B * per_image,)``.

        Ordered per group draw: ``[endpoints of all B, interior members of all B, ...]``.
        """
        labels = labels.cpu()
        out = []
        for _ in range(self.groups):
            r = torch.rand(labels.shape[0], generator=generator)
            pos = (r * self.class_counts[labels]).long().clamp(max=self.class_counts[labels] - 1)
            g = self.class_groups[labels, pos]
            if self.endpoint:
                out.append(torch.where(self.class_a[g] == labels, self.end_a[g], self.end_b[g]))
            if self.interior:
                keys = torch.rand(g.shape[0], self.interior_members.shape[1], generator=generator)
                cols = torch.arange(self.interior_members.shape[1])
                keys[cols[None, :] >= self.n_interior[g][:, None]] = 2.0  # never pick padding
                pick = torch.argsort(keys, dim=1)[:, : self.interior]
                chosen = self.interior_members[g[:, None], pick]
                out.append(chosen.T.reshape(-1))
        return torch.cat(out)


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def _dist() -> tuple[Any, int, int, torch.device]:
    """(state, rank, world size, device) from accelerate (works without a launcher)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # cpu=True lets a launcher's WORLD_SIZE > 1 start gloo (MULTI_CPU) on machines without CUDA
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return state, state.process_index, state.num_processes, state.device


def _all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Sum gradients over processes (each rank's loss is pre-weighted by its batch share)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _average_buffers(model: nn.Module, world: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes."""
    if world == 1:
        return
    for b in model.buffers():
        if b.is_floating_point():
            torch.distributed.all_reduce(b)
            b.div_(world)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """Seed of random stream ``stream`` (order, augmentation, synthetic, method) in an epoch."""
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63 - 1)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """Logits of uint8 images ``(N, C, H, W)`` in eval mode, batch by batch, on the CPU.

    Args:
        model: A classifier from :mod:`csm.models`.
        images: uint8 images.
        batch_size: Images per forward pass.
        device: Where to run the model (it must already live there).
        bf16: Use bf16 autocast (only honoured on CUDA).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device, non_blocking=True).float().div_(255)
            with torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"
            ):
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from csm.metrics import compute_all

    return {f"val/{k}": float(v) for k, v in compute_all(logits, labels).items()}


def _better(metric: str, new: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether ``new`` beats ``best`` on ``val/metric`` (ties: lower val NLL)."""
    if best is None:
        return True
    key = f"val/{metric}"
    if key not in new:
        raise CSMError(
            f"--select-metric {metric}: not a validation metric; use one of "
            f"{', '.join(k[4:] for k in new if k.startswith('val/'))}"
        )
    a, b = float(new[key]), float(best[key])
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    minimise = any(s in metric for s in _MINIMISE)
    if a != b:
        return a < b if minimise else a > b
    return float(new.get("val/cls/NLL", 0.0)) < float(best.get("val/cls/NLL", 0.0))


def _mean_std(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 training images in [0, 1] units."""
    x = images.double().div(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def build_augment(cfg: TrainConfig, allow_hflip: bool) -> Augment:
    """The training augmentation: random crop with padding, flips only if the data allows."""
    return Augment(
        padding=cfg.crop_padding if cfg.augment else 0,
        hflip=bool(cfg.augment and cfg.hflip and allow_hflip),
    )


def method_params(cfg: TrainConfig) -> dict[str, Any]:
    """The flat hyper-parameter dict handed to :func:`csm.methods.build_method`."""
    keys = (
        "alpha",
        "gamma",
        "gamma_low",
        "gamma_high",
        "threshold",
        "beta",
        "weight",
        "margin",
        "bandwidth",
        "class_reduction",
        "mode",
        "mc_samples",
        "temperature",
        "proj_dim",
        "stage2_method",
        "pretrain_fraction",
        "csm_loss",
        "synthetic_weight",
        "joint_forward",
    )
    return {k: getattr(cfg, k) for k in keys}


def training_step(
    model: nn.Module,
    method: Any,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    batch: Any,
    state: Any,
    *,
    grad_clip: float = 0.0,
    autocast: bool = False,
    loss_scale: float = 1.0,
    world: int = 1,
    pretrain_augment: Any = None,
) -> torch.Tensor:
    """One optimisation step: method loss (bf16 autocast on CUDA), backward, all-reduce, clip.

    Args:
        model: The classifier (not wrapped; methods call ``forward_features``/``head``).
        method: A :class:`csm.methods.Method`.
        optimizer: Optimiser over ``params``.
        params: Parameters trained in this stage.
        batch: A :class:`csm.methods.Batch` (this process's rows).
        state: A :class:`csm.methods.StepState`.
        grad_clip: Max gradient norm (0 disables).
        autocast: bf16 autocast (CUDA only).
        loss_scale: This process's share of the global batch times the number of processes.
        world: Number of processes (gradients are summed, then divided by it).
        pretrain_augment: For RefCal stage 1, the view augmentation; selects ``pretrain_loss``.

    Returns:
        The detached float32 loss (no device synchronisation).
    """
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        if pretrain_augment is not None:
            loss, _ = method.pretrain_loss(model, batch, augment=pretrain_augment, state=state)
        else:
            loss, _ = method.compute_loss(model, batch, state)
    loss = loss.float()
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale).backward()
    if world > 1:
        _all_reduce_grads(params, world)
        for p in params:
            if p.grad is not None:
                p.grad.div_(world)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()


def _check_finite(loss_sum: torch.Tensor, cfg: TrainConfig, epoch: int, step: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise CSMError(
            f"--lr {cfg.lr}: training diverged (non-finite loss by epoch {epoch + 1}, "
            f"step {step + 1}); lower --lr or use --grad-clip"
        )


def train(cfg: TrainConfig) -> Path:
    """Train a classifier and write the run directory (see the module docstring).

    Args:
        cfg: The resolved configuration.

    Returns:
        The run directory.

    Raises:
        CSMError: Unknown method or model, a synthetic dataset whose classes differ from the
            real one, an out-of-range hyper-parameter, or a run directory holding another run
            (without ``resume``/``overwrite``).
    """
    from csm.methods import METHODS, Batch, StepState, build_method

    _validate(cfg)
    if cfg.method not in METHODS:
        raise CSMError(f"--method {cfg.method!r}: unknown method; use one of {', '.join(METHODS)}")
    method = build_method(cfg.method, method_params(cfg))
    model_options = _parse_model_options(cfg.model_options)
    if not (cfg.model.startswith("hf:") or cfg.model in MODELS):
        raise CSMError(
            f"--model {cfg.model!r}: unknown architecture; use one of {sorted(MODELS)} "
            "or hf:<config>"
        )
    if method.needs_synthetic and cfg.synthetic is None:
        raise CSMError(
            f"--method {cfg.method}: needs a synthetic dataset; pass --synthetic DIR "
            "(made by csm generate and csm annotate)"
        )
    stages = int(getattr(method, "stages", 1))
    if stages == 2:
        pre_epochs, _ = method.stage_epochs(cfg.epochs)
    else:
        pre_epochs = 0
    dist_state, rank, world, device = _dist()
    is_main = rank == 0
    out, resuming = _prepare_run_dir(cfg)
    if world > 1:
        dist_state.wait_for_everyone()
    if cfg.overwrite and is_main and out.is_dir():
        _remove_run(out)
    if world > 1:
        dist_state.wait_for_everyone()

    real = real_data_for(cfg)
    num_classes = real.num_classes
    c, h, _ = real.image_shape
    mean, std = _mean_std(real.train.images)
    spec = model_spec(cfg.model, num_classes, c, h, mean, std, **model_options)
    syn = sampler = None
    if cfg.synthetic is not None and method.needs_synthetic:
        syn, sampler = _load_synthetic(cfg, real)
    elif cfg.synthetic is not None:
        logger.warning(
            "--synthetic %s: ignored, method %s does not train on synthetic data",
            cfg.synthetic, cfg.method,
        )

    torch.manual_seed(cfg.seed)
    model = build_model_from_spec(spec).to(device)
    cuda = device.type == "cuda"
    autocast = cuda and cfg.bf16
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    def stage_of(epoch: int) -> int:
        return 1 if (stages == 1 or epoch < pre_epochs) else 2

    def stage_params(stage: int) -> list[nn.Parameter]:
        return list(dict.fromkeys(method.stage_parameters(model, stage)))

    start_epoch, global_step, best_epoch = 0, 0, -1
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    optimizer = _make_optimizer(cfg, stage_params(stage_of(0)))
    ckpt_path = out / "checkpoints" / "last.pt"
    if resuming:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        done = int(ckpt["epoch"])
        optimizer = _make_optimizer(cfg, stage_params(stage_of(done)))
        optimizer.load_state_dict(ckpt["optimizer"])
        method.load_state_dict(ckpt["method"])
        rows, best = list(ckpt["rows"]), ckpt["best"]
        best_epoch, global_step = int(ckpt["best_epoch"]), int(ckpt["global_step"])
        start_epoch = done + 1
        logger.info("resuming %s after epoch %d", out, done + 1)
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        _write_json(out / "class_names.json", real.class_names)
        _write_json(out / "model.json", spec)

    augment = build_augment(cfg, real.allow_hflip)
    train_images = real.train.images.to(device)
    train_labels = real.train.labels.to(device)
    syn_images = syn.images.to(device) if syn is not None else None
    syn_soft = syn.soft_labels.to(device) if syn is not None else None
    n_train = int(train_labels.shape[0])
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    stop = cfg.max_steps is not None and global_step >= cfg.max_steps
    for epoch in range(start_epoch, cfg.epochs):
        if stop:
            break
        stage = stage_of(epoch)
        if stage == 2 and epoch == pre_epochs:  # stage boundary: optimise the head only
            optimizer = _make_optimizer(cfg, stage_params(2))
        stage_start = pre_epochs if stage == 2 else 0
        stage_len = (cfg.epochs - pre_epochs) if stage == 2 else (pre_epochs or cfg.epochs)
        params = stage_params(stage)
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, 0))  # dropout and other global draws
        g_order, g_aug, g_syn, g_method = (
            torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, s)) for s in (1, 2, 3, 4)
        )
        perm = torch.randperm(n_train, generator=g_order)
        model.train()
        t0 = time.time()
        loss_sum, seen = torch.zeros((), device=device), 0
        lr = cfg.lr
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not is_main,
            leave=False,
        )
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size].to(device)
            n_global = int(idx.numel())
            lr = lr_at(cfg, epoch - stage_start, step, steps_per_epoch, stage_len)
            for group in optimizer.param_groups:
                group["lr"] = lr
            y = train_labels[idx]
            first_stage_two = stage == 1 and stages == 2
            # every rank draws the whole global batch, then keeps its rows: identical random
            # streams for any number of processes. Crops/flips run on uint8 (exact, less memory).
            raw = train_images[idx]
            x = (raw if first_stage_two else augment(raw, g_aug)).float().div_(255)
            syn_x = syn_y = None
            if sampler is not None:
                sidx = sampler.sample(y, g_syn).to(device)
                syn_x = augment(syn_images[sidx], g_aug).float().div_(255)
                syn_y = syn_soft[sidx]
            rows_sl = _local_rows(n_global, rank, world)
            batch = Batch(
                x[rows_sl],
                y[rows_sl],
                idx[rows_sl],
                _syn_local(syn_x, n_global, rank, world),
                _syn_local(syn_y, n_global, rank, world),
            )
            if cuda and cfg.channels_last:
                batch.x = batch.x.contiguous(memory_format=torch.channels_last)
                if batch.syn_x is not None:
                    batch.syn_x = batch.syn_x.contiguous(memory_format=torch.channels_last)
            state = StepState(epoch=epoch, step=global_step, stage=stage, generator=g_method)
            loss = training_step(
                model,
                method,
                optimizer,
                params,
                batch,
                state,
                grad_clip=cfg.grad_clip,
                autocast=autocast,
                loss_scale=_share(n_global, rank, world) * world,
                world=world,
                pretrain_augment=functools.partial(augment, generator=g_aug)
                if first_stage_two
                else None,
            )
            global_step += 1
            loss_sum = loss_sum + loss * (rows_sl.stop - rows_sl.start)  # no per-step sync
            seen += rows_sl.stop - rows_sl.start
            if step % 10 == 0 or step == steps_per_epoch - 1:
                _check_finite(loss_sum, cfg, epoch, step)
                if is_main:
                    bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.3g}")
            if cfg.max_steps is not None and global_step >= cfg.max_steps:
                stop = True
                break
        partial = step < steps_per_epoch - 1
        bar.close()
        method.on_epoch_end()
        _average_buffers(model, world)
        _check_finite(loss_sum, cfg, epoch, steps_per_epoch - 1)
        train_loss = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(train_loss)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "stage": stage,
            "step": global_step,
            "lr": lr,
            "train/loss": float(train_loss[0] / train_loss[1].clamp(min=1)),
            "time_s": round(time.time() - t0, 3),
        }
        if partial:
            row["partial"] = True  # stopped by max_steps inside the epoch
        improved = False
        if stage == 2 or stages == 1:
            logits = predict_logits(model, real.val.images, cfg.eval_batch_size, device, autocast)
            row.update(_val_metrics(logits, real.val.labels))
            improved = _better(cfg.select_metric, row, best)
            if improved:
                best = {k: v for k, v in row.items() if k.startswith("val/")}
                best_epoch = epoch + 1
        rows.append(row)
        if is_main:
            if improved:
                _save_weights(model, out / "model.safetensors")
            _write_metrics_csv(out / "metrics.csv", rows)
            # a max_steps stop inside an epoch keeps the previous checkpoint, so --resume
            # replays the whole epoch and matches an uninterrupted run
            if not partial and (
                (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or stop
            ):
                _save_checkpoint(
                    ckpt_path, model, optimizer, method, epoch, rows, best, best_epoch, global_step
                )
            shown = "".join(
                f", {k} {row[k]:.4f}" for k in ("val/cls/Acc", "val/cal/ECE") if k in row
            )
            logger.info(
                "epoch %d/%d: train loss %.4f%s", epoch + 1, cfg.epochs, row["train/loss"], shown
            )
        if world > 1:
            dist_state.wait_for_everyone()
    if is_main:
        if best is None:
            raise CSMError(
                f"--epochs {cfg.epochs}: no epoch trained the classifier; give more epochs"
            )
        _write_json(
            out / "run.json",
            {
                "method": cfg.method,
                "model": cfg.model,
                "dataset": cfg.dataset,
                "synthetic": cfg.synthetic,
                "seed": cfg.seed,
                "status": "complete" if len(rows) == cfg.epochs else "stopped",
                "best_epoch": best_epoch,
                "select_metric": cfg.select_metric,
                "val": best,
                "epochs_trained": len(rows),
                "steps": global_step,
                "world_size": world,
                "device": device.type,
                "method_params": _jsonable(method.hparams()),
                "num_train": n_train,
                "num_synthetic": 0 if syn is None else int(syn.images.shape[0]),
            },
        )
    if world > 1:
        dist_state.wait_for_everyone()
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _local_rows(n: int, rank: int, world: int) -> slice:
    """Contiguous share of a global batch of ``n`` rows for ``rank`` (sizes differ by <= 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _share(n: int, rank: int, world: int) -> float:
    """Weight that turns this rank's mean loss into its part of the global mean (x world)."""
    sl = _local_rows(n, rank, world)
    return (sl.stop - sl.start) / n if n else 0.0


def _syn_local(t: torch.Tensor | None, n_real: int, rank: int, world: int) -> torch.Tensor | None:
    """The synthetic rows that belong to this rank's real rows (the sampler's block layout)."""
    if t is None or world == 1:
        return t
    blocks = t.shape[0] // max(1, n_real)
    sl = _local_rows(n_real, rank, world)
    return torch.cat([t[b * n_real + sl.start : b * n_real + sl.stop] for b in range(blocks)])


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Any,
    epoch: int,
    rows: list[dict[str, Any]],
    best: dict[str, float] | None,
    best_epoch: int,
    global_step: int,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "method": method.state_dict() if hasattr(method, "state_dict") else None,
        "rows": rows,
        "best": best,
        "best_epoch": best_epoch,
        "global_step": global_step,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_synthetic(cfg: TrainConfig, real: Any) -> tuple[Any, SyntheticSampler]:
    from csm.synthetic import load_synthetic_tensors

    if not Path(cfg.synthetic).is_dir():
        raise CSMError(f"--synthetic {cfg.synthetic}: folder not found; pass a csm generate output")
    syn = load_synthetic_tensors(cfg.synthetic)
    check_synthetic_matches(syn, real.class_names, real.image_shape, cfg.synthetic)
    sampler = SyntheticSampler(
        syn.group_id,
        syn.lam,
        syn.class_a,
        syn.class_b,
        real.num_classes,
        cfg.syn_groups,
        cfg.syn_endpoint,
        cfg.syn_interior,
    )
    return syn, sampler


def check_synthetic_matches(
    syn: Any, class_names: list[str], image_shape: tuple[int, int, int], where: str
) -> None:
    """Raise a CSMError if a synthetic dataset's classes or image shape differ from the real."""
    if list(syn.class_names) != list(class_names):
        raise CSMError(
            f"--synthetic {where}: classes {list(syn.class_names)[:5]} differ from the real "
            f"dataset's {list(class_names)[:5]}; generate it from a model trained on this dataset"
        )
    if tuple(syn.images.shape[1:]) != tuple(image_shape):
        raise CSMError(
            f"--synthetic {where}: images are {tuple(syn.images.shape[1:])} but real images are "
            f"{tuple(image_shape)}; pass --image-size to match or regenerate"
        )


def train_command(cfg: TrainConfig) -> str | None:
    """``csm train``: run :func:`train` and return a one-line summary (main process only)."""
    out = train(cfg)
    info_path = out / "run.json"
    if _dist()[1] != 0 or not info_path.is_file():  # other processes of accelerate launch
        return None
    info = _read_json(info_path)
    val = info.get("val") or {}
    shown = ", ".join(f"{k[4:]} {val[k]:.4f}" for k in ("val/cls/Acc", "val/cal/ECE") if k in val)
    return f"{out}: best epoch {info['best_epoch']} on val ({shown})"
