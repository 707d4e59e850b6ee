"""ECE-sweep and the debiased l2 estimator against independent, loop-by-loop implementations
of the papers' reference code (written here, not imported)."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import torch

from csm.calibration.estimators import (
    debiased_calibration_error,
    sweep_bins,
    sweep_calibration_error,
)


def _ref_sweep(fx: np.ndarray, y: np.ndarray, norm: float) -> tuple[float, int]:
    """Roelofs et al.'s em_ece_sweep, written out with plain loops."""
    n = len(fx)
    order = sorted(range(n), key=lambda i: fx[i])

    def binned(b):
        bins = [0] * n
        for rank, i in enumerate(order):
            bins[i] = min(b - 1, int(math.floor(rank / n * b)))
        return bins

    def stats(bins, b):
        ece, mono, last = 0.0, True, -1000.0
        for k in range(b):
            members = [i for i in range(n) if bins[i] == k]
            if members:
                fm = sum(fx[i] for i in members) / len(members)
                ym = sum(y[i] for i in members) / len(members)
                mono = mono and ym >= last
                last = ym
                ece += len(members) * abs(ym - fm) ** norm
        return (ece / n) ** (1 / norm), mono

    prev, prev_b = [0] * n, 1
    for b in range(2, n):
        bins = binned(b)
        if not stats(bins, b)[1]:
            return stats(prev, prev_b)[0], prev_b
        prev, prev_b = bins, b
    return stats(prev, prev_b)[0], prev_b


def _ref_debiased(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Kumar et al.'s lower_bound_scaling_ce(p=2, debias=True), get_equal_bins binning."""
    s = sorted(probs)
    size = int(np.ceil(len(s) / num_bins))
    chunks = [s[i : i + size] for i in range(0, len(s), size)]
    bins = sorted({(chunks[i][-1] + chunks[i + 1][0]) / 2.0 for i in range(len(chunks) - 1)})
    bins = sorted(set(bins) | {1.0})
    binned = [[] for _ in bins]
    for p, lab in zip(probs, labels):
        binned[bisect.bisect_left(bins, p)].append((p, lab))
    total = 0.0
    for data in binned:
        if len(data) < 2:
            continue
        mp = sum(p for p, _ in data) / len(data)
        ml = sum(lab for _, lab in data) / len(data)
        total += len(data) / len(probs) * ((mp - ml) ** 2 - ml * (1 - ml) / (len(data) - 1))
    return max(total, 0.0) ** 0.5


def _toy(seed: int, n: int, skew: float):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1.0, n)
    correct = (rng.uniform(size=n) < np.clip(conf - skew, 0, 1)).astype(float)
    return conf, correct


@pytest.mark.parametrize(("seed", "n", "skew"), [(0, 60, 0.0), (1, 200, 0.1), (2, 150, -0.1)])
@pytest.mark.parametrize("norm", [1.0, 2.0])
def test_sweep_equals_the_reference_loop(seed, n, skew, norm):
    conf, correct = _toy(seed, n, skew)
    want, bins = _ref_sweep(conf, correct, norm)
    t = (torch.tensor(conf), torch.tensor(correct))
    assert sweep_bins(*t) == bins
    assert sweep_calibration_error(*t, p=norm) == pytest.approx(want, abs=1e-12)


def test_sweep_on_sorted_correctness_goes_to_n_minus_1_bins():
    conf = np.linspace(0.5, 0.99, 40)
    correct = (conf > 0.7).astype(float)  # every error less confident than every success
    want, bins = _ref_sweep(conf, correct, 1.0)
    assert bins == 39 and sweep_bins(torch.tensor(conf), torch.tensor(correct)) == 39
    assert sweep_calibration_error(torch.tensor(conf), torch.tensor(correct)) == pytest.approx(want)


@pytest.mark.parametrize(("seed", "n", "bins"), [(0, 100, 15), (3, 333, 15), (4, 90, 10)])
def test_debiased_equals_the_reference_loop(seed, n, bins):
    conf, correct = _toy(seed, n, 0.05)
    got = debiased_calibration_error(torch.tensor(conf), torch.tensor(correct), n_bins=bins)
    assert got == pytest.approx(_ref_debiased(conf, correct, bins), abs=1e-12)


def test_debiased_is_smaller_than_plugin_l2_on_a_calibrated_model():
    # a perfectly calibrated model: the plug-in l2 error stays positive from noise alone, the
    # debiased estimator removes (on average) that noise term
    rng = np.random.default_rng(7)
    conf = rng.uniform(0.5, 1.0, (50, 300))
    correct = (rng.uniform(size=conf.shape) < conf).astype(float)
    deb, plug = [], []
    for c, y in zip(conf, correct):
        deb.append(debiased_calibration_error(torch.tensor(c), torch.tensor(y)) ** 2)
        edges = np.quantile(c, np.linspace(0, 1, 16))
        idx = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, 14)
        plug.append(
            sum(
                (idx == k).mean() * (c[idx == k].mean() - y[idx == k].mean()) ** 2
                for k in range(15)
            )
        )
    assert np.mean(deb) < 0.5 * np.mean(plug)
