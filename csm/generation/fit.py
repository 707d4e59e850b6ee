"""``csm fit-diffusion``: train a class-conditional pixel-space diffusion model on a real dataset.

The model is a diffusers :class:`~diffusers.UNet2DModel` whose class-embedding table has ``K + 1``
rows; the last is the *null* class. During training each label is replaced by the null class with
probability ``label_dropout`` (Ho & Salimans, 2022), so one network provides both the conditional
and the unconditional noise prediction needed by classifier-free guidance, and semantic mixing
(Luo et al., ICML 2025) can later interpolate between rows of the table.

Training follows the DDPM noise-prediction objective (Ho et al., 2020): ``x0`` in ``[-1, 1]``,
uniform timesteps, MSE between the true and the predicted noise, with AdamW, linear warm-up then
cosine decay, gradient-norm clipping, an exponential moving average of the weights (diffusers'
``EMAModel``: decay ``min(ema_decay, (1 + s) / (10 + s))`` at step ``s >= 1``, a plain copy at step
0), bf16 on a GPU, and `accelerate <https://huggingface.co/docs/accelerate>`_ for multi-device runs:
``accelerate launch --multi_gpu --num_processes 2 -m csm fit-diffusion ...`` trains one model with
DDP (gloo on a CPU machine), each process on its share of the global ``--batch-size``; the
learning-rate schedule advances once per optimizer step whatever the process count, and only the
main process writes.

Output folder (``--out``)::

    model_index.json, unet/, scheduler/   a CSMMixingPipeline (EMA weights, DDIM sampler);
                                          model_index.json records the class names
    training_config.json, config.yaml     the resolved FitDiffusionConfig, preset values filled in,
                                          plus dataset, class names, steps done, final loss
    training_log.csv                      step,lr,loss of every optimizer step (the learning rate
                                          that step used; the loss averaged over all processes)
    samples.png                           one row per class (pure-class samples of the EMA model)
    checkpoints/step-XXXXXXX/             resumable state (--resume) every --checkpoint-every steps:
                                          accelerate ``save_state`` (model, optimizer, scheduler,
                                          RNG, the diffusers ``EMAModel``), state.json and the log

The pipeline files appear only when training is complete (``model_index.json`` last), so a folder
with ``model_index.json`` is always a finished model. Every random choice (parameter init, batch
order, noise, timesteps, label dropout) is derived from ``--seed`` and the step number (drawn for
the whole global batch, then split across the processes), so a run resumed from a checkpoint
continues exactly like an uninterrupted one, and the processes see the numbers one process would.

References:
    Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models." NeurIPS 2020.
    Ho, Salimans. "Classifier-Free Diffusion Guidance." NeurIPS workshop 2021 / arXiv 2207.12598.
    Luo, Tao, Dong, Xu. "Beyond One-Hot Labels: Semantic Mixing for Model Calibration." ICML 2025.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from csm.config import config_to_dict, save_config
from csm.data.real import RealData, load_real
from csm.errors import CSMError
from csm.generation.card import export_pipeline_files
from csm.generation.pipeline import CSMMixingPipeline, build_unet
from csm.utils import (
    atomic_path,
    atomic_write_text,
    check_output,
    claim_output,
    distributed_state,
    process_rows,
)

logger = logging.getLogger(__name__)

LOG_NAME = "training_log.csv"
EMA_NAME = "ema.safetensors"

__all__ = ["PRESETS", "FitDiffusionConfig", "Preset", "fit_diffusion", "image_grid"]


#: Model outputs ``csm fit-diffusion`` trains (diffusers ``prediction_type`` names).
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class Preset:
    """Model size and optimisation defaults of one preset."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention: bool
    norm_num_groups: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    ema_decay: float
    image_size: int | None  # None: the dataset's own size
    num_train_timesteps: int


#: ``tiny``: seconds, for tests. ``small``: 16-32 px on a CPU in minutes (digits, 16 px, 1500
#: steps: 9.5 min of single-thread CPU time; ~0.17 s/step with 2 idle cores). ``base``:
#: CIFAR-scale (32 px, attention at the lowest resolution) on a GPU.
PRESETS: dict[str, Preset] = {
    "tiny": Preset((16, 32), 1, False, 8, 30, 16, 2e-3, 5, 0.9, 8, 200),
    "small": Preset((32, 64, 64), 1, False, 16, 1500, 64, 2e-3, 100, 0.995, None, 1000),
    "base": Preset((128, 256, 256, 256), 2, True, 32, 150_000, 128, 2e-4, 2000, 0.9999, None, 1000),
}


@dataclass
class FitDiffusionConfig:
    """Configuration of ``csm fit-diffusion``; ``None`` fields take the preset's value."""

    dataset: str = field(default="", metadata={"help": "dataset spec: digits, mnist5k, HF id, dir"})
    out: str = field(default="runs/diffusion", metadata={"help": "output pipeline folder"})
    preset: str = field(default="small", metadata={"help": "model size: tiny, small or base"})
    image_size: int | None = field(default=None, metadata={"help": "resize images (px)"})
    steps: int | None = field(default=None, metadata={"help": "optimiser steps"})
    batch_size: int | None = field(default=None, metadata={"help": "global batch size"})
    lr: float | None = field(default=None, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    ema_decay: float | None = field(default=None, metadata={"help": "EMA decay of the weights"})
    label_dropout: float = field(
        default=0.1, metadata={"help": "probability of training on the null class (for CFG)"}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})
    beta_schedule: str = field(
        default="squaredcos_cap_v2", metadata={"help": "DDPM beta schedule (diffusers name)"}
    )
    prediction_type: str = field(
        default="epsilon",
        metadata={"help": "what the UNet predicts: epsilon or v_prediction (Salimans & Ho 2022)"},
    )
    snr_gamma: float = field(
        default=0.0,
        metadata={"help": "min-SNR-gamma loss weighting (Hang et al. 2023; 5 is typical; 0 = off)"},
    )
    hflip: bool | None = field(
        default=None, metadata={"help": "random horizontal flips (default: dataset's allow_hflip)"}
    )
    checkpoint_every: int = field(default=500, metadata={"help": "save resumable state every N"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing model in --out"})
    seed: int = field(default=0, metadata={"help": "seed of init, batches, noise, dropout"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val/test split"})
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of train held out as val (as csm train's)"}
    )
    test_fraction: float = field(
        default=0.2, metadata={"help": "share held out as test when the dataset has none"}
    )
    train_per_class: int | None = field(
        default=None,
        metadata={
            "help": "train on this many images per class (as csm train --train-per-class: "
            "the generator of a run sees only that run's training images)"
        },
    )
    grid_per_class: int = field(default=8, metadata={"help": "samples per class in samples.png"})
    grid_steps: int = field(default=25, metadata={"help": "DDIM steps for samples.png"})
    grid_guidance: float = field(default=1.0, metadata={"help": "CFG scale for samples.png"})
    mixed_precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, else no), no, bf16, fp16"}
    )
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads (default: torch's; 1 is fastest on a busy CPU)"},
    )


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` floats in ``[0, 1]`` into a uint8 ``(H', W', C)`` grid, row-major."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_png(grid: np.ndarray, path: str | os.PathLike, scale: int = 1) -> None:
    """Write a uint8 grid as PNG (atomically), optionally upscaled by pixel repetition."""
    from PIL import Image

    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _resolved(cfg: FitDiffusionConfig) -> dict:
    """The preset values for every ``None`` field."""
    if cfg.preset not in PRESETS:
        raise CSMError(f"--preset {cfg.preset!r}: unknown; choose one of {sorted(PRESETS)}")
    p = PRESETS[cfg.preset]
    out = {}
    for name in ("image_size", "steps", "batch_size", "lr", "warmup_steps", "ema_decay"):
        v = getattr(cfg, name)
        out[name] = getattr(p, name) if v is None else v
    return out


def _validate(cfg: FitDiffusionConfig, r: dict) -> None:
    if not cfg.dataset:
        raise CSMError("--dataset: missing; pass a dataset spec, e.g. --dataset digits")
    if r["steps"] < 1:
        raise CSMError(f"--steps {r['steps']}: must be >= 1")
    if r["batch_size"] < 1:
        raise CSMError(f"--batch-size {r['batch_size']}: must be >= 1")
    for flag, value in (
        ("--lr", r["lr"]),
        ("--weight-decay", cfg.weight_decay),
        ("--grad-clip", cfg.grad_clip),
        ("--grid-guidance", cfg.grid_guidance),
    ):
        if not math.isfinite(value):
            raise CSMError(f"{flag} {value}: not a finite number; give a finite value")
    if not r["lr"] > 0:
        raise CSMError(f"--lr {r['lr']}: must be > 0")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise CSMError(
            f"--weight-decay {cfg.weight_decay} / --grad-clip {cfg.grad_clip}: must be >= 0"
        )
    if cfg.grid_per_class < 1 or cfg.grid_steps < 1:
        raise CSMError(
            f"--grid-per-class {cfg.grid_per_class} / --grid-steps {cfg.grid_steps}: must be >= 1"
        )
    if not 0.0 <= cfg.label_dropout < 1.0:
        raise CSMError(f"--label-dropout {cfg.label_dropout}: must be in [0, 1), e.g. 0.1")
    if not 0.0 <= r["ema_decay"] < 1.0:
        raise CSMError(f"--ema-decay {r['ema_decay']}: must be in [0, 1), e.g. 0.999")
    if cfg.checkpoint_every < 1:
        raise CSMError(f"--checkpoint-every {cfg.checkpoint_every}: must be >= 1")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise CSMError(f"--mixed-precision {cfg.mixed_precision!r}: choose auto, no, bf16 or fp16")
    _validate_loss(cfg)
    if cfg.resume and cfg.overwrite:
        raise CSMError("--resume and --overwrite: pick one (continue, or start over)")
    check_output(cfg.out, "generator", overwrite=cfg.overwrite, resume=cfg.resume)


def _validate_loss(cfg: FitDiffusionConfig) -> None:
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise CSMError(
            f"--prediction-type {cfg.prediction_type!r}: choose {' or '.join(PREDICTION_TYPES)}"
        )
    if not (math.isfinite(cfg.snr_gamma) and cfg.snr_gamma >= 0):
        raise CSMError(f"--snr-gamma {cfg.snr_gamma}: must be >= 0 (0 = off; 5 is typical)")


def _step_generator(seed: int, step: int) -> torch.Generator:
    """Per-step generator: noise of step ``step`` never depends on earlier steps (exact resume).

    The draws cover the whole global batch and every process takes its own rows, so the random
    numbers of a step do not depend on the number of processes.
    """
    s = np.random.SeedSequence([seed, step, 0, 0x6469]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s))


def _batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of global step ``step``: epochs are seeded permutations, batches drop the tail."""
    per_epoch = max(1, n // batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if n < batch:  # tiny datasets: sample with repetition from the permutation
        return perm[torch.arange(batch) % n]
    return perm[pos * batch : (pos + 1) * batch]


def _checkpoints(out: Path) -> list[Path]:
    d = out / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _prepare_out(cfg: FitDiffusionConfig) -> Path:
    """Claim ``--out`` for this command (only a folder fit-diffusion owns is ever replaced)."""
    out = Path(cfg.out)
    check_output(out, "generator", overwrite=cfg.overwrite, resume=cfg.resume)
    done = (out / "model_index.json").is_file()
    if done and not cfg.overwrite:
        raise CSMError(
            f"--out {out}: already holds a trained model; pass --overwrite to replace it or "
            "choose another --out"
        )
    if not cfg.resume and not cfg.overwrite and _checkpoints(out):
        raise CSMError(
            f"--out {out}: holds checkpoints of an unfinished run; pass --resume to continue it "
            "or --overwrite to start over"
        )
    return claim_output(out, "generator", overwrite=cfg.overwrite, resume=cfg.resume)


def _main_prepares_out(cfg: FitDiffusionConfig, accelerator: Accelerator) -> Path:
    """The main process checks and creates ``--out``; its refusal reaches every process."""
    error = None
    if accelerator.is_main_process:
        try:
            _prepare_out(cfg)
        except CSMError as exc:
            if accelerator.num_processes == 1:
                raise
            error = str(exc)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise CSMError(error)
    return Path(cfg.out)


@dataclass
class _Run:
    """Everything one training session works with (built by :func:`_setup`)."""

    cfg: FitDiffusionConfig
    r: dict
    preset: Preset
    data: RealData
    hflip: bool
    out: Path
    accelerator: Accelerator
    mixed_precision: str
    unet: torch.nn.Module
    noise_sched: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel
    record: dict
    identity: dict
    log: list[tuple[int, float, float]] = field(default_factory=list)  # (step, lr, loss)
    start: int = 0


def _load_data(cfg: FitDiffusionConfig, r: dict, preset: Preset) -> RealData:
    """The real dataset, checked to be square and divisible by the preset's down-sampling."""
    data = load_real(
        cfg.dataset,
        image_size=r["image_size"],
        seed=cfg.split_seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        train_per_class=cfg.train_per_class,
    )
    _, h, w = data.image_shape
    if h != w:
        raise CSMError(
            f"--dataset {cfg.dataset}: images are {h}x{w}; pass --image-size to make them square"
        )
    n_down = len(preset.block_out_channels) - 1
    if h % (2**n_down):
        raise CSMError(
            f"--image-size {h}: must be divisible by {2**n_down} for preset {cfg.preset!r}; "
            f"e.g. --image-size {max(2**n_down, h - h % 2**n_down)}"
        )
    return data


def _make_accelerator(cfg: FitDiffusionConfig, batch_size: int) -> tuple[Accelerator, str]:
    """An ``Accelerator`` over :func:`csm.utils.distributed_state` (gloo DDP on CPU machines).

    ``--batch-size`` is the global batch, split across the processes (``split_batches=True``), so
    accelerate's prepared scheduler advances once per optimizer step whatever the process count.
    """
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    state = distributed_state()
    if batch_size % state.num_processes:
        raise CSMError(
            f"--batch-size {batch_size}: must be divisible by the {state.num_processes} processes"
        )
    accelerator = Accelerator(
        mixed_precision=mp,
        cpu=state.device.type == "cpu",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    return accelerator, mp


#: Options in a checkpoint's identity only where they differ from their default, so checkpoints
#: written before they existed still resume (their defaults are the config's own).
_OPTIONAL_IDENTITY = {
    f.name: f.default
    for f in fields(FitDiffusionConfig)
    if f.name
    in (
        "prediction_type",
        "snr_gamma",
        "split_seed",
        "val_fraction",
        "test_fraction",
        "train_per_class",
    )
}


def _records(
    cfg: FitDiffusionConfig, r: dict, preset: Preset, data: RealData, hflip: bool
) -> tuple[dict, dict]:
    """The record written to ``training_config.json`` and the keys a checkpoint must match."""
    record = {
        **config_to_dict(cfg),
        **r,
        "hflip": hflip,
        "dataset_spec": data.spec,
        "class_names": data.class_names,
        "image_shape": list(data.image_shape),
        "block_out_channels": list(preset.block_out_channels),
        "layers_per_block": preset.layers_per_block,
        "attention": preset.attention,
        "num_train_timesteps": preset.num_train_timesteps,
        "train_split": data.split_record(),
    }
    keys = ("dataset_spec", "class_names", "image_shape", "preset", "seed", "steps", "batch_size")
    identity = {key: record[key] for key in keys}
    for key, default in _OPTIONAL_IDENTITY.items():
        if record[key] != default:  # absent from the identity of checkpoints written before
            identity[key] = record[key]
    return record, identity


def _setup(cfg: FitDiffusionConfig) -> _Run:
    """Check the options, load the data, build the model, optimiser, schedules and EMA."""
    r = _resolved(cfg)
    _validate(cfg, r)
    if cfg.num_threads is not None:
        if cfg.num_threads < 1:
            raise CSMError(f"--num-threads {cfg.num_threads}: must be >= 1")
        torch.set_num_threads(cfg.num_threads)
    preset = PRESETS[cfg.preset]
    data = _load_data(cfg, r, preset)
    hflip = data.allow_hflip if cfg.hflip is None else cfg.hflip
    accelerator, mp = _make_accelerator(cfg, r["batch_size"])
    out = _main_prepares_out(cfg, accelerator)
    c, h, _ = data.image_shape
    torch.manual_seed(cfg.seed)
    unet = build_unet(
        data.num_classes,
        image_size=h,
        in_channels=c,
        block_out_channels=preset.block_out_channels,
        layers_per_block=preset.layers_per_block,
        attention=preset.attention,
        norm_num_groups=preset.norm_num_groups,
    )
    noise_sched = DDPMScheduler(
        num_train_timesteps=preset.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=r["lr"], weight_decay=cfg.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, r["warmup_steps"], r["steps"])
    # decay min(ema_decay, (1 + s) / (10 + s)) at 0-based step s >= 1; a plain copy at s = 0
    ema = EMAModel(unet.parameters(), decay=r["ema_decay"], update_after_step=0, foreach=True)
    unet, optimizer, lr_sched = accelerator.prepare(unet, optimizer, lr_sched)
    ema.to(accelerator.device)  # saved beside save_state as safetensors: _save_ema / _load_ema
    record, identity = _records(cfg, r, preset, data, hflip)
    return _Run(
        cfg=cfg,
        r=r,
        preset=preset,
        data=data,
        hflip=hflip,
        out=out,
        accelerator=accelerator,
        mixed_precision=mp,
        unet=unet,
        noise_sched=noise_sched,
        optimizer=optimizer,
        lr_sched=lr_sched,
        ema=ema,
        record=record,
        identity=identity,
    )


def _read_log(path: Path) -> list[tuple[int, float, float]]:
    rows = list(csv.reader(path.read_text().splitlines()))[1:]
    return [(int(s), float(lr), float(loss)) for s, lr, loss in rows]


def _write_log(rows: list[tuple[int, float, float]], path: Path) -> None:
    """``step,lr,loss`` of every optimizer step (lr as used by that step, loss over all ranks)."""
    lines = ["step,lr,loss"] + [f"{s},{lr!r},{loss!r}" for s, lr, loss in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _resume(run: _Run) -> None:
    """Restore the last checkpoint with ``Accelerator.load_state`` (``--resume``)."""
    ckpts = _checkpoints(run.out)
    if not (run.cfg.resume and ckpts):
        if run.cfg.resume:
            logger.info("--resume: no checkpoint in %s; starting from step 0", run.out)
        return
    last = ckpts[-1]
    meta = json.loads((last / "state.json").read_text())
    expected = {**run.identity, "num_processes": run.accelerator.num_processes}
    for key, val in expected.items():
        if meta.get(key) != val:
            raise CSMError(
                f"--resume: checkpoint {last} was made with {key}={meta.get(key)!r}, not "
                f"{val!r}; pass the original options (and process count) or --overwrite to "
                "start over"
            )
    run.accelerator.load_state(str(last))
    _load_ema(run.ema, last, meta)
    run.ema.to(run.accelerator.device)
    run.start = int(meta["step"])
    run.log = [row for row in _read_log(last / LOG_NAME) if row[0] < run.start]
    logger.info("resuming from %s (step %d)", last, run.start)


def _save_ema(ema: EMAModel, folder: Path) -> dict[str, Any]:
    """Write the EMA weights as ``ema.safetensors``; return its scalar state (for state.json).

    Not ``register_for_checkpointing``: accelerate reloads registered objects with
    ``torch.load(weights_only=False)`` (unpickling), and csm loads only safetensors or
    ``weights_only=True`` files.
    """
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    tensors = {f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(shadow)}
    with atomic_path(folder / EMA_NAME) as tmp:
        save_file(tensors, str(tmp))
    return state


def _load_ema(ema: EMAModel, folder: Path, meta: dict[str, Any]) -> None:
    """Restore what :func:`_save_ema` wrote (``CSMError`` if it is missing or does not fit)."""
    path = folder / EMA_NAME
    if not path.is_file() or "ema" not in meta:
        raise CSMError(f"--resume: {path} missing; the checkpoint is incomplete, use --overwrite")
    tensors = load_file(str(path))
    shadow = [tensors[f"shadow.{i}"] for i in range(len(tensors))]
    if [t.shape for t in shadow] != [t.shape for t in ema.shadow_params]:
        raise CSMError(f"--resume: {path} does not match the model; use --overwrite")
    ema.load_state_dict({**meta["ema"], "shadow_params": shadow})


def _save_checkpoint(run: _Run, step: int) -> None:
    """``Accelerator.save_state`` (model, optimizer, scheduler, EMA, RNG) into ``step-XXXXXXX``.

    Every process takes part (each saves its RNG state); the main process then writes
    ``state.json`` and the training log, renames the folder into place and prunes old ones.
    """
    acc = run.accelerator
    final = run.out / "checkpoints" / f"step-{step:07d}"
    tmp = run.out / "checkpoints" / f".tmp-step-{step:07d}"
    acc.wait_for_everyone()
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    meta = {**run.identity, "num_processes": acc.num_processes, "step": step}
    meta["ema"] = _save_ema(run.ema, tmp)
    atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1))
    _write_log(run.log, tmp / LOG_NAME)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    keep = run.cfg.keep_checkpoints
    for old in _checkpoints(run.out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _noisy_batch(run: _Run, step: int) -> tuple[torch.Tensor, ...]:
    """This process's share of step ``step``: noisy images, labels, timesteps and true noise.

    The random draws are made for the whole global batch (one generator per step) and sliced, so
    one process and several see exactly the same numbers.
    """
    cfg, acc = run.cfg, run.accelerator
    idx = _batch_indices(len(run.data.train.labels), run.r["batch_size"], step, cfg.seed)
    b = len(idx)
    mine = process_rows(b, acc.process_index, acc.num_processes)
    g = _step_generator(cfg.seed, step)
    flip = torch.rand(b, generator=g)[mine] < 0.5 if run.hflip else None
    drop = torch.rand(b, generator=g)[mine] < cfg.label_dropout
    shape = (b, *run.data.image_shape)
    noise = torch.randn(shape, generator=g)[mine]
    t = torch.randint(0, run.preset.num_train_timesteps, (b,), generator=g)[mine]
    idx = idx[mine]
    x0 = run.data.train.images[idx].float().div(127.5).sub(1.0)
    if flip is not None:
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
    y = run.data.train.labels[idx].clone()
    y[drop] = run.data.num_classes  # the null row
    xt = run.noise_sched.add_noise(x0, noise, t)
    return tuple(v.to(acc.device) for v in (xt, y, t, noise))


def diffusion_loss(
    sched: DDPMScheduler,
    pred: torch.Tensor,
    xt: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """The denoising loss of one batch, for the scheduler's ``prediction_type``.

    ``epsilon``: ``||eps_hat - eps||^2`` (Ho et al. 2020); ``v_prediction``: ``||v_hat - v||^2``
    with ``v = sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho 2022; diffusers' ``get_velocity``).
    With ``snr_gamma > 0`` each sample's loss is weighted by ``min(SNR_t, gamma) / SNR_t`` for
    epsilon and ``min(SNR_t, gamma) / (SNR_t + 1)`` for v (min-SNR-gamma, Hang et al. 2023,
    arXiv 2303.09556; the weights of diffusers' training examples, SNR from
    ``diffusers.training_utils.compute_snr``), which stops the many nearly noise-free
    timesteps from dominating the gradient and speeds up convergence.

    Args:
        sched: The training noise scheduler.
        pred: (B, C, H, W) model output.
        xt: (B, C, H, W) noisy images.
        noise: (B, C, H, W) the noise added.
        t: (B,) timesteps.
        snr_gamma: gamma of min-SNR weighting (0: plain mean).

    Returns:
        The scalar loss (float32).
    """
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    else:  # v_prediction: x0 recovered from xt and the noise
        a = sched.alphas_cumprod.to(xt.device)[t].float().view(-1, 1, 1, 1)
        x0 = (xt.float() - (1 - a).sqrt() * noise.float()) / a.sqrt()
        target = sched.get_velocity(x0, noise.float(), t)
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma <= 0:
        return per.mean()
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t)
    w = snr.clamp(max=snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
    return (per * w).mean()


def _train_step(run: _Run, step: int) -> float:
    """One optimizer step (DDP-synchronised) and one EMA update; returns the all-rank mean loss."""
    acc = run.accelerator
    xt, y, t, noise = _noisy_batch(run, step)
    lr = float(run.optimizer.param_groups[0]["lr"])
    with acc.autocast():
        pred = run.unet(xt, t, class_labels=y).sample
    loss = diffusion_loss(run.noise_sched, pred, xt, noise, t, run.cfg.snr_gamma)
    acc.backward(loss)
    if run.cfg.grad_clip > 0:
        acc.clip_grad_norm_(run.unet.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.lr_sched.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.step(acc.unwrap_model(run.unet).parameters())
    loss_val = float(acc.reduce(loss.detach(), reduction="mean"))
    run.log.append((step, lr, loss_val))
    return loss_val


def _train(run: _Run) -> float:
    """Steps ``run.start .. steps - 1`` with checkpoints; returns the smoothed loss."""
    steps = run.r["steps"]
    run.unet.train()
    bar = tqdm(
        range(run.start, steps),
        initial=run.start,
        total=steps,
        desc="fit-diffusion",
        disable=not run.accelerator.is_local_main_process,
    )
    ema_loss = None
    for step in bar:
        loss_val = _train_step(run, step)
        ema_loss = loss_val if ema_loss is None else 0.98 * ema_loss + 0.02 * loss_val
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{run.lr_sched.get_last_lr()[0]:.2e}")
        done = step + 1
        if done % run.cfg.checkpoint_every == 0 and done < steps:
            _save_checkpoint(run, done)
    bar.close()
    return ema_loss


def fit_diffusion(cfg: FitDiffusionConfig) -> Path:
    """Train a class-conditional UNet on ``cfg.dataset`` and save a :class:`CSMMixingPipeline`.

    Under ``accelerate launch`` the processes train one model together (DDP; the global batch
    is split across them) and only the main process writes.

    Args:
        cfg: Resolved configuration.

    Returns:
        The output folder (load it with ``CSMMixingPipeline.from_pretrained``).

    Raises:
        CSMError: Bad option, unknown dataset, an output folder in the way, a checkpoint from a
            different dataset or config.
    """
    run = _setup(cfg)
    _resume(run)
    t0 = time.perf_counter()
    ema_loss = _train(run)
    train_seconds = time.perf_counter() - t0
    acc = run.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return run.out
    ema_unet = copy.deepcopy(acc.unwrap_model(run.unet)).to("cpu").eval()
    run.ema.copy_to(ema_unet.parameters())
    sampler = DDIMScheduler.from_config(run.noise_sched.config)
    pipe = CSMMixingPipeline(unet=ema_unet, scheduler=sampler, class_names=run.data.class_names)
    pipe.set_progress_bar_config(disable=True)
    run.record.update(
        steps_done=run.r["steps"],
        final_loss_ema=ema_loss,
        last_loss=run.log[-1][2] if run.log else float("nan"),
        train_seconds_this_session=round(train_seconds, 1),
        resumed_from_step=run.start,
        mixed_precision=run.mixed_precision,
        num_processes=acc.num_processes,
    )
    _write_log(run.log, run.out / LOG_NAME)
    _write_pipeline(pipe, run.out, run.record, cfg)
    logger.info("saved model to %s (train %.1fs, loss %.4f)", run.out, train_seconds, ema_loss or 0)
    return run.out


def _write_pipeline(pipe: CSMMixingPipeline, out: Path, record: dict, cfg) -> None:
    """Save the pipeline, configs and sample grid; ``model_index.json`` is moved in last."""
    k = pipe.num_classes
    per = max(1, cfg.grid_per_class)
    gens = [torch.Generator().manual_seed(cfg.seed * 1000 + i) for i in range(per)] * k
    labels = [c for c in range(k) for _ in range(per)]
    imgs = []
    for s in range(0, len(labels), 64):
        imgs.append(
            pipe(
                labels[s : s + 64],
                generator=gens[s : s + 64],
                num_inference_steps=cfg.grid_steps,
                guidance_scale=cfg.grid_guidance,
            ).images
        )
    grid = image_grid(torch.cat(imgs), nrow=per)
    save_png(grid, out / "samples.png", scale=max(1, 64 // pipe.unet.config.sample_size))

    tmp = out / ".tmp-pipeline"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    for name in ("unet", "scheduler"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        os.replace(tmp / name, out / name)
    atomic_write_text(out / "training_config.json", json.dumps(record, indent=1))
    save_config(cfg, out)
    os.replace(tmp / "model_index.json", out / "model_index.json")
    export_pipeline_files(out)  # pipeline_csm.py + model card: loadable by diffusers without csm
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
