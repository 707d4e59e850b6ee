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

import numpy as np
import torch
from torch import Tensor

from csm.training.losses import check_range

__all__ = [
    "BATCH_TRANSFORMS",
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

    def __call__(
        self, x: Tensor, y: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mix a batch.

        Args:
            x: ``(N, ...)`` float images.
            y: ``(N, K)`` dense float targets (rows summing to 1).
            generator: CPU generator for lam and the permutation.

        Returns:
            ``(x_mixed, y_mixed)``; ``last_lam`` holds the coefficient used.
        """
        if not y.is_floating_point() or y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"y: mixup needs dense (N, K) float targets for N={x.shape[0]} images, "
                f"got {y.dtype} {tuple(y.shape)}; convert with F.one_hot(y, K).float()"
            )
        lam = sample_beta(self.alpha, generator)
        perm = torch.randperm(x.shape[0], generator=generator)
        self.last_lam = lam
        return mix(x, y, lam, perm)


class RegMixupTransform(Mixup):
    """The mix of RegMixup (Pinto et al., 2022): mixup with a large alpha (default 10).

    The method trains on the clean and the mixed batch together (see
    :class:`csm.training.methods.RegMixupMethod`).
    """

    default_alpha = 10.0


class RankMixupTransform(Mixup):
    """The mix of RankMixup (Noh et al., 2023); alpha default 1.0 is an [unverified] choice."""

    default_alpha = 1.0


BATCH_TRANSFORMS: dict[str, type[Mixup]] = {
    "mixup": Mixup,
    "regmixup": RegMixupTransform,
    "rankmixup": RankMixupTransform,
}
"""Name -> batch transform class (constructed with ``alpha``)."""
