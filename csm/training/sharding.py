"""Each process's rows of a global batch, with random draws that do not depend on the split.

Under ``accelerate launch`` every process walks the same global batches (same order, same seeds)
and trains on its contiguous share (:func:`csm.utils.process_rows`). The cheap random draws
(crop offsets, flips, synthetic indices) are made for the WHOLE global batch from the epoch's
generators, and only the expensive part (cropping, flipping, the forward pass) runs on the
process's own rows, so P processes see exactly the images one process would.

:func:`augment_rows` draws :class:`csm.data.augment.Augment`'s parameters for a global batch
(``Augment.draw``) and applies them to some rows (``Augment.apply``); for all rows it equals
``augment(x, generator)`` bit for bit.
"""

from __future__ import annotations

import torch

from csm.data.augment import Augment
from csm.utils import process_rows

__all__ = ["augment_rows", "loss_share", "synthetic_rows"]

Rows = slice | torch.Tensor


def augment_rows(
    augment: Augment, x: torch.Tensor, n: int, rows: Rows, generator: torch.Generator
) -> torch.Tensor:
    """Augment ``x``, the rows ``rows`` of an ``n``-image global batch, with the draws of all ``n``.

    Args:
        augment: The training augmentation (crop padding, flips).
        x: This process's images ``(len(rows), C, H, W)`` (any dtype, any device).
        n: Images in the global batch.
        rows: Which rows of the global batch ``x`` holds (a slice or an index tensor).
        generator: The epoch's augmentation generator (CPU); advances as for ``n`` images.

    Returns:
        The augmented images, shape and dtype of ``x``.
    """
    offsets, flips = augment.draw(n, generator)
    return augment.apply(
        x,
        None if offsets is None else offsets[:, rows],
        None if flips is None else flips[rows],
    )


def synthetic_rows(m: int, n_real: int, rank: int, world: int) -> torch.Tensor:
    """Rows of the ``m`` synthetic images of a global batch that go with this rank's real rows.

    :meth:`csm.training.sampler.SyntheticSampler.sample` lays them out in blocks of ``n_real``
    (one block per drawn member), so the rank takes its real rows' share of every block.
    """
    sl = process_rows(n_real, rank, world)
    blocks = m // max(1, n_real)
    return torch.cat(
        [torch.arange(b * n_real + sl.start, b * n_real + sl.stop) for b in range(blocks)]
        or [torch.zeros(0, dtype=torch.long)]
    )


def loss_share(n: int, rank: int, world: int) -> float:
    """Weight that turns this rank's mean loss into its part of the global mean, times ``world``.

    DDP averages gradients over the ``world`` processes, so with this weight the averaged
    gradient is the gradient of the global per-sample mean (1.0 for one process).
    """
    sl = process_rows(n, rank, world)
    return (sl.stop - sl.start) / n * world if n else 0.0
