"""Paired comparisons against a reference method (CE): per-seed differences, bootstrap, wins.

Two methods trained with the same seed are scored on the same test split, so their difference
on that split is the quantity of interest, not the difference of two means with their own
spreads. For every method ``M``, calibrator and metric this module reports

* the per-seed differences ``metric(M, seed) - metric(ref, seed)`` over the seeds both have;
* their mean and a 95% percentile interval from a **hierarchical paired bootstrap**: each
  replicate draws the seeds with replacement and, inside each drawn seed, the test samples with
  replacement (the same draw for ``M`` and the reference, so the pairing is kept), then averages
  the per-seed differences (Davison & Hinkley 1997, section 3.8, for resampling at both levels;
  paired as in Dietterich 1998 for comparing classifiers on the same test data);
* win counts: seeds on which ``M`` is better than the reference in the metric's own direction
  (:func:`csm.calibration.metrics.higher_is_better`), ties counted apart.

The bootstrap never materialises resampled arrays: a replicate is a vector of multinomial counts
``w`` over the test samples and every metric is a weighted sum. Accuracy, NLL and Brier are means
of per-sample values; ECE (equal-width bins, csm's one binning, :func:`bin_indices`) is
``sum_b |sum_{i in b} w_i (correct_i - conf_i)| / n``; AdaECE's equal-mass bins are placed over
the resampled multiset in confidence order (the order :func:`adaptive_ece` sorts by), through a
cumulative sum. With all counts equal to one each equals the one-shot metric of
:mod:`csm.calibration.metrics` (tested). NLL here is computed from the (calibrated)
probabilities, clamped at 1e-12, for every calibrator alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from csm.calibration.metrics import bin_indices, higher_is_better
from csm.errors import CSMError

__all__ = [
    "PAIRED_METRICS",
    "PairedSamples",
    "paired_comparison",
    "weighted_metric",
]

#: Metrics the paired bootstrap reports (clean test).
PAIRED_METRICS = ("cls/Acc", "cls/NLL", "cls/Brier", "cal/ECE", "cal/AdaECE")

_CHUNK = 1000  # bootstrap replicates processed at once (memory: _CHUNK x n float64 per matrix)


@dataclass
class PairedSamples:
    """Per-sample quantities of one run's clean test predictions (one calibrator).

    Attributes:
        conf: (n,) top-label confidence.
        correct: (n,) 1.0 where the top label is right.
        nll: (n,) ``-log p_y`` (clamped at 1e-12).
        brier: (n,) ``sum_k (p_k - 1[k = y])^2``.
        labels: (n,) the labels (to check that two runs share their test split).
    """

    conf: torch.Tensor
    correct: torch.Tensor
    nll: torch.Tensor
    brier: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_probs(cls, probs: torch.Tensor, labels: torch.Tensor) -> PairedSamples:
        """Per-sample quantities from ``(n, K)`` probabilities and ``(n,)`` labels."""
        p = probs.double()
        y = labels.long()
        conf, pred = p.max(1)
        onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
        return cls(
            conf=conf,
            correct=(pred == y).double(),
            nll=-p.gather(1, y[:, None]).squeeze(1).clamp_min(1e-12).log(),
            brier=(p - onehot).pow(2).sum(1),
            labels=y,
        )


def _adaptive(s: PairedSamples, w: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Weighted AdaECE of every row of ``w`` (R, n): equal-mass bins over the multiset."""
    n_total = int(round(float(w[0].sum()))) if w.shape[0] else 0
    _, order = torch.sort(s.conf, descending=True, stable=True)
    order = order.flip(0)  # ascending, ties in the order adaptive_ece gives them
    v = (s.correct - s.conf)[order]
    ws = w[:, order]
    c = ws.cumsum(1)  # (R, n) positions covered after each sample
    g = (ws * v).cumsum(1)
    edges = torch.tensor(
        [math.ceil(k * n_total / n_bins) for k in range(n_bins + 1)], dtype=w.dtype
    ).expand(w.shape[0], -1)
    idx = torch.searchsorted(c.contiguous(), edges.contiguous(), right=True)  # first c_i > p
    prev = (idx - 1).clamp_min(0)
    c_prev = torch.where(idx > 0, c.gather(1, prev), torch.zeros_like(edges))
    g_prev = torch.where(idx > 0, g.gather(1, prev), torch.zeros_like(edges))
    v_at = v[idx.clamp_max(v.numel() - 1)]
    f = torch.where(idx < v.numel(), g_prev + (edges - c_prev) * v_at, g[:, -1:].expand_as(edges))
    return (f[:, 1:] - f[:, :-1]).abs().sum(1) / n_total


def weighted_metric(
    s: PairedSamples, w: torch.Tensor, metric: str, n_bins: int = 15
) -> torch.Tensor:
    """``metric`` of the resampled test sets given by multinomial counts ``w`` (R, n).

    Args:
        s: The run's per-sample quantities.
        w: (R, n) float64 counts; each row sums to the resampled set's size.
        metric: One of :data:`PAIRED_METRICS`.
        n_bins: Bins of ECE and AdaECE.

    Returns:
        (R,) float64 values (fractions; NLL in nats).
    """
    n = w.sum(1)
    if metric == "cls/Acc":
        return w @ s.correct / n
    if metric == "cls/NLL":
        return w @ s.nll / n
    if metric == "cls/Brier":
        return w @ s.brier / n
    if metric == "cal/ECE":
        bins = bin_indices(s.conf.float(), n_bins)
        gap = torch.zeros(s.conf.numel(), n_bins, dtype=torch.float64)
        gap[torch.arange(s.conf.numel()), bins] = s.correct - s.conf
        return (w @ gap).abs().sum(1) / n
    if metric == "cal/AdaECE":
        return _adaptive(s, w, n_bins)
    raise CSMError(f"paired metric {metric!r}: unknown; choose one of {', '.join(PAIRED_METRICS)}")


def _counts(n: int, reps: int, generator: torch.Generator) -> torch.Tensor:
    """(reps, n) multinomial counts of ``n`` draws with replacement from ``n`` samples."""
    idx = torch.randint(0, n, (reps, n), generator=generator)
    return torch.zeros(reps, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(reps, n, dtype=torch.float64)
    )


def _seed_differences(
    m: PairedSamples, ref: PairedSamples, metrics: Sequence[str], reps: int, gen, n_bins: int
) -> dict[str, torch.Tensor]:
    """(reps,) bootstrap differences ``M - ref`` per metric for one seed's test split."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in metrics}
    n = m.conf.numel()
    for start in range(0, reps, _CHUNK):
        w = _counts(n, min(_CHUNK, reps - start), gen)
        for k in metrics:
            out[k].append(weighted_metric(m, w, k, n_bins) - weighted_metric(ref, w, k, n_bins))
    return {k: torch.cat(v) for k, v in out.items()}


def _check_pairs(
    method: str, ref: str, seeds: list[int], m: Mapping[int, PairedSamples], r: Mapping
) -> None:
    for seed in seeds:
        if not torch.equal(m[seed].labels, r[seed].labels):
            raise CSMError(
                f"paired comparison {method} vs {ref}, seed {seed}: the two runs were tested on "
                "different test splits (labels differ); train both with the same seed, dataset "
                "and split seed"
            )


def _summary(
    method: str,
    cal: str,
    metric: str,
    seeds: list[int],
    point: list[float],
    boot: torch.Tensor,
) -> dict[str, Any]:
    """One output row: per-seed differences, mean, 95% interval, wins/ties/losses."""
    hib = higher_is_better(metric)
    wins = sum(1 for d in point if (d > 0 if hib else d < 0))
    ties = sum(1 for d in point if d == 0)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return {
        "method": method,
        "calibrator": cal,
        "metric": metric,
        "n_seeds": len(seeds),
        "seeds": " ".join(str(s) for s in seeds),
        "diffs": " ".join(repr(float(d)) for d in point),
        "mean_diff": float(sum(point) / len(point)),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "wins": wins,
        "ties": ties,
        "losses": len(point) - wins - ties,
    }


def paired_comparison(
    samples: Mapping[str, Mapping[str, Mapping[int, PairedSamples]]],
    reference: str,
    *,
    metrics: Sequence[str] = PAIRED_METRICS,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
) -> list[dict[str, Any]]:
    """Paired differences of every method against ``reference``, per calibrator and metric.

    Args:
        samples: ``{method label: {calibrator: {seed: PairedSamples}}}`` (clean test).
        reference: The method label to compare against (e.g. ``"ce"``).
        metrics: Metrics of :data:`PAIRED_METRICS` to compare.
        n_boot: Bootstrap replicates (each draws seeds, then test samples, with replacement).
        seed: Seed of the bootstrap draws (recorded with the output by the caller).
        n_bins: Bins of ECE and AdaECE.

    Returns:
        One row per (method, calibrator, metric) with the seeds in common, the per-seed
        differences ``M - reference``, their mean, the 95% bootstrap interval and the win, tie
        and loss counts; empty when ``reference`` is absent.

    Raises:
        CSMError: Two runs of one seed were tested on different splits, or a metric is unknown.
    """
    if reference not in samples:
        return []
    rows = []
    for method, by_cal in samples.items():
        if method == reference:
            continue
        for cal, by_seed in by_cal.items():
            ref = samples[reference].get(cal, {})
            seeds = sorted(set(by_seed) & set(ref))
            if not seeds:
                continue
            _check_pairs(method, reference, seeds, by_seed, ref)
            gen = torch.Generator().manual_seed(seed)
            slots = len(seeds)
            # one independent test-sample draw per (replicate, slot): a seed drawn twice in a
            # replicate is resampled twice
            per_seed = [
                _seed_differences(by_seed[s], ref[s], metrics, n_boot * slots, gen, n_bins)
                for s in seeds
            ]
            pick = torch.randint(0, slots, (n_boot, slots), generator=gen)
            for k in metrics:
                d = torch.stack([p[k].view(n_boot, slots) for p in per_seed], 2)
                boot = d.gather(2, pick[:, :, None]).squeeze(2).mean(1)
                point = [
                    float(
                        weighted_metric(by_seed[s], _ones_like(by_seed[s]), k, n_bins)
                        - weighted_metric(ref[s], _ones_like(ref[s]), k, n_bins)
                    )
                    for s in seeds
                ]
                rows.append(
                    {"reference": reference, **_summary(method, cal, k, seeds, point, boot)}
                )
    return rows


def _ones_like(s: PairedSamples) -> torch.Tensor:
    return torch.ones(1, s.conf.numel(), dtype=torch.float64)
