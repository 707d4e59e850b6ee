"""Before/after table of the methods issue 13 changed, from committed results.csv files.

Before: eval/results/fast-recipes/<dataset>-5seeds (the committed fast-recipe benchmark); after:
the fidelity re-runs of ``eval/fidelity.sh`` (same recipes, seeds and splits; clean test). Cells
are mean ± sample std over seeds 0-4 of test accuracy, ECE (15 equal-width bins) and ECE after
temperature scaling fitted on val, in %. Usage: ``python eval/summarize.py`` (or ``python
eval/fidelity_summary.py > eval/results/fidelity.md``).
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("ce", "refcal", "rankmixup", "mbls", "bsce_gra")


def _cells(path: Path, method: str) -> list[str] | None:
    rows = [r for r in csv.DictReader(path.open()) if r["method"] == method]
    clean = [r for r in rows if r["condition"] == "clean"]
    none = [r for r in clean if r["calibrator"] == "none"]
    ts = [r for r in clean if r["calibrator"] == "ts"]
    if not none:
        return None

    def fmt(vals: list[str]) -> str:
        x = [100 * float(v) for v in vals]
        return f"{statistics.mean(x):.2f} ± {statistics.stdev(x):.2f}"

    return [fmt([r["cls/Acc"] for r in none]), fmt([r["cal/ECE"] for r in none]),
            fmt([r["cal/ECE"] for r in ts])]  # fmt: skip


def table(results: Path = RESULTS) -> str:
    """The before/after table (markdown) from the results under ``results``."""
    out = ["# Fidelity re-runs (issue 13): before / after", "", __doc__.split("\n\n")[1], ""]
    out += [
        "| dataset | method | run | Acc % | ECE % | ECE % + TS |",
        "|---|---|---|---:|---:|---:|",
    ]
    for ds in ("digits", "mnist5k"):
        runs = {
            "before (committed)": results / "fast-recipes" / f"{ds}-5seeds" / "results.csv",
            "after (reference defaults)": results / f"fidelity-{ds}-5seeds" / "results.csv",
            "after, refcal views=trainer": results
            / f"fidelity-{ds}-5seeds-refcal-views-trainer"
            / "results.csv",
        }
        for method in METHODS:
            for label, path in runs.items():
                cells = _cells(path, method) if path.is_file() else None
                if cells is not None:
                    out.append(f"| {ds} | {method} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    sys.stdout.write(table())


if __name__ == "__main__":
    main()
