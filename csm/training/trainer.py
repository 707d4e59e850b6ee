"""``csm train``: one training loop for CSM and every competing train-time calibration method.

The loop (:func:`train`) trains a classifier from :mod:`csm.training.models` on a real dataset
(:func:`csm.data.real.load_real`), optionally with a synthetic soft-labelled dataset
(:func:`csm.synthetic.load_synthetic_tensors`), with any method of
:data:`csm.training.methods.METHODS`.
A method turns a :class:`~csm.training.methods.Batch` into a loss (``loss, logs =
method.compute_loss(model, batch, state)``); the loop owns everything else:

- SGD (momentum, weight decay) or AdamW; ``multistep`` (x ``lr_decay`` at ``milestones``) or
  ``cosine`` learning-rate schedules; gradient-norm clipping;
- torch augmentation (:mod:`csm.data.augment`): random crop with zero padding; horizontal flips only
  where the dataset allows them (never for digits);
- bf16 autocast and ``channels_last`` on CUDA only; on CPU every step is float32 and
  deterministic from the recorded seed;
- model selection on the ``val`` split only (``select_metric``), never on ``test``;
- a per-epoch ``metrics.csv``, checkpoints after every epoch and ``--resume`` (a resumed run equals
  an uninterrupted one: every random draw of epoch ``e`` comes from generators seeded by
  ``(seed, e)``, and the checkpoint, accelerate's ``save_state`` plus the loop and method state,
  holds model, optimizers and method state; :func:`csm.training.runs.save_checkpoint`);
- a method's training plan (:meth:`csm.training.methods.Method.stages`): each stage has its
  epochs, its parameters (and optimiser), its loss and whether the trainer augments; only stages
  that train the classifier are validated (RefCal's SupCon stage is not);
- ``accelerate launch`` on several processes or GPUs: an ``accelerate.Accelerator`` prepares the
  model (with the method's own modules, one ``DistributedDataParallel`` forward per step) and the
  optimisers. Every process walks the same global batches; the cheap random draws (crop offsets,
  flips, synthetic indices) are made for the whole global batch and each process augments and
  forwards only its own rows (:mod:`csm.training.sharding`). Each process's loss is weighted by
  its share, so P processes compute the same update as one whenever the loss is a per-sample mean
  and the model has no batch statistics. BatchNorm normalises per process as in plain DDP, whose
  buffer broadcast keeps rank 0's running statistics (``--sync-bn``: SyncBatchNorm on CUDA).
  Validation is sharded across processes (``predict(..., shard=True)``). On CUDA machines use
  ``accelerate launch --multi_gpu --num_processes P -m csm train ...``; on a CPU-only machine the
  same command starts P gloo processes. (``accelerate launch --cpu --num_processes P`` starts
  only ONE process: accelerate's simple launcher ignores ``num_processes`` on CPU without MPI.)
  The whole real training split lives on the device as uint8 (CIFAR-10: 150 MB). Synthetic
  images stay in the dataset's memory-mapped Arrow shards (``syn_reader="lazy"``, the default):
  the sampler's metadata is in memory and each process reads and decodes only its own rows of
  each batch, so memory does not grow with the synthetic set; ``syn_reader="eager"`` decodes
  every image into memory (on the device) first. Both give the same batches, byte for byte.

CSM batches (Luo et al., ICML 2025, section 3 of ``csm-method.md``): for each real image of class
``y`` the sampler draws ``syn_groups`` synthetic groups whose pair contains ``y`` and takes from
each the endpoint dominated by ``y`` (``syn_endpoint``) plus ``syn_interior`` random interior
members, so the paper's batch is 128 real + 256 synthetic images. Synthetic images are augmented
like real ones.

Run directory (``out``)::

    config.yaml         resolved TrainConfig
    class_names.json    class names, index = label
    model.json          architecture + build kwargs (csm.training.models.model_spec)
    model.safetensors   weights of the best epoch on val
    metrics.csv         one row per epoch: stage, step, lr, train loss, val metrics, time
    run.json            method, model, dataset, seed, status, best_epoch, best val, world_size
    checkpoints/last/   resume state (accelerate save_state + loop.json + method_<rank>.safetensors)

:func:`load_run` reloads a finished run (model in eval mode on the CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from csm.calibration.metrics import (
    canonical_metric,
    compute_all,
    higher_is_better,
)
from csm.data.augment import Augment
from csm.errors import CSMError
from csm.training.config import TrainConfig, method_params, parse_model_options, validate_config
from csm.training.inference import predict
from csm.training.methods import Batch, Method, Stage, StepState, build_method
from csm.training.models import MODELS, build_model_from_spec, model_spec
from csm.training.optim import lr_at, make_optimizer
from csm.training.runs import (
    claim_run_dir,
    discard_failed_run,
    jsonable,
    load_checkpoint,
    prepare_run_dir,
    read_json,
    real_data_for,
    save_checkpoint,
    save_run,
    save_weights,
    write_json,
    write_metrics_csv,
)
from csm.training.sampler import load_synthetic_for, take_images
from csm.training.sharding import augment_rows, loss_share, synthetic_rows
from csm.utils import distributed_state, process_rows

logger = logging.getLogger(__name__)

__all__ = ["CPUHeapReuse", "StepModule", "build_augment", "train", "train_command", "training_step"]


class StepModule(nn.Module):
    """The model and the method's own modules; ``forward(batch, state)`` is a stage's loss.

    Wrapping the whole loss in one module gives ``DistributedDataParallel`` exactly one forward
    per step, whatever the method does inside (CSM's two forward passes, CLUE's MC-dropout
    passes, RefCal's encoder-only and head-only stages, its projection head).

    Args:
        model: The classifier.
        extra: Modules owned by the method (:meth:`~csm.training.methods.Method.all_modules`).
    """

    def __init__(self, model: nn.Module, extra: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.extra = nn.ModuleList(extra)
        self.loss_fn: Any = None

    def forward(self, batch: Batch, state: StepState) -> torch.Tensor:
        """The current stage's float32 loss of ``batch``."""
        loss, _ = self.loss_fn(self.model, batch, state)
        return loss.float()


@dataclass
class _Loop:
    """What the loop has done so far (checkpointed as ``loop.json``)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_epoch: int = -1
    global_step: int = 0
    stop: bool = False


@dataclass
class _Run:
    """Everything one training run holds after setup."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    method: Method
    model: nn.Module
    step_module: StepModule
    wrapped: nn.Module
    stages: list[Stage]
    optimizers: list[Any]
    params: list[list[nn.Parameter]]
    augment: Augment
    real: Any
    train_images: torch.Tensor
    train_labels: torch.Tensor
    syn: Any = None
    sampler: Any = None
    syn_images: Any = None  # uint8 tensor on the device, or SyntheticImages (lazy)
    syn_soft: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def autocast(self) -> bool:
        return self.device.type == "cuda" and self.cfg.bf16


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """Seed of random stream ``stream`` (order, augmentation, synthetic, method) in an epoch."""
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63 - 1)


#: ``--select-metric last``: keep the final epoch's model (no selection), as long training
#: recipes that report their final model do.
LAST = "last"


def _better(metric: str, new: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether ``new`` beats ``best`` on ``val/metric`` (ties: lower val NLL); with
    :data:`LAST` every epoch beats the one before (the final model is kept)."""
    if best is None or metric == LAST:
        return True
    metric = canonical_metric(metric)  # torch-uncertainty aliases -> our names
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
    if a != b:
        return a > b if higher_is_better(metric) else a < b
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


def training_step(
    step_module: nn.Module,
    optimizer: Any,
    params: list[nn.Parameter],
    batch: Batch,
    state: StepState,
    *,
    accelerator: Any = None,
    grad_clip: float = 0.0,
    autocast: bool = False,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """One optimisation step: loss (bf16 autocast on CUDA), backward, clip, step.

    Args:
        step_module: A :class:`StepModule` (or its ``DistributedDataParallel`` wrapper) whose
            ``loss_fn`` is the current stage's loss.
        optimizer: Optimiser over ``params`` (plain or prepared by accelerate).
        params: Parameters trained in this stage (for clipping).
        batch: This process's rows of the global batch.
        state: The :class:`~csm.training.methods.StepState`.
        accelerator: The run's ``Accelerator`` (``backward`` and clipping go through it); None
            for a bare single-process step.
        grad_clip: Max gradient norm (0 disables).
        autocast: bf16 autocast (CUDA only).
        loss_scale: :func:`csm.training.sharding.loss_share` of this process (1 for one).

    Returns:
        The detached float32 loss (no device synchronisation).
    """
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = step_module(batch, state).float()
    optimizer.zero_grad(set_to_none=True)
    scaled = loss * loss_scale
    if accelerator is not None:
        accelerator.backward(scaled)
    else:
        scaled.backward()
    if grad_clip > 0:
        clip = accelerator.clip_grad_norm_ if accelerator is not None else nn.utils.clip_grad_norm_
        clip(params, grad_clip)
    optimizer.step()
    return loss.detach()


class CPUHeapReuse:
    """Context manager: large CPU tensors come from glibc's reused heap, not fresh ``mmap`` pages.

    glibc serves every block of 32 MiB or more (its largest ``mmap`` threshold) with a new
    ``mmap`` and unmaps it when freed, so the kernel zero-fills such a tensor page by page (one
    minor fault per 4 KiB) on every step again; PyTorch keeps no CPU cache. The cost grows with
    the batch: in ``bench/training.py`` (small CNN, 3x32x32) CE at batch 128 (16 MiB activations)
    has no faults, CSM's 256-image synthetic forward (32 MiB activations) ~180 per image, 12% of
    its step (``bench/RESULTS.md``, "Training"). Inside the block ``mallopt(M_MMAP_MAX, 0)`` puts
    large blocks on the heap and ``M_TRIM_THRESHOLD`` (2 GiB - 1) keeps freed memory there for
    the next step; on exit glibc's documented defaults (65536, 128 KiB) come back and
    ``malloc_trim(0)`` returns the free memory. Only where memory comes from changes, never a
    number; resident memory stays near the step's peak inside the block (fragmentation can add
    to it). :func:`train` enters it on the CPU.

    The reuse is not guaranteed: a freed block is reused only while it is whole, and glibc
    serves the small requests made between two steps (autograd metadata, buffers over 512
    bytes) from the smallest free chunk that fits, often the freed block, so the next
    same-size request no longer fits and the heap grows into fresh, zero-filled pages (probed:
    each 40 MiB allocation landing 40 MiB + 128 bytes above the last). The ``csm`` command
    therefore also turns on PyTorch's transparent-huge-page CPU allocations
    (:func:`csm.cli.cpu_allocator_defaults`), which make the fresh pages 2 MiB ones, 512 times
    fewer faults, whatever the heap's state.

    A no-op (``active`` False) when ``enabled`` is False, where the C library is not glibc, when
    the environment sets ``CSM_CPU_HEAP_REUSE=0`` or tunes glibc's allocator itself
    (``GLIBC_TUNABLES`` with ``malloc``, ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``), and
    inside another active block.
    """

    ENV = "CSM_CPU_HEAP_REUSE"
    _depth = 0  # active blocks in this process (only the outermost one sets and restores)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.active = False
        self._libc: Any = None

    @classmethod
    def _glibc(cls) -> Any:
        import ctypes
        import os
        import platform

        env = os.environ
        user_tuned = "malloc" in env.get("GLIBC_TUNABLES", "") or any(
            k in env for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
        )
        if env.get(cls.ENV, "1") == "0" or user_tuned or platform.libc_ver()[0] != "glibc":
            return None
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None

    def __enter__(self) -> CPUHeapReuse:
        if self.enabled and CPUHeapReuse._depth == 0:
            self._libc = self._glibc()
        if self._libc is not None:  # M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1 (malloc.h)
            self.active = bool(self._libc.mallopt(-4, 0)) and bool(
                self._libc.mallopt(-1, 2**31 - 1)
            )
        CPUHeapReuse._depth += self.active
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self._libc.mallopt(-4, 65536)
            self._libc.mallopt(-1, 128 * 1024)
            self._libc.malloc_trim(0)
            CPUHeapReuse._depth -= 1
            self.active = False


def _check_finite(loss_sum: torch.Tensor, cfg: TrainConfig, epoch: int, step: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise CSMError(
            f"--lr {cfg.lr}: training diverged (non-finite loss by epoch {epoch + 1}, "
            f"step {step + 1}); lower --lr or use --grad-clip"
        )


# ------------------------------------------------------------------------------ setup
def _check_inputs(cfg: TrainConfig) -> Method:
    """Validate the configuration and build the method."""
    validate_config(cfg)
    method = build_method(cfg.method, method_params(cfg))
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
    return method


def _accelerator(stages: list[Stage]) -> Any:
    """An Accelerator on the process group of :func:`csm.utils.distributed_state`.

    csm's own ``--bf16`` flag controls autocast, so accelerate's mixed precision stays off. A
    method with several stages leaves some parameters unused in each, hence
    ``find_unused_parameters`` for it.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    state = distributed_state()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=len(stages) > 1)
    return Accelerator(cpu=state.device.type == "cpu", mixed_precision="no", kwargs_handlers=[ddp])


def _check_batches(cfg: TrainConfig, n_train: int, world: int) -> None:
    """Every process needs at least one row of every global batch."""
    last = n_train % cfg.batch_size or cfg.batch_size
    if min(cfg.batch_size, last) < world:
        raise CSMError(
            f"--batch-size {cfg.batch_size}: with {world} processes every batch needs at least "
            f"{world} images (the last batch of the {n_train} training images has {last}); "
            "choose another --batch-size"
        )


def _model(cfg: TrainConfig, spec: dict[str, Any], world: int, device: torch.device) -> nn.Module:
    """The classifier, initialised from the seed (SyncBatchNorm with ``--sync-bn``)."""
    torch.manual_seed(cfg.seed)
    model = build_model_from_spec(spec).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and world > 1:
        if device.type != "cuda":
            raise CSMError(
                "--sync-bn true: SyncBatchNorm needs CUDA processes; drop --sync-bn on CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _synthetic_images(syn: Any, device: torch.device) -> Any:
    """Where the trainer takes synthetic images from: the decoded tensor moved to ``device``, or
    the lazy :class:`csm.synthetic.SyntheticImages` as is (rows decoded per batch)."""
    if syn is None:
        return None
    return syn.images.to(device) if isinstance(syn.images, torch.Tensor) else syn.images


def _setup(cfg: TrainConfig) -> tuple[_Run, _Loop, int]:
    """Build data, model, method, accelerator and optimisers; resume if asked.

    Returns:
        The run, the loop state and the first epoch to train.
    """
    method = _check_inputs(cfg)
    stages = method.stages(cfg.epochs)
    accelerator = _accelerator(stages)
    out, resuming = prepare_run_dir(cfg)  # checks only: nothing is written before the inputs load
    real = real_data_for(cfg)
    _check_batches(cfg, int(real.train.labels.shape[0]), accelerator.num_processes)
    c, h, _ = real.image_shape
    mean, std = _mean_std(real.train.images)
    spec = model_spec(
        cfg.model, real.num_classes, c, h, mean, std, **parse_model_options(cfg.model_options)
    )
    syn = sampler = None
    if cfg.synthetic is not None and method.needs_synthetic:
        syn, sampler = load_synthetic_for(cfg, real, lazy=cfg.syn_reader == "lazy")
    elif cfg.synthetic is not None:
        logger.warning(
            "--synthetic %s: ignored, method %s does not train on synthetic data",
            cfg.synthetic,
            cfg.method,
        )
    device = accelerator.device
    model = _model(cfg, spec, accelerator.num_processes, device)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # every input is valid: take the folder
        claim_run_dir(cfg, resuming)
    accelerator.wait_for_everyone()
    step_module = StepModule(model, method.all_modules(model))
    params = [stage.parameters(model) for stage in stages]
    optimizers = [make_optimizer(stage_config(cfg, s), p) for s, p in zip(stages, params)]
    wrapped, *optimizers = accelerator.prepare(step_module, *optimizers)
    run = _Run(
        cfg,
        out,
        accelerator,
        method,
        model,
        step_module,
        wrapped,
        stages,
        optimizers,
        params,
        build_augment(cfg, real.allow_hflip),
        real,
        real.train.images.to(device),
        real.train.labels.to(device),
        syn,
        sampler,
        _synthetic_images(syn, device),
        syn.soft_labels.to(device) if syn is not None else None,
    )
    loop, start = _Loop(), 0
    if resuming:
        saved = load_checkpoint(accelerator, out, method)
        loop = _Loop(saved["rows"], saved["best"], saved["best_epoch"], saved["global_step"])
        start = int(saved["epoch"]) + 1
        logger.info("resuming %s after epoch %d", out, start)
    elif accelerator.is_main_process:
        save_run(out, cfg, real.class_names, spec)
    accelerator.wait_for_everyone()
    return run, loop, start


# ------------------------------------------------------------------------------ one epoch
def stage_config(cfg: TrainConfig, stage: Stage) -> TrainConfig:
    """``cfg`` with the stage's own learning rate / weight decay where the stage sets them.

    RefCal's stage 2 trains the linear head at lr 5 without weight decay, as the reference's
    ``main_linear.py`` does (:class:`csm.training.methods.RefCalMethod`).
    """
    changes = {
        k: getattr(stage, k) for k in ("lr", "weight_decay") if getattr(stage, k) is not None
    }
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _stage_at(stages: list[Stage], epoch: int) -> tuple[int, int]:
    """(index of the stage that trains ``epoch``, first epoch of that stage)."""
    start = 0
    for i, stage in enumerate(stages):
        if epoch < start + stage.epochs:
            return i, start
        start += stage.epochs
    raise ValueError(f"epoch {epoch}: beyond the training plan")  # pragma: no cover


def _local_batch(
    run: _Run, idx: torch.Tensor, stage: Stage, g_aug: torch.Generator, g_syn: torch.Generator
) -> tuple[Batch, slice]:
    """This process's rows of the global batch ``idx``: random draws for all rows, work on its own.

    Crops and flips run on uint8 (exact, less memory); synthetic indices are drawn for the whole
    global batch and the process keeps the ones that go with its real rows.
    """
    acc, n = run.accelerator, int(idx.numel())
    rows = process_rows(n, acc.process_index, acc.num_processes)
    y = run.train_labels[idx]
    raw = run.train_images[idx[rows]]
    x = (augment_rows(run.augment, raw, n, rows, g_aug) if stage.augment else raw).float().div_(255)
    syn_x = syn_y = None
    if run.sampler is not None:
        sidx = run.sampler.sample(y, g_syn)
        srows = synthetic_rows(int(sidx.numel()), n, acc.process_index, acc.num_processes)
        syn_raw = take_images(run.syn_images, sidx[srows], run.device)  # this rank's rows only
        local = sidx[srows].to(run.device)
        syn_x = (
            augment_rows(run.augment, syn_raw, int(sidx.numel()), srows, g_aug).float().div_(255)
        )
        syn_y = run.syn_soft[local]
    if run.device.type == "cuda" and run.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        if syn_x is not None:
            syn_x = syn_x.contiguous(memory_format=torch.channels_last)
    return Batch(x, y[rows], idx[rows], syn_x, syn_y), rows


def _train_epoch(run: _Run, loop: _Loop, epoch: int) -> dict[str, Any]:
    """Train one epoch of the current stage; returns its metrics row (no validation yet)."""
    cfg, acc = run.cfg, run.accelerator
    i, stage_start = _stage_at(run.stages, epoch)
    stage, optimizer, params = run.stages[i], run.optimizers[i], run.params[i]
    run.step_module.loss_fn = stage.loss
    torch.manual_seed(_epoch_seed(cfg.seed, epoch, 0))  # dropout and other global draws
    # csm draws nothing from Python's or NumPy's global generators; seeding them anyway makes the
    # RNG states accelerate's save_state records (random_states_<rank>.pkl) a function of the seed
    random.seed(_epoch_seed(cfg.seed, epoch, 5))
    np.random.seed(_epoch_seed(cfg.seed, epoch, 5) % 2**32)
    g_order, g_aug, g_syn, g_method = (
        torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, s)) for s in (1, 2, 3, 4)
    )
    n_train = int(run.train_labels.shape[0])
    steps = math.ceil(n_train / cfg.batch_size)
    perm = torch.randperm(n_train, generator=g_order)
    run.wrapped.train()
    t0, lr, step = time.time(), cfg.lr, 0
    loss_sum, seen = torch.zeros((), device=run.device), 0
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not acc.is_main_process,
        leave=False,
    )
    for step in bar:
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size].to(run.device)
        lr = lr_at(stage_config(cfg, stage), epoch - stage_start, step, steps, stage.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch, rows = _local_batch(run, idx, stage, g_aug, g_syn)
        n = int(idx.numel())
        views = (
            None
            if stage.augment
            else partial(augment_rows, run.augment, n=n, rows=rows, generator=g_aug)
        )
        state = StepState(epoch, loop.global_step, i + 1, g_method, views)
        loss = training_step(
            run.wrapped,
            optimizer,
            params,
            batch,
            state,
            accelerator=acc,
            grad_clip=cfg.grad_clip,
            autocast=run.autocast,
            loss_scale=loss_share(n, acc.process_index, acc.num_processes),
        )
        loop.global_step += 1
        loss_sum = loss_sum + loss * (rows.stop - rows.start)  # no per-step sync
        seen += rows.stop - rows.start
        if step % 10 == 0 or step == steps - 1:
            _check_finite(loss_sum, cfg, epoch, step)
            bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.3g}")
        if cfg.max_steps is not None and loop.global_step >= cfg.max_steps:
            loop.stop = True
            break
    bar.close()
    run.method.on_epoch_end()
    _check_finite(loss_sum, cfg, epoch, steps - 1)
    total = acc.reduce(
        torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64, device=run.device), "sum"
    ).cpu()
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "stage": i + 1,
        "step": loop.global_step,
        "lr": lr,
        "train/loss": float(total[0] / total[1].clamp(min=1)),
        "time_s": round(time.time() - t0, 3),
    }
    if step < steps - 1:
        row["partial"] = True  # stopped by max_steps inside the epoch
    return row


def _sync_buffers(run: _Run) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts them at the start of every forward; after an epoch's last step each process
    holds the statistics of its own last batch, so before validation (sharded over processes)
    and checkpointing every process takes rank 0's, the ones it saves.
    """
    if run.accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    for buf in run.model.buffers():
        buf.copy_(broadcast(buf.clone(), from_process=0))


def _validate(run: _Run, loop: _Loop, row: dict[str, Any], epoch: int) -> bool:
    """Add val metrics to ``row`` and update the best epoch; returns whether it improved."""
    cfg = run.cfg
    logits = predict(
        run.model, run.real.val.images, cfg.eval_batch_size, run.device, run.autocast, shard=True
    )
    row.update({f"val/{k}": float(v) for k, v in compute_all(logits, run.real.val.labels).items()})
    if not _better(cfg.select_metric, row, loop.best):
        return False
    loop.best = {k: v for k, v in row.items() if k.startswith("val/")}
    loop.best_epoch = epoch + 1
    return True


def _save_epoch(run: _Run, loop: _Loop, row: dict[str, Any], epoch: int, improved: bool) -> None:
    """Write weights (if improved), metrics.csv and, at checkpoint epochs, the resume state."""
    cfg, acc = run.cfg, run.accelerator
    if acc.is_main_process:
        if improved:
            save_weights(run.model, run.out / "model.safetensors")
        write_metrics_csv(run.out / "metrics.csv", loop.rows)
    # a max_steps stop inside an epoch keeps the previous checkpoint, so --resume replays the
    # whole epoch and matches an uninterrupted run
    last = epoch + 1 == cfg.epochs or loop.stop
    if not row.get("partial") and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
        state = {"epoch": epoch, "rows": loop.rows, "best": loop.best}
        state.update(best_epoch=loop.best_epoch, global_step=loop.global_step)
        save_checkpoint(acc, run.out, state, run.method.state_dict())
    shown = "".join(f", {k} {row[k]:.4f}" for k in ("val/cls/Acc", "val/cal/ECE") if k in row)
    if acc.is_main_process:
        logger.info(
            "epoch %d/%d: train loss %.4f%s", epoch + 1, cfg.epochs, row["train/loss"], shown
        )


def _write_run_json(run: _Run, loop: _Loop) -> None:
    """The run's summary (main process)."""
    cfg = run.cfg
    partial = bool(loop.rows and loop.rows[-1].get("partial"))  # max_steps inside the last epoch
    if loop.best is None:
        raise CSMError(f"--epochs {cfg.epochs}: no epoch trained the classifier; give more epochs")
    write_json(
        run.out / "run.json",
        {
            "method": cfg.method,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "synthetic": cfg.synthetic,
            "seed": cfg.seed,
            "status": "complete" if len(loop.rows) == cfg.epochs and not partial else "stopped",
            "best_epoch": loop.best_epoch,
            "select_metric": cfg.select_metric,
            "val": loop.best,
            "epochs_trained": len(loop.rows),
            "steps": loop.global_step,
            "world_size": run.accelerator.num_processes,
            "device": run.device.type,
            "method_params": jsonable(run.method.hparams()),
            "num_train": int(run.train_labels.shape[0]),
            "num_synthetic": 0 if run.syn is None else int(run.syn.images.shape[0]),
        },
    )


# ------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig) -> Path:
    """Train a classifier and write the run directory (see the module docstring).

    Args:
        cfg: The resolved configuration.

    Returns:
        The run directory.

    Raises:
        CSMError: Unknown method, model or method option, a synthetic dataset whose classes
            differ from the real one, an out-of-range hyper-parameter, or a run directory
            holding another run (without ``resume``/``overwrite``).
    """
    created = not Path(cfg.out).is_dir() or not any(Path(cfg.out).iterdir())
    run, loop, start = _setup(cfg)
    try:
        with CPUHeapReuse(run.device.type == "cpu"):  # no per-step page faults (see the class)
            _train_loop(run, loop, start)
    except Exception:
        if run.accelerator.is_main_process and start == 0:
            discard_failed_run(run.out, created)  # e.g. diverged: a retry starts clean
        raise
    return run.out


def _validates(cfg: TrainConfig, loop: _Loop, epoch: int) -> bool:
    """Whether epoch ``epoch`` is validated: every ``--val-every``-th epoch and the last one
    (also a ``--max-steps`` stop). Model selection chooses among the validated epochs."""
    return (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs or loop.stop


def _train_loop(run: _Run, loop: _Loop, start: int) -> None:
    """The epochs from ``start``, then ``run.json``."""
    cfg = run.cfg
    loop.stop = cfg.max_steps is not None and loop.global_step >= cfg.max_steps
    for epoch in range(start, cfg.epochs):
        if loop.stop:
            break
        row = _train_epoch(run, loop, epoch)
        _sync_buffers(run)
        improved = False
        if run.stages[_stage_at(run.stages, epoch)[0]].trains_classifier and _validates(
            cfg, loop, epoch
        ):
            improved = _validate(run, loop, row, epoch)
        loop.rows.append(row)
        _save_epoch(run, loop, row, epoch, improved)
        run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        _write_run_json(run, loop)
    run.accelerator.wait_for_everyone()


def train_command(cfg: TrainConfig) -> str | None:
    """``csm train``: run :func:`train` and return a one-line summary (main process only)."""
    out = train(cfg)
    info_path = out / "run.json"
    if not distributed_state().is_main_process or not info_path.is_file():
        return None  # other processes of accelerate launch
    info = read_json(info_path)
    val = info.get("val") or {}
    shown = ", ".join(f"{k[4:]} {val[k]:.4f}" for k in ("val/cls/Acc", "val/cal/ECE") if k in val)
    return f"{out}: best epoch {info['best_epoch']} on val ({shown})"
