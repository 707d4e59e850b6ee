"""Training-time image augmentation written with torch (no torchvision).

The CIFAR recipe of the CSM paper (and of most calibration papers) augments with a random crop
after zero padding (``RandomCrop(32, padding=4)``) and a random horizontal flip. Both are applied
per sample and batched on whatever device the images live on; every random draw comes from an
explicit :class:`torch.Generator`, so a run is reproducible from its seed.

Horizontal flips are only used where the dataset allows them (``RealData.allow_hflip``); digits and
MNIST never flip (a mirrored 2 is not a 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from csm.errors import CSMError

__all__ = ["Augment", "crop_at", "flip_where", "random_crop", "random_hflip"]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad every image by ``padding`` pixels and crop back to the original size.

    Each sample gets its own offset, drawn uniformly from ``{0, ..., 2 * padding}`` in both axes
    (the torchvision ``RandomCrop(size, padding)`` convention).

    Args:
        x: Images ``(N, C, H, W)`` of any dtype.
        padding: Pixels of zero padding on every side (0 returns ``x``).
        generator: Source of the offsets (on the CPU).

    Returns:
        Cropped images with the shape and dtype of ``x``.
    """
    if padding < 0:
        raise CSMError(f"crop padding {padding}: must be >= 0; use 0 to disable cropping")
    if padding == 0 or x.shape[0] == 0:
        return x
    offsets = torch.randint(0, 2 * padding + 1, (2, x.shape[0]), generator=generator)
    return crop_at(x, padding, offsets)


def crop_at(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop each image at its ``(row, col)`` offset.

    Args:
        x: Images ``(N, C, H, W)`` of any dtype.
        padding: Pixels of zero padding on every side.
        offsets: ``(2, N)`` integer offsets in ``{0, ..., 2 * padding}`` (rows, then columns).
    """
    n, _, h, w = x.shape
    offsets = offsets.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)[None, :]  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)[None, :]  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p`` (one draw per sample)."""
    if not 0.0 <= p <= 1.0:
        raise CSMError(f"flip probability {p}: must lie in [0, 1]")
    if x.shape[0] == 0:
        return x
    return flip_where(x, torch.rand(x.shape[0], generator=generator) < p)


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images of ``x`` whose entry of the boolean ``flip`` ``(N,)`` is set."""
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


@dataclass
class Augment:
    """Random crop with padding, then (optionally) horizontal flip.

    ``augment(x, g)`` equals ``augment.apply(x, *augment.draw(len(x), g))``: the draws can be made
    for a whole global batch and applied to any subset of its rows (each process of a
    multi-process run augments only its own rows, with the draws one process would make).

    Attributes:
        padding: Zero padding for the random crop (0 disables the crop).
        hflip: Whether to flip horizontally (only set where the dataset allows it).
    """

    padding: int = 4
    hflip: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch ``(N, C, H, W)``; draws come from ``generator``."""
        return self.apply(x, *self.draw(x.shape[0], generator))

    def draw(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The random parameters of ``n`` images: crop offsets ``(2, n)`` and flips ``(n,)``.

        Drawn in the order :func:`random_crop` then :func:`random_hflip` draw them; ``None``
        where that part is disabled (or ``n == 0``).
        """
        if self.padding < 0:
            raise CSMError(f"crop padding {self.padding}: must be >= 0; use 0 to disable cropping")
        offsets = flips = None
        if self.padding > 0 and n > 0:
            offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator)
        if self.hflip and n > 0:
            flips = torch.rand(n, generator=generator) < 0.5
        return offsets, flips

    def apply(
        self, x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Apply drawn parameters (one column of ``offsets`` / entry of ``flips`` per image)."""
        if offsets is not None:
            x = crop_at(x, self.padding, offsets)
        if flips is not None:
            x = flip_where(x, flips)
        return x
