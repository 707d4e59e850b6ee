"""CSM's label mode for one regime, chosen on validation only (issue 15: "the best CSM
configuration chosen on validation only").

usage: python eval/csm_choice.py --runs DIR [DIR ...] --candidates s4 judge-ts pair-fit
                                 --seeds N --out CHOICE_DIR
       python eval/csm_choice.py --label-of DIR --seeds N

The rule, fixed before any run and the same as the mixing ablations' (eval/mixing_summary.py):
the candidate with the lowest mean validation ECE (``val/cal/ECE`` of each run's selected
checkpoint, ``run.json``) over the seeds, ties to the first candidate. Every candidate needs a
complete CSM run for every seed. Test metrics are never read: the candidates' runs are trained
with ``csm benchmark --evaluate false``. A run's label mode is the annotation name of its
``synthetic`` spec (``DIR:NAME``, ``config.yaml``), so runs of one candidate can come from any of
the folders given (e.g. the regime's own CSM runs). Writes ``CHOICE_DIR/choice.json`` (the chosen
label, the rule, each candidate's per-seed values) and ``choice.md``; prints the chosen label.
``--label-of DIR`` prints the label mode of DIR's CSM runs when every seed is complete with one
label (else nothing): the candidate those runs already answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm.utils import atomic_write_text  # noqa: E402

RULE = "lowest mean validation ECE (val/cal/ECE of each run's selected checkpoint) over the seeds"


def csm_runs(folder: Path) -> dict[int, tuple[str, dict]]:
    """seed -> (label mode, run.json) of the complete CSM runs in ``folder/runs/csm``."""
    found = {}
    for run in sorted((folder / "runs" / "csm").glob("seed*")):
        info_path, cfg_path = run / "run.json", run / "config.yaml"
        if not (info_path.is_file() and cfg_path.is_file()):
            continue
        info = json.loads(info_path.read_text())
        if info.get("status") != "complete":
            continue
        spec = yaml.safe_load(cfg_path.read_text()).get("synthetic") or ""
        found[int(run.name[len("seed") :])] = (spec.rpartition(":")[2] or "lambda", info)
    return found


def label_of(folder: Path, seeds: int) -> str:
    """The one label mode of ``folder``'s CSM runs if every seed is complete, else ``""``."""
    runs = csm_runs(folder)
    labels = {runs[s][0] for s in range(seeds) if s in runs}
    return labels.pop() if len(labels) == 1 and all(s in runs for s in range(seeds)) else ""


def gather(folders: list[Path], candidates: list[str], seeds: int) -> dict[str, dict[int, dict]]:
    """candidate -> seed -> validation metrics; raises SystemExit naming what is missing."""
    vals: dict[str, dict[int, dict]] = {c: {} for c in candidates}
    for folder in folders:
        for seed, (label, info) in csm_runs(folder).items():
            if label in vals and seed < seeds:
                vals[label].setdefault(seed, info.get("val") or {})
    missing = [f"{c} seed {s}" for c in candidates for s in range(seeds) if s not in vals[c]]
    if missing:
        raise SystemExit(f"csm_choice.py: no complete CSM run for {', '.join(missing)}")
    return vals


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def choose(vals: dict[str, dict[int, dict]]) -> tuple[str, list[str]]:
    """The chosen candidate and the markdown lines of the choice."""
    lines = [
        "| label mode | val ECE % | val AdaECE % | val Acc % | seeds |",
        "|---|---:|---:|---:|---:|",
    ]
    best = None
    for label, by_seed in vals.items():
        ece = [m["val/cal/ECE"] for m in by_seed.values()]
        ada = [m.get("val/cal/AdaECE", float("nan")) for m in by_seed.values()]
        acc = [m["val/cls/Acc"] for m in by_seed.values()]
        lines.append(
            f"| {label} | {_mean_std(ece)} | {_mean_std(ada)} | {_mean_std(acc)} | {len(ece)} |"
        )
        if best is None or statistics.fmean(ece) < best[1]:
            best = (label, statistics.fmean(ece))
    return best[0], lines


def write(out: Path, chosen: str, vals: dict[str, dict[int, dict]], lines: list[str]) -> None:
    """``choice.json`` and ``choice.md`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "chosen": chosen,
        "rule": RULE,
        "candidates": {
            label: {str(s): {k: m[k] for k in ("val/cal/ECE", "val/cls/Acc")} for s, m in v.items()}
            for label, v in vals.items()
        },
    }
    md = [
        f"CSM's label mode, chosen on validation only ({RULE}): **{chosen}**.",
        "",
        *lines,
        "",
    ]
    for name, text in (
        ("choice.json", json.dumps(record, indent=2) + "\n"),
        ("choice.md", "\n".join(md)),
    ):
        atomic_write_text(out / name, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, default=[])
    parser.add_argument("--candidates", nargs="+", default=[])
    parser.add_argument("--seeds", type=int, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--label-of", type=Path)
    args = parser.parse_args(argv)
    if args.label_of is not None:
        print(label_of(args.label_of, args.seeds))
        return
    if not (args.runs and args.candidates and args.out):
        parser.error("--runs, --candidates and --out are needed (or --label-of)")
    vals = gather(args.runs, args.candidates, args.seeds)
    chosen, lines = choose(vals)
    write(args.out, chosen, vals, lines)
    print(chosen)


if __name__ == "__main__":
    sys.exit(main())
