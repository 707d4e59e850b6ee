"""Image corruptions for evaluating calibration under distribution shift, written in torch.

Five corruptions at three severities, in the spirit of ImageNet-C / CIFAR-10-C (Hendrycks &
Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019, arXiv 1903.12261). The original benchmark ships five severities computed with
PIL/OpenCV/scikit-image on 32x32 or 224x224 images; here every corruption is a few tensor
operations so it runs on any image size, on CPU or GPU, in batches. The three severities are
chosen to span the CIFAR-10-C range (roughly its severities 1, 3 and 5); they are *not*
pixel-identical to CIFAR-10-C.

Every corruption takes float images in ``[0, 1]`` with shape ``(N, C, H, W)`` (what the models
consume) and returns a tensor of the same shape and dtype, clamped to ``[0, 1]``. Only
``gaussian_noise`` is random; it draws its noise from one ``torch.Generator`` per sample (the
diffusers idiom), so a sample's corrupted version depends on its own seed only, never on the
batch it was processed in. :func:`sample_generators` builds those generators from a base seed and
the samples' indices.

Parameters per severity (1, 2, 3):

============== ======================================================================
gaussian_noise additive N(0, sigma^2) noise, sigma = 0.08, 0.18, 0.38 (CIFAR-10-C sev. 1, 3, 5)
blur           Gaussian blur, sigma = 0.5, 1.0, 1.5 pixels at 32 px (scaled by H/32 above 32
               px), kernel radius ceil(3 sigma), reflect padding
contrast       x -> (x - m) c + m with m the per-image mean, c = 0.6, 0.4, 0.2
brightness     x -> x + b, b = 0.1, 0.3, 0.5 (additive, clamped)
pixelate       area-downsample to round(f H) x round(f W), f = 0.75, 0.5, 0.35, then
               nearest-neighbour upsample back
============== ======================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from csm.errors import CSMError

SEVERITIES: tuple[int, ...] = (1, 2, 3)

NOISE_SIGMA = (0.08, 0.18, 0.38)
BLUR_SIGMA = (0.5, 1.0, 1.5)
CONTRAST_FACTOR = (0.6, 0.4, 0.2)
BRIGHTNESS_SHIFT = (0.1, 0.3, 0.5)
PIXELATE_FACTOR = (0.75, 0.5, 0.35)

Generators = torch.Generator | Sequence[torch.Generator] | None


def _check(images: torch.Tensor, severity: int, name: str) -> None:
    if images.ndim != 4:
        raise CSMError(
            f"{name}: images have shape {tuple(images.shape)}; "
            "expected (N, C, H, W) float in [0, 1]"
        )
    if not images.is_floating_point():
        raise CSMError(
            f"{name}: images have dtype {images.dtype}; "
            "convert to float in [0, 1] (x.float() / 255)"
        )
    if severity not in SEVERITIES:
        raise CSMError(
            f"{name}: severity {severity} is not one of {list(SEVERITIES)}; pick 1, 2 or 3"
        )


def sample_generators(seed: int, indices: Sequence[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from ``(seed, index)`` by pure integer arithmetic.

    Args:
        seed: Base seed (recorded with the evaluation).
        indices: Global indices of the samples in the split (not their position in a batch).

    Returns:
        A list of seeded ``torch.Generator``, one per index.
    """
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    gens = []
    for i in indices:
        g = torch.Generator()
        g.manual_seed((int(seed) * 1_000_003 + int(i) * 7_919 + 12_345) % (2**63 - 1))
        gens.append(g)
    return gens


def gaussian_noise(
    images: torch.Tensor, severity: int, generator: Generators = None
) -> torch.Tensor:
    """Add zero-mean Gaussian noise with standard deviation ``NOISE_SIGMA[severity - 1]``.

    Args:
        images: Float images in ``[0, 1]``, shape ``(N, C, H, W)``.
        severity: 1, 2 or 3.
        generator: One generator for the whole batch, or a list with one per sample (batch
            invariant); ``None`` uses the global RNG.

    Returns:
        The noisy images, clamped to ``[0, 1]``.
    """
    _check(images, severity, "gaussian_noise")
    sigma = NOISE_SIGMA[severity - 1]
    shape = images.shape[1:]
    if isinstance(generator, Sequence):
        if len(generator) != images.shape[0]:
            raise CSMError(
                f"gaussian_noise: {len(generator)} generators for {images.shape[0]} images; "
                "pass one generator per image"
            )
        noise = torch.stack([torch.randn(shape, generator=g) for g in generator])
    else:
        noise = torch.randn(images.shape, generator=generator)
    noise = noise.to(device=images.device, dtype=images.dtype)
    return (images + sigma * noise).clamp_(0.0, 1.0)


def _gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def blur(images: torch.Tensor, severity: int, generator: Generators = None) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (mass-preserving on each row/column).

    Args:
        images: Float images in ``[0, 1]``, shape ``(N, C, H, W)``.
        severity: 1, 2 or 3; sigma = ``BLUR_SIGMA[severity - 1] * max(1, H / 32)`` pixels.
        generator: Unused (deterministic corruption); accepted for a uniform signature.

    Returns:
        The blurred images.
    """
    _check(images, severity, "blur")
    n, c, h, w = images.shape
    sigma = BLUR_SIGMA[severity - 1] * max(1.0, h / 32.0)
    k = _gaussian_kernel1d(sigma, images.dtype, images.device)
    r = (k.numel() - 1) // 2
    x = images.reshape(n * c, 1, h, w)
    # reflect padding needs pad < dim; fall back to replicate for tiny images
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.pad(x, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w).clamp_(0.0, 1.0)


def contrast(images: torch.Tensor, severity: int, generator: Generators = None) -> torch.Tensor:
    """Pull every pixel towards its image's mean: ``(x - m) * c + m``.

    Args:
        images: Float images in ``[0, 1]``, shape ``(N, C, H, W)``.
        severity: 1, 2 or 3; ``c = CONTRAST_FACTOR[severity - 1]``.
        generator: Unused.

    Returns:
        The low-contrast images.
    """
    _check(images, severity, "contrast")
    c = CONTRAST_FACTOR[severity - 1]
    m = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - m) * c + m).clamp_(0.0, 1.0)


def brightness(images: torch.Tensor, severity: int, generator: Generators = None) -> torch.Tensor:
    """Brighten by adding ``BRIGHTNESS_SHIFT[severity - 1]`` to every pixel, clamped to 1.

    Args:
        images: Float images in ``[0, 1]``, shape ``(N, C, H, W)``.
        severity: 1, 2 or 3.
        generator: Unused.

    Returns:
        The brightened images.
    """
    _check(images, severity, "brightness")
    return (images + BRIGHTNESS_SHIFT[severity - 1]).clamp_(0.0, 1.0)


def pixelate(images: torch.Tensor, severity: int, generator: Generators = None) -> torch.Tensor:
    """Area-downsample by ``PIXELATE_FACTOR[severity - 1]`` and upsample with nearest neighbour.

    Args:
        images: Float images in ``[0, 1]``, shape ``(N, C, H, W)``.
        severity: 1, 2 or 3.
        generator: Unused.

    Returns:
        The blocky images, same shape as the input.
    """
    _check(images, severity, "pixelate")
    f = PIXELATE_FACTOR[severity - 1]
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, round(f * h)), max(1, round(f * w))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest").clamp_(0.0, 1.0)


CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "blur": blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
}


def corrupt(
    images: torch.Tensor, name: str, severity: int, generator: Generators = None
) -> torch.Tensor:
    """Apply the corruption ``name`` from :data:`CORRUPTIONS` at ``severity``.

    Args:
        images: Float images in ``[0, 1]``, shape ``(N, C, H, W)``.
        name: A key of :data:`CORRUPTIONS`.
        severity: 1, 2 or 3.
        generator: Generator(s) for random corruptions (see :func:`gaussian_noise`).

    Returns:
        The corrupted images.

    Raises:
        CSMError: On an unknown name, a bad severity, or images that are not float (N, C, H, W).
    """
    if name not in CORRUPTIONS:
        raise CSMError(f"corruption {name!r}: unknown; choose from {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](images, severity, generator)
