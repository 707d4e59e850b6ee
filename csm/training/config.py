"""The configuration of ``csm train`` (:class:`TrainConfig`) and its validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from csm.calibration.metrics import METRIC_ALIASES, METRIC_NAMES
from csm.errors import CSMError
from csm.training.methods import METHODS, accepted_params, all_method_params
from csm.training.optim import SCHEDULES

MEMBER_ORDERS = ("reannotated", "generation")
"""How a synthetic group's members are ordered: by the reannotated soft label (the CSM reference
code's, default) or by the generation ratio λ (:class:`csm.training.sampler.SyntheticSampler`)."""

SYN_READERS = ("lazy", "eager")
"""How the trainer reads synthetic images: ``lazy`` keeps them in the memory-mapped shards and
decodes the rows of each batch (memory flat in the dataset's size, default); ``eager`` decodes
them all into memory up front (:func:`csm.synthetic.load_synthetic_tensors`). Same batches."""

__all__ = [
    "METHOD_PARAMS",
    "TrainConfig",
    "method_params",
    "only_method_options",
    "parse_model_options",
    "validate_config",
]


@dataclass
class _TrainOptions:
    """The options of ``csm train`` that are not method hyper-parameters."""

    dataset: str = field(default="digits", metadata={"help": "real dataset spec (csm data info)"})
    synthetic: str | None = field(
        default=None, metadata={"help": "synthetic dataset folder (csm generate/annotate)"}
    )
    method: str = field(
        default="ce", metadata={"help": "training method (csm.training.methods.METHODS)"}
    )
    model: str = field(
        default="cnn", metadata={"help": "architecture (csm.training.models.MODELS or hf:CFG)"}
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
    train_per_class: int | None = field(
        default=None,
        metadata={
            "help": "keep only this many training images per class (a stratified subset drawn "
            "with the data seed; val and test unchanged)"
        },
    )
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
        default="cls/Acc",
        metadata={
            "help": "val metric for model selection (ties: lower NLL), or last (final epoch)"
        },
    )
    val_every: int = field(
        default=1,
        metadata={
            "help": "validate every N epochs and the last one (model selection chooses among "
            "them; with --select-metric last only the last one matters)"
        },
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
    syn_member_order: str = field(
        default="reannotated",
        metadata={
            "help": "order of a group's members: reannotated (soft label, the CSM reference "
            "code's) or generation (lambda)"
        },
    )
    allow_split_mismatch: bool = field(
        default=False,
        metadata={
            "help": "train on --synthetic whose generator or annotation encoder was trained on "
            "other images than this run's training split (default: refused)"
        },
    )
    syn_reader: str = field(
        default="lazy",
        metadata={
            "help": "synthetic images: lazy (decode each batch's rows from the memory-mapped "
            "shards; memory flat in the dataset size) or eager (decode all into memory first)"
        },
    )
    checkpoint_every: int = field(default=1, metadata={"help": "epochs between checkpoints"})
    max_steps: int | None = field(
        default=None, metadata={"help": "stop after this many steps in total (smoke tests)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in out"})
    overwrite: bool = field(default=False, metadata={"help": "replace a different run in out"})
    sync_bn: bool = field(
        default=False,
        metadata={"help": "SyncBatchNorm across processes under accelerate launch (world > 1)"},
    )


METHOD_PARAMS = all_method_params()
"""Every method hyper-parameter (declared once, on the methods) -> its merged :class:`Param`."""

TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [
        (name, p.type | None, field(default=None, metadata={"help": p.help}))
        for name, p in METHOD_PARAMS.items()
    ],
    bases=(_TrainOptions,),
)
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = """Configuration of ``csm train`` (every field is a ``--flag``).

The method hyper-parameters (``alpha``, ``gamma``, ``csm_loss``, ...) are derived from the
methods' declarations (:func:`csm.training.methods.all_method_params`): each is optional and
``None`` means the chosen method's own default; setting one the method does not accept is an
error (:func:`method_params`).
"""


def validate_config(cfg: Any) -> None:
    """Raise a one-line :class:`~csm.errors.CSMError` for an out-of-range or inconsistent option.

    Args:
        cfg: A :class:`TrainConfig`.
    """
    method_params(cfg)  # unknown method, or an option the method does not accept
    checks = [
        (cfg.epochs >= 1, "--epochs", cfg.epochs, "give at least 1"),
        (
            cfg.train_per_class is None or cfg.train_per_class >= 1,
            "--train-per-class",
            cfg.train_per_class,
            "give at least 1 (or leave it unset for the whole training split)",
        ),
        (cfg.batch_size >= 1, "--batch-size", cfg.batch_size, "give at least 1"),
        (cfg.val_every >= 1, "--val-every", cfg.val_every, "give at least 1 (every epoch)"),
        (
            cfg.syn_member_order in MEMBER_ORDERS,
            "--syn-member-order",
            cfg.syn_member_order,
            f"use one of {', '.join(MEMBER_ORDERS)}",
        ),
        (
            cfg.syn_reader in SYN_READERS,
            "--syn-reader",
            cfg.syn_reader,
            f"use one of {', '.join(SYN_READERS)}",
        ),
        (cfg.eval_batch_size >= 1, "--eval-batch-size", cfg.eval_batch_size, "give at least 1"),
        (cfg.optimizer in ("sgd", "adamw"), "--optimizer", cfg.optimizer, "use sgd or adamw"),
        (
            cfg.schedule in SCHEDULES,
            "--schedule",
            cfg.schedule,
            f"use one of {', '.join(SCHEDULES)}",
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

    metric = METRIC_ALIASES.get(cfg.select_metric, cfg.select_metric)  # torch-uncertainty names
    if metric != "last" and (metric not in METRIC_NAMES or metric.startswith("ood/")):
        raise CSMError(
            f"--select-metric {cfg.select_metric}: not a validation metric; use last or one of "
            f"{', '.join(m for m in METRIC_NAMES if not m.startswith('ood/'))} (or an alias: "
            f"{', '.join(METRIC_ALIASES)})"
        )
    if cfg.resume and cfg.overwrite:
        raise CSMError("--resume and --overwrite: contradictory; pass only one of them")


def parse_model_options(items: list[str]) -> dict[str, Any]:
    """Parse ``--model-options key=value ...`` (values as YAML scalars)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CSMError(f"--model-options {item!r}: expected key=value; e.g. norm=group")
        options[key.strip()] = yaml.safe_load(value)
    return options


def method_params(cfg: Any) -> dict[str, Any]:
    """The method options set in ``cfg`` (not None), for :func:`~csm.training.methods.build_method`.

    Raises:
        CSMError: An option the chosen method does not accept (naming it and listing the
            method's options), or an unknown method.
    """
    if cfg.method not in METHODS:
        raise CSMError(f"--method {cfg.method!r}: unknown method; use one of {', '.join(METHODS)}")
    given = {k: getattr(cfg, k) for k in METHOD_PARAMS if getattr(cfg, k) is not None}
    accepted = accepted_params(cfg.method, given)
    for key, value in given.items():
        if key not in accepted:
            options = ", ".join(f"--{k.replace('_', '-')}" for k in accepted) or "none"
            raise CSMError(
                f"--{key.replace('_', '-')} {value}: not an option of method {cfg.method}; "
                f"its options are: {options}"
            )
    return given


def only_method_options(cfg: Any) -> Any:
    """``cfg`` with the method options its method does not accept reset to None.

    For callers that apply one set of options to many methods (``csm benchmark``).
    """
    given = {k: getattr(cfg, k) for k in METHOD_PARAMS if getattr(cfg, k) is not None}
    accepted = accepted_params(cfg.method, given)
    return dataclasses.replace(cfg, **{k: None for k in given if k not in accepted})
