"""Bias-aware estimators of the top-label calibration error.

The binned ECE is a biased estimator of the true calibration error: with few samples per bin the
per-bin gaps are noisy and their absolute values add up, so it over-estimates a well-calibrated
model's error and its ranking of methods can change with the bin count. Two estimators that
reduce the bias, on the top-label confidence ``conf`` and correctness ``correct``:

* :func:`sweep_calibration_error` -- the monotonic sweep (Roelofs, Cain, Shlens & Mozer,
  "Mitigating bias in calibration error estimation", AISTATS 2022; reference code
  google-research/google-research ``caltrain/calibration_metrics.py``, ``em_ece_sweep``):
  equal-mass bins, with the largest number of bins for which the bin accuracies, in confidence
  order, never decrease.
* :func:`debiased_calibration_error` -- the debiased l2 estimator (Kumar, Liang & Ma,
  "Verified uncertainty calibration", NeurIPS 2019; reference code p-lambda/verified_calibration
  ``calibration/utils.py``, ``lower_bound_scaling_ce(p=2, debias=True)`` with ``get_equal_bins``
  and ``unbiased_square_ce``): per bin the squared gap minus the variance of the bin's mean
  accuracy, ``(conf_b - acc_b)^2 - acc_b (1 - acc_b) / (n_b - 1)``, weighted by bin mass, clipped
  at zero, square root.

Differences from the reference code, kept on purpose: ties of equal confidence are ordered by a
stable sort (the sweep's reference uses ``np.argsort``'s default quicksort, whose tie order is
unspecified); :func:`sweep_calibration_error` takes the norm ``p`` as an argument with default 1
so that it is on the scale of the binned ECE (the reference class's default is 2); when the
correctness, sorted by confidence, never decreases (every bin count is monotone), the sweep ends at
``n - 1`` bins as the reference's loop does, computed directly instead of by trying every count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "debiased_calibration_error",
    "debiased_error_sorted",
    "sweep_calibration_error",
    "sweep_error_sorted",
    "sweep_bins",
]


def _ascending(conf: torch.Tensor, correct: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Confidences ascending and the correctness in that order; ties in the order
    :func:`csm.calibration.metrics.adaptive_ece` gives them (a stable descending sort, flipped)."""
    s, order = torch.sort(conf.detach().cpu(), descending=True, stable=True)
    return s.flip(0).numpy(), correct.detach().cpu()[order].flip(0).numpy()


def _prefix(conf_asc: np.ndarray, correct_asc: np.ndarray):
    """Correctness (float64) and the prefix sums of confidence and correctness."""
    y = np.asarray(correct_asc, dtype=np.float64)
    pc = np.concatenate([[0.0], np.cumsum(np.asarray(conf_asc, dtype=np.float64))])
    py = np.concatenate([[0.0], np.cumsum(y)])
    return y, pc, py


def _bin_stats(b: int, n: int, pc: np.ndarray, py: np.ndarray):
    """Counts, confidence sums and correct sums of ``b`` equal-mass bins over ``n`` positions
    (position ``p`` in bin ``floor(p b / n)``, as the reference assigns them)."""
    edges = -((-np.arange(b + 1) * n) // b)  # ceil(k n / b)
    counts = np.diff(edges)
    return counts, np.diff(pc[edges]), np.diff(py[edges])


def sweep_bins(conf: torch.Tensor, correct: torch.Tensor) -> int:
    """The number of equal-mass bins the monotonic sweep settles on (>= 1).

    Args:
        conf: (N,) top-label confidences.
        correct: (N,) 1 where the prediction is right.
    """
    return _sweep_bins(*_prefix(*_ascending(conf, correct)))


def _sweep_bins(y: np.ndarray, pc: np.ndarray, py: np.ndarray) -> int:
    n = y.size
    if n < 3:
        return 1
    if np.all(np.diff(y) >= 0):  # every bin count is monotone: the reference stops at n - 1
        return n - 1
    best = 1
    for b in range(2, n):
        counts, _, sy = _bin_stats(b, n, pc, py)
        if np.any(np.diff(sy / counts) < 0):
            return best
        best = b
    return best


def sweep_calibration_error(conf: torch.Tensor, correct: torch.Tensor, p: float = 1.0) -> float:
    """Equal-mass monotonic-sweep calibration error (Roelofs et al. 2022), ``l_p`` norm.

    ``ECE_sweep = (sum_b (n_b / N) |acc_b - conf_b|^p)^(1/p)`` with the largest number of
    equal-mass bins ``b*`` such that ``acc_1 <= acc_2 <= ... <= acc_b*`` (bins in confidence
    order); see the module docstring for the reference code.

    Args:
        conf: (N,) top-label confidences in [0, 1].
        correct: (N,) 1 where the prediction is right.
        p: Norm (1: the scale of the binned ECE; the reference class defaults to 2).

    Returns:
        The estimate (a fraction; NaN for no samples).
    """
    return sweep_error_sorted(*_ascending(conf, correct), p=p)


def sweep_error_sorted(conf_asc: np.ndarray, correct_asc: np.ndarray, p: float = 1.0) -> float:
    """:func:`sweep_calibration_error` of confidences sorted ascending (and their correctness)."""
    y, pc, py = _prefix(conf_asc, correct_asc)
    n = y.size
    if n == 0:
        return math.nan
    counts, sc, sy = _bin_stats(_sweep_bins(y, pc, py), n, pc, py)
    gap = np.abs(sy / counts - sc / counts) ** p
    return float((np.sum(counts * gap) / n) ** (1.0 / p))


def debiased_calibration_error(
    conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15
) -> float:
    """Debiased l2 top-label calibration error (Kumar et al. 2019), equal-mass bins.

    Bins as the reference's ``get_equal_bins``: the sorted confidences are cut into chunks of
    ``ceil(N / n_bins)``, a boundary lies halfway between consecutive chunks (duplicates merged),
    and a confidence goes to the first bin whose upper boundary is >= it. A bin with fewer than
    two samples contributes 0, as in the reference.

    Args:
        conf: (N,) top-label confidences in [0, 1].
        correct: (N,) 1 where the prediction is right.
        n_bins: Number of chunks (reference default 15).

    Returns:
        ``sqrt(max(0, sum_b (n_b / N) [(conf_b - acc_b)^2 - acc_b (1 - acc_b) / (n_b - 1)]))``
        (NaN for no samples).
    """
    return debiased_error_sorted(*_ascending(conf, correct), n_bins=n_bins)


def debiased_error_sorted(conf_asc: np.ndarray, correct_asc: np.ndarray, n_bins: int = 15) -> float:
    """:func:`debiased_calibration_error` of confidences sorted ascending (and correctness)."""
    s = np.asarray(conf_asc, dtype=np.float64)
    y, pc, py = _prefix(s, correct_asc)
    n = s.size
    if n == 0:
        return math.nan
    part = -(-n // n_bins)
    starts = np.arange(part, n, part)
    edges = np.unique(np.append((s[starts - 1] + s[starts]) / 2.0, 1.0))
    # a bin holds the values in (edges[i-1], edges[i]]: its sorted positions via searchsorted
    bounds = np.concatenate([[0], np.searchsorted(s, edges, side="right")])
    bounds[-1] = n  # values above the last boundary (none for probabilities) join the last bin
    counts = np.diff(bounds).astype(np.float64)
    sc, sy = np.diff(pc[bounds]), np.diff(py[bounds])
    ok = counts >= 2
    acc = sy[ok] / counts[ok]
    sq = (sc[ok] / counts[ok] - acc) ** 2 - acc * (1 - acc) / (counts[ok] - 1)
    return float(max(np.sum(counts[ok] * sq) / n, 0.0) ** 0.5)
