"""Summary of ``eval/mixing_ablations.sh``: one row per CSM variant against CE (issue 14, item 5).

usage: python eval/mixing_summary.py digits|mnist5k [--out DIR]

Reads ``OUT/eval-<variant>/results.csv`` and ``paired.csv`` (CE and the variant, the same seeds
and split) and the two ``inspect-*/inspect.json`` spreads; writes ``OUT/summary.md``. Test split
only; every setting was fixed before the runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm.evaluation.leaderboard import read_paired, read_results  # noqa: E402

NOTE = (
    "Test split, mean ± std over seeds; shifted = mean over 5 corruptions x 3 severities; "
    "Δ = CSM variant − CE on the same seed and split (percentage points), 95% hierarchical "
    "paired bootstrap interval, wins/seeds (`csm evaluate` paired.csv)."
)
VARIANTS = ("base", "judge-ts", "pair-fit", "targeted", "old-gen")
METRICS = ("cls/Acc", "cal/ECE", "cal/AdaECE")
#: The inspected datasets whose confidence spread the summary quotes (issue 14, item 4).
SPREADS = {
    "syn": "uniform λ grid",
    "syn-targeted": "targeted λ, ends fixed at 0 and 1",
    "syn-targeted-ends": "targeted λ, --lambda-ends targeted",
}
#: The CSM configuration the regimes re-run uses (eval/regimes.sh CSM_LABEL / CSM_SCHEDULE) is
#: chosen on validation only, by a rule fixed before the runs: among the variants of the improved
#: generator, the lowest mean validation ECE of the selected checkpoints (run.json "val").
CHOICES = {
    "base": ("s4", "uniform"),
    "judge-ts": ("judge-ts", "uniform"),
    "pair-fit": ("pair-fit", "uniform"),
    "targeted": ("s4", "targeted"),
}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def _cells(rows: list[dict], method: str) -> list[str]:
    def vals(cal: str, metric: str, clean: bool) -> list[float]:
        out: dict[str, list[float]] = {}
        for r in rows:
            if r["method"] == method and r["calibrator"] == cal and r.get(metric, "") != "":
                if (r["condition"] == "clean") == clean:
                    out.setdefault(str(r["run"]), []).append(float(r[metric]))
        return [statistics.fmean(v) for v in out.values()]  # shifted: mean over conditions

    cells = [_mean_std(vals("none", m, True)) for m in METRICS]
    cells.append(_mean_std(vals("ts", "cal/ECE", True)))
    cells.append(_mean_std(vals("none", "cal/ECE", False)))
    return cells


def _paired(paired: list[dict], metric: str) -> str:
    for r in paired:
        if r["calibrator"] == "none" and r["metric"] == metric:
            m, lo, hi = (100 * r[k] for k in ("mean_diff", "ci_low", "ci_high"))
            return f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] {r['wins']}/{r['n_seeds']}"
    return "—"


def val_metric(out: Path, folder: str, method: str, metric: str = "val/cal/ECE") -> list[float]:
    """``metric`` of every seed's selected checkpoint (``run.json`` ``val``; never test)."""
    runs = sorted((out / folder / "runs" / method).glob("seed*/run.json"))
    return [float(json.loads(p.read_text())["val"][metric]) for p in runs]


def choose_on_val(out: Path) -> tuple[str, list[str]]:
    """The variant :data:`CHOICES` picks (lowest mean val ECE) and one line per candidate."""
    lines, best = [], None
    for v in CHOICES:
        ece = val_metric(out, f"csm-{v}", "csm")
        if not ece:
            continue
        acc = val_metric(out, f"csm-{v}", "csm", "val/cls/Acc")
        mean = statistics.fmean(ece)
        n = len(ece)
        lines.append(f"- {v}: val ECE {_mean_std(ece)}, val Acc {_mean_std(acc)} ({n} seeds)")
        if best is None or mean < best[1]:
            best = (v, mean)
    return (best[0] if best else ""), lines


def summarize(out: Path) -> str:
    head = (
        "| variant | Acc % | ECE % | AdaECE % | ECE % + TS | shifted ECE % | ΔECE vs CE "
        "| ΔAdaECE vs CE | val ECE % |"
    )
    lines = [head, "|---|" + "---:|" * 8]
    ce_done = False
    for v in VARIANTS:
        folder = out / f"eval-{v}"
        if not (folder / "results.csv").is_file():
            continue
        rows = read_results(folder / "results.csv")
        paired = read_paired(folder / "paired.csv") if (folder / "paired.csv").is_file() else []
        if not ce_done:
            ce_val = _mean_std(val_metric(out, "ce", "ce"))
            lines.append("| ce | " + " | ".join(_cells(rows, "ce")) + f" | | | {ce_val} |")
            ce_done = True
        deltas = [_paired(paired, "cal/ECE"), _paired(paired, "cal/AdaECE")]
        deltas.append(_mean_std(val_metric(out, f"csm-{v}", "csm")))
        lines.append(f"| csm {v} | " + " | ".join(_cells(rows, "csm") + deltas) + " |")
    chosen, candidates = choose_on_val(out)
    label, schedule = CHOICES.get(chosen, ("", ""))
    seeds = len(val_metric(out, "ce", "ce"))  # every candidate should have CE's seeds
    counts = [len(val_metric(out, f"csm-{v}", "csm")) for v in CHOICES]
    partial = any(n < seeds for n in counts)
    verdict = f"- **chosen{' so far (runs missing)' if partial else ''}: {chosen or 'none'}**"
    if chosen:
        verdict += f" (eval/regimes.sh CSM_LABEL={label} CSM_SCHEDULE={schedule})"
    spread = []
    base_ks = None
    for name, what in SPREADS.items():
        path = out / f"inspect-{name}" / "inspect.json"
        if not path.is_file():
            continue
        ann = json.loads(path.read_text()).get("spread", {}).get("annotated", {})
        ks, inner = ann.get("ks"), (ann.get("interior") or {}).get("ks")
        base_ks = base_ks or (ks, inner)
        line = f"- {name} ({what}): KS distance of soft[a] to U(0, 1) {ks:.3f} over all images"
        line += f", {inner:.3f} without each group's two ends" if inner is not None else ""
        if name != "syn" and base_ks[0]:
            line += f" ({base_ks[0] / ks:.2f}x"
            line += f", {base_ks[1] / inner:.2f}x)" if inner and base_ks[1] else ")"
        spread.append(line)
    return (
        "\n".join(
            [
                f"# Mixing ablations ({out.name})",
                "",
                NOTE,
                "",
                *lines,
                "",
                "Confidence spread (csm inspect):",
                *spread,
                "",
                "Chosen on validation (lowest mean val ECE of the selected checkpoints, among the "
                "improved generator's variants; the rule was fixed before the runs):",
                *candidates,
                verdict,
            ]
        )
        + "\n"
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["digits", "mnist5k"])
    ap.add_argument("--out", default=None, help="ablation folder (default: eval/results/...)")
    args = ap.parse_args()
    out = Path(args.out or f"eval/results/{args.dataset}-mixing-ablations")
    text = summarize(out)
    (out / "summary.md").write_text(text)
    logging.info("%s", text)


if __name__ == "__main__":
    main()
