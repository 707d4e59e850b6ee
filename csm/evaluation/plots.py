"""Pictures of calibration: reliability diagrams and risk-coverage curves (matplotlib, Agg).

* :func:`plot_reliability` draws one reliability diagram per panel (e.g. one per post-hoc
  calibrator of a method): per-bin accuracy as bars against the diagonal, the gap to the bin's
  mean confidence shaded, and underneath it the confidence histogram (share of samples per bin)
  with the mean accuracy and mean confidence marked. Reliability diagrams follow Guo et al.,
  "On Calibration of Modern Neural Networks", ICML 2017 (arXiv 1706.04599), Fig. 1.
* :func:`plot_risk_coverage` draws selective risk against coverage for several methods
  (Geifman & El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017;
  AURC as in Geifman et al., ICLR 2019, arXiv 1805.08206).

Files are written atomically (temporary name, then ``os.replace``). :func:`write_plots`
writes the pictures of ``csm evaluate``. The non-interactive Agg backend is used, so no display
is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from csm.errors import CSMError  # noqa: E402
from csm.utils import atomic_path


@dataclass
class ReliabilityPanel:
    """Binned top-label statistics for one reliability diagram.

    Attributes:
        label: Panel title (e.g. the calibrator name).
        edges: Bin edges, ``(B + 1,)``, from 0 to 1.
        accuracy: Accuracy of each bin, ``(B,)`` (any value for empty bins).
        confidence: Mean confidence of each bin, ``(B,)``.
        count: Number of samples in each bin, ``(B,)``.
        ece: The expected calibration error to print in the panel (fraction), or ``None``.
    """

    label: str
    edges: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor
    count: torch.Tensor
    ece: float | None = None


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _draw_diagram(ax: Axes, p: ReliabilityPanel, first: bool) -> None:
    """Per-bin accuracy bars, the gap to the bin's mean confidence, and the diagonal."""
    edges = p.edges.double().cpu()
    left, width = edges[:-1], edges[1:] - edges[:-1]
    count = p.count.double().cpu()
    acc = torch.where(count > 0, p.accuracy.double().cpu(), torch.zeros_like(count))
    conf = torch.where(count > 0, p.confidence.double().cpu(), torch.zeros_like(count))
    ax.bar(
        left,
        acc,
        width=width,
        align="edge",
        color="#3b75af",
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
    )
    gap_lo, gap_hi = torch.minimum(acc, conf), torch.maximum(acc, conf)
    ax.bar(
        left,
        gap_hi - gap_lo,
        bottom=gap_lo,
        width=width,
        align="edge",
        color="#d62728",
        alpha=0.3,
        edgecolor="#d62728",
        hatch="//",
        linewidth=0.5,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    head = p.label if p.ece is None else f"{p.label}  (ECE {100 * p.ece:.2f}%)"
    ax.set_title(head, fontsize=9)
    if first:
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize=7)


def _draw_histogram(ax: Axes, p: ReliabilityPanel, first: bool) -> None:
    """Share of samples per bin, with the mean accuracy and mean confidence marked."""
    edges = p.edges.double().cpu()
    left, width = edges[:-1], edges[1:] - edges[:-1]
    count = p.count.double().cpu()
    total = float(count.sum())
    share = count / total if total > 0 else count
    ax.bar(
        left, share, width=width, align="edge", color="#7f7f7f", edgecolor="black", linewidth=0.5
    )
    if total > 0:
        mean_acc = float((p.accuracy.double().cpu() * count).nansum() / total)
        mean_conf = float((p.confidence.double().cpu() * count).nansum() / total)
        ax.axvline(mean_acc, color="#3b75af", linestyle="-", linewidth=1.2, label="mean acc")
        ax.axvline(mean_conf, color="#d62728", linestyle="--", linewidth=1.2, label="mean conf")
    ax.set_xlabel("confidence")
    if first:
        ax.set_ylabel("share")
        ax.legend(loc="upper left", fontsize=6)


def reliability_figure(panels: Sequence[ReliabilityPanel], title: str = "") -> Figure:
    """Build the reliability-diagram figure (one column per panel) without saving it.

    Args:
        panels: One :class:`ReliabilityPanel` per column.
        title: Figure title.

    Returns:
        The matplotlib figure; axes ``[2 * i]`` is panel ``i``'s diagram and ``[2 * i + 1]`` its
        confidence histogram.
    """
    if not panels:
        raise CSMError("reliability diagram: no panels to draw; give at least one set of bins")
    n = len(panels)
    fig, axes = plt.subplots(
        2,
        n,
        figsize=(3.2 * n, 4.4),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08},
    )
    ordered = []
    for i, p in enumerate(panels):
        top, bottom = axes[0, i], axes[1, i]
        ordered += [top, bottom]
        _draw_diagram(top, p, i == 0)
        _draw_histogram(bottom, p, i == 0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig._csm_axes = ordered  # type: ignore[attr-defined]  (stable order for tests)
    return fig


def plot_reliability(
    panels: Sequence[ReliabilityPanel], path: str | os.PathLike, title: str = ""
) -> Path:
    """Write a reliability diagram PNG with the confidence histogram under each panel.

    Args:
        panels: One :class:`ReliabilityPanel` per column (e.g. uncalibrated, ts, vs, ...).
        path: Output PNG path (written atomically).
        title: Figure title (say what was pooled, e.g. seeds, and the number of bins).

    Returns:
        The path written.
    """
    return _save(reliability_figure(panels, title), path)


def risk_coverage_curve(
    confidence: torch.Tensor, correct: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective risk at every coverage, rejecting the least confident samples first.

    Samples are sorted by decreasing confidence with a stable sort (ties keep input order);
    the point ``k`` (1-based) has coverage ``k / N`` and risk = errors among the first ``k`` / k.
    The mean of the risks is the AURC of Geifman et al. (2019).

    Args:
        confidence: ``(N,)`` confidence scores (higher = more trusted).
        correct: ``(N,)`` bool or 0/1 correctness.

    Returns:
        ``(coverage, risk)``, both ``(N,)`` float64.
    """
    if confidence.numel() == 0:
        raise CSMError("risk-coverage: no samples; evaluate on a non-empty split")
    order = torch.sort(confidence.double().cpu(), descending=True, stable=True).indices
    errors = 1.0 - correct.double().cpu()[order]
    k = torch.arange(1, errors.numel() + 1, dtype=torch.float64)
    return k / errors.numel(), torch.cumsum(errors, 0) / k


def risk_coverage_figure(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]], title: str = ""
) -> Figure:
    """Build the risk-coverage figure: one line per entry of ``curves`` (label -> (cov, risk))."""
    if not curves:
        raise CSMError("risk-coverage plot: no curves to draw; give at least one run")
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for label, (cov, risk) in curves.items():
        aurc = float(risk.double().mean())
        ax.plot(cov.cpu(), risk.cpu(), linewidth=1.3, label=f"{label} (AURC {100 * aurc:.2f}%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of samples kept, most confident first)")
    ax.set_ylabel("selective risk (error rate among kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_risk_coverage(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Write a risk-coverage PNG with one curve per method (AURC in the legend, in %).

    Args:
        curves: Label -> ``(coverage, risk)`` from :func:`risk_coverage_curve`.
        path: Output PNG path (written atomically).
        title: Figure title.

    Returns:
        The path written.
    """
    return _save(risk_coverage_figure(curves, title), path)


def reliability_panel(
    label: str, probs: torch.Tensor, labels: torch.Tensor, n_bins: int
) -> ReliabilityPanel:
    """A :class:`ReliabilityPanel` of probabilities ``(N, K)`` against labels ``(N,)``
    (:func:`csm.calibration.metrics.reliability_bins`: equal-width bins, ECE printed)."""
    from csm.calibration.metrics import reliability_bins

    b = reliability_bins(probs, labels, n_bins)
    return ReliabilityPanel(
        label=label,
        edges=torch.tensor(b.edges),
        accuracy=torch.tensor(b.accuracy),
        confidence=torch.tensor(b.confidence),
        count=torch.tensor(b.counts),
        ece=b.ece,
    )


def write_plots(
    pooled: Mapping[str, Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]],
    out: str | os.PathLike,
    n_bins: int,
    seeds: Mapping[str, int],
) -> list[Path]:
    """Write ``reliability/<group>.png`` per method and ``risk_coverage.png`` (``csm evaluate``).

    Args:
        pooled: Per leaderboard group, per calibrator (panel order), the ``(probs, labels)`` of
            the clean test split of each run; the runs (seeds) are pooled.
        out: The output folder.
        n_bins: Equal-width bins of the diagrams.
        seeds: Number of runs pooled per group (stated in the titles).

    Returns:
        The paths written.
    """
    out = Path(out)
    written = []
    curves = {}
    for group, by_cal in pooled.items():
        panels = []
        for cal_name, parts in by_cal.items():
            probs = torch.cat([p for p, _ in parts])
            labels = torch.cat([y for _, y in parts])
            panels.append(reliability_panel(cal_name, probs, labels, n_bins))
            if cal_name == "none":
                conf, pred = probs.max(-1)
                curves[group] = risk_coverage_curve(conf, pred == labels)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in group)
        title = f"{group}: clean test, {seeds[group]} seed(s) pooled, {n_bins} equal-width bins"
        written.append(plot_reliability(panels, out / "reliability" / f"{safe}.png", title=title))
    if curves:
        title = "Risk-coverage on clean test (no calibrator)"
        written.append(plot_risk_coverage(curves, out / "risk_coverage.png", title=title))
    return written
