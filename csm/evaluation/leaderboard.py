"""``results.csv`` and ``leaderboard.md``: the evaluator's result rows, written, read and tabulated.

A result row is a dict with the identity columns :data:`ID_COLUMNS` (run, method, model, dataset,
seed, calibrator, condition, corruption, severity, n, and the size and error count of the
validation split the calibrators were fitted on: val_n, val_errors) and one value per metric of
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
    "BIN_COUNTS",
    "BINNED_ECE_PREFIX",
    "ID_COLUMNS",
    "MIN_VAL_ERRORS",
    "format_leaderboard",
    "group_labeler",
    "PAIRED_COLUMNS",
    "format_paired",
    "format_sanity",
    "read_paired",
    "read_results",
    "write_paired",
    "write_results",
]

#: Fewest errors a calibration split should hold for its calibrators to be trusted (issue 15:
#: runs below it are flagged in the log and the leaderboard's sanity checks).
MIN_VAL_ERRORS = 20

#: Bin counts of the binned-ECE sensitivity table (clean test; columns ``cal/ECE@<bins>``): the
#: ranking of methods by binned ECE can change with the bin count (the question the NATS-Bench
#: calibration study, arXiv 2401.11396, raises).
BIN_COUNTS = (5, 10, 15, 25, 50, 100)
BINNED_ECE_PREFIX = "cal/ECE@"

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
    "val_n",
    "val_errors",
]

#: Columns of ``paired.csv`` (rows of :func:`csm.evaluation.paired.paired_comparison`).
PAIRED_COLUMNS = [
    "reference",
    "method",
    "calibrator",
    "metric",
    "n_seeds",
    "seeds",
    "diffs",
    "mean_diff",
    "ci_low",
    "ci_high",
    "wins",
    "ties",
    "losses",
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


def write_paired(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Write the paired comparison rows as ``paired.csv`` (atomically; floats as ``repr``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PAIRED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_paired(path: str | os.PathLike) -> list[Row]:
    """Read ``paired.csv`` back (numbers as floats / ints)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("mean_diff", "ci_low", "ci_high"):
            r[k] = float(r[k])
        for k in ("n_seeds", "wins", "ties", "losses"):
            r[k] = int(r[k])
    return rows


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
        f"AdaECE: {n_bins} equal-mass bins; ECE-sweep: equal-mass bins, as many as keep bin "
        "accuracy monotone (Roelofs et al. 2022); dECE: debiased l2 estimator, "
        f"{n_bins} equal-mass bins (Kumar et al. 2019); classwise ECE: {n_bins} equal-width bins "
        "per class; smECE, KS, KDE-ECE (Zhang et al. 2020) and MMCE (Kumar et al. 2018, "
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


def _bins_table(board: _Board) -> str | None:
    """Binned ECE at each of :data:`BIN_COUNTS` (clean, no calibrator), with each method's rank
    per bin count (``None``: the rows hold no such columns)."""
    cols_present = [
        b for b in BIN_COUNTS if any(f"{BINNED_ECE_PREFIX}{b}" in r for r in board.rows)
    ]
    if not cols_present:
        return None
    means: dict[tuple[str, int], float] = {}
    cells: Cells = {}
    for b in cols_present:
        for g, vals in board.by_group(board.base_cal, CLEAN, f"{BINNED_ECE_PREFIX}{b}").items():
            cells[(g, str(b))] = vals
            means[(g, b)] = _mean_std(vals)[0]
    cols = [(str(b), MetricInfo(f"ECE {b} bins", False, True)) for b in cols_present]
    table = _table(
        f"Binned ECE vs number of bins (clean test, calibrator: {board.base_cal})",
        board.groups,
        cols,
        cells,
    )
    orders = {
        b: tuple(sorted(board.groups, key=lambda g, b=b: means.get((g, b), math.inf)))
        for b in cols_present
    }
    verdict = "changes" if len(set(orders.values())) > 1 else "does not change"
    best = "; ".join(f"{b}: " + " < ".join(order[:5]) for b, order in orders.items())
    return f"{table}\n\nThe ranking by binned ECE {verdict} with the bin count (best five: {best})."


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


def _clean_values(rows: Sequence[Row], method: str, cal: str, metric: str) -> dict[str, float]:
    """Per seed, ``metric`` of ``method`` on clean test under ``cal``."""
    return {
        str(r["seed"]): _num(r.get(metric))
        for r in rows
        if r["method"] == method and r["calibrator"] == cal and r["condition"] == CLEAN
    }


def _split_line(rows: Sequence[Row]) -> str:
    """Size and error count of the calibration (val) splits; runs under MIN_VAL_ERRORS."""
    per_run = {str(r["run"]): r for r in rows if str(r.get("val_n", "")) != ""}
    if not per_run:
        return "- Calibration split: not recorded in these results."
    n = sorted(int(_num(r["val_n"])) for r in per_run.values())
    err = sorted(int(_num(r["val_errors"])) for r in per_run.values())
    few = [run for run, r in per_run.items() if int(_num(r["val_errors"])) < MIN_VAL_ERRORS]
    text = (
        f"- Calibration split (val, never test): {n[0]}–{n[-1]} images per run holding "
        f"{err[0]}–{err[-1]} errors (median {err[len(err) // 2]}); "
    )
    if few:
        return text + f"**{len(few)} of {len(per_run)} runs hold < {MIN_VAL_ERRORS} errors**."
    return text + f"every run holds >= {MIN_VAL_ERRORS}."


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else math.nan


def _debiased_ts_line(rows: Sequence[Row], reference: str) -> list[str]:
    """The TS effect in the debiased binned estimator (``cal/dECE``, Kumar et al. 2019): on small
    test splits the plain binned ECE of a well calibrated model is floored by its own bias, which
    caps the ratio TS can show."""
    before = _clean_values(rows, reference, "none", "cal/dECE")
    after = _clean_values(rows, reference, "ts", "cal/dECE")
    b, a = _mean(before), _mean(after)
    if not (before and after) or math.isnan(a) or math.isnan(b):
        return []
    ratio = f"{b / a:.2f}x" if a > 0 else "to 0"
    return [
        f"- The same in the debiased estimator (dECE, Kumar et al. 2019): {100 * b:.2f}% → "
        f"{100 * a:.2f}% ({ratio})."
    ]


def format_sanity(rows: Sequence[Row], reference: str = "ce") -> str:
    """The sanity checks a reviewer asks first (issue 15), from the result rows.

    Does temperature scaling lower the reference's ECE; is the reference over- or
    under-confident (OE vs UE, Thulasidasan et al. 2019); do label smoothing and focal loss
    lower its ECE, as Mukhoti et al. (2020) report for over-confident networks; how large and
    error-rich the calibration splits are.
    """
    lines = ["## Sanity checks", "", _split_line(rows)]
    ece = _clean_values(rows, reference, "none", "cal/ECE")
    if not ece:
        return "\n".join([*lines, f"- No {reference} runs: no reference checks."])
    oe = _mean(_clean_values(rows, reference, "none", "cal/OE"))
    ue = _mean(_clean_values(rows, reference, "none", "cal/UE"))
    regime = "over-confident" if oe > ue else "under-confident"
    lines.append(
        f"- {reference} is **{regime}**: OE {100 * oe:.2f}% vs UE {100 * ue:.2f}% "
        f"(clean test, mean over {len(ece)} seed(s))."
    )
    ts = _clean_values(rows, reference, "ts", "cal/ECE")
    if ts:
        lowered = sum(1 for k in ts if k in ece and ts[k] < ece[k])
        ratio = _mean(ece) / _mean(ts) if _mean(ts) > 0 else math.inf
        lines.append(
            f"- TS {'lowers' if _mean(ts) < _mean(ece) else 'does not lower'} {reference}'s "
            f"ECE: {100 * _mean(ece):.2f}% → {100 * _mean(ts):.2f}% ({ratio:.2f}x; lower on "
            f"{lowered}/{len(ts)} seeds)."
        )
        lines += _debiased_ts_line(rows, reference)
    for other in ("ls", "focal"):
        vals = _clean_values(rows, other, "none", "cal/ECE")
        if vals:
            verdict = "lowers" if _mean(vals) < _mean(ece) else "does not lower"
            lines.append(
                f"- {other} {verdict} {reference}'s ECE: {100 * _mean(vals):.2f}% vs "
                f"{100 * _mean(ece):.2f}% (the literature expects lower when {reference} is "
                "over-confident)."
            )
    return "\n".join(lines)


_PAIRED_SHOWN = ("cal/ECE", "cal/AdaECE", "cls/Acc", "cls/NLL")


def _paired_cell(r: Row) -> str:
    info = METRIC_INFO[r["metric"]]
    scale, digits = (100.0, 2) if info.percent else (1.0, 3)
    m, lo, hi = (float(r[k]) * scale for k in ("mean_diff", "ci_low", "ci_high"))
    sig = "**" if lo > 0 or hi < 0 else ""
    text = f"{sig}{m:+.{digits}f}{sig} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return f"{text} {r['wins']}/{r['n_seeds']}"


def format_paired(paired: Sequence[Row], reference: str) -> str:
    """Markdown tables of the paired comparison against ``reference`` (one per calibrator)."""
    parts = [
        f"## Paired against {reference}",
        "",
        f"Cells: mean over seeds of (method − {reference}) on the same test split, 95% "
        "hierarchical paired bootstrap interval [lo, hi] (seeds, then test samples, resampled "
        f"with replacement), and wins/seeds (seeds on which the method beats {reference} in "
        "the metric's direction). **Bold**: the interval excludes 0. Percentage points for %-"
        "metrics; NLL in nats (from probabilities).",
    ]
    cals = list(dict.fromkeys(str(r["calibrator"]) for r in paired))
    for cal in [c for c in ("none", "ts") if c in cals] or cals[:1]:
        cells = {(r["method"], r["metric"]): r for r in paired if r["calibrator"] == cal}
        methods = list(dict.fromkeys(m for m, _ in cells))
        metrics = [k for k in _PAIRED_SHOWN if any(k == mk for _, mk in cells)]
        head = ["method", *(f"Δ{METRIC_INFO[k].label}" for k in metrics)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            row = [_paired_cell(cells[(m, k)]) if (m, k) in cells else "" for k in metrics]
            lines.append("| " + " | ".join([m, *row]) + " |")
        parts += ["", f"### Calibrator: {cal}", "", *lines]
    return "\n".join(parts)


def format_leaderboard(
    rows: Sequence[Row],
    *,
    n_bins: int = 15,
    paired: Sequence[Row] = (),
    reference: str = "ce",
) -> str:
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
        paired: Rows of ``paired.csv``; when given, (6) the paired comparison against
            ``reference`` per calibrator (none and ts).
        reference: The reference method of ``paired``.

    Returns:
        The markdown text.

    Raises:
        CSMError: No rows.
    """
    if not rows:
        raise CSMError("leaderboard: no result rows; evaluate at least one run")
    board = _Board(rows)
    parts = _header(board, n_bins)
    parts += ["", format_sanity(rows, reference), "", _clean_table(board)]
    for table in _calibrator_tables(board):
        parts += ["", table]
    for extra in (_bins_table(board), _shift_table(board)):
        if extra is not None:
            parts += ["", extra]
    if paired:
        parts += ["", format_paired(paired, reference)]
    return "\n".join(parts) + "\n"
