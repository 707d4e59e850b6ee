"""eval/summarize.py and eval/mixing_summary.py: the committed tables from results files."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from csm.evaluation.leaderboard import write_paired

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import mixing_summary  # noqa: E402
import summarize  # noqa: E402

METRICS = ("cls/Acc", "cal/ECE", "cal/AdaECE", "cal/ECE-sweep", "cal/dECE", "cal/OE", "cal/UE")


def _results(folder: Path, values: dict[str, list[tuple[float, float]]]) -> None:
    """results.csv with clean-test rows: method -> per seed (Acc, ECE); AdaECE = ECE, TS halves
    ECE (dECE: TS divides it by 1.5); OE 90% of the ECE before TS, half of it after; one
    shifted row per seed with ECE twice the clean one."""
    folder.mkdir(parents=True)
    lines = ["run,method,seed,calibrator,condition," + ",".join(METRICS)]
    for method, seeds in values.items():
        for seed, (acc, ece) in enumerate(seeds):
            for cal, e, d, oe in (("none", ece, ece, 0.9), ("ts", ece / 2, ece / 1.5, 0.5)):
                cells = [acc, e, e, e, d, oe * e, (1 - oe) * e]
                lines.append(
                    f"{method}/{seed},{method},{seed},{cal},clean," + ",".join(map(str, cells))
                )
            shifted = [acc - 0.2, 2 * ece, 2 * ece, 2 * ece, 2 * ece, ece, ece]
            row = f"{method}/{seed},{method},{seed},none,blur@1," + ",".join(map(str, shifted))
            lines.append(row)
    (folder / "results.csv").write_text("\n".join(lines) + "\n")


def _paired(folder: Path, method: str, metric: str, diff: float, lo: float, hi: float) -> dict:
    return {
        "reference": "ce",
        "method": method,
        "calibrator": "none",
        "metric": metric,
        "n_seeds": 2,
        "seeds": "0 1",
        "diffs": "",
        "mean_diff": diff,
        "ci_low": lo,
        "ci_high": hi,
        "wins": 2 if hi < 0 else 1,
        "ties": 0,
        "losses": 0 if hi < 0 else 1,
    }


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    oc = root / "digits-overconfident"
    # ls is better calibrated but 6 points less accurate than CE: not a rival of CSM
    _results(
        oc,
        {
            "ce": [(0.90, 0.10), (0.92, 0.12)],
            "ls": [(0.85, 0.02), (0.85, 0.02)],
            "csm": [(0.91, 0.05), (0.91, 0.06)],
        },
    )
    rows = [_paired(oc, "csm", m, -0.055, -0.07, -0.04) for m in ("cal/ECE", "cal/AdaECE")]
    write_paired(rows, oc / "paired.csv")
    (oc / "leaderboard.md").write_text(
        "# Leaderboard\n\n## Sanity checks\n\n- ce is **over-confident**: OE 9% vs UE 1%.\n"
        "- TS lowers ce's ECE: 11% → 5.5% (2.00x).\n\n### Clean test\n\n- not a sanity line\n"
    )
    (oc / "csm_choice.md").write_text("CSM's label mode, chosen on validation only: **s4**.\n")
    conv = root / "mnist5k-converged"
    _results(conv, {"ce": [(0.99, 0.02), (0.99, 0.02)], "csm": [(0.99, 0.03), (0.99, 0.03)]})
    write_paired([_paired(conv, "csm", "cal/ECE", 0.01, -0.005, 0.025)], conv / "paired.csv")
    (conv / "config.yaml").write_text("synthetic: work/d{data_seed}/syn:pair-fit\n")
    return root


def test_headline_answers_each_regime_from_the_results(results: Path, tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- headline:start -->\nold table\n<!-- headline:end -->\nrest\n")
    sys.argv = ["summarize.py", "--results", str(results), "--readme", str(readme)]
    summarize.main()
    head = (results / "headline.md").read_text()
    assert "## digits, overconfident regime (3 methods x 2 seeds" in head
    assert "- ce is **over-confident**: OE 9% vs UE 1%." in head and "not a sanity line" not in head
    # CSM 5.50% vs CE 11.00%: ratio 0.50 <= 0.63; LS is outside CE's accuracy - 0.5 pt
    assert "- ECE: csm 5.50% vs ce 11.00% (ratio 0.50; paired Δ -5.50 [-7.00, -4.00] 2/2)" in head
    assert "within 0.5 pt of CE's accuracy: **csm**" in head
    # CE: OE 9.90% vs UE 1.10%; TS 11% -> 5.5% (2.00x) in ECE, 11% -> 7.33% (1.50x) in dECE
    assert (
        "- Regime check: ce's OE 9.90% vs UE 1.10% (**over-confident**); TS on ce: ECE 11.00% → "
        "5.50% (2.00x); dECE 11.00% → 7.33% (1.50x); TS ≥ 2x **met in ECE only**." in head
    )
    assert "at most 0.63x CE's (the paper's ~37% reduction): 0.50x, **met**" in head
    assert "| csm | 91.00 ± 0.00 | 5.50 ± 0.71 | 2.75 ± 0.35 |" in head
    # how CSM's configuration was chosen: STAGE=choose's table, else the runs' fixed label mode
    assert "CSM's label mode, chosen on validation only: **s4**.\n\nDoes CSM" in head
    assert "CSM's label mode: **pair-fit**, fixed before the runs" in head
    # converged: the paired interval contains 0
    assert "its ECE is **level with** CE's (95% interval of the paired Δ -0.50 to +2.50 pt)" in head
    text = readme.read_text()
    assert (
        text.startswith("intro\n<!-- headline:start -->\n| dataset | regime |")
        and "old table" not in text
    )
    assert text.endswith("<!-- headline:end -->\nrest\n")
    assert "| digits | overconfident | ls | 85.00 ± 0.00 | 2.00 ± 0.00 |" in text
    assert "- mnist5k, converged: Goal: csm" in text


def test_mixing_summary_chooses_the_label_mode_on_validation_only(tmp_path: Path):
    out = tmp_path / "ablation"
    val = {"base": [0.05, 0.06], "judge-ts": [0.03, 0.06], "pair-fit": [0.04, 0.04]}
    for variant, eces in val.items():
        for seed, ece in enumerate(eces):
            run = out / f"csm-{variant}" / "runs" / "csm" / f"seed{seed}"
            run.mkdir(parents=True)
            metrics = {"val/cal/ECE": ece, "val/cls/Acc": 0.9}
            (run / "run.json").write_text(json.dumps({"val": metrics}))
    chosen, lines = mixing_summary.choose_on_val(out)
    assert chosen == "pair-fit" and len(lines) == 3  # mean val ECE 5.5, 4.5, 4.0; test unread
    assert lines[1] == "- judge-ts: val ECE 4.50 ± 2.12, val Acc 90.00 ± 0.00 (2 seeds)"


def _copy_results(src: Path, dst: Path) -> None:
    """The committed kinds of files of ``src`` (tables, configs, run records), not weights,
    caches or figures."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        keep = (".csv", ".md", ".json", ".yaml")
        return {
            n
            for n in names
            if n in ("eval_cache", "checkpoints")
            or (not (Path(folder) / n).is_dir() and not n.endswith(keep))
        }

    shutil.copytree(src, dst, ignore=ignore)


def test_summarize_regenerates_every_committed_table(tmp_path: Path):
    """The acceptance of issue 15: every committed table is what ``python eval/summarize.py``
    writes from the committed results (so no figure was edited by hand)."""
    results = tmp_path / "results"
    _copy_results(REPO / "eval" / "results", results)
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    written = [
        "headline.md",
        "fast-recipes/headline.md",
        "fast-recipes/digits-ablations/ablations.md",
        "digits-mixing-ablations/summary.md",
        "mnist5k-mixing-ablations/summary.md",
        "fidelity.md",
    ]
    for name in written:
        (results / name).write_text("stale\n")
    sys.argv = ["summarize.py", "--results", str(results), "--readme", str(readme)]
    summarize.main()
    for name in written:
        committed = (REPO / "eval" / "results" / name).read_text()
        assert (results / name).read_text() == committed, f"eval/results/{name} is not regenerated"
    assert readme.read_text() == (REPO / "README.md").read_text()
