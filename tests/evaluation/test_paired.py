"""The paired comparison: weighted metrics equal csm's one-shot metrics, the hierarchical
bootstrap agrees with a naive resampling loop, wins are counted in each metric's direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm.calibration.metrics import accuracy, adaptive_ece, brier, ece
from csm.errors import CSMError
from csm.evaluation.paired import PAIRED_METRICS, PairedSamples, paired_comparison, weighted_metric

OFFICIAL = {"cls/Acc": accuracy, "cls/Brier": brier, "cal/ECE": ece, "cal/AdaECE": adaptive_ece}


def _probs(seed: int, n: int = 300, k: int = 6, scale: float = 3.0, ties: int = 40):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, k, generator=g) * scale).softmax(1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    probs[:ties] = probs[0]  # a block of tied confidences with mixed correctness
    y[:ties] = torch.randint(0, k, (ties,), generator=g)
    return probs, y


def _nll(probs, y):
    return float(-probs.double().gather(1, y[:, None]).clamp_min(1e-12).log().mean())


@pytest.mark.parametrize("metric", PAIRED_METRICS)
def test_weighted_metric_equals_the_one_shot_metric_on_explicit_resamples(metric):
    probs, y = _probs(0)
    s = PairedSamples.from_probs(probs, y)
    g = torch.Generator().manual_seed(1)
    n = y.numel()
    for trial in range(4):
        idx = torch.arange(n) if trial == 0 else torch.randint(0, n, (n,), generator=g)
        w = torch.bincount(idx, minlength=n).double()[None]
        rep = torch.repeat_interleave(torch.arange(n), w[0].long())
        fn = OFFICIAL.get(metric, _nll)
        assert float(weighted_metric(s, w, metric)) == pytest.approx(
            fn(probs[rep], y[rep]), abs=1e-6
        ), (metric, trial)


def _naive_interval(m, r, metric, seeds, n_boot, rng):
    """The hierarchical paired bootstrap written out: draw seeds, then test indices, call the
    one-shot metric on the resampled arrays of both methods."""
    fn = OFFICIAL.get(metric, _nll)
    vals = []
    for _ in range(n_boot):
        diffs = []
        for s in rng.integers(0, len(seeds), len(seeds)):
            (pm, y), (pr, _) = m[seeds[s]], r[seeds[s]]
            idx = torch.from_numpy(rng.integers(0, y.numel(), y.numel()))
            diffs.append(fn(pm[idx], y[idx]) - fn(pr[idx], y[idx]))
        vals.append(np.mean(diffs))
    return np.quantile(vals, [0.025, 0.975])


def test_bootstrap_interval_agrees_with_a_naive_resampling_loop():
    seeds = [0, 1, 2]
    ref, sharp = {}, {}
    for s in seeds:
        probs, y = _probs(10 + s, n=200)
        ref[s] = (probs, y)
        sharp[s] = ((probs.log() * 1.6).softmax(1), y)  # the same predictions, sharpened
    samples = {
        "ce": {"none": {s: PairedSamples.from_probs(*ref[s]) for s in seeds}},
        "sharp": {"none": {s: PairedSamples.from_probs(*sharp[s]) for s in seeds}},
    }
    rows = paired_comparison(samples, "ce", n_boot=1500, seed=3)
    assert {r["metric"] for r in rows} == set(PAIRED_METRICS)
    rng = np.random.default_rng(0)
    for row in rows:
        metric = row["metric"]
        fn = OFFICIAL.get(metric, _nll)
        point = [fn(*sharp[s]) - fn(*ref[s]) for s in seeds]
        assert [float(d) for d in row["diffs"].split()] == pytest.approx(point, abs=1e-6)
        assert row["mean_diff"] == pytest.approx(np.mean(point), abs=1e-6)
        if metric in ("cal/ECE", "cls/NLL"):
            lo, hi = _naive_interval(sharp, ref, metric, seeds, 600, rng)
            width = hi - lo
            assert row["ci_low"] == pytest.approx(lo, abs=0.15 * width), metric
            assert row["ci_high"] == pytest.approx(hi, abs=0.15 * width), metric
        assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"]
        assert row["wins"] + row["ties"] + row["losses"] == 3


def test_wins_follow_each_metrics_direction_and_identical_methods_tie():
    probs, y = _probs(5)
    worse = (probs.log() * 3.0).softmax(1)  # sharpened: same accuracy, larger NLL
    samples = {
        "ce": {"none": {0: PairedSamples.from_probs(probs, y)}},
        "same": {"none": {0: PairedSamples.from_probs(probs, y)}},
        "sharp3": {"none": {0: PairedSamples.from_probs(worse, y)}},
    }
    rows = {(r["method"], r["metric"]): r for r in paired_comparison(samples, "ce", n_boot=200)}
    same = rows[("same", "cal/ECE")]
    assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["ties"]) == (0, 0, 0, 1)
    nll = rows[("sharp3", "cls/NLL")]
    assert nll["mean_diff"] > 0 and nll["losses"] == 1 and nll["wins"] == 0
    assert nll["ci_low"] > 0  # the interval excludes 0
    acc = rows[("sharp3", "cls/Acc")]
    assert acc["mean_diff"] == 0 and acc["ties"] == 1
    # deterministic from the seed
    again = {(r["method"], r["metric"]): r for r in paired_comparison(samples, "ce", n_boot=200)}
    assert again == rows
    assert paired_comparison(samples, "absent") == []


def test_runs_tested_on_different_splits_are_refused():
    probs, y = _probs(6)
    other = y.roll(1)
    samples = {
        "ce": {"none": {4: PairedSamples.from_probs(probs, y)}},
        "ls": {"none": {4: PairedSamples.from_probs(probs, other)}},
    }
    with pytest.raises(CSMError, match="ls vs ce, seed 4: .*different test splits"):
        paired_comparison(samples, "ce", n_boot=10)
