"""The leaderboard's sanity section: regime, TS effect, smoothing methods, calibration split."""

from __future__ import annotations

from csm.evaluation.leaderboard import format_leaderboard, format_sanity


def _rows(oe: float, ue: float, ts_ece: float, val_errors: list[int]) -> list[dict]:
    rows = []
    for seed, errors in enumerate(val_errors):
        for cal, ece in (("none", 0.05 + 0.01 * seed), ("ts", ts_ece)):
            rows.append(
                {
                    "run": f"runs/ce/seed{seed}",
                    "method": "ce",
                    "model": "cnn",
                    "dataset": "digits",
                    "seed": seed,
                    "calibrator": cal,
                    "condition": "clean",
                    "n": 359,
                    "val_n": 145,
                    "val_errors": errors,
                    "cal/ECE": ece,
                    "cal/OE": oe,
                    "cal/UE": ue,
                }
            )
        rows.append(
            {
                **rows[-2],
                "run": f"runs/focal/seed{seed}",
                "method": "focal",
                "val_errors": 30,
                "cal/ECE": 0.08,
            }
        )
    return rows


def test_sanity_reports_regime_ts_effect_and_thin_calibration_splits():
    text = format_sanity(_rows(0.04, 0.01, 0.02, [3, 25]))
    assert (
        "ce is **over-confident**: OE 4.00% vs UE 1.00% (clean test, mean over 2 seed(s))" in text
    )
    # ECE none: 5% and 6% -> mean 5.5%; ts 2% -> 2.75x, lower on both seeds
    assert "TS lowers ce's ECE: 5.50% → 2.00% (2.75x; lower on 2/2 seeds)" in text
    assert "focal does not lower ce's ECE: 8.00% vs 5.50%" in text
    assert "145–145 images per run holding 3–30 errors" in text
    assert "**1 of 4 runs hold < 20 errors**" in text


def test_sanity_under_confident_and_no_reference():
    text = format_sanity(_rows(0.001, 0.02, 0.09, [40, 40]))
    assert "ce is **under-confident**" in text and "TS does not lower ce's ECE" in text
    assert "every run holds >= 20" in text
    rows = [r for r in _rows(0.01, 0.02, 0.03, [40]) if r["method"] != "ce"]
    assert "No ce runs" in format_sanity(rows)
    assert "## Sanity checks" in format_leaderboard(rows)


def test_sanity_gives_the_ts_effect_in_the_debiased_estimator_too():
    rows = _rows(0.04, 0.01, 0.02, [30, 30])
    for r in rows:  # dECE: 4% and 5% uncalibrated (mean 4.5%), 1% after TS
        if r["method"] == "ce":
            r["cal/dECE"] = 0.01 if r["calibrator"] == "ts" else 0.04 + 0.01 * r["seed"]
    text = format_sanity(rows)
    assert (
        "- The same in the debiased estimator (dECE, Kumar et al. 2019): 4.50% → 1.00% (4.50x)"
        in text
    )
    assert "debiased" not in format_sanity(_rows(0.04, 0.01, 0.02, [30, 30]))  # not recorded
