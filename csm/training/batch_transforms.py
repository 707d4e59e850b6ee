"""Mixup-family batch transforms: images in, mixed images and dense targets out.

A transform is called as ``x_mixed, y_mixed = transform(x, y_dense, generator)`` (timm style:
the transform emits dense targets, the losses in :mod:`csm.training.losses` consume them). Every
random choice (the mixing coefficient and the partner permutation) comes from the
``torch.Generator`` the caller passes, so a seeded trainer replays the same mixes. The coefficient
``lam ~ Beta(alpha, alpha)`` is drawn with NumPy from a seed taken from that generator, because
``torch.distributions.Beta`` cannot use a generator.

References:
    Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
    Pinto et al., "RegMixup: Mixup as a Regularizer Can Surprisingly Improve Accuracy and
    Out-of-Distribution Robustness", NeurIPS 2022.
    Noh et al., "RankMixup: Ranking-Based Mixup Training for Network Calibration", ICCV 2023.

Example:
    >>> import torch
    >>> from csm.training.batch_transforms import Mixup
    >>> x, y = torch.rand(4, 1, 8, 8), torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    >>> xm, ym = Mixup(alpha=0.2)(x, y, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(ym.sum(1), torch.ones(4)))
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from csm.training.losses import check_range

__all__ = [
    "BATCH_TRANSFORMS",
    "SupConViews",
    "Mixup",
    "RankMixupTransform",
    "RegMixupTransform",
    "mix",
    "sample_beta",
]


def sample_beta(alpha: float, generator: torch.Generator | None = None) -> float:
    """Draw ``lam ~ Beta(alpha, alpha)`` reproducibly from a torch generator.

    Args:
        alpha: concentration > 0.
        generator: source of the seed; None uses torch's global generator.

    Returns:
        A float in [0, 1].
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix(x: Tensor, y: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic mix: ``lam * v + (1 - lam) * v[perm]`` for images and targets.

    Args:
        x: ``(N, ...)`` images.
        y: ``(N, K)`` dense targets.
        lam: weight of the original sample.
        perm: ``(N,)`` partner indices.

    Returns:
        Mixed images (dtype of ``x``) and mixed float targets.
    """
    perm = perm.to(x.device)
    x_mixed = lam * x + (1.0 - lam) * x[perm]
    y_mixed = lam * y + (1.0 - lam) * y[perm.to(y.device)]
    return x_mixed.to(x.dtype), y_mixed


class Mixup:
    """Input mixup: ``x~ = lam x_i + (1 - lam) x_perm(i)``, targets mixed alike.

    Args:
        alpha: Beta concentration > 0 (default 0.2).
    """

    default_alpha: float = 0.2

    def __init__(self, alpha: float | None = None) -> None:
        self.alpha = check_range(
            "alpha", self.default_alpha if alpha is None else alpha, 0.0, low_open=True
        )
        self.last_lam: float | None = None
        self.last_perm: Tensor | None = None

    def __call__(
        self, x: Tensor, y: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mix a batch.

        Args:
            x: ``(N, ...)`` float images.
            y: ``(N, K)`` dense float targets (rows summing to 1).
            generator: CPU generator for lam and the permutation.

        Returns:
            ``(x_mixed, y_mixed)``; ``last_lam`` and ``last_perm`` hold the coefficient and the
            partner permutation used.
        """
        if not y.is_floating_point() or y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"y: mixup needs dense (N, K) float targets for N={x.shape[0]} images, "
                f"got {y.dtype} {tuple(y.shape)}; convert with F.one_hot(y, K).float()"
            )
        lam = sample_beta(self.alpha, generator)
        perm = torch.randperm(x.shape[0], generator=generator)
        self.last_lam, self.last_perm = lam, perm
        return mix(x, y, lam, perm)


class RegMixupTransform(Mixup):
    """The mix of RegMixup (Pinto et al., 2022): mixup with a large alpha (default 10).

    The method trains on the clean and the mixed batch together (see
    :class:`csm.training.methods.RegMixupMethod`).
    """

    default_alpha = 10.0


class RankMixupTransform(Mixup):
    """The mix of RankMixup (Noh et al., 2023): alpha = 2, the reference's CIFAR setting
    (cvlab-yonsei/RankMixup ``configs/model/resnet50_mixup.yaml``: ``mixup_alpha: 2.0 # cifar
    2.0 / Tiny 1.0``)."""

    default_alpha = 2.0


BATCH_TRANSFORMS: dict[str, type[Mixup]] = {
    "mixup": Mixup,
    "regmixup": RegMixupTransform,
    "rankmixup": RankMixupTransform,
}
"""Name -> batch transform class (constructed with ``alpha``)."""


class SupConViews:
    """The SimCLR-style views of SupCon / RefCal stage 1, on float images in [0, 1].

    The reference (HobbitLong/SupContrast ``main_supcon.py``, reused by RefCal's
    ``main_refcal.py``) draws each view with ``RandomResizedCrop(size, scale=(0.2, 1))``,
    ``RandomHorizontalFlip``, ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)`` and
    ``RandomGrayscale(p=0.2)``. This class applies, per image, a random resized crop (area share
    in ``scale``, aspect ratio log-uniform in [3/4, 4/3], bilinear resampling with
    ``grid_sample``), then with probability ``jitter_p`` brightness and contrast factors drawn
    uniformly from ``[1 - jitter, 1 + jitter]`` and, for RGB images, saturation likewise and
    grayscale with probability ``grayscale_p``. Differences from torchvision's transforms:
    hue jitter is not applied, the jitter order is fixed (brightness, contrast, saturation;
    torchvision shuffles it) and the crop is drawn directly rather than by 10 rejection tries.
    The flip is left to the trainer's augmentation, which knows whether a dataset may flip.

    Every random draw comes from the CPU ``generator``.

    Args:
        scale: Range of the crop's area share, ``0 < low <= high <= 1`` (reference (0.2, 1)).
        jitter: Colour-jitter strength in [0, 1) (reference 0.4).
        jitter_p: Probability of applying the jitter (reference 0.8).
        grayscale_p: Probability of turning an RGB image gray (reference 0.2).
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.2, 1.0),
        jitter: float = 0.4,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
    ) -> None:
        low = check_range("scale[0]", scale[0], 0.0, 1.0, low_open=True)
        self.scale = (low, check_range("scale[1]", scale[1], low, 1.0))
        self.jitter = check_range("jitter", jitter, 0.0, 1.0)
        self.jitter_p = check_range("jitter_p", jitter_p, 0.0, 1.0)
        self.grayscale_p = check_range("grayscale_p", grayscale_p, 0.0, 1.0)

    def crop_boxes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, 4)`` crop boxes ``(cx, cy, w, h)`` in normalised [-1, 1] image coordinates."""
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(n, generator=generator)
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(
            n, generator=generator
        )
        ratio = log_r.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)
        h = (area / ratio).sqrt().clamp(max=1.0)
        u = torch.rand(n, 2, generator=generator)
        cx = (2.0 * u[:, 0] - 1.0) * (1.0 - w)
        cy = (2.0 * u[:, 1] - 1.0) * (1.0 - h)
        return torch.stack([cx, cy, w, h], dim=1)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random view of every image of ``x`` ``(N, C, H, W)`` (float, [0, 1])."""
        n, c = x.shape[0], x.shape[1]
        boxes = self.crop_boxes(n, generator)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = boxes[:, 2], boxes[:, 0]
        theta[:, 1, 1], theta[:, 1, 2] = boxes[:, 3], boxes[:, 1]
        grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
        out = F.grid_sample(x.float(), grid, mode="bilinear", align_corners=False)
        apply = (torch.rand(n, generator=generator) < self.jitter_p).float()
        factors = 1.0 + self.jitter * (2.0 * torch.rand(n, 3, generator=generator) - 1.0)
        factors = 1.0 + apply[:, None] * (factors - 1.0)  # factor 1 = unchanged
        f = factors.to(x.device)[:, :, None, None, None]
        out = (out * f[:, 0]).clamp(0.0, 1.0)
        gray = _gray(out)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        out = (mean + f[:, 1] * (out - mean)).clamp(0.0, 1.0)
        to_gray = torch.rand(n, generator=generator) < self.grayscale_p
        if c == 3:
            gray = _gray(out)
            out = (gray + f[:, 2] * (out - gray)).clamp(0.0, 1.0)
            out = torch.where(
                to_gray.to(x.device)[:, None, None, None], _gray(out).expand_as(out), out
            )
        return out.to(x.dtype)


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma ``(N, 1, H, W)`` of RGB images (the image itself if single-channel)."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
    return (x * w[None, :, None, None]).sum(dim=1, keepdim=True)
