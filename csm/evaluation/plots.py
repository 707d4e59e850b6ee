"""Pictures of calibration: reliability diagrams and risk-coverage curves (matplotlib, Agg).

* :func:`plot_reliability` draws one reliability diagram per panel (e.g. one per post-hoc
  calibrator of a method): per-bin accuracy as bars against the diagonal, the gap to the bin's
  mean confidence shaded, and underneath it the confidence histogram (share of samples per bin)
  with the mean accuracy and mean confidence marked. Reliability diagrams follow Guo et al.,
  "On Calibration of Modern Neural Networks", ICML 2017 (arXiv 1706.04599), Fig. 1; as in
  torch-uncertainty's diagrams, a bar's opacity grows with its bin's mass
  (``alpha = 0.2 + 0.8 * n_b / max_b n_b``) and its sample count is printed on it, so a bin of 3
  samples does not look like a bin of 3,000.
* :func:`mosaic_figure`, :func:`captioned_images_figure`, :func:`curves_figure` and
  :func:`soft_label_figure` draw the demo report's pictures: labelled image grids (λ sweeps,
  real against generated), images with their λ and soft label, train/val curves, and the soft
  label against λ.
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
import numpy as np  # noqa: E402
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


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG atomically (``csm.utils.atomic_path``) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def bar_alphas(count: torch.Tensor) -> torch.Tensor:
    """Opacity of each bin's bars: ``0.2 + 0.8 * n_b / max_b n_b`` (torch-uncertainty style)."""
    count = count.double().cpu()
    top = float(count.max()) if count.numel() else 0.0
    return 0.2 + 0.8 * (count / top if top > 0 else count)


def _draw_diagram(ax: Axes, p: ReliabilityPanel, first: bool) -> None:
    """Per-bin accuracy bars (faded by bin mass, count on top), the gap, and the diagonal."""
    edges = p.edges.double().cpu()
    left, width = edges[:-1], edges[1:] - edges[:-1]
    count = p.count.double().cpu()
    acc = torch.where(count > 0, p.accuracy.double().cpu(), torch.zeros_like(count))
    conf = torch.where(count > 0, p.confidence.double().cpu(), torch.zeros_like(count))
    rgba = [(0.231, 0.459, 0.686, float(a)) for a in bar_alphas(count)]
    ax.bar(
        left,
        acc,
        width=width,
        align="edge",
        color=rgba,
        edgecolor="black",
        linewidth=0.5,
        label="accuracy (opacity: bin mass)",
    )
    for x, w, h, n in zip(left.tolist(), width.tolist(), acc.tolist(), count.tolist()):
        if n > 0:
            ax.text(x + w / 2, min(h, 0.93) + 0.01, f"{int(n)}", ha="center", fontsize=5)
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
    return save_figure(reliability_figure(panels, title), path)


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
    return save_figure(risk_coverage_figure(curves, title), path)


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


# ----------------------------------------------------------------------------- report pictures
def _as_hwc(image: np.ndarray) -> np.ndarray:
    """A ``(C, H, W)`` or ``(H, W)`` uint8 image as ``(H, W, 3)`` for ``imshow``."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim == 2:
        img = img[..., None]
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def mosaic_figure(
    tiles: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    xlabel: str = "",
    gap_after: int | None = None,
) -> Figure:
    """One labelled image grid: ``tiles[r][c]`` (uint8, ``(C, H, W)``) at row r, column c.

    Args:
        tiles: Rows of equally sized images (one axes, so hundreds of tiles stay fast).
        row_labels: One label per row (left).
        col_labels: One label per column (under the grid), e.g. the λ of each column.
        title: Figure title.
        xlabel: What the columns are.
        gap_after: Draw a wider gap after this column (e.g. between real and generated).
    """
    if not tiles or not tiles[0]:
        raise CSMError("image grid: no images to draw")
    rows = [[_as_hwc(t) for t in row] for row in tiles]
    h, w = rows[0][0].shape[:2]
    pad, ncol = 1, max(len(r) for r in rows)
    extra = 0 if gap_after is None else w // 2
    height, width = len(rows) * (h + pad) + pad, ncol * (w + pad) + pad + extra
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    xs = [pad + c * (w + pad) + (extra if gap_after is not None and c > gap_after else 0)
          for c in range(ncol)]  # fmt: skip
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y = pad + r * (h + pad)
            canvas[y : y + h, xs[c] : xs[c] + w] = img[:h, :w]
    inch = 0.5 / max(h, w)  # about half an inch per tile
    fig, ax = plt.subplots(figsize=(1.6 + width * inch, 0.6 + height * inch))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(rows))], list(row_labels))
    ax.set_xticks([x + w / 2 for x in xs[: len(col_labels)]], list(col_labels))
    ax.tick_params(length=0, labelsize=7)
    for side in ax.spines.values():
        side.set_visible(False)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def captioned_images_figure(
    images: Sequence[np.ndarray], captions: Sequence[str], ncols: int = 6, title: str = ""
) -> Figure:
    """Images (uint8, ``(C, H, W)``) with a caption printed under each one."""
    if not images:
        raise CSMError("captioned images: no images to draw")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.7 * ncols, 2.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions):
        ax.imshow(_as_hwc(img), interpolation="nearest")
        ax.text(0.5, -0.04, cap, transform=ax.transAxes, ha="center", va="top", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(hspace=0.6)
    return fig


def curves_figure(
    curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    panels: Sequence[tuple[str, str]],
    title: str = "",
    xlabel: str = "epoch",
) -> Figure:
    """Line plots, one panel per ``(key, panel title)``: ``curves[line][key] = (x, y)``.

    Lines whose label shares the part before ``/`` (e.g. ``csm/seed0``, ``csm/seed1``) share a
    colour, so methods stand out over seeds.
    """
    if not curves or not panels:
        raise CSMError("curves: nothing to draw; give at least one run and one metric")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 2.9), squeeze=False)
    groups = list(dict.fromkeys(label.split("/")[0] for label in curves))
    colours = plt.get_cmap("tab10")
    for ax, (key, name) in zip(axes[0], panels):
        seen: set[str] = set()
        for label, series in curves.items():
            if key not in series:
                continue
            group = label.split("/")[0]
            x, y = series[key]
            ax.plot(x, y, marker=".", linewidth=1, color=colours(groups.index(group) % 10),
                    label=None if group in seen else group)  # fmt: skip
            seen.add(group)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def soft_label_figure(
    lam: torch.Tensor, soft_a: torch.Tensor, pair: torch.Tensor, title: str = ""
) -> Figure:
    """Soft label of class a against the generation λ: one thin line per pair, the mean in bold.

    Args:
        lam: ``(N,)`` generation ratios.
        soft_a: ``(N,)`` soft label given to class a.
        pair: ``(N,)`` pair index of each image (one line each, mean over its images per λ).
        title: Figure title (say which annotation and squash).
    """
    if lam.numel() == 0:
        raise CSMError("soft label plot: no images")
    lam, soft_a, pair = lam.double().cpu(), soft_a.double().cpu(), pair.cpu()
    grid = torch.unique(lam)
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for p in torch.unique(pair):
        sel = pair == p
        ys = [
            float(soft_a[sel & (lam == g)].mean()) for g in grid if bool((sel & (lam == g)).any())
        ]
        xs = [float(g) for g in grid if bool((sel & (lam == g)).any())]
        ax.plot(xs, ys, color="gray", alpha=0.25, linewidth=0.7)
    mean = [float(soft_a[lam == g].mean()) for g in grid]
    ax.plot(grid.tolist(), mean, color="#d62728", marker="o", linewidth=2, label="mean over images")
    ax.plot([0, 1], [0, 1], "--", color="black", linewidth=0.8, label="soft label = λ")
    ax.set_xlabel("λ (generation weight of class a)")
    ax.set_ylabel("soft label of class a")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    return fig
