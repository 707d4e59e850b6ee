"""Tests for the targeted λ schedule and the confidence spread (csm.generation.schedule)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kstest

from csm.errors import CSMError
from csm.generation.mixing import group_plan, lambdas, pair_for_group
from csm.generation.schedule import (
    MonotoneCurve,
    Pilot,
    confidence_spread,
    fit_schedule,
    isotonic_fit,
    ks_uniform,
    lambda_ranks,
    schedule_from_record,
    targeted_lambdas,
)
from csm.synthetic import iter_shards, read_table
from csm.synthetic.variants import activate, label_table, write_annotation

NAMES = ["zero", "one", "two"]


def toy_annotate(
    dataset: Path, curve: Callable[[np.ndarray], np.ndarray], name: str = "toy", active=True
) -> None:
    """Annotate ``dataset`` with the known curve ``soft[a] = curve(λ)`` (a toy annotator)."""
    from csm.synthetic import read_manifest

    names = list(read_manifest(dataset)["params"]["class_names"])
    tables = []
    for _, path in iter_shards(dataset):
        t = read_table(path)
        lam = t.column("lam").to_numpy().astype(np.float64)
        share = np.clip(curve(lam), 0.0, 1.0)
        cols = [t.column(c).to_numpy() for c in ("group_id", "class_a", "class_b")]
        tables.append(label_table(names, cols[0], share, lam, cols[1], cols[2]))
    info = {"mode": "projection", "encoder": "toy", "squash": 4.0}
    write_annotation(dataset, name, info, tables)
    if active:
        activate(dataset, name)


def s_curve(lam: np.ndarray) -> np.ndarray:
    """An S-shaped λ -> soft[a] curve that snaps to class a early (around λ = 0.35)."""
    return 1.0 / (1.0 + np.exp(-14.0 * (np.asarray(lam) - 0.35)))


def _pilot(curve, group_size=8, groups_per_pair=3, names=NAMES, noise=0.0, seed=0) -> Pilot:
    """A pilot of the uniform grid whose annotator is ``curve`` (plus Gaussian noise)."""
    rng = np.random.default_rng(seed)
    p = len(names) * (len(names) - 1) // 2
    a, b, lam = [], [], []
    for k in range(groups_per_pair * p):
        pa, pb = pair_for_group(k, len(names))
        grid = lambdas(group_size)
        a += [pa] * group_size
        b += [pb] * group_size
        lam += grid
    lam = np.array(lam)
    soft = np.clip(curve(lam) + noise * rng.standard_normal(len(lam)), 0, 1)
    return Pilot(
        spec="toy",
        name="toy",
        annotation="toy",
        class_names=list(names),
        image_shape=(1, 8, 8),
        info={},
        annotation_info={},
        fingerprint="0" * 64,
        class_a=np.array(a),
        class_b=np.array(b),
        lam=lam,
        soft_a=soft,
    )


# ------------------------------------------------------------------------------------ spread
def test_ks_uniform_equals_scipy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1000):
        for x in (rng.random(n), rng.beta(0.3, 0.3, n), rng.random(n) * 0.2 + 0.7):
            assert ks_uniform(x) == pytest.approx(kstest(x, "uniform").statistic, abs=1e-12)
    x = np.array([-0.5, 0.2, 1.7])  # outside [0, 1]: the uniform CDF is flat there
    assert ks_uniform(x) == pytest.approx(kstest(x, "uniform").statistic, abs=1e-12)
    with pytest.raises(CSMError, match="empty"):
        ks_uniform([])


def test_lambda_ranks_and_spread_per_rank():
    gid = np.array([5, 5, 5, 2, 2, 2])
    lam = np.array([1.0, 0.0, 0.4, 0.6, 1.0, 0.0])
    assert lambda_ranks(gid, lam).tolist() == [2, 0, 1, 1, 2, 0]
    soft = np.array([0.95, 0.05, 0.3, 0.7, 0.9, 0.1])
    rep = confidence_spread(soft, gid, lam, bins=5)
    assert rep["n"] == 6 and rep["ks"] == pytest.approx(kstest(soft, "uniform").statistic)
    assert rep["histogram"]["counts"] == [2, 1, 0, 1, 2]
    np.testing.assert_allclose(rep["histogram"]["edges"], np.linspace(0, 1, 6))
    assert [r["rank"] for r in rep["per_rank"]] == [0, 1, 2]
    mid = rep["per_rank"][1]
    assert mid["n"] == 2 and mid["lam_mean"] == pytest.approx(0.5) and mid["mean"] == 0.5
    assert rep["interior"]["n"] == 2 and rep["interior"]["ks"] == pytest.approx(
        kstest([0.3, 0.7], "uniform").statistic
    )
    assert "per_rank" not in confidence_spread(soft)


# ------------------------------------------------------------------------------------ curve
def test_isotonic_fit_pools_ties_and_violators_as_computed_by_hand():
    # x = 0, 0, 1, 2, 3 with y = 0.2, 0.4, 0.1, 0.5, 0.45 (unit weights):
    # ties at x = 0 pool to 0.3 (weight 2); 0.3 > 0.1 pools to (0.6 + 0.1) / 3; 0.5 > 0.45 -> 0.475
    xs, fitted = isotonic_fit([0, 0, 1, 2, 3], [0.2, 0.4, 0.1, 0.5, 0.45])
    np.testing.assert_allclose(xs, [0, 1, 2, 3])
    np.testing.assert_allclose(fitted, [0.7 / 3, 0.7 / 3, 0.475, 0.475], atol=1e-12)
    # weights: a heavy low value at x = 1 pulls the pooled block down
    _, fitted = isotonic_fit([0, 1], [0.6, 0.0], [1.0, 3.0])
    np.testing.assert_allclose(fitted, [0.15, 0.15], atol=1e-12)
    with pytest.raises(CSMError, match="non-finite"):
        isotonic_fit([0.0, 1.0], [0.0, np.nan])


def test_targeted_lambdas_invert_a_known_curve():
    lam = np.linspace(0, 1, 201)
    curve = MonotoneCurve.fit(lam, lam**3)  # soft = λ³: the targets t_j = j/(G-1)
    got = targeted_lambdas(curve, 8)
    want = (np.arange(8) / 7) ** (1 / 3)
    assert got[0] == 0.0 and got[-1] == 1.0 and len(got) == 8
    np.testing.assert_allclose(got, want, atol=2e-3)
    np.testing.assert_allclose(curve(got), np.arange(8) / 7, atol=1e-6)  # exact on the fit
    # a curve that does not reach 0 and 1: targets over its own range [f(0), f(1)]
    squashed = MonotoneCurve.fit(lam, 0.1 + 0.8 * lam**3)
    np.testing.assert_allclose(targeted_lambdas(squashed, 8), want, atol=2e-3)


def test_targeted_ends_place_every_member_at_the_midpoint_targets():
    lam = np.linspace(0, 1, 201)
    curve = MonotoneCurve.fit(lam, lam**3)  # soft = λ³: targets (j + 1/2)/G, λ = their cube roots
    got = targeted_lambdas(curve, 8, ends="targeted")
    want = ((np.arange(8) + 0.5) / 8) ** (1 / 3)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert 0.0 < got[0] and got[-1] < 1.0 and len(got) == 8
    # the G confidences are the midpoints: KS distance 1/(2G), the least G points can have
    assert ks_uniform(curve(got)) == pytest.approx(1 / 16, abs=1e-3)
    assert ks_uniform(curve(targeted_lambdas(curve, 8))) == pytest.approx(1 / 8, abs=1e-3)
    with pytest.raises(CSMError, match="--lambda-ends 'both': choose fixed or targeted"):
        targeted_lambdas(curve, 8, ends="both")


def test_inverse_of_flat_stretches_and_flat_curves():
    c = MonotoneCurve(np.array([0.0, 0.25, 0.5, 0.75, 1.0]), np.array([0.1, 0.1, 0.5, 0.9, 0.9]))
    # flat at 0.1 on [0, 0.25] and at 0.9 on [0.75, 1]: the middle of the stretch
    np.testing.assert_allclose(
        c.inverse([0.1, 0.3, 0.5, 0.9, 2.0]), [0.125, 0.375, 0.5, 0.875, 0.875]
    )
    flat = MonotoneCurve.fit(np.linspace(0, 1, 8), np.full(8, 0.5))
    assert targeted_lambdas(flat, 8) is None
    # a decreasing annotator gives a flat isotonic fit: not invertible either
    assert (
        targeted_lambdas(MonotoneCurve.fit(np.linspace(0, 1, 8), np.linspace(1, 0, 8)), 8) is None
    )


# ------------------------------------------------------------------------------------ schedule
def test_targeted_schedule_lowers_the_ks_distance_on_a_known_curve():
    pilot = _pilot(s_curve, noise=0.02)
    sched = fit_schedule(pilot, groups=3, group_size=8)
    assert set(sched.pairs) == {"0-1", "0-2", "1-2"} and sched.record["fallback"] == {}
    uniform = np.concatenate([s_curve(np.array(lambdas(8)))] * 3)
    targeted = np.concatenate([s_curve(np.array(v)) for v in sched.pairs.values()])
    ks_u, ks_t = ks_uniform(uniform), ks_uniform(targeted)
    assert ks_t < 0.6 * ks_u, (ks_u, ks_t)  # the S-curve's confidences now spread out
    pred = sched.record["predicted_ks"]
    assert pred["targeted"] < pred["uniform"]
    for lam in sched.pairs.values():
        assert lam[0] == 0.0 and lam[-1] == 1.0 and np.all(np.diff(lam) > 0)
        assert lam[1] > 1 / 7 and lam[-2] < 6 / 7  # denser where the curve rises (λ≈0.35)
        assert lam[3] < 3 / 7
    assert "ends" not in sched.record  # fixed ends: the record is what it always was
    free = fit_schedule(pilot, groups=3, group_size=8, ends="targeted")
    assert free.record["ends"] == "targeted" and "ends targeted" in free.record["method"]
    spread = np.concatenate([s_curve(np.array(v)) for v in free.pairs.values()])
    assert ks_uniform(spread) < 0.75 * ks_t  # the ends no longer pin 2 of 8 at 0 and 1
    # the group plan takes its pair's ratios from the schedule
    plan = group_plan(4, 3, 0, 8, sched)
    assert plan.lams == sched.pairs[f"{plan.class_a}-{plan.class_b}"]
    assert group_plan(4, 3, 0, 8).lams == tuple(lambdas(8))
    with pytest.raises(CSMError, match="group_size=4"):
        group_plan(4, 3, 0, 4, sched)


def test_missing_and_flat_pairs_fall_back_or_fail(caplog):
    pilot = _pilot(s_curve, groups_per_pair=1)
    keep = ~((pilot.class_a == 1) & (pilot.class_b == 2))  # the pilot lacks pair (1, 2)
    flat = (pilot.class_a == 0) & (pilot.class_b == 2)
    pilot.soft_a = np.where(flat, 0.5, pilot.soft_a)  # and pair (0, 2) never changes class
    for name in ("class_a", "class_b", "lam", "soft_a"):
        setattr(pilot, name, getattr(pilot, name)[keep])
    with caplog.at_level("WARNING"):
        sched = fit_schedule(pilot, groups=5, group_size=8)
    assert set(sched.record["fallback"]) == {"0-2", "1-2"}
    assert sched.pairs["1-2"] == sched.pairs["0-2"] == tuple(lambdas(8))
    assert sched.pairs["0-1"] != tuple(lambdas(8))
    assert "one|two (1-2)" in caplog.text and "zero|two (0-2)" in caplog.text
    assert "flat curve" in caplog.text and "0 pilot images" in caplog.text
    with pytest.raises(CSMError, match=r"--pilot toy: pair zero\|two \(0-2\).*--pilot-strict"):
        fit_schedule(pilot, groups=5, group_size=8, strict=True)
    # only the pairs the run uses are fitted: one group uses pair (0, 1) alone
    assert set(fit_schedule(pilot, groups=1, group_size=8, strict=True).pairs) == {"0-1"}


def test_schedule_is_a_pure_function_of_the_pilot_and_round_trips():
    a = fit_schedule(_pilot(s_curve, noise=0.05, seed=3), 3, 5)
    b = fit_schedule(_pilot(s_curve, noise=0.05, seed=3), 3, 5)
    assert json.dumps(a.record, sort_keys=True) == json.dumps(b.record, sort_keys=True)
    again = schedule_from_record(json.loads(json.dumps(a.record)), 3, 5, "card")
    assert again.pairs == a.pairs and again.to_record() == a.record
    bad = a.to_record()
    bad["pairs"]["0-1"] = [0.0, 0.7, 0.6, 0.8, 1.0]
    with pytest.raises(CSMError, match="card: the recorded λ schedule is invalid"):
        schedule_from_record(bad, 3, 5, "card")
    with pytest.raises(CSMError, match="invalid"):
        schedule_from_record(a.record, 3, 6, "card")  # another group size
