"""Corruptions: hand-computed values, scipy reference for blur, batch invariance of the noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from csm.data.corruptions import (
    BLUR_SIGMA,
    BRIGHTNESS_SHIFT,
    CONTRAST_FACTOR,
    CORRUPTIONS,
    NOISE_SIGMA,
    SEVERITIES,
    corrupt,
    sample_generators,
)
from csm.errors import CSMError


def _images(n: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("severity", SEVERITIES)
def test_shape_dtype_range(name: str, severity: int) -> None:
    x = _images()
    y = corrupt(x, name, severity, sample_generators(0, range(len(x))))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(y, x)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_severity_increases_distortion(name: str) -> None:
    # smooth images (pixelation of i.i.d. noise destroys it equally at every factor)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    phase = torch.arange(8.0).view(8, 1, 1, 1)
    x = 0.5 + 0.3 * torch.sin(xx / 3.0 + phase) * torch.cos(yy / 4.0 - phase)
    dist = [
        float((corrupt(x, name, s, sample_generators(3, range(len(x)))) - x).abs().mean())
        for s in SEVERITIES
    ]
    assert dist[0] < dist[1] < dist[2], dist


def test_gaussian_noise_per_sample_seeds_are_batch_invariant() -> None:
    x = _images(n=6)
    full = corrupt(x, "gaussian_noise", 2, sample_generators(7, range(6)))
    part = corrupt(x[2:5], "gaussian_noise", 2, sample_generators(7, [2, 3, 4]))
    torch.testing.assert_close(full[2:5], part, rtol=0, atol=0)
    again = corrupt(x, "gaussian_noise", 2, sample_generators(7, range(6)))
    torch.testing.assert_close(full, again, rtol=0, atol=0)
    other = corrupt(x, "gaussian_noise", 2, sample_generators(8, range(6)))
    assert not torch.equal(full, other)


def test_gaussian_noise_std_matches_severity() -> None:
    x = torch.full((16, 1, 32, 32), 0.5)
    for s in SEVERITIES[:2]:  # sigma 0.08 and 0.18: clamping at 0/1 is negligible
        y = corrupt(x, "gaussian_noise", s, sample_generators(0, range(16)))
        assert abs(float((y - x).std()) - NOISE_SIGMA[s - 1]) < 0.01
        assert abs(float((y - x).mean())) < 0.01


def test_gaussian_noise_generator_count_mismatch() -> None:
    with pytest.raises(CSMError, match="2 generators for 4 images"):
        corrupt(_images(), "gaussian_noise", 1, sample_generators(0, [0, 1]))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_blur_matches_scipy_gaussian_filter(severity: int) -> None:
    x = _images(n=2, c=1, h=20, w=24, seed=2)
    y = corrupt(x, "blur", severity)
    sigma = BLUR_SIGMA[severity - 1]
    # torch "reflect" padding excludes the edge pixel: scipy calls it "mirror"
    ref = np.stack(
        [
            ndimage.gaussian_filter(im[0].double().numpy(), sigma, mode="mirror", truncate=3.0)
            for im in x
        ]
    )
    np.testing.assert_allclose(y[:, 0].numpy(), ref, atol=1e-5)


def test_blur_keeps_constant_image() -> None:
    x = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(corrupt(x, "blur", 3), x)


def test_contrast_and_brightness_by_hand() -> None:
    x = torch.tensor([[[[0.0, 0.2], [0.4, 0.6]]]])
    m = 0.3
    for s in SEVERITIES:
        c = CONTRAST_FACTOR[s - 1]
        torch.testing.assert_close(corrupt(x, "contrast", s), (x - m) * c + m)
        b = BRIGHTNESS_SHIFT[s - 1]
        torch.testing.assert_close(corrupt(x, "brightness", s), (x + b).clamp(0, 1))
    assert float(corrupt(x, "brightness", 3)[0, 0, 1, 1]) == 1.0  # 0.6 + 0.5 clamps


def test_pixelate_is_block_average() -> None:
    x = _images(n=1, c=1, h=8, w=8, seed=4)
    y = corrupt(x, "pixelate", 2)  # factor 0.5: 2x2 blocks
    blocks = x.reshape(1, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    expect = blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(y, expect)


def test_bad_input_errors_name_the_problem() -> None:
    with pytest.raises(CSMError, match="severity 4"):
        corrupt(_images(), "blur", 4)
    with pytest.raises(CSMError, match="'fog': unknown"):
        corrupt(_images(), "fog", 1)
    with pytest.raises(CSMError, match="dtype torch.uint8"):
        corrupt(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "contrast", 1)
    with pytest.raises(CSMError, match=r"shape \(4, 4\)"):
        corrupt(torch.zeros(4, 4), "contrast", 1)
