"""``csm train``: one training loop for CSM and every competing train-time calibration method.

The loop (:func:`train`) trains a classifier from :mod:`csm.training.models` on a real dataset
(:func:`csm.data.real.load_real`), optionally with a synthetic soft-labelled dataset
(:func:`csm.synthetic.dataset.load_synthetic_tensors`), with any method of
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
    model.json          architecture + build kwargs (csm.training.models.model_spec)
    model.safetensors   weights of the best epoch on val
    metrics.csv         one row per epoch: stage, step, lr, train loss, val metrics, time
    run.json            method, model, dataset, seed, status, best_epoch, best val metrics
    checkpoints/last.pt resume state (torch.load(weights_only=True))

:func:`load_run` reloads a finished run (model in eval mode on the CPU).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from csm.calibration.metrics import higher_is_better
from csm.data.augment import Augment
from csm.errors import CSMError
from csm.training.config import TrainConfig, method_params, parse_model_options, validate_config
from csm.training.inference import predict
from csm.training.models import MODELS, build_model_from_spec, model_spec
from csm.training.optim import lr_at, make_optimizer
from csm.training.runs import (
    jsonable,
    prepare_run_dir,
    read_json,
    real_data_for,
    remove_run,
    save_checkpoint,
    save_run,
    save_weights,
    write_json,
    write_metrics_csv,
)
from csm.training.sampler import load_synthetic_for
from csm.utils import distributed_state, process_rows

logger = logging.getLogger(__name__)

__all__ = ["build_augment", "train", "train_command", "training_step"]


def _dist() -> tuple[Any, int, int, torch.device]:
    """(state, rank, world size, device) of this process."""
    state = distributed_state()
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


def _val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from csm.calibration.metrics import compute_all

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
        method: A :class:`csm.training.methods.Method`.
        optimizer: Optimiser over ``params``.
        params: Parameters trained in this stage.
        batch: A :class:`csm.training.methods.Batch` (this process's rows).
        state: A :class:`csm.training.methods.StepState`.
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
    from csm.training.methods import METHODS, Batch, StepState, build_method

    validate_config(cfg)
    if cfg.method not in METHODS:
        raise CSMError(f"--method {cfg.method!r}: unknown method; use one of {', '.join(METHODS)}")
    method = build_method(cfg.method, method_params(cfg))
    model_options = parse_model_options(cfg.model_options)
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
    out, resuming = prepare_run_dir(cfg)
    if world > 1:
        dist_state.wait_for_everyone()
    if cfg.overwrite and is_main and out.is_dir():
        remove_run(out)
    if world > 1:
        dist_state.wait_for_everyone()

    real = real_data_for(cfg)
    num_classes = real.num_classes
    c, h, _ = real.image_shape
    mean, std = _mean_std(real.train.images)
    spec = model_spec(cfg.model, num_classes, c, h, mean, std, **model_options)
    syn = sampler = None
    if cfg.synthetic is not None and method.needs_synthetic:
        syn, sampler = load_synthetic_for(cfg, real)
    elif cfg.synthetic is not None:
        logger.warning(
            "--synthetic %s: ignored, method %s does not train on synthetic data",
            cfg.synthetic,
            cfg.method,
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
    optimizer = make_optimizer(cfg, stage_params(stage_of(0)))
    ckpt_path = out / "checkpoints" / "last.pt"
    if resuming:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        done = int(ckpt["epoch"])
        optimizer = make_optimizer(cfg, stage_params(stage_of(done)))
        optimizer.load_state_dict(ckpt["optimizer"])
        method.load_state_dict(ckpt["method"])
        rows, best = list(ckpt["rows"]), ckpt["best"]
        best_epoch, global_step = int(ckpt["best_epoch"]), int(ckpt["global_step"])
        start_epoch = done + 1
        logger.info("resuming %s after epoch %d", out, done + 1)
    elif is_main:
        save_run(out, cfg, real.class_names, spec)

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
            optimizer = make_optimizer(cfg, stage_params(2))
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
            rows_sl = process_rows(n_global, rank, world)
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
            logits = predict(model, real.val.images, cfg.eval_batch_size, device, autocast)
            row.update(_val_metrics(logits, real.val.labels))
            improved = _better(cfg.select_metric, row, best)
            if improved:
                best = {k: v for k, v in row.items() if k.startswith("val/")}
                best_epoch = epoch + 1
        rows.append(row)
        if is_main:
            if improved:
                save_weights(model, out / "model.safetensors")
            write_metrics_csv(out / "metrics.csv", rows)
            # a max_steps stop inside an epoch keeps the previous checkpoint, so --resume
            # replays the whole epoch and matches an uninterrupted run
            if not partial and (
                (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or stop
            ):
                save_checkpoint(
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
        write_json(
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
                "method_params": jsonable(method.hparams()),
                "num_train": n_train,
                "num_synthetic": 0 if syn is None else int(syn.images.shape[0]),
            },
        )
    if world > 1:
        dist_state.wait_for_everyone()
    return out


def _syn_local(t: torch.Tensor | None, n_real: int, rank: int, world: int) -> torch.Tensor | None:
    """The synthetic rows that belong to this rank's real rows (the sampler's block layout)."""
    if t is None or world == 1:
        return t
    blocks = t.shape[0] // max(1, n_real)
    sl = process_rows(n_real, rank, world)
    return torch.cat([t[b * n_real + sl.start : b * n_real + sl.stop] for b in range(blocks)])


def _share(n: int, rank: int, world: int) -> float:
    """Weight that turns this rank's mean loss into its part of the global mean (x world)."""
    sl = process_rows(n, rank, world)
    return (sl.stop - sl.start) / n if n else 0.0


def train_command(cfg: TrainConfig) -> str | None:
    """``csm train``: run :func:`train` and return a one-line summary (main process only)."""
    out = train(cfg)
    info_path = out / "run.json"
    if _dist()[1] != 0 or not info_path.is_file():  # other processes of accelerate launch
        return None
    info = read_json(info_path)
    val = info.get("val") or {}
    shown = ", ".join(f"{k[4:]} {val[k]:.4f}" for k in ("val/cls/Acc", "val/cal/ECE") if k in val)
    return f"{out}: best epoch {info['best_epoch']} on val ({shown})"
