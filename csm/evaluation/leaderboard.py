"""``results.csv`` and ``leaderboard.md``: the evaluator's result rows, written, read and tabulated.

A result row is a dict with the identity columns :data:`ID_COLUMNS` (run, method, model, dataset,
seed, calibrator, condition, corruption, severity, n) and one value per metric of
:data:`csm.calibration.metrics.METRIC_INFO` (fractions; NLL in nats). The leaderboard reads each
metric's label, unit and direction from that one table.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from csm.calibration.metrics import METRIC_INFO, MetricInfo
from csm.errors import CSMError
from csm.utils import atomic_write_text

__all__ = [
    "CLEAN",
    "ID_COLUMNS",
    "format_leaderboard",
    "group_labeler",
    "read_results",
    "write_results",
]

CLEAN = "clean"
"""Name of the uncorrupted test condition (others are ``<corruption>@<severity>``)."""

ID_COLUMNS = [
    "run",
    "method",
    "model",
    "dataset",
    "seed",
    "calibrator",
    "condition",
    "corruption",
    "severity",
    "n",
]

Row = dict[str, Any]
Cells = dict[tuple[str, str], list[float]]


def write_results(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Write result rows as ``results.csv`` (atomically; floats as ``repr``, exact round trip).

    Columns: :data:`ID_COLUMNS`, then the metrics in :data:`METRIC_INFO` order, then any other
    metric columns in first-seen order; a metric missing from a row is an empty cell.
    """
    metric_cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in ID_COLUMNS and k not in metric_cols:
                metric_cols.append(k)
    ordered = [m for m in METRIC_INFO if m in metric_cols]
    ordered += [m for m in metric_cols if m not in ordered]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ID_COLUMNS + ordered, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_results(path: str | os.PathLike) -> list[Row]:
    """Read ``results.csv`` back (metric cells stay strings; empty = missing)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def group_labeler(rows: Sequence[Row]) -> Callable[[Row], str]:
    """Leaderboard row label of a result row: the method, plus the model and/or dataset when
    the rows hold more than one of them (so runs on different data are never pooled as seeds)."""
    extra = [k for k in ("model", "dataset") if len({str(r[k]) for r in rows}) > 1]

    def label(row: Row) -> str:
        if not extra:
            return str(row["method"])
        return f"{row['method']} ({', '.join(str(row[k]) for k in extra)})"

    return label


# ---------------------------------------------------------------------------------------------
# cells


def _num(v: Any) -> float:
    """A metric cell as float (``""``/``None`` -> NaN), for rows read back from CSV."""
    if v is None or v == "":
        return math.nan
    return float(v)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof = 1; NaN for one value) and count, NaNs skipped."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan, len(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var), len(vals)


def _shown(mean: float, info: MetricInfo) -> float:
    """A mean rounded as the table shows it (percent: 2 decimals of x 100; else 3 decimals)."""
    return round(mean * (100.0 if info.percent else 1.0), 2 if info.percent else 3)


def _fmt(mean: float, std: float, percent: bool) -> str:
    if math.isnan(mean):
        return "–"
    scale, digits = (100.0, 2) if percent else (1.0, 3)
    text = f"{mean * scale:.{digits}f}"
    if not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def _best_per_column(
    row_labels: list[str],
    columns: list[tuple[str, MetricInfo]],
    stats: dict[tuple[str, str], tuple[float, float, int]],
) -> dict[str, float]:
    """The best shown mean of each column that has at least two values."""
    best: dict[str, float] = {}
    for col, info in columns:
        shown = []
        for r in row_labels:
            m = stats.get((r, col), (math.nan, math.nan, 0))[0]
            if not math.isnan(m):
                shown.append(_shown(m, info))
        if len(shown) > 1:
            best[col] = max(shown) if info.higher_is_better else min(shown)
    return best


def _table(
    title: str, row_labels: list[str], columns: list[tuple[str, MetricInfo]], cells: Cells
) -> str:
    """A markdown table; ``cells[(row, column)]`` holds one value per seed. Best mean in bold."""
    stats = {k: _mean_std(v) for k, v in cells.items()}
    best = _best_per_column(row_labels, columns, stats)
    head = ["method"] + [
        f"{info.label}{' %' if info.percent else ''} {'↑' if info.higher_is_better else '↓'}"
        for _, info in columns
    ]
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
    ]
    for r in row_labels:
        out = [r]
        for col, info in columns:
            m, s, _ = stats.get((r, col), (math.nan, math.nan, 0))
            text = _fmt(m, s, info.percent)
            if col in best and not math.isnan(m) and _shown(m, info) == best[col]:
                text = f"**{text}**"
            out.append(text)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the leaderboard


class _Board:
    """The result rows with what every table needs: group labels, groups, calibrators."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows
        self.label = group_labeler(rows)
        self.groups: list[str] = list(dict.fromkeys(self.label(r) for r in rows))
        self.runs: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            self.runs[self.label(r)].add(str(r["run"]))
        self.calibrators: list[str] = list(dict.fromkeys(str(r["calibrator"]) for r in rows))
        self.base_cal = "none" if "none" in self.calibrators else self.calibrators[0]
        self.present = [m for m in METRIC_INFO if any(not math.isnan(_num(r.get(m))) for r in rows)]

    def by_group(self, cal: str, cond: str, metric: str) -> dict[str, list[float]]:
        """Per group, the values of ``metric`` under calibrator ``cal`` and condition ``cond``."""
        out: dict[str, list[float]] = defaultdict(list)
        for r in self.rows:
            if r["calibrator"] == cal and r["condition"] == cond:
                out[self.label(r)].append(_num(r.get(metric)))
        return out


def _header(board: _Board, n_bins: int) -> list[str]:
    datasets = sorted({str(r["dataset"]) for r in board.rows})
    seeds = sorted({len(v) for v in board.runs.values()})
    seed_text = "/".join(str(s) for s in seeds)
    n_runs = sum(len(v) for v in board.runs.values())
    return [
        "# Leaderboard",
        "",
        f"Dataset: {', '.join(datasets)}. Runs: {n_runs} "
        f"({len(board.groups)} method(s), {seed_text} seed(s) each). Test split only; every "
        "post-hoc calibrator was fitted on the validation split.",
        "",
        f"Cells are mean ± sample std (ddof=1) over seeds; **bold** = best in its column; ↑/↓ = "
        "higher/lower is better. Columns marked % are fractions x 100; NLL is in nats; Brier is "
        "the squared error summed over classes (0..2), as fractions. "
        f"ECE, MCE, OE, UE: {n_bins} equal-width bins on the top-label confidence, "
        "[lo, hi) with the last bin closed so confidence 1.0 lands in it; "
        f"AdaECE: {n_bins} equal-mass bins; classwise ECE: {n_bins} equal-width bins per "
        "class; smECE, KS, KDE-ECE (Zhang et al. 2020) and MMCE (Kumar et al. 2018, "
        "Laplacian kernel, width 0.4) use no bins. "
        "mis-AUROC: misclassification detection by max-softmax (alien: by -uncertainty; correct "
        "= positive); AURC, E-AURC and AUGRC (Traub et al. 2024) from the risk-coverage curve; "
        "Risk@80: error at 80% coverage; Cov@5Risk: the largest coverage with error <= 5% (0 "
        "when none); OOD-AUROC, OOD-AUPR and FPR95: in-distribution vs OOD by max-softmax, OOD "
        "positive.",
    ]


def _clean_table(board: _Board) -> str:
    """Clean test under the base calibrator (``none``), every metric present."""
    cols = [(m, METRIC_INFO[m]) for m in board.present]
    cells: Cells = {}
    for m, _ in cols:
        for g, vals in board.by_group(board.base_cal, CLEAN, m).items():
            cells[(g, m)] = vals
    return _table(f"Clean test, calibrator: {board.base_cal}", board.groups, cols, cells)


def _calibrator_tables(board: _Board) -> list[str]:
    """ECE, NLL and AURC on clean test, one column per post-hoc calibrator."""
    tables = []
    for metric in ("cal/ECE", "cls/NLL", "sc/AURC"):
        if metric not in board.present or len(board.calibrators) < 2:
            continue
        info = METRIC_INFO[metric]
        cols = [(c, MetricInfo(c, info.higher_is_better, info.percent)) for c in board.calibrators]
        cells: Cells = {}
        for c in board.calibrators:
            for g, vals in board.by_group(c, CLEAN, metric).items():
                cells[(g, c)] = vals
        title = f"{info.label} on clean test after each post-hoc calibrator"
        tables.append(_table(title, board.groups, cols, cells))
    return tables


def _shift_table(board: _Board) -> str | None:
    """Accuracy and ECE per severity, averaged over the corruptions per run (``None``: no
    shifted rows)."""
    shifted = [r for r in board.rows if r["condition"] != CLEAN]
    if not shifted:
        return None
    metrics = ("cls/Acc", "cal/ECE")
    sevs = sorted({int(_num(r["severity"])) for r in shifted})
    shift_cals = [c for c in ("none", "ts") if c in board.calibrators] or [board.base_cal]

    def row_label(group: str, cal: str) -> str:
        return group if cal == board.base_cal else f"{group} + {cal}"

    cols = []
    for metric in metrics:
        info = METRIC_INFO[metric]
        for s in [0, *sevs]:
            lab = f"{info.label} {'clean' if s == 0 else f's{s}'}"
            cols.append((f"{metric}@{s}", MetricInfo(lab, info.higher_is_better, info.percent)))
    per_run: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in board.rows:
        if r["calibrator"] not in shift_cals:
            continue
        label = row_label(board.label(r), str(r["calibrator"]))
        s = 0 if r["condition"] == CLEAN else int(_num(r["severity"]))
        for metric in metrics:
            per_run[(label, str(r["run"]), f"{metric}@{s}")].append(_num(r.get(metric)))
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (label, _run, col), vals in per_run.items():
        cells[(label, col)].append(_mean_std(vals)[0])
    corr = sorted({str(r["corruption"]) for r in shifted})
    row_labels = [row_label(g, c) for c in shift_cals for g in board.groups]
    title = f"Under shift: mean over corruptions ({', '.join(corr)}) per severity"
    return _table(title, row_labels, cols, dict(cells))


def format_leaderboard(rows: Sequence[Row], *, n_bins: int = 15) -> str:
    """Render ``results.csv`` rows as the markdown leaderboard.

    Tables: (1) clean test, no post-hoc calibration, every metric; (2) ECE, (3) NLL and (4) AURC
    on clean test for every post-hoc calibrator; (5) accuracy and ECE under shift, averaged over the
    corruptions at each severity (uncalibrated and ``ts``). Each cell is the mean ± sample
    standard deviation (ddof = 1) over the runs of a method (one run per seed); the best mean of
    each column is in bold (ties at the shown precision all bold).

    Args:
        rows: Result rows (dicts with :data:`ID_COLUMNS` and metric names; values may be
            strings as read from CSV).
        n_bins: Number of bins used, stated in the header.

    Returns:
        The markdown text.

    Raises:
        CSMError: No rows.
    """
    if not rows:
        raise CSMError("leaderboard: no result rows; evaluate at least one run")
    board = _Board(rows)
    parts = _header(board, n_bins)
    parts += ["", _clean_table(board)]
    for table in _calibrator_tables(board):
        parts += ["", table]
    shift = _shift_table(board)
    if shift is not None:
        parts += ["", shift]
    return "\n".join(parts) + "\n"
