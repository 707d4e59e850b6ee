"""The one inference loop: logits (and features) of a classifier on uint8 images, batch by batch.

Training (validation each epoch), evaluation and annotation all call :func:`predict`. With
``shard=True`` under ``accelerate launch`` each process runs only its contiguous share of the
images, in whole batches, and the shares are gathered back in order, so every
process returns the same tensor as a single process would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from csm.utils import distributed_state, process_rows

__all__ = ["predict"]

Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    *,
    features: bool = False,
    transform: Transform | None = None,
    shard: bool = False,
    desc: str = "",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits of uint8 images ``(N, C, H, W)`` in eval mode, batch by batch, returned on the CPU.

    Args:
        model: A classifier from :mod:`csm.training.models` (``forward_features`` + ``head``);
            it must already live on ``device``. Its train/eval mode is restored afterwards.
        images: uint8 images (any device).
        batch_size: Images per forward pass.
        device: Where the model runs.
        bf16: bf16 autocast (honoured on CUDA only).
        features: Also return the penultimate features (``forward_features``).
        transform: ``transform(x, idx)`` applied to each float batch in [0, 1] on the CPU
            before the forward (``idx``: the batch's row numbers in ``images``), e.g. a
            corruption with per-image generators.
        shard: Split the rows across the processes of ``accelerate launch`` and gather the
            results (every process gets the whole output).
        desc: Progress-bar label (the bar shows only for long runs, on the main process).

    Returns:
        float32 logits ``(N, K)``, or ``(logits, features)`` when ``features`` is set.
    """
    n = images.shape[0]
    state = distributed_state() if shard else None
    if state is not None and (
        state.num_processes == 1 or -(-n // batch_size) < state.num_processes
    ):
        state = None  # one process, or fewer batches than processes: each runs them all
    rows = slice(0, n)
    if state is not None:
        rows = _batch_aligned_rows(n, batch_size, state.process_index, state.num_processes)
    show = state is None or state.is_main_process
    device = torch.device(device)
    outs = _forward_rows(
        model, images, rows, batch_size, device, bf16, transform, features, desc, show
    )
    if state is not None:
        outs = [_gather_rows(t, n, batch_size, state) for t in outs]
    return (outs[0], outs[1]) if features else outs[0]


@torch.inference_mode()
def _forward_rows(
    model: nn.Module,
    images: torch.Tensor,
    rows: slice,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    transform: Transform | None,
    features: bool,
    desc: str,
    show: bool,
) -> list[torch.Tensor]:
    """Logits (and features) of ``images[rows]``, on the CPU."""
    was_training = model.training
    model.eval()
    logits, feats = [], []
    starts = range(rows.start, rows.stop, batch_size)
    try:
        for s in tqdm(starts, desc=desc, leave=False, disable=not show or len(starts) < 20):
            e = min(s + batch_size, rows.stop)
            if transform is None:
                x = images[s:e].to(device, non_blocking=True).float().div_(255)
            else:
                x = transform(images[s:e].cpu().float().div_(255), torch.arange(s, e)).to(device)
            with torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"
            ):
                f = model.forward_features(x)
                logits.append(model.head(f).float().cpu())
            if features:
                feats.append(f.float().cpu())
    finally:
        model.train(was_training)
    outs = [logits, feats] if features else [logits]
    return [torch.cat(t) if t else torch.zeros(0) for t in outs]


def _batch_aligned_rows(n: int, batch_size: int, rank: int, world: int) -> slice:
    """Rank's share of ``n`` rows in whole batches, so every batch (and result) is as in one
    process."""
    batches = process_rows(-(-n // batch_size), rank, world)
    return slice(min(n, batches.start * batch_size), min(n, batches.stop * batch_size))


def _gather_rows(local: torch.Tensor, n: int, batch_size: int, state) -> torch.Tensor:
    """Concatenate every process's share (:func:`_batch_aligned_rows`) in rank order."""
    from accelerate.utils import gather, pad_across_processes

    device = state.device
    padded = pad_across_processes(local.to(device), dim=0)
    everything = gather(padded).cpu()  # (world * max_rows, ...)
    width = padded.shape[0]
    parts = []
    for r in range(state.num_processes):
        sl = _batch_aligned_rows(n, batch_size, r, state.num_processes)
        parts.append(everything[r * width : r * width + (sl.stop - sl.start)])
    return torch.cat(parts)
