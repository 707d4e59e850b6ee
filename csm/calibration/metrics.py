"""Calibration, selective-classification and OOD metrics on concatenated predictions.

Every metric is computed once on the whole evaluation set (never as an average of per-batch
values), in torch, vectorised. :func:`compute_all` takes logits, computes the softmax once and
returns every metric under torch-uncertainty-style names; :func:`compute_all_probs` does the same
for probabilities (the output of a post-hoc calibrator). Each metric is also a function of
``probs`` (N, K) and integer ``labels`` (N,).

Conventions (stated once, used everywhere):

* Values are **fractions**, not percent.
* Notation: ``p = softmax(z)``, prediction ``argmax p`` (first index among exact ties, as
  :meth:`torch.Tensor.max`), confidence ``c = max p``, correctness ``a = 1[pred == y]``.
* **Binning** (ECE, MCE, OE, UE, classwise ECE, reliability diagrams): ``n_bins`` (default 15)
  equal-width bins with edges ``torch.linspace(0, 1, n_bins + 1)`` in the input's dtype. Bins are
  left-closed, right-open, ``[e_b, e_{b+1})``, except the last, which is closed, ``[e_{B-1}, 1]``:
  a confidence of exactly 1.0 lands in the last bin. This matches torchmetrics'
  ``multiclass_calibration_error`` for every confidence below 1.0; torchmetrics puts c == 1.0
  into an extra bin of its own (``bucketize(right=True) - 1`` on all ``n_bins + 1`` edges), which
  changes its ECE/MCE whenever some confidence is exactly 1.0 (a saturated float32 softmax) and
  the last bin also holds samples with the opposite calibration gap.
* **AdaECE**: the confidences sorted (descending, stable, then reversed) are split into ``n_bins``
  chunks whose sizes differ by at most one (``bin = floor(rank * B / N)``); no sample is dropped and
  with fewer samples than bins each sample is its own bin. Samples tied at a chunk boundary are
  split by that order.
* **ECE-sweep** (``cal/ECE-sweep``) and the **debiased** l2 estimator (``cal/dECE``), the two
  bias-aware estimators of :mod:`csm.calibration.estimators` (Roelofs et al. 2022; Kumar et al.
  2019), on the same confidence order as AdaECE.
* **NLL** from logits is ``logsumexp(z) - z_y`` (exact, no clamping needed); from probabilities
  it is ``-log(max(p_y, 1e-12))`` (calibrators such as histogram binning output exact zeros).
* **Brier** sums over classes: ``mean_i sum_k (p_ik - 1[y_i = k])^2`` (range [0, 2]).
* Misclassification **AUROC** (``sc/AUROC``): positives are correct predictions, score ``c``, ties
  get averaged ranks (Mann-Whitney), as scikit-learn's ``roc_auc_score``.
* **AURC** (Geifman et al. 2019): samples sorted by ``c`` descending (stable among ties); the mean
  over coverages ``i/N``, ``i = 1..N``, of the selective risk (error rate of the ``i`` most
  confident). **E-AURC** subtracts the AURC of the oracle ordering (all correct first) computed on
  the same discrete grid. **Risk@80** is the selective risk of the ``ceil(0.8 N)`` most confident.
* **OvO AUROC** (``cls/OvO-AUROC``): Hand & Till's one-vs-one macro average as scikit-learn's
  ``roc_auc_score(multi_class="ovo")``: for every pair of classes present in ``labels``,
  ``(AUC(a|b) + AUC(b|a)) / 2`` with ``AUC(a|b)`` ranking class-a against class-b samples by
  ``p_a``; the mean over pairs. Classes absent from ``labels`` are skipped.
* **OOD AUROC** (``ood/AUROC``): in-distribution samples are positives, OOD negatives, score is the
  maximum softmax probability (Hendrycks & Gimpel 2017), ties averaged.
* **AUGRC** (``sc/AUGRC``, Traub et al. 2024) as torch-uncertainty: trapezoid over coverages
  ``i/N`` of the generalized risk (errors among the ``i`` most confident) / N, divided by
  ``1 - 1/N``. **Cov@5Risk**: the largest ``i/N`` whose selective risk is <= 5% (0.0 if none;
  torch-uncertainty gives NaN).
* **KDE-ECE** (``cal/KDE-ECE``, Zhang, Kailkhura & Han 2020): their ``ece_kde_binary`` (triweight
  KDE, KDEpy's FFTKDE discretisation); checked against the reference code run with KDEpy 1.1.12
  (agreement ~1e-13, a one-off check outside the suite). **MMCE** (``cal/MMCE``, Kumar et al.
  2018): ``sqrt`` of the double sum with a Laplacian kernel of width 0.4, exact in O(N).
* **OOD AUPR / FPR95** follow torch-uncertainty: OOD positive, score ``-MSP``; AUPR is
  scikit-learn's average precision, FPR95 the FPR at the first threshold of ``roc_curve``
  (``drop_intermediate=False``) whose TPR reaches 0.95.
* Aliases: torch-uncertainty's ``cal/aECE`` and ``sc/Risk@80Cov`` (:data:`METRIC_ALIASES`).

Undefined values (an AUROC with only one kind of sample, OvO with fewer than two classes) are NaN,
logged as a warning, never an exception.

Cost: one chunked pass over the (N, K) matrix (rows visited in label order) plus one integer
sort of the N confidences, and for ``cls/OvO-AUROC`` a class-major copy of the probabilities and
O(N) work per class column: a table look-up of every value's rank among that class's samples,
with an exact sort of the few percent of values the table cannot separate (O(K N) in all; ~0.6
s of the suite at 1,000,000 x 100 on one thread, see bench/RESULTS.md). ``compute_all(...,
exclude={"cls/OvO-AUROC"})`` skips it. :class:`MetricStream` computes the same in pieces.

References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (ECE, MCE).
    Mukhoti et al., "Calibrating Deep Neural Networks using Focal Loss", NeurIPS 2020 (AdaECE).
    Roelofs et al., "Mitigating Bias in Calibration Error Estimation", AISTATS 2022 (ECE-sweep).
    Kumar, Liang & Ma, "Verified Uncertainty Calibration", NeurIPS 2019 (debiased estimator).
    Kull et al., "Beyond temperature scaling", NeurIPS 2019 (classwise ECE).
    Thulasidasan et al., "On Mixup Training", NeurIPS 2019 (over-confidence error).
    Błasiok & Nakkiran, "Smooth ECE: Principled Reliability Diagrams via Kernel Smoothing",
    ICLR 2024 (smECE).
    Gupta et al., "Calibration of Neural Networks using Splines", ICLR 2021 (KS error).
    Geifman et al., "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019
    (AURC, E-AURC).
    Traub et al., "Overcoming Common Flaws in the Evaluation of Selective Classification
    Systems", NeurIPS 2024 (AUGRC); torch-uncertainty's risk_coverage.py (AUGRC, Cov@xRisk).
    Zhang, Kailkhura & Han, "Mix-n-Match: Ensemble and Compositional Methods for Uncertainty
    Calibration in Deep Learning", ICML 2020 (KDE-ECE;
    github.com/zhang64-llnl/Mix-n-Match-Calibration).
    Kumar, Sarawagi & Jain, "Trainable Calibration Measures for Neural Networks from Kernel Mean
    Embeddings", ICML 2018 (MMCE).
    Hand & Till, "A Simple Generalisation of the Area Under the ROC Curve for Multiple Class
    Classification Problems", Machine Learning 2001 (OvO AUROC).
    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples
    in Neural Networks", ICLR 2017 (max-softmax OOD score).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from csm.calibration.estimators import (
    debiased_calibration_error,
    debiased_error_sorted,
    sweep_calibration_error,
    sweep_error_sorted,
)
from csm.errors import CSMError

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_ALIASES",
    "METRIC_INFO",
    "METRIC_NAMES",
    "MetricStream",
    "canonical_metric",
    "kde_ece",
    "mmce",
    "ood_metrics",
    "MetricInfo",
    "higher_is_better",
    "ReliabilityBins",
    "accuracy",
    "adaptive_ece",
    "augrc",
    "aurc",
    "coverage_at_5_risk",
    "bin_indices",
    "binned_errors",
    "binned_sums",
    "brier",
    "classwise_ece",
    "compute_all",
    "compute_all_probs",
    "e_aurc",
    "debiased_ece",
    "ece",
    "ece_sweep",
    "ks_error",
    "mce",
    "misclassification_auroc",
    "nll",
    "ood_auroc",
    "ovo_auroc",
    "overconfidence_error",
    "reliability_bins",
    "risk_at_coverage",
    "selective_metrics",
    "smooth_ece",
    "underconfidence_error",
    "validate_logits",
    "validate_probs",
]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is: its short label, which direction is better, whether shown as %."""

    label: str
    higher_is_better: bool
    percent: bool


METRIC_INFO: dict[str, MetricInfo] = {
    "cls/Acc": MetricInfo("Acc", True, True),
    "cls/NLL": MetricInfo("NLL", False, False),
    "cls/Brier": MetricInfo("Brier", False, False),
    "cal/ECE": MetricInfo("ECE", False, True),
    "cal/AdaECE": MetricInfo("AdaECE", False, True),
    "cal/ECE-sweep": MetricInfo("ECE-sweep", False, True),
    "cal/dECE": MetricInfo("dECE", False, True),
    "cal/ClasswiseECE": MetricInfo("cw-ECE", False, True),
    "cal/MCE": MetricInfo("MCE", False, True),
    "cal/OE": MetricInfo("OE", False, True),
    "cal/UE": MetricInfo("UE", False, True),
    "cal/smECE": MetricInfo("smECE", False, True),
    "cal/KS": MetricInfo("KS", False, True),
    "cal/KDE-ECE": MetricInfo("KDE-ECE", False, True),
    "cal/MMCE": MetricInfo("MMCE", False, True),
    "sc/AUROC": MetricInfo("mis-AUROC", True, True),
    "sc/AURC": MetricInfo("AURC", False, True),
    "sc/E-AURC": MetricInfo("E-AURC", False, True),
    "sc/Risk@80": MetricInfo("Risk@80", False, True),
    "sc/AUGRC": MetricInfo("AUGRC", False, True),
    "sc/Cov@5Risk": MetricInfo("Cov@5Risk", True, True),
    "cls/OvO-AUROC": MetricInfo("OvO-AUROC", True, True),
    "ood/AUROC": MetricInfo("OOD-AUROC", True, True),
    "ood/AUPR": MetricInfo("OOD-AUPR", True, True),
    "ood/FPR95": MetricInfo("FPR95", False, True),
}
"""The one table of metrics: every key :func:`compute_all` returns, in report order, with its
direction (used by model selection and the leaderboard alike) and presentation."""

METRIC_NAMES: tuple[str, ...] = tuple(METRIC_INFO)
"""Every key :func:`compute_all` returns (the ``ood/`` ones only when OOD logits are given)."""

METRIC_ALIASES: dict[str, str] = {
    "cal/aECE": "cal/AdaECE",
    "sc/Risk@80Cov": "sc/Risk@80",
}
"""torch-uncertainty's names for metrics we name differently (its ``cal/ECE``, ``cls/NLL``,
``cls/Brier``, ``sc/AURC``, ``sc/AUGRC``, ``sc/Cov@5Risk``, ``ood/AUROC``, ``ood/AUPR`` and
``ood/FPR95`` are ours too); accepted wherever a metric is named (:func:`canonical_metric`)."""


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` (a :data:`METRIC_NAMES` key or alias) are better.

    Raises:
        CSMError: ``metric`` is not a known metric.
    """
    return METRIC_INFO[canonical_metric(metric)].higher_is_better


_NLL_FLOOR = 1e-12
_COV_RISK = 0.05
_PROB_TOL = 1e-3
_ROW_CHUNK_ELEMS = 1 << 16


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------
def _as_float_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise CSMError(
            f"{name}: expected a 2-D (N, K) tensor, got shape {tuple(t.shape)}; "
            "pass one row per sample and one column per class"
        )
    if t.shape[0] == 0:
        raise CSMError(f"{name}: empty input (0 samples); evaluate on a non-empty split")
    if t.shape[1] < 2:
        raise CSMError(f"{name}: {t.shape[1]} class column(s); at least 2 classes are needed")
    t = t.detach().cpu()  # metrics run on CPU; no autograd graph
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.contiguous()


def _check_finite(t: torch.Tensor, name: str) -> None:
    # fast path: one reduction; a non-finite sum means NaN/inf somewhere (or overflow)
    if bool(torch.isfinite(t.sum())):
        return
    bad = ~torch.isfinite(t)
    n_bad = int(bad.sum())
    if n_bad == 0:  # finite values whose sum overflowed
        return
    rows = torch.nonzero(bad.any(dim=1)).flatten()
    first = bad[rows[0]].nonzero().flatten()[0].item()
    n_nan = int(torch.isnan(t).sum())
    shown = ", ".join(str(r) for r in rows[:5].tolist())
    more = f" (+{rows.numel() - 5} more)" if rows.numel() > 5 else ""
    raise CSMError(
        f"{name}: {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} inf) in "
        f"{rows.numel()} of {t.shape[0]} rows, rows {shown}{more} (first at row {rows[0].item()}, "
        f"column {first}); fix or drop those samples (a diverged model or corrupted cache)"
    )


def _check_labels(labels: torch.Tensor | np.ndarray, n: int, k: int, name: str) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.shape[0] != n:
        raise CSMError(
            f"{name}: expected shape ({n},) to match the predictions, got {tuple(y.shape)}; "
            "pass one integer class index per sample"
        )
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise CSMError(f"{name}: dtype {y.dtype} is not an integer type; pass class indices")
    y = y.detach().cpu().long()
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        n_out = int(((y < 0) | (y >= k)).sum())
        raise CSMError(
            f"{name}: {n_out} value(s) outside the class range [0, {k - 1}] (found min {lo}, "
            f"max {hi}); labels must index the {k} prediction columns (same class set as the model)"
        )
    return y


def validate_logits(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    *,
    name: str = "logits",
    labels_name: str = "labels",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validates logits (and labels) and returns them as float / int64 tensors.

    Args:
        logits: (N, K) logits, K >= 2, N >= 1, all finite.
        labels: optional (N,) integer class indices in ``[0, K)``.
        name: how the logits are named in error messages.
        labels_name: how the labels are named in error messages.

    Returns:
        ``(logits, labels)``; float16/bfloat16/integer logits are converted to float32.

    Raises:
        CSMError: empty input, wrong shape, NaN/inf values (with their count and rows), labels
            outside the class range.
    """
    z = _as_float_matrix(logits, name)
    _check_finite(z, name)
    y = None if labels is None else _check_labels(labels, z.shape[0], z.shape[1], labels_name)
    return z, y


def validate_probs(
    probs: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    *,
    name: str = "probs",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validates class probabilities: finite, in [0, 1], rows summing to 1 (tolerance 1e-3).

    Raises:
        CSMError: as :func:`validate_logits`, plus values outside [0, 1] or rows not summing to 1.
    """
    p = _as_float_matrix(probs, name)
    _check_finite(p, name)
    lo, hi = torch.aminmax(p)
    if float(lo) < 0 or float(hi) > 1:
        raise CSMError(
            f"{name}: values outside [0, 1]; pass probabilities (use compute_all for logits)"
        )
    # row sums as a matrix-vector product (BLAS); the tolerance dwarfs float32 rounding
    dev = (p @ torch.ones(p.shape[1], dtype=p.dtype) - 1).abs()
    if bool((dev > _PROB_TOL).any()):
        row = int(dev.argmax())
        raise CSMError(
            f"{name}: {int((dev > _PROB_TOL).sum())} row(s) do not sum to 1 (row {row} sums to "
            f"{1 + float(dev[row]):.4f}); pass softmax probabilities, not logits or scores"
        )
    y = None if labels is None else _check_labels(labels, p.shape[0], p.shape[1], "labels")
    return p, y


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise CSMError(f"n_bins: {n_bins!r} is not a positive integer; use e.g. 15")
    return n_bins


# --------------------------------------------------------------------------------------------
# shared building blocks
# --------------------------------------------------------------------------------------------
def bin_indices(values: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Equal-width bin index of every value in [0, 1] (the module's one binning convention).

    Bins ``[e_b, e_{b+1})`` with ``e = linspace(0, 1, n_bins + 1)`` in ``values.dtype``; the last
    bin is closed so 1.0 maps to ``n_bins - 1``.

    Args:
        values: any-shape float tensor of values in [0, 1].
        n_bins: number of bins.

    Returns:
        int64 tensor of the same shape with entries in ``[0, n_bins)``.
    """
    edges = torch.linspace(0, 1, _check_n_bins(n_bins) + 1, dtype=values.dtype)
    return torch.bucketize(values, edges[1:-1], right=True)


def _top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conf, pred = probs.max(dim=1)
    return conf, (pred == labels)


def binned_sums(
    conf: torch.Tensor, correct: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin sample counts, confidence sums and correct counts (the module's binning).

    Args:
        conf: Top-label confidences ``(N,)`` in [0, 1].
        correct: Whether each prediction is correct ``(N,)`` (bool or 0/1).
        n_bins: Number of equal-width bins (see :func:`bin_indices`).

    Returns:
        ``(count, sum_conf, sum_correct)``, each float64 ``(n_bins,)``; the input of
        :func:`binned_errors`.
    """
    c = conf.detach().cpu().numpy()
    idx = _bin_np(c, _check_n_bins(n_bins))
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sconf = np.bincount(idx, weights=c, minlength=n_bins)  # float64 sums
    sacc = np.bincount(idx, weights=correct.detach().cpu().numpy(), minlength=n_bins)
    return torch.from_numpy(count), torch.from_numpy(sconf), torch.from_numpy(sacc)


def binned_errors(count: torch.Tensor, sconf: torch.Tensor, sacc: torch.Tensor) -> dict[str, float]:
    """ECE, MCE, OE and UE from the per-bin sums of :func:`binned_sums`.

    Args:
        count: Samples per bin.
        sconf: Sum of the confidences in each bin.
        sacc: Number of correct predictions in each bin.

    Returns:
        ``{"cal/ECE", "cal/MCE", "cal/OE", "cal/UE"}`` as fractions (empty bins are skipped).
    """
    n = count.sum()
    nz = count > 0
    mconf = sconf[nz] / count[nz]
    macc = sacc[nz] / count[nz]
    w = count[nz] / n
    gap = macc - mconf
    return {
        "cal/ECE": float((w * gap.abs()).sum()),
        "cal/MCE": float(gap.abs().max()),
        "cal/OE": float((w * mconf * (-gap).clamp(min=0)).sum()),
        "cal/UE": float((w * mconf * gap.clamp(min=0)).sum()),
    }


def _nan(metric: str, why: str) -> float:
    logger.warning("%s is undefined (%s); reporting NaN", metric, why)
    return float("nan")


def _arr(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CPU tensor's numpy view (no copy), or the array itself."""
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Start positions of the runs of equal values (tie groups) of a sorted array, from 0."""
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])


def _auroc_sorted_desc(scores, positive, metric: str) -> float:
    """Mann-Whitney AUROC with averaged tie ranks; ``scores`` sorted descending."""
    s, pos = _arr(scores), _arr(positive).astype(bool, copy=False)
    n = s.size
    cpos = np.r_[0, np.cumsum(pos, dtype=np.int64)]  # exact counts
    n_pos = int(cpos[-1])
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return _nan(metric, f"{n_pos} positive and {n_neg} negative samples")
    starts = _group_starts(s)
    ends = np.r_[starts[1:], n]
    pos_in_group = cpos[ends] - cpos[starts]
    # ascending rank (1-based) averaged over a group occupying descending slots [start, end)
    avg_rank = n - starts - (ends - starts - 1) / 2
    r_pos = float((avg_rank * pos_in_group).sum())
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _auroc(scores: torch.Tensor, positive: torch.Tensor, metric: str) -> float:
    s, order = torch.sort(scores, descending=True, stable=True)
    return _auroc_sorted_desc(s, positive[order], metric)


# --------------------------------------------------------------------------------------------
# smooth ECE (Błasiok & Nakkiran), matching relplot 1.0's discretisation
# --------------------------------------------------------------------------------------------
class _SmoothECE:
    """smECE of (confidence f, correctness y) pairs with a reflected Gaussian kernel.

    Follows the reference implementation (``relplot.smECE``, Apple, 2023) step by step so that the
    numbers agree: the residuals ``f - y`` and the unit weights are linearly split onto a uniform
    grid of ``max(2000, round(20 / sigma)) // 2 + 1`` points, convolved (FFT) with a Gaussian whose
    mass outside [0, 1] is reflected back, interpolated at ``max(200, round(10 / sigma))`` mesh
    points, and smECE_sigma = sum |r_s| dens / sum dens with ``dens`` the smoothed density (+1e-4).
    The bandwidth is the fixed point ``sigma = smECE_sigma`` found by 10 bisection steps on
    [0, 1] (returning the upper end, as relplot does).
    """

    def __init__(self, f: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> None:
        self.f = _arr(f).astype(np.float64)
        self.r = self.f - _arr(y)
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _grid(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in self._grids:
            pos = self.f * (n - 1)
            bins = np.clip(pos.astype(np.int64), 0, n - 2)
            frac = pos - bins
            vals = np.empty((2, n), dtype=np.float64)
            vals[0] = np.bincount(bins, (1 - frac) * self.r, n)
            vals[0] += np.bincount(bins + 1, frac * self.r, n)
            vals[1] = np.bincount(bins, 1 - frac, n) + np.bincount(bins + 1, frac, n)
            self._grids[n] = (torch.from_numpy(vals), torch.linspace(0, 1, n, dtype=torch.float64))
        return self._grids[n]

    @staticmethod
    def _reflected_convolve(values: torch.Tensor, sigma: float) -> torch.Tensor:
        n = values.shape[-1]
        t = torch.linspace(0, 1, n, dtype=torch.float64)
        ker = torch.exp(-((t - 0.5) ** 2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
        ext = torch.cat([values.flip(-1)[..., :-1], values, values.flip(-1)[..., 1:]], dim=-1)
        m = ext.shape[-1] + n - 1
        size = 1 << (m - 1).bit_length()
        full = torch.fft.irfft(torch.fft.rfft(ext, size) * torch.fft.rfft(ker, size), size)[..., :m]
        valid = full[..., n - 1 : ext.shape[-1]]  # np.convolve(..., "valid")
        return valid[..., n // 2 : n // 2 + n]

    def at(self, sigma: float) -> float:
        n = max(2000, round(20 / sigma)) // 2 + 1
        vals, grid = self._grid(n)
        smoothed = self._reflected_convolve(vals, sigma)
        mesh = max(round(10 / sigma), 200)
        t = torch.linspace(0, 1, mesh, dtype=torch.float64)
        inds = (t * (n - 1)).long().clamp(0, n - 2)
        res = (t - inds * (1 / (n - 1))) / (1 / (n - 1))
        interp = smoothed[:, inds] * (1 - res) + smoothed[:, inds + 1] * res
        dens = interp[1] + 1e-4
        rs = interp[0] / dens
        return float((rs.abs() * dens).sum() / dens.sum())

    def fixed_point(self, eps: float = 1e-3) -> float:
        def ok(alpha: float) -> bool:
            return alpha < eps or alpha < self.at(alpha)

        if ok(1.0):
            return self.at(1.0)
        start, end = 1.0, 0.0
        for _ in range(10):
            mid = (start + end) / 2
            if ok(mid):
                end = mid
            else:
                start = mid
        return self.at(start)


# --------------------------------------------------------------------------------------------
# one-vs-one AUROC
# --------------------------------------------------------------------------------------------
def _sorted_column(col: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and value keys of one probability column in ascending order of the value.

    float32 columns (probabilities >= 0, no -0.0) sort as one int64 key ``bits << 32 | label``:
    the bit pattern of a non-negative float orders like the float, and numpy's integer sort is
    several times faster than an argsort. Other dtypes use a stable argsort.
    """
    if col.dtype == np.float32:
        s = np.sort((col.view(np.int32).astype(np.int64) << 32) | y)
        return s & 0xFFFFFFFF, s >> 32
    order = np.argsort(col, kind="stable")
    return y[order], col[order]


def _column_wins(col: np.ndarray, y: np.ndarray, a: int, k: int) -> np.ndarray:
    """``w[b] = sum over class-b samples i of (#class-a samples j with p_ja < p_ia, + 1/2 per
    tie)``, for one column ``a`` of the probabilities: one sort of the column, one cumulative
    count of class a along it, one weighted bincount by label. Ties between a class-a sample and
    another sample are then corrected group by group (only groups that hold both)."""
    lab, vals = _sorted_column(col, y)
    is_a = lab == a
    cum = np.cumsum(is_a, dtype=np.int64)  # class-a samples at or before each sorted position
    wins = np.bincount(lab, weights=cum, minlength=k)
    q = np.flatnonzero(is_a)
    if q.size == 0 or q.size == lab.size:
        return wins
    vq = vals[q]
    tied = (vals[np.maximum(q - 1, 0)] == vq) & (q > 0)
    tied |= (vals[np.minimum(q + 1, lab.size - 1)] == vq) & (q < lab.size - 1)
    if not bool(tied.any()):
        return wins
    tv = np.unique(vq[tied])
    lo, hi = np.searchsorted(vals, tv, "left"), np.searchsorted(vals, tv, "right")
    before = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0)
    a_in = cum[hi - 1] - before
    keep = (hi - lo) > a_in  # the group also holds samples of other classes
    lo, hi, before, a_in = lo[keep], hi[keep], before[keep], a_in[keep]
    lens = hi - lo
    idx = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens - lo, lens)
    # a non-a sample in a tie group got (class-a before the group) + (class-a ahead of it in
    # the group); the averaged rank wants (class-a before the group) + half of the group's a's
    corr = np.repeat(0.5 * a_in + before, lens) - cum[idx]
    other = lab[idx] != a
    return wins + np.bincount(lab[idx][other], weights=corr[other], minlength=k)


_OVO_TABLE_BITS = 20
_OVO_CHUNK = 1 << 14


def _float_keys(col: np.ndarray) -> np.ndarray:
    """Integer view of a column of non-negative floats (no -0.0) that orders like the floats."""
    return col.view(np.int32 if col.dtype == np.float32 else np.int64)


def _rank_table(ua: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Lookup table of the class-a ranks for :meth:`_GroupedPart.sweep`.

    ``ua`` holds the sorted integer keys of the class-a values. Keys are cut into buckets of
    ``2**shift`` consecutive keys, ``bucket(v) = (v - base) >> shift``, at most about
    ``2**_OVO_TABLE_BITS`` of them between the smallest and the largest class-a key. A bucket
    holding no class-a value maps to twice the number of class-a values below it (exact for every
    value in it: no class-a value can tie with it or lie between); a bucket holding class-a
    values maps to -1 (its values are ranked exactly by sorting). Bucket 0 lies below every
    class-a value, the last above.

    Returns:
        ``(table, base, shift)``; the table is int16 when ``2 n_a`` fits (half the cache
        footprint of int32: the look-ups run markedly faster), else int32.
    """
    lo, hi = int(ua[0]), int(ua[-1])
    shift = max(0, (hi - lo + 2).bit_length() - _OVO_TABLE_BITS)
    base = lo - (1 << shift)
    bucket = (ua - ua.dtype.type(base)) >> shift  # sorted, >= 1
    first = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    occupied = bucket[first]
    j = occupied.size
    values = np.empty(2 * j + 1, dtype=np.int16 if 2 * ua.size < 2**15 else np.int32)
    values[0 : 2 * j : 2] = 2 * first  # the gap before each occupied bucket
    values[1 : 2 * j : 2] = -1  # the occupied bucket
    values[2 * j] = 2 * ua.size  # the bucket above every class-a value
    lengths = np.empty(2 * j + 1, dtype=np.int64)
    lengths[0 : 2 * j : 2] = occupied - np.r_[0, occupied[:-1] + 1]
    lengths[1 : 2 * j : 2] = 1
    lengths[2 * j] = 1
    return np.repeat(values, lengths), base, shift


@dataclass
class _GroupedPart:
    """One piece of the evaluation set for the OvO AUROC, its samples grouped by label.

    Attributes:
        probs_t: (K, n) class-major probabilities, columns ordered by label (stable).
        labels: (n,) the labels in that order (non-decreasing), int64.
        bounds: (K + 1,) where each label's run starts (``bounds[K] = n``).
        pieces: per chunk of the sweep, ``(start, end, offsets)``: the chunk cut at the label
            boundaries, offsets relative to ``start``.
        piece_labels: the label of every piece, in order.
        entry: (n,) the table entries of the last swept column (in the table's dtype).
    """

    probs_t: np.ndarray
    labels: np.ndarray
    bounds: np.ndarray
    pieces: list[tuple[int, int, np.ndarray]]
    piece_labels: np.ndarray
    entry: np.ndarray

    @classmethod
    def of(cls, probs_t: np.ndarray, labels: np.ndarray) -> _GroupedPart:
        """The part of grouped ``probs_t`` (K, n) and its non-decreasing ``labels`` (n,)."""
        k, n = probs_t.shape
        bounds = np.r_[0, np.cumsum(np.bincount(labels, minlength=k))]
        pieces, piece_labels = [], []
        for s in range(0, n, _OVO_CHUNK):
            e = min(n, s + _OVO_CHUNK)
            cuts = np.unique(np.r_[s, bounds[(bounds > s) & (bounds < e)]])
            pieces.append((s, e, cuts - s))
            piece_labels.append(np.searchsorted(bounds, cuts, "right") - 1)
        entry = np.empty(n, dtype=np.int16)
        return cls(probs_t, labels, bounds, pieces, np.concatenate(piece_labels), entry)

    def sweep(self, keys: np.ndarray, table: np.ndarray, base: int, shift: int) -> np.ndarray:
        """The table entry of every sample of one column (:func:`_rank_table`; kept in
        :attr:`entry`), summed per label (int64). One subtraction, shift, look-up and segment
        sum per value, in chunks that stay in cache."""
        size = min(keys.size, _OVO_CHUNK)
        h = np.empty(size, dtype=keys.dtype)
        off = keys.dtype.type(base)
        if self.entry.dtype != table.dtype:
            self.entry = np.empty(keys.size, dtype=table.dtype)
        sums = []
        for s, e, offsets in self.pieces:
            hh, ee = h[: e - s], self.entry[s:e]
            np.subtract(keys[s:e], off, out=hh)
            np.right_shift(hh, shift, out=hh)
            np.take(table, hh, mode="clip", out=ee)  # below bucket 0 -> 0, above the last -> last
            sums.append(np.add.reduceat(ee, offsets, dtype=np.int64))
        k = len(self.bounds) - 1
        # every piece sum is below 2**53 in magnitude: exact in float64
        return np.bincount(self.piece_labels, np.concatenate(sums), k).astype(np.int64)


def _table_wins(parts: list[_GroupedPart], a: int, k: int, top: float | None):
    """:func:`_column_wins` for column ``a`` of the grouped parts, in O(N) instead of a sort.

    Every sample gets its class-a rank from :func:`_rank_table` (:meth:`_GroupedPart.sweep`:
    one subtraction, one shift, one table look-up and a segment sum per value, in numpy); the
    samples in buckets that hold class-a values, all class-a samples included, are then ranked
    exactly among the class-a samples by :func:`_column_wins` on that subset (a few percent of
    the column), which settles ties.

    Args:
        top: also return the column's values >= ``top`` (classwise ECE), or None.

    Returns:
        ``(w, high)``: ``w`` as :func:`_column_wins` (float64, exact halves) with entry ``a``
        set to 0; the column's values >= ``top`` (None without ``top``).
    """
    cols = [part.probs_t[a] for part in parts]
    keys = [_float_keys(c) for c in cols]
    ua = np.concatenate([kk[p.bounds[a] : p.bounds[a + 1]] for kk, p in zip(keys, parts)])
    ua.sort()
    table, base, shift = _rank_table(ua)
    wins2 = np.zeros(k, dtype=np.int64)
    sub_vals, sub_labels = [], []
    for part, kk, col in zip(parts, keys, cols):
        wins2 += part.sweep(kk, table, base, shift)
        flagged = np.flatnonzero(part.entry < 0)
        sub_vals.append(col[flagged])
        sub_labels.append(part.labels[flagged])
    vals, labels = np.concatenate(sub_vals), np.concatenate(sub_labels)
    wins2 += np.bincount(labels, minlength=k)  # replace the -1 entries by the exact ranks
    exact = _column_wins(vals, labels, a, k)  # multiples of 1/2, exact in float64
    wins2 += np.rint(2 * exact).astype(np.int64)
    wins2[a] = 0
    high = None if top is None else np.concatenate([c[c >= top] for c in cols])
    return wins2 / 2, high


def _label_order(y: np.ndarray, k: int) -> np.ndarray:
    """A stable argsort of integer labels in ``[0, k)`` (radix sort for 16-bit labels)."""
    return np.argsort(y.astype(np.int16) if k <= 2**15 else y, kind="stable")


def _ovo_auroc(parts, classwise: _ClasswiseSums | None = None) -> tuple[float, np.ndarray | None]:
    """Hand & Till's OvO AUROC from class-major probabilities: ``parts`` are ``(probs_t (K, n),
    labels (n,))`` pieces of the evaluation set, each with its columns grouped by label
    (non-decreasing labels; one piece for a single call). For every class column a,
    ``AUC(a|b) = 1 - w[a, b] / (n_a n_b)`` with ``w[a, b]`` the class-a ranks (Mann-Whitney,
    ties averaged) of the class-b samples in column a (:func:`_table_wins`), all in integer
    arithmetic, so the result does not depend on how the set was split.

    Args:
        parts: the pieces (tensors or arrays).
        classwise: float32 pieces only: also bin every column's entries >= e_1 for classwise
            ECE, as :meth:`_ClasswiseSums.add_column` on a copy.

    Returns:
        ``(auroc, upper_fixed)``: the AUROC and, with ``classwise``, the
        :attr:`_ClasswiseSums.upper_fixed` sums of the entries >= e_1 (else None).
    """
    grouped = [_GroupedPart.of(_arr(p), _arr(y).astype(np.int64, copy=False)) for p, y in parts]
    k = grouped[0].probs_t.shape[0]
    counts = sum(np.diff(g.bounds) for g in grouped).astype(np.float64)
    present = np.flatnonzero(counts)
    cw, top = None, None
    if classwise is not None:
        cw = _ClasswiseSums(k, classwise.n_bins)
        top = float(_edges(cw.n_bins, np.float32)[1])
    w = np.zeros((k, k))
    for a in range(k):
        if counts[a] and len(present) >= 2:
            w[a], high = _table_wins(grouped, a, k, top)
        elif cw is not None:  # no ranks needed: only the classwise entries
            high = np.concatenate([c[c >= top] for c in (g.probs_t[a] for g in grouped)])
        if cw is not None:
            cw.add_column(a, high)
    upper = None if cw is None else cw.upper_fixed
    if len(present) < 2:
        return _nan("cls/OvO-AUROC", f"{len(present)} class present in labels"), upper
    n = counts[present]
    auc = 1 - w[np.ix_(present, present)] / (n[:, None] * n[None, :])
    pair = (auc + auc.T) / 2
    iu = np.triu_indices(len(present), k=1)
    return float(pair[iu].mean()), upper


# --------------------------------------------------------------------------------------------
# metric functions on probabilities
# --------------------------------------------------------------------------------------------
def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (fraction)."""
    p, y = validate_probs(probs, labels)
    return float(_top_label(p, y)[1].double().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Negative log-likelihood ``mean -log max(p_y, 1e-12)`` (nats)."""
    p, y = validate_probs(probs, labels)
    py = p.gather(1, y[:, None]).squeeze(1).double()
    return float(-torch.log(py.clamp(min=_NLL_FLOOR)).mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Brier score summed over classes, averaged over samples (range [0, 2])."""
    p, y = validate_probs(probs, labels)
    return _brier(p, y)


def _brier(p: torch.Tensor, y: torch.Tensor) -> float:
    sq = torch.einsum("ij,ij->i", p, p).double()  # per-row sum of squares
    py = p.gather(1, y[:, None]).squeeze(1).double()
    return float((sq - 2 * py + 1).mean())


def _top_label_binned(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict[str, float]:
    """ECE, MCE, OE and UE from one pass of top-label equal-width binning."""
    p, y = validate_probs(probs, labels)
    return binned_errors(*binned_sums(*_top_label(p, y), n_bins))


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins (Guo et al. 2017)."""
    return _top_label_binned(probs, labels, n_bins)["cal/ECE"]


def mce(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Maximum calibration error: largest |accuracy - confidence| over non-empty bins."""
    return _top_label_binned(probs, labels, n_bins)["cal/MCE"]


def overconfidence_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """OE = sum_b (n_b/N) conf_b max(conf_b - acc_b, 0) (Thulasidasan et al. 2019)."""
    return _top_label_binned(probs, labels, n_bins)["cal/OE"]


def underconfidence_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """UE = sum_b (n_b/N) conf_b max(acc_b - conf_b, 0), the mirror image of OE."""
    return _top_label_binned(probs, labels, n_bins)["cal/UE"]


def ece_sweep(probs: torch.Tensor, labels: torch.Tensor, p: float = 1.0) -> float:
    """ECE-sweep: equal-mass bins, as many as keep bin accuracy monotone in confidence (Roelofs
    et al. 2022); :func:`csm.calibration.estimators.sweep_calibration_error`."""
    pr, y = validate_probs(probs, labels)
    conf, correct = _top_label(pr, y)
    return sweep_calibration_error(conf, correct, p=p)


def debiased_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Debiased l2 calibration error, equal-mass bins (Kumar et al. 2019);
    :func:`csm.calibration.estimators.debiased_calibration_error`."""
    pr, y = validate_probs(probs, labels)
    conf, correct = _top_label(pr, y)
    return debiased_calibration_error(conf, correct, n_bins=n_bins)


def _adaptive_ece(conf_asc, correct_asc, n_bins: int) -> float:
    c, a = _arr(conf_asc), _arr(correct_asc)
    n = c.size
    idx = np.arange(n, dtype=np.int64) * n_bins // n
    sconf = np.bincount(idx, weights=c, minlength=n_bins)
    sacc = np.bincount(idx, weights=a, minlength=n_bins)
    return float(np.abs(sacc - sconf).sum() / n)


def adaptive_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """AdaECE: ECE with equal-mass bins (Mukhoti et al. 2020); see the module conventions."""
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    s, order = torch.sort(conf, descending=True, stable=True)
    return _adaptive_ece(s.flip(0), correct[order].flip(0), _check_n_bins(n_bins))


_EDGES: dict[tuple[int, np.dtype], np.ndarray] = {}


def _edges(n_bins: int, dtype: np.dtype) -> np.ndarray:
    """The bin edges of :func:`bin_indices` (``torch.linspace`` in ``dtype``), cached."""
    key = (n_bins, np.dtype(dtype))
    if key not in _EDGES:
        tdt = torch.from_numpy(np.empty(0, dtype)).dtype
        _EDGES[key] = torch.linspace(0, 1, n_bins + 1, dtype=tdt).numpy()
    return _EDGES[key]


def _bin_np(values: np.ndarray, n_bins: int) -> np.ndarray:
    """:func:`bin_indices` for a numpy array, without a binary search: ``floor(v * n_bins)`` is
    the bin or a neighbour of it (rounding is far below a bin width), so one comparison with
    each adjacent edge makes it exactly ``torch.bucketize(v, edges[1:-1], right=True)``."""
    edges = _edges(n_bins, values.dtype)
    b = (values * n_bins).astype(np.intp)
    np.clip(b, 0, n_bins - 1, out=b)
    b -= values < edges[b]
    b += (values >= edges[b + 1]) & (b < n_bins - 1)
    return b


def _fixed_point_bincount(key: np.ndarray, vals: np.ndarray, shift: int, size: int) -> np.ndarray:
    """Exact int64 per-key sums of ``vals * 2**shift`` (integers by the choice of ``shift``):
    float64 bincounts over pieces small enough that every partial sum stays below 2**53."""
    out = np.zeros(size, dtype=np.int64)
    step = max(1, 1 << max(0, 52 - shift - 1))
    for s in range(0, key.size, step):
        w = vals[s : s + step].astype(np.float64) * 2.0**shift
        out += np.bincount(key[s : s + step], weights=w, minlength=size).astype(np.int64)
    return out


class _ClasswiseSums:
    """Accumulates sum p_ik per (class k, bin b) over row chunks, for classwise ECE.

    Bin 0 ([0, e_1)) holds most entries when K is large, and a row has at most n_bins - 1 entries
    >= e_1 (they sum to 1), so only those are binned one by one; bin 0's sum is the column total
    minus the others. Works on numpy arrays (faster than torch for these small chunked passes).

    The sums of float32 entries >= e_1 are exact: such an entry is an integer multiple of
    ``2**-fixed_shift`` (its exponent is at least e_1's), so they are added as int64 in that unit
    (:attr:`upper_fixed`) and do not depend on the order of the samples. That lets the OvO sweep,
    which visits every class column anyway, bin them (:meth:`add_column`) instead of the row pass
    with the same result. float64 entries are summed in float64 (:attr:`upper`).
    """

    _FLUSH = 1 << 19

    def __init__(self, k: int, n_bins: int) -> None:
        self.k, self.n_bins = k, n_bins
        self.fixed_shift = 24 - int(np.frexp(_edges(n_bins, np.float32)[1])[1])
        self.total = np.zeros(k, dtype=np.float64)
        self.upper = np.zeros(k * n_bins, dtype=np.float64)
        self.upper_fixed = np.zeros(k * n_bins, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_pending = 0

    def add(self, blk: np.ndarray, *, upper: bool = True) -> None:
        """Adds a (rows, K) chunk; the entries >= e_1 are binned in batches (:meth:`flush`),
        unless ``upper`` is False (float32 only: :meth:`add_column` bins them instead)."""
        self.total += blk.sum(0, dtype=np.float64)  # float64: independent of chunking
        if self.n_bins == 1 or not upper:
            return
        flat = blk.reshape(-1)
        idx = np.flatnonzero(flat >= _edges(self.n_bins, blk.dtype)[1])
        self._pending.append((idx % self.k, flat[idx]))
        self._n_pending += idx.size
        if self._n_pending >= self._FLUSH:
            self.flush()

    def flush(self) -> None:
        """Bins the entries collected by :meth:`add` (call before reading the sums)."""
        if not self._pending:
            return
        cls = np.concatenate([c for c, _ in self._pending])
        vals = np.concatenate([v for _, v in self._pending])
        self._pending, self._n_pending = [], 0
        key = cls * self.n_bins + _bin_np(vals, self.n_bins)
        if vals.dtype == np.float32:
            self.upper_fixed += _fixed_point_bincount(key, vals, self.fixed_shift, self.upper.size)
        else:
            self.upper += np.bincount(key, weights=vals, minlength=self.upper.size)

    def add_column(self, a: int, vals: np.ndarray) -> None:
        """Adds the float32 entries ``vals`` (all >= e_1) of class column ``a``."""
        b = self.n_bins
        sums = _fixed_point_bincount(_bin_np(vals, b), vals, self.fixed_shift, b)
        self.upper_fixed[a * b : (a + 1) * b] += sums

    def hits(self, py: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-(class, bin) counts of ``y == k`` (``k * n_bins + b``, b the bin of ``p_y``)."""
        key = y * self.n_bins + _bin_np(py, self.n_bins)
        return np.bincount(key, minlength=self.k * self.n_bins).astype(np.float64)

    def value_from_hits(self, hits: np.ndarray, n: int, extra_fixed=None) -> float:
        """Classwise ECE from the per-(class, bin) counts of :meth:`hits` (plus the
        :attr:`upper_fixed` sums ``extra_fixed`` binned elsewhere)."""
        fixed = self.upper_fixed if extra_fixed is None else self.upper_fixed + extra_fixed
        upper = self.upper + fixed / 2.0**self.fixed_shift
        sums = upper.reshape(self.k, self.n_bins).copy()
        sums[:, 0] = self.total - sums[:, 1:].sum(1)
        return float(np.abs(hits - sums.reshape(-1)).sum() / (n * self.k))


def _classwise_ece(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> float:
    acc = _ClasswiseSums(p.shape[1], n_bins)
    pn, rows = p.numpy(), max(1, _ROW_CHUNK_ELEMS // p.shape[1])
    for s in range(0, p.shape[0], rows):
        acc.add(pn[s : s + rows])
    acc.flush()
    py = p.gather(1, y[:, None]).squeeze(1).numpy()
    return acc.value_from_hits(acc.hits(py, y.numpy()), y.numel())


def classwise_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019): mean over classes of the binned ECE of p_k vs 1[y = k].

    ``(1/K) sum_k sum_b (n_kb/N) |freq_kb - mean p_kb|`` with equal-width bins over every p_ik.
    """
    p, y = validate_probs(probs, labels)
    return _classwise_ece(p, y, _check_n_bins(n_bins))


def smooth_ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """smECE of the top-label confidence (Błasiok & Nakkiran 2024); see :class:`_SmoothECE`."""
    p, y = validate_probs(probs, labels)
    return _SmoothECE(*_top_label(p, y)).fixed_point()


def _ks(conf_desc, correct_desc) -> float:
    c, a = _arr(conf_desc)[::-1], _arr(correct_desc)[::-1]  # ascending views
    n = c.size
    diff = np.cumsum(c.astype(np.float64) - a) / n
    ends = np.r_[_group_starts(c)[1:], n] - 1
    return float(np.abs(diff[ends]).max())


def ks_error(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """KS calibration error (Gupta et al. 2021): max |cumulative (c - a)| / N along ascending c.

    The cumulative sum is read at the end of each group of tied confidences, so the value does not
    depend on how ties are ordered.
    """
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    s, order = torch.sort(conf, descending=True, stable=True)
    return _ks(s, correct[order])


def misclassification_auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of the confidence separating correct (positive) from wrong predictions."""
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    return _auroc(conf, correct, "sc/AUROC")


def _selective(correct_desc) -> dict[str, float]:
    a = _arr(correct_desc).astype(bool, copy=False)
    n = a.size
    i = np.arange(1, n + 1, dtype=np.int64)
    err_count = i - np.cumsum(a, dtype=np.int64)  # errors among the i most confident, exact
    err, cover = err_count.astype(np.float64), i.astype(np.float64)
    risk = err / cover
    aurc_v = float(risk.mean())
    n_correct = n - int(err_count[-1])
    opt = float((np.maximum(i - n_correct, 0) / cover).mean())
    keep = max(1, math.ceil(0.8 * n - 1e-9))
    ok = np.flatnonzero(risk <= _COV_RISK)
    out = {
        "sc/AURC": aurc_v,
        "sc/E-AURC": aurc_v - opt,
        "sc/Risk@80": float(err[keep - 1] / keep),
        # 0.0 when no coverage reaches the risk (reject everything); torch-uncertainty: NaN
        "sc/Cov@5Risk": float(ok[-1] + 1) / n if ok.size else 0.0,
    }
    if n < 2:
        out["sc/AUGRC"] = _nan("sc/AUGRC", "fewer than 2 samples")
    else:  # torch-uncertainty: trapezoid over coverages 1/N..1, normalised by (1 - 1/N)
        g = err / n
        out["sc/AUGRC"] = float((g.sum() - (g[0] + g[-1]) / 2) / n / (1 - 1 / n))
    return out


def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019), confidence = max probability."""
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    order = torch.sort(conf, descending=True, stable=True).indices
    return _selective(correct[order])["sc/AURC"]


def e_aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Excess AURC: AURC minus the AURC of the oracle ranking (all correct predictions first)."""
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    order = torch.sort(conf, descending=True, stable=True).indices
    return _selective(correct[order])["sc/E-AURC"]


def risk_at_coverage(probs: torch.Tensor, labels: torch.Tensor, coverage: float = 0.8) -> float:
    """Selective risk (error rate) of the ``ceil(coverage * N)`` most confident predictions."""
    if not 0 < coverage <= 1:
        raise CSMError(f"coverage: {coverage} is not in (0, 1]; use e.g. 0.8")
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    order = torch.sort(conf, descending=True, stable=True).indices
    keep = max(1, math.ceil(coverage * len(order) - 1e-9))
    return float(1 - correct[order[:keep]].double().mean())


def augrc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the generalized risk-coverage curve (Traub et al. 2024), as torch-uncertainty:
    trapezoid over coverages i/N of (errors among the i most confident) / N, over (1 - 1/N)."""
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    order = torch.sort(conf, descending=True, stable=True).indices
    return _selective(correct[order])["sc/AUGRC"]


def coverage_at_5_risk(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Largest coverage i/N whose selective risk (error rate of the i most confident) is <= 5%
    (torch-uncertainty's ``CovAt5Risk``); 0.0 (reject everything) when no coverage reaches it,
    where torch-uncertainty returns NaN (a NaN would make result rows compare unequal)."""
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    order = torch.sort(conf, descending=True, stable=True).indices
    return _selective(correct[order])["sc/Cov@5Risk"]


def selective_metrics(
    confidence: torch.Tensor | np.ndarray, correct: torch.Tensor | np.ndarray
) -> dict[str, float]:
    """Every ``sc/`` metric (AUROC, AURC, E-AURC, Risk@80, AUGRC, Cov@5Risk) for any score.

    Use it for scores other than the max probability, e.g. ``-u`` of an uncertainty head
    (:class:`csm.calibration.calibrators.AlienHead`). Same conventions as :func:`compute_all`.

    Args:
        confidence: (N,) scores, higher = more likely correct.
        correct: (N,) bool or 0/1, whether each prediction is correct.
    """
    s = torch.as_tensor(confidence)
    a = torch.as_tensor(correct).bool()
    if s.dim() != 1 or s.numel() == 0 or a.shape != s.shape:
        raise CSMError(
            f"confidence: expected a non-empty 1-D tensor matching correct {tuple(a.shape)}, got "
            f"{tuple(s.shape)}; pass one score per sample"
        )
    if not bool(torch.isfinite(s).all()):
        raise CSMError(f"confidence: {int((~torch.isfinite(s)).sum())} non-finite score(s)")
    s_desc, order = torch.sort(s.double(), descending=True, stable=True)
    out = {"sc/AUROC": _auroc_sorted_desc(s_desc, a[order], "sc/AUROC")}
    out.update(_selective(a[order]))
    return out


def ovo_auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """One-vs-one macro AUROC (Hand & Till 2001), as sklearn's ``multi_class="ovo"``."""
    p, y = validate_probs(probs, labels)
    pn, yn = p.numpy(), y.numpy()
    order = _label_order(yn, p.shape[1])
    probs_t = np.empty(pn.shape[::-1], dtype=pn.dtype)  # class-major, samples grouped by label
    rows = max(1, _ROW_CHUNK_ELEMS // pn.shape[1])
    for s in range(0, pn.shape[0], rows):  # chunks whose transpose stays in cache
        # + 0.0 turns -0.0 into 0.0 (values are ranked as bit patterns)
        np.add(np.take(pn, order[s : s + rows], 0).T, 0.0, out=probs_t[:, s : s + rows])
    return _ovo_auroc([(probs_t, yn[order])])[0]


def ood_auroc(probs_in: torch.Tensor, probs_out: torch.Tensor) -> float:
    """AUROC of the max-softmax probability separating in-distribution (positive) from OOD."""
    p_in, _ = validate_probs(probs_in, name="probs_in")
    p_out, _ = validate_probs(probs_out, name="ood_probs")
    return ood_metrics(p_in, p_out)["ood/AUROC"]


def ood_metrics(probs_in: torch.Tensor, probs_out: torch.Tensor) -> dict[str, float]:
    """``ood/AUROC``, ``ood/AUPR`` and ``ood/FPR95`` of the max-softmax probability (Hendrycks &
    Gimpel 2017); see the module conventions for which side is positive."""
    p_in, _ = validate_probs(probs_in, name="probs_in")
    p_out, _ = validate_probs(probs_out, name="ood_probs")
    return _ood_metrics(p_in.max(dim=1).values, p_out.max(dim=1).values)


# --------------------------------------------------------------------------------------------
# KDE-ECE (Zhang, Kailkhura & Han 2020) and MMCE (Kumar et al. 2018)
# --------------------------------------------------------------------------------------------
_KDE_GRID_POINTS = 2**14


def _triweight_kde(data: list[np.ndarray], bw: float, grid: torch.Tensor) -> torch.Tensor:
    """KDEpy's ``FFTKDE(bw, kernel="triweight").fit(data).evaluate(grid)`` on an equidistant
    grid: the data (the concatenation of the float64 arrays ``data``) are linearly binned onto
    the grid (weights summing to 1), then convolved ("same") with the kernel sampled at the grid
    offsets. KDEpy scales kernels to unit variance, so the triweight ``35/32 (1 - t^2)^3``
    (variance 1/9) has support radius ``3 bw``."""
    n = grid.numel()
    g0, dx = float(grid[0]), float(grid[1] - grid[0])
    weights = np.zeros(n, dtype=np.float64)
    for part in data:
        pos = (part - g0) / dx
        lo = np.clip(np.floor(pos).astype(np.int64), 0, n - 2)
        frac = pos - lo
        weights += np.bincount(lo, 1 - frac, n)
        weights += np.bincount(lo + 1, frac, n)
    w = torch.from_numpy(weights / sum(part.size for part in data))
    radius = 3.0 * bw
    half = min(int(math.floor(radius / dx)), n - 1)
    t = torch.arange(-half, half + 1, dtype=torch.float64) * dx / radius
    ker = 35 / 32 * (1 - t**2).clamp(min=0) ** 3 / radius
    size = 1 << (n + ker.numel() - 2).bit_length()
    full = torch.fft.irfft(torch.fft.rfft(w, size) * torch.fft.rfft(ker, size), size)
    return full[half : half + n]


def _kde_ece(conf: torch.Tensor, correct: torch.Tensor) -> float:
    """KDE-based top-label ECE (order 1), step by step as the reference ``ece_kde_binary``.

    Bandwidth ``std(conf of correct predictions) * (2N)^-0.2``; both densities (of the correct
    predictions' confidences and of all confidences) are estimated on 2^14 points of
    [-0.6, 1.6] from the data mirrored about 0 (values < 0.5) and 1 (values >= 0.5), zeroed
    outside (0, 1) and doubled. Accuracy at c is ``min(acc * f_1(c) / f(c), 1)`` where either
    density exceeds 1e-6 (elsewhere the integrand repeats its previous value, as in the
    reference); KDE-ECE = trapz(|c - acc(c)| f(c)) / trapz(f(c)) over the grid points in [0, 1].
    """
    c = _arr(conf).astype(np.float64)
    ok = _arr(correct).astype(bool, copy=False)
    n = c.size
    c1 = c[ok]
    if c1.size < 2 or float(c1.std()) == 0:
        return _nan("cal/KDE-ECE", "fewer than two distinct confidences of correct predictions")
    bw = float(c1.std()) * (2 * n) ** -0.2
    grid = torch.linspace(-0.6, 1.6, _KDE_GRID_POINTS, dtype=torch.float64)
    inside = (grid > 0) & (grid < 1)

    def density(d: np.ndarray) -> torch.Tensor:
        mirrored = [-d[d < 0.5], d, 2 - d[d >= 0.5]]
        return torch.where(inside, 2 * _triweight_kde(mirrored, bw, grid), 0.0)

    pp1, pp2 = density(c1), density(c)
    acc = c1.size / n
    valid = torch.maximum(pp1, pp2) > 1e-6
    rel = torch.clamp(acc * pp1 / pp2, max=1.0)  # pp2 == 0 < pp1 gives inf -> 1, as np.min
    vals = torch.where(valid, (grid - rel).abs() * pp2, 0.0)
    last = torch.cummax(torch.where(valid, torch.arange(grid.numel()), 0), 0).values
    integral = vals[last]  # invalid points repeat the last valid value (0 before any)
    ind = (grid >= 0) & (grid <= 1)
    den = torch.trapezoid(pp2[ind], grid[ind])
    return float(torch.trapezoid(integral[ind], grid[ind]) / den)


def _mmce(conf_asc, correct_asc, width: float = 0.4) -> float:
    """MMCE = sqrt((1/N^2) sum_ij (a_i - c_i)(a_j - c_j) exp(-|c_i - c_j| / width)) exactly in
    O(N) on ascending confidences: for c_i <= c_j the kernel factorises into
    ``exp(c_i / w) exp(-c_j / w)``, so the double sum is a prefix sum."""
    c = _arr(conf_asc).astype(np.float64)
    r = _arr(correct_asc) - c
    up = r * np.exp(c / width)
    prefix = np.cumsum(up) - up  # sum over i < j
    total = float((r * r).sum() + 2 * (r * np.exp(-c / width) * prefix).sum())
    return math.sqrt(max(total, 0.0)) / c.size


def kde_ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """KDE-based ECE of the top-label confidence (Zhang, Kailkhura & Han 2020); see
    :func:`_kde_ece` for the estimator (the reference ``util_evaluation.ece_kde_binary`` of
    github.com/zhang64-llnl/Mix-n-Match-Calibration, built on KDEpy's ``FFTKDE``)."""
    p, y = validate_probs(probs, labels)
    return _kde_ece(*_top_label(p, y))


def mmce(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """MMCE of the top-label confidence (Kumar, Sarawagi & Jain 2018), Laplacian kernel of
    width 0.4 as their reference code and :class:`csm.training.losses.MMCELoss`."""
    p, y = validate_probs(probs, labels)
    conf, correct = _top_label(p, y)
    s, order = torch.sort(conf, stable=True)
    return _mmce(s, correct[order])


# --------------------------------------------------------------------------------------------
# OOD detection: AUROC, AUPR, FPR95 from one sort of the max-softmax scores
# --------------------------------------------------------------------------------------------
def _ood_metrics(c_in: torch.Tensor, c_out: torch.Tensor) -> dict[str, float]:
    """``ood/AUROC`` (in-distribution positive, score MSP), and, as torch-uncertainty's OOD
    metrics (OOD positive, score ``-MSP``), ``ood/AUPR`` (average precision, scikit-learn's
    ``average_precision_score``) and ``ood/FPR95`` (the false-positive rate at the first
    threshold whose true-positive rate reaches 0.95, on scikit-learn's ``roc_curve``)."""
    scores = torch.cat([c_in.double(), c_out.double()])
    is_in = torch.cat(
        [torch.ones_like(c_in, dtype=torch.bool), torch.zeros_like(c_out, dtype=torch.bool)]
    )
    s_desc, order = torch.sort(scores, descending=True, stable=True)
    pos_in = is_in[order]
    out = {"ood/AUROC": _auroc_sorted_desc(s_desc, pos_in, "ood/AUROC")}
    if c_out.numel() == 0 or c_in.numel() == 0:
        out["ood/AUPR"] = out["ood/FPR95"] = out["ood/AUROC"]  # NaN, already logged
        return out
    ood_asc = (~pos_in).flip(0).double()  # OOD first = descending -MSP
    _, counts = torch.unique_consecutive(s_desc.flip(0), return_counts=True)
    ends = torch.cumsum(counts, 0) - 1
    tp = torch.cumsum(ood_asc, 0)[ends]
    fp = (ends + 1).double() - tp
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    out["ood/AUPR"] = float(
        (torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64)) * precision).sum()
    )
    first = int(torch.searchsorted(recall, torch.tensor([0.95], dtype=torch.float64))[0])
    out["ood/FPR95"] = float(fp[first] / fp[-1])
    return out


@dataclass
class ReliabilityBins:
    """Per-bin statistics for a reliability diagram (module binning convention).

    Attributes:
        edges: ``n_bins + 1`` bin edges from 0 to 1.
        counts: samples per bin.
        confidence: mean confidence per bin (NaN for empty bins).
        accuracy: accuracy per bin (NaN for empty bins).
        ece: the top-label ECE these bins give.
    """

    edges: list[float]
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]
    ece: float


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> ReliabilityBins:
    """Equal-width top-label reliability statistics for plotting.

    Args:
        probs: (N, K) probabilities.
        labels: (N,) class indices.
        n_bins: number of equal-width bins.

    Returns:
        A :class:`ReliabilityBins`.
    """
    p, y = validate_probs(probs, labels)
    count, sconf, sacc = binned_sums(*_top_label(p, y), _check_n_bins(n_bins))
    safe = count.clamp(min=1)
    nan = torch.full_like(count, float("nan"))
    return ReliabilityBins(
        edges=torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).tolist(),
        counts=[int(c) for c in count.tolist()],
        confidence=torch.where(count > 0, sconf / safe, nan).tolist(),
        accuracy=torch.where(count > 0, sacc / safe, nan).tolist(),
        ece=float((sacc - sconf).abs().sum() / count.sum()),
    )


# --------------------------------------------------------------------------------------------
# everything at once, or streamed
# --------------------------------------------------------------------------------------------
_ROW_METRICS = ("cls/Acc", "cls/NLL", "cls/Brier")


class MetricStream:
    """Every :func:`compute_all` metric over an evaluation set seen in pieces.

    ``update(scores, labels)`` with batches (logits, or probabilities with ``from_probs=True``),
    ``update_ood(scores)`` with batches of an OOD set, ``merge(other)`` to combine the streams of
    several processes (in rank order), ``compute()`` for the result. ``compute_all`` is one
    ``update`` and one ``compute``, so the two agree: on the same samples in the same order the
    result equals the one-shot one, exactly for every metric that ranks or bins the samples, up
    to float summation order (about 1e-12 relative; classwise ECE's float32 column totals about
    1e-9 absolute) for the sums behind NLL, Brier and classwise ECE.

    What is kept, and how memory scales with N samples of K classes:

    * exact sufficient statistics, O(K * n_bins), independent of N: NLL, Brier, accuracy (sums)
      and classwise ECE (per class and bin: probability sums and hit counts);
    * the top-label confidence and correctness of every sample, 5 bytes per sample (4 for
      float64 input): ECE/MCE/OE/UE, AdaECE, smECE, KS, KDE-ECE, MMCE and every ``sc/`` metric
      need a sort or a kernel over all confidences (the binned ones alone would need only bin
      sums, but the suite sorts anyway); the OOD metrics keep the OOD set's confidences (4 bytes
      per OOD sample);
    * ``cls/OvO-AUROC`` needs every probability (it ranks every class column): 4 bytes per
      entry plus 8 per label, O(N K); ``exclude={"cls/OvO-AUROC"}`` drops it and its memory.

    Across processes: gather the streams (``accelerate.utils.gather_object([stream])``; every
    field is a tensor or a float, so it pickles) and merge them in rank order.

    Args:
        num_classes: K, the number of prediction columns.
        n_bins: bins for the binned metrics (see the module conventions).
        exclude: metric names (or aliases) to leave out; ``cls/OvO-AUROC``, ``cal/smECE``,
            ``cal/ClasswiseECE``, ``cal/KDE-ECE`` and ``cal/MMCE`` are then not computed.
        from_probs: the scores passed to :meth:`update` are probabilities, not logits.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        n_bins: int = 15,
        exclude: Collection[str] = (),
        from_probs: bool = False,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise CSMError(f"num_classes: {num_classes!r}; give the number of classes (>= 2)")
        self.k, self.n_bins = num_classes, _check_n_bins(n_bins)
        self.exclude, self.from_probs = _check_exclude(exclude), from_probs
        self.n = 0
        self.nll_sum = self.sq_sum = self.py_sum = 0.0
        want_cw = "cal/ClasswiseECE" not in self.exclude
        self.classwise = _ClasswiseSums(self.k, self.n_bins) if want_cw else None
        self.hits = np.zeros(self.k * self.n_bins, dtype=np.float64)
        self.want_ovo = "cls/OvO-AUROC" not in self.exclude
        self.dtype: torch.dtype | None = None  # of the scores, fixed by the first update
        self.conf: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.probs_t: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.ood_conf: list[torch.Tensor] = []

    @property
    def classwise_in_ovo(self) -> bool:
        """Whether the OvO sweep bins the classwise entries >= e_1 (float32 scores), not the
        row pass (same sums: they are exact, see :class:`_ClasswiseSums`)."""
        return (
            self.want_ovo
            and self.classwise is not None
            and self.dtype == torch.float32
            and self.n_bins > 1
        )

    @property
    def name(self) -> str:
        return "probs" if self.from_probs else "logits"

    def _validate(self, scores, labels, name: str):
        if self.from_probs:
            x, y = validate_probs(scores, labels, name=name)
        else:
            x, y = validate_logits(scores, labels, name=name)
        if x.shape[1] != self.k:
            raise CSMError(
                f"{name}: {x.shape[1]} columns but the stream has {self.k} classes; score every "
                "set with the same model"
            )
        return x, y

    def update(self, scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Adds a batch: ``scores`` (B, K) logits (or probabilities), ``labels`` (B,)."""
        x, y = self._validate(scores, labels, self.name)
        with torch.no_grad():
            self._row_pass(x, y)

    def update_ood(self, scores: torch.Tensor | np.ndarray) -> None:
        """Adds a batch of an OOD set (no labels): ``ood/AUROC``, ``ood/AUPR``, ``ood/FPR95``."""
        x, _ = self._validate(scores, None, "ood_" + self.name)
        with torch.no_grad():
            p = x if self.from_probs else torch.softmax(x, dim=1)
            self.ood_conf.append(p.max(dim=1).values)

    def _row_pass(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One chunked pass over the rows: softmax (for logits), top label, the per-row terms of
        NLL and Brier, classwise sums and, for the OvO AUROC, the class-major probabilities
        with the samples grouped by label (the rows are then visited in label order). Chunks of
        ~64K values stay in cache, so the several reductions cost about one read of the matrix
        instead of one each; they run in numpy, whose kernels beat torch's on such small chunks
        on one thread."""
        if self.dtype not in (None, x.dtype):
            raise CSMError(
                f"{self.name}: dtype {x.dtype}, but the stream's earlier batches were "
                f"{self.dtype}; pass every batch in one dtype"
            )
        self.dtype = x.dtype
        n, k = x.shape
        xn, yn = x.numpy(), y.numpy()
        rows = max(1, _ROW_CHUNK_ELEMS // k)
        logits = not self.from_probs
        upper = not self.classwise_in_ovo
        # rows in label order always, so that excluding the OvO AUROC leaves every float sum
        # (NLL, Brier, classwise) bit-identical
        order = _label_order(yn, k)
        y_rows = yn[order]
        probs_t = np.empty((k, n), dtype=xn.dtype) if self.want_ovo else None
        buf = np.empty((min(rows, n), k), dtype=xn.dtype)
        conf, py, sq = (np.empty(n, dtype=xn.dtype) for _ in range(3))
        pred = np.empty(n, dtype=np.int64)
        z_pred, z_y = (np.empty(n, dtype=xn.dtype) for _ in range(2)) if logits else (None, None)
        offsets = np.arange(min(rows, n)) * k
        for s in range(0, n, rows):
            e = min(n, s + rows)
            xb = np.take(xn, order[s:e], 0, out=buf[: e - s])
            pb = torch.softmax(torch.from_numpy(xb), dim=1).numpy() if logits else xb
            if probs_t is not None and logits:
                probs_t[:, s:e] = pb.T
            elif probs_t is not None:
                np.add(pb.T, 0.0, out=probs_t[:, s:e])  # + 0.0: no -0.0 (ranked as bits)
            flat, off = pb.reshape(-1), offsets[: e - s]
            pb.argmax(1, out=pred[s:e])  # first index among exact ties, as torch.max
            at_pred, at_y = off + pred[s:e], off + y_rows[s:e]
            np.take(flat, at_pred, out=conf[s:e])
            np.take(flat, at_y, out=py[s:e])
            np.einsum("ij,ij->i", pb, pb, out=sq[s:e])
            if logits:
                np.take(xb.reshape(-1), at_pred, out=z_pred[s:e])
                np.take(xb.reshape(-1), at_y, out=z_y[s:e])
            if self.classwise is not None:
                self.classwise.add(pb, upper=upper)
        self._add_row_terms(conf, py, sq, z_pred, z_y, y_rows)
        correct = pred == y_rows
        conf[order], correct[order] = conf.copy(), correct.copy()  # back to the sample order
        if probs_t is not None:
            self.probs_t.append(torch.from_numpy(probs_t))
            self.labels.append(torch.from_numpy(y_rows))
        self.n += n
        self.conf.append(torch.from_numpy(conf))
        self.correct.append(torch.from_numpy(correct))

    def _add_row_terms(self, conf, py, sq, z_pred, z_y, y) -> None:
        """Adds the NLL, Brier and classwise-hit terms of a row pass (any row order)."""
        if z_pred is not None:
            # logsumexp(z) = z_k - log p_k for any k; k = argmax keeps p_k >= 1/K
            f64 = np.float64
            nll = z_pred.astype(f64) - np.log(conf.astype(f64)) - z_y.astype(f64)
        else:
            nll = -np.log(np.maximum(py.astype(np.float64), _NLL_FLOOR))
        self.nll_sum += float(nll.sum())
        self.sq_sum += float(sq.sum(dtype=np.float64))
        self.py_sum += float(py.sum(dtype=np.float64))
        if self.classwise is not None:
            self.classwise.flush()
            self.hits += self.classwise.hits(py, y)

    def merge(self, other: MetricStream) -> MetricStream:
        """Appends ``other``'s samples after this stream's (in place); returns ``self``."""
        same = (self.k, self.n_bins, self.exclude, self.from_probs)
        dtypes = {self.dtype, other.dtype} - {None}
        if same != (other.k, other.n_bins, other.exclude, other.from_probs) or len(dtypes) > 1:
            raise CSMError(
                "merge: the streams differ in classes, n_bins, exclude, from_probs or dtype; "
                "create every process's stream with the same arguments and feed it one dtype"
            )
        self.dtype = self.dtype or other.dtype
        self.n += other.n
        self.nll_sum += other.nll_sum
        self.sq_sum += other.sq_sum
        self.py_sum += other.py_sum
        if self.classwise is not None and other.classwise is not None:
            self.classwise.total += other.classwise.total
            self.classwise.upper += other.classwise.upper
            self.classwise.upper_fixed += other.classwise.upper_fixed
        self.hits += other.hits
        for mine, theirs in (
            (self.conf, other.conf),
            (self.correct, other.correct),
            (self.probs_t, other.probs_t),
            (self.labels, other.labels),
            (self.ood_conf, other.ood_conf),
        ):
            mine.extend(theirs)
        return self

    def compute(self) -> dict[str, float]:
        """Every metric, as Python floats (fractions); see :func:`compute_all`."""
        if self.n == 0:
            raise CSMError("MetricStream: no samples; call update(scores, labels) first")
        with torch.no_grad():
            return self._compute()

    def _compute(self) -> dict[str, float]:
        skip, n_bins = self.exclude, self.n_bins
        conf, correct = _cat(self.conf), _cat(self.correct)
        out: dict[str, float] = {
            "cls/Acc": float(np.count_nonzero(correct.numpy()) / self.n),
            "cls/NLL": self.nll_sum / self.n,
            "cls/Brier": (self.sq_sum - 2 * self.py_sum) / self.n + 1,
        }
        binned = binned_errors(*binned_sums(conf, correct, n_bins))
        s_desc, c_desc = _sort_desc(conf, correct)
        out["cal/ECE"] = binned["cal/ECE"]
        out["cal/AdaECE"] = _adaptive_ece(s_desc[::-1], c_desc[::-1], n_bins)
        out["cal/ECE-sweep"] = sweep_error_sorted(s_desc[::-1], c_desc[::-1])
        out["cal/dECE"] = debiased_error_sorted(s_desc[::-1], c_desc[::-1], n_bins)
        cw_cols = None
        if self.want_ovo:
            parts = list(zip(self.probs_t, self.labels))
            in_ovo = self.classwise if self.classwise_in_ovo else None
            out["cls/OvO-AUROC"], cw_cols = _ovo_auroc(parts, in_ovo)
        if self.classwise is not None:
            out["cal/ClasswiseECE"] = self.classwise.value_from_hits(self.hits, self.n, cw_cols)
        for key in ("cal/MCE", "cal/OE", "cal/UE"):
            out[key] = binned[key]
        if "cal/smECE" not in skip:
            out["cal/smECE"] = _SmoothECE(conf, correct).fixed_point()
        out["cal/KS"] = _ks(s_desc, c_desc)
        if "cal/KDE-ECE" not in skip:
            out["cal/KDE-ECE"] = _kde_ece(conf, correct)
        if "cal/MMCE" not in skip:
            out["cal/MMCE"] = _mmce(s_desc[::-1], c_desc[::-1])
        out["sc/AUROC"] = _auroc_sorted_desc(s_desc, c_desc, "sc/AUROC")
        out.update(_selective(c_desc))
        if self.ood_conf:
            out.update(_ood_metrics(conf, _cat(self.ood_conf)))
        return {key: out[key] for key in METRIC_INFO if key in out and key not in skip}


def _sort_desc(conf: torch.Tensor, correct: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Confidences (probabilities, >= 0) sorted descending, stable among ties, and the
    correctness in that order, as arrays. float32 confidences sort as one int64 key, the
    reversed bit pattern above the sample index: numpy's integer sort is ~8x faster than a
    stable torch sort."""
    n = conf.numel()
    if conf.dtype != torch.float32 or n >= 2**32:
        s_desc, order = torch.sort(conf, descending=True, stable=True)
        return s_desc.numpy(), correct[order].numpy()
    key = (np.int64(0x7FFFFFFF) - conf.numpy().view(np.int32)) << 32
    key |= np.arange(n, dtype=np.int64)
    key.sort()
    s_desc = (np.int64(0x7FFFFFFF) - (key >> 32)).astype(np.int32).view(np.float32)
    key &= 0xFFFFFFFF
    return s_desc, correct.numpy()[key]


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def canonical_metric(name: str) -> str:
    """The :data:`METRIC_NAMES` key of ``name``, which may be a torch-uncertainty alias
    (:data:`METRIC_ALIASES`, e.g. ``cal/aECE`` -> ``cal/AdaECE``).

    Raises:
        CSMError: ``name`` is neither a metric nor an alias.
    """
    if name in METRIC_INFO:
        return name
    if name in METRIC_ALIASES:
        return METRIC_ALIASES[name]
    raise CSMError(
        f"metric {name!r}: unknown; use one of {', '.join(METRIC_INFO)} "
        f"(or the aliases {', '.join(METRIC_ALIASES)})"
    )


def _check_exclude(exclude) -> frozenset[str]:
    names = [exclude] if isinstance(exclude, str) else list(exclude)
    unknown = sorted(n for n in names if n not in METRIC_INFO and n not in METRIC_ALIASES)
    if unknown:
        raise CSMError(
            f"exclude: unknown metric name(s) {unknown}; choose from {', '.join(METRIC_NAMES)}"
        )
    return frozenset(canonical_metric(n) for n in names)


def compute_all(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    n_bins: int = 15,
    ood_logits: torch.Tensor | np.ndarray | None = None,
    exclude: Collection[str] = (),
) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES` from logits, with one softmax.

    Args:
        logits: (N, K) logits of the whole evaluation set (concatenated, not per batch; use
            :class:`MetricStream` for sets that arrive in pieces or do not fit one process).
        labels: (N,) int class indices.
        n_bins: bins for ECE, MCE, OE, UE, classwise ECE and AdaECE.
        ood_logits: optional (M, K) logits of an OOD set; adds ``ood/AUROC``, ``ood/AUPR`` and
            ``ood/FPR95``.
        exclude: metric names (or torch-uncertainty aliases) to leave out. ``cls/OvO-AUROC``
            is the most expensive (a class-major copy and O(N) per class column); excluding it,
            ``cal/smECE``, ``cal/ClasswiseECE``, ``cal/KDE-ECE`` or ``cal/MMCE`` skips their
            computation.

    Returns:
        ``{name: value}`` as Python floats, fractions (not %), in :data:`METRIC_INFO` order.

    Raises:
        CSMError: invalid logits/labels (see :func:`validate_logits`).
    """
    return _one_shot(logits, labels, n_bins, ood_logits, exclude, from_probs=False)


def _one_shot(scores, labels, n_bins, ood, exclude, *, from_probs: bool) -> dict[str, float]:
    n_bins = _check_n_bins(n_bins)
    skip = _check_exclude(exclude)
    name = "probs" if from_probs else "logits"
    x, y = validate_probs(scores, labels) if from_probs else validate_logits(scores, labels)
    stream = MetricStream(x.shape[1], n_bins=n_bins, exclude=skip, from_probs=from_probs)
    if ood is not None:
        xo = torch.as_tensor(ood)
        if xo.dim() == 2 and xo.shape[1] != x.shape[1]:
            raise CSMError(
                f"ood_{name}: {xo.shape[1]} columns but {name} have {x.shape[1]}; score the OOD "
                "set with the same model"
            )
        stream.update_ood(ood)
    with torch.no_grad():
        stream._row_pass(x, y)  # x, y validated above; update() would validate them again
    return stream.compute()


def compute_all_probs(
    probs: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    n_bins: int = 15,
    ood_probs: torch.Tensor | np.ndarray | None = None,
    exclude: Collection[str] = (),
) -> dict[str, float]:
    """:func:`compute_all` for probabilities (e.g. a post-hoc calibrator's output).

    NLL clamps ``p_y`` at 1e-12 because calibrators such as histogram binning output exact zeros.
    """
    return _one_shot(probs, labels, n_bins, ood_probs, exclude, from_probs=True)
