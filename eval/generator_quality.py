"""Table of ``eval/generator_quality.sh``'s inspections: what each generator lever bought.

usage: python eval/generator_quality.py [--out eval/results/generator-quality]

Reads every ``<dataset>-<model>-g<guidance>/inspect.json`` and writes ``README.md`` there: per
model and guidance, the judge's recognition of pure-class samples (mean over classes, and the
worst class), the share of monotone groups, the share of flipped images, the diversity ratios and
the KS distance of the judge's soft[a] to U(0, 1); goals of issue 14: recognition >= 0.95,
monotone >= 90%, flipped <= 12%.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

GOALS = "recognition >= 0.95, monotone >= 90%, flipped <= 12% (issue 14, item 2)"


def _row(name: str, rep: dict) -> str:
    rec = {k: v["generated"] for k, v in rep["recognition"].items()}
    worst = min(rec, key=rec.get)
    div = rep.get("diversity_ratio_mean", {})
    ok = (
        rep["recognition_mean"] >= 0.95
        and rep["monotone_share"] >= 0.90
        and rep["flipped_share"] <= 0.12
    )
    cells = [
        name,
        f"{rep['generation'].get('guidance')}",
        f"{rep['recognition_mean']:.2f} ({rep['real_test_recognition_mean']:.2f})",
        f"{worst}: {rec[worst]:.2f}",
        f"{100 * rep['monotone_share']:.1f}",
        f"{100 * rep['flipped_share']:.1f}",
        f"{div.get('pixel', float('nan')):.2f} / {div.get('feature', float('nan')):.2f}",
        f"{rep['spread']['judge']['ks']:.3f}",
        "yes" if ok else "no",
    ]
    return "| " + " | ".join(cells) + " |"


def table(folder: Path) -> str:
    lines = [
        "# Generator quality (csm inspect)",
        "",
        f"Goals: {GOALS}. Judge: a CE classifier of its own (seed 100; on digits trained on "
        "split 0, on mnist5k on split 100, whose training images include some of split 0's test "
        "images, so mnist5k's real-test figure is an upper bound); real test recognition is the "
        "judge's accuracy on real test images. 90 groups x 5 λ per row, DDIM 25 steps, seed 0. "
        "Regenerate: `bash eval/generator_quality.sh`.",
        "",
        "| model | guidance | recognition (real test) | worst class | monotone % | flipped % "
        "| diversity pixel / feature | KS judge | goals met |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for path in sorted(folder.glob("*/inspect.json")):
        lines.append(_row(path.parent.name.rsplit("-g", 1)[0], json.loads(path.read_text())))
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval/results/generator-quality")
    folder = Path(ap.parse_args().out)
    text = table(folder)
    (folder / "README.md").write_text(text)
    logging.info("%s", text)


if __name__ == "__main__":
    main()
