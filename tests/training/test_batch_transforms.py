"""Mixup-family batch transforms: seeded, dense targets summing to one, the documented formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csm.errors import CSMError
from csm.training.batch_transforms import BATCH_TRANSFORMS, Mixup, mix, sample_beta


def _batch(n: int = 8, k: int = 4):
    g = torch.Generator().manual_seed(123)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = F.one_hot(torch.arange(n) % k, k).float()
    return x, y


@pytest.mark.parametrize("name", sorted(BATCH_TRANSFORMS))
def test_seeded_and_targets_sum_to_one(name: str) -> None:
    x, y = _batch()
    transform = BATCH_TRANSFORMS[name]()
    a = transform(x, y, torch.Generator().manual_seed(7))
    b = transform(x, y, torch.Generator().manual_seed(7))
    c = transform(x, y, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[1].dtype == torch.float32 and a[1].shape == y.shape
    torch.testing.assert_close(a[1].sum(1), torch.ones(8))
    assert (a[1] >= 0).all()
    assert a[0].shape == x.shape and a[0].dtype == x.dtype


def test_mix_formula_and_reproduction() -> None:
    x, y = _batch()
    g = torch.Generator().manual_seed(3)
    xm, ym = Mixup(alpha=0.4)(x, y, g)
    # replay the same draws: lam first, then the permutation
    g2 = torch.Generator().manual_seed(3)
    lam = sample_beta(0.4, g2)
    perm = torch.randperm(8, generator=g2)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(ym, lam * y + (1 - lam) * y[perm])


def test_mix_by_hand() -> None:
    x = torch.tensor([[1.0], [3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    xm, ym = mix(x, y, 0.25, torch.tensor([1, 0]))
    torch.testing.assert_close(xm, torch.tensor([[2.5], [1.5]]))
    torch.testing.assert_close(ym, torch.tensor([[0.25, 0.75], [0.75, 0.25]]))


def test_soft_targets_stay_normalised() -> None:
    x, _ = _batch()
    y = torch.softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), 1)
    _, ym = Mixup(1.0)(x, y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ym.sum(1), torch.ones(8))


def test_beta_concentration_follows_alpha() -> None:
    g = torch.Generator().manual_seed(0)
    wide = np.array([sample_beta(0.2, g) for _ in range(400)])
    narrow = np.array([sample_beta(10.0, g) for _ in range(400)])
    # Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1))
    assert abs(narrow.mean() - 0.5) < 0.03
    assert narrow.std() == pytest.approx((1 / (4 * 21)) ** 0.5, rel=0.2)
    assert wide.std() == pytest.approx((1 / (4 * 1.4)) ** 0.5, rel=0.2)
    assert ((wide < 0.05) | (wide > 0.95)).mean() > 0.5


def test_defaults() -> None:
    assert BATCH_TRANSFORMS["mixup"]().alpha == 0.2
    assert BATCH_TRANSFORMS["regmixup"]().alpha == 10.0


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf")])
def test_bad_alpha_names_alpha(alpha: float) -> None:
    with pytest.raises(CSMError, match=r"^alpha="):
        Mixup(alpha)


def test_integer_targets_are_rejected() -> None:
    x, _ = _batch()
    with pytest.raises(ValueError, match="dense"):
        Mixup()(x, torch.zeros(8, dtype=torch.long), torch.Generator())


def test_supcon_views_are_seeded_crops_of_the_image() -> None:
    from csm.training.batch_transforms import SupConViews

    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    views = SupConViews()
    a = views(x, torch.Generator().manual_seed(1))
    b = views(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, views(x, torch.Generator().manual_seed(2)))
    # no crop (area 1, ratio 1 when scale is (1, 1) is not guaranteed: ratio varies), no jitter,
    # no grayscale: a full-area crop of aspect ratio 1 is the identity resampling
    ident = SupConViews(scale=(1.0, 1.0), jitter=0.0, jitter_p=0.0, grayscale_p=0.0)
    boxes = ident.crop_boxes(1000, torch.Generator().manual_seed(0))
    area = boxes[:, 2] * boxes[:, 3]
    assert float(area.max()) <= 1.0 + 1e-6 and bool((boxes[:, 2] <= 1).all())
    gray = SupConViews(jitter_p=0.0, grayscale_p=1.0)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
