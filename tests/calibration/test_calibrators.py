"""Post-hoc calibrators: they fix known miscalibration, fit on val only, output probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

from csm.calibration import metrics as M
from csm.calibration.calibrators import CALIBRATORS, AlienHead, HistogramBinning
from csm.errors import CSMError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster on a shared CPU; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _calibrated_task(seed: int, n: int, k: int = 5, temperature: float = 1.0):
    """Labels drawn from softmax(z_true); the model reports z_true * temperature."""
    g = torch.Generator().manual_seed(seed)
    z_true = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z_true, 1), 1, generator=g).squeeze(1)
    return (z_true * temperature).float(), y


def _feature_task(seed: int, n: int, k: int = 4, d: int = 8):
    """Linear head on ReLU features; logits from the head, labels noisy around its argmax."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, k)
    with torch.no_grad():
        head.weight.copy_(torch.randn(k, d, generator=g))
        head.bias.zero_()
    feats = (torch.randn(n, d, generator=g) * 3).relu()
    with torch.no_grad():
        z = head(feats)
    noisy = torch.rand(n, generator=g) < 0.3
    y = torch.where(noisy, torch.randint(0, k, (n,), generator=g), z.argmax(1))
    return z, y, feats, head


def _check_probs(p: torch.Tensor, n: int, k: int) -> None:
    assert p.shape == (n, k) and p.dtype == torch.float32
    assert bool(torch.isfinite(p).all()) and bool((p >= 0).all()) and bool((p <= 1).all())
    assert torch.allclose(p.sum(1), torch.ones(n), atol=1e-5)


def test_ts_recovers_known_temperature_and_lowers_nll():
    zv, yv = _calibrated_task(0, 4000, temperature=3.0)  # over-confident by a factor 3
    zt, yt = _calibrated_task(1, 4000, temperature=3.0)
    ts = CALIBRATORS["ts"]().fit(zv, yv)
    assert ts.temperature == pytest.approx(3.0, rel=0.08)
    raw = M.compute_all(zt, yt)
    cal = M.compute_all_probs(ts(zt), yt)
    assert cal["cls/NLL"] < raw["cls/NLL"] - 0.1
    assert cal["cal/ECE"] < raw["cal/ECE"] / 2
    assert cal["cls/Acc"] == raw["cls/Acc"]  # a temperature never changes the argmax
    assert torch.allclose(ts(zt), torch.softmax(zt.double() / ts.temperature, 1).float())


def test_ts_on_already_calibrated_logits_stays_near_one():
    zv, yv = _calibrated_task(2, 4000)
    assert CALIBRATORS["ts"]().fit(zv, yv).temperature == pytest.approx(1.0, rel=0.08)


def test_calibrators_fit_on_val_only():
    zv, yv = _calibrated_task(3, 800, temperature=2.0)
    zt, yt = _calibrated_task(4, 300, temperature=2.0)
    a = CALIBRATORS["ts"]().fit(zv, yv)
    b = CALIBRATORS["ts"]().fit(zv, yv)
    pa = a(zt)
    b(zt[:10] * 5)  # applying to other data never refits
    assert a.temperature == b.temperature
    assert torch.equal(pa, b(zt))
    c = CALIBRATORS["ts"]().fit(zt, yt)  # fitting on other data gives another temperature
    assert c.temperature != a.temperature
    with pytest.raises(CSMError, match="not fitted"):
        CALIBRATORS["vs"]()(zt)


@pytest.mark.parametrize("name", ["none", "ts", "vs", "hist", "isotonic", "fc", "cc", "alien"])
def test_every_calibrator_outputs_probabilities(name):
    z, y, feats, head = _feature_task(5, 500)
    cal = CALIBRATORS[name]()
    if name == "cc":
        cal = CALIBRATORS[name](num_samples=100, sigmas=[0.1, 1.0, 3.0])
    if name == "alien":
        cal = CALIBRATORS[name](epochs=20, hidden=16)
    cal.fit(z[:300], y[:300], feats[:300], head)
    p = cal(z[300:], feats[300:] if cal.needs_features else None)
    _check_probs(p, 200, 4)
    assert isinstance(cal.params(), dict)
    M.compute_all_probs(p, y[300:])  # the evaluator accepts it


def test_vs_lowers_validation_nll():
    zv, yv = _calibrated_task(6, 2000, temperature=2.5)
    zv = zv + torch.tensor([1.0, 0.0, -1.0, 0.5, 0.0])  # per-class bias as well
    vs = CALIBRATORS["vs"]().fit(zv, yv)
    assert M.nll(vs(zv), yv) < M.compute_all(zv, yv)["cls/NLL"] - 0.1


def test_histogram_binning_by_hand():
    z = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.45, 0.55]]))
    y = torch.tensor([0, 0, 1, 1, 0])
    hb = HistogramBinning(n_bins=2).fit(z, y)
    # class 0: p0 in bin 1 for rows 0-2 (2 of 3 positive), bin 0 for rows 3-4 (1 of 2 positive)
    assert hb.table[0].tolist() == pytest.approx([0.5, 2 / 3])
    # class 1: p1 = 0.1 (bin 0, 1 of 3), 0.8 and 0.55 (bin 1, 1 of 2)
    assert hb.table[1].tolist() == pytest.approx([1 / 3, 0.5])
    out = hb(torch.log(torch.tensor([[0.7, 0.3]])))
    assert out[0].tolist() == pytest.approx([(2 / 3) / (2 / 3 + 1 / 3), (1 / 3) / 1.0])


def test_isotonic_matches_sklearn_then_renormalises():
    zv, yv = _calibrated_task(7, 600, k=3, temperature=2.0)
    zt, _ = _calibrated_task(8, 100, k=3, temperature=2.0)
    iso = CALIBRATORS["isotonic"]().fit(zv, yv)
    pv = torch.softmax(zv.double(), 1).numpy()
    pt = torch.softmax(zt.double(), 1).numpy()
    q = np.stack(
        [
            IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
            .fit(pv[:, j], (yv.numpy() == j).astype(float))
            .predict(pt[:, j])
            for j in range(3)
        ],
        axis=1,
    )
    ok = q.sum(1) > 0
    expect = q[ok] / q[ok].sum(1, keepdims=True)
    assert np.allclose(iso(zt).numpy()[ok], expect, atol=1e-6)


def test_feature_clipping_picks_a_clip_that_fixes_overconfidence():
    z, y, feats, head = _feature_task(9, 1200)
    fc = CALIBRATORS["fc"](criterion="nll").fit(z[:600], y[:600], feats[:600], head)
    assert fc.clip < float(feats.max())  # it clips something
    base_acc = M.compute_all(z[:600], y[:600])["cls/Acc"]
    with torch.no_grad():
        clipped = head(feats[:600].clamp(-fc.clip, fc.clip))
    assert M.compute_all(clipped, y[:600])["cls/Acc"] >= 0.99 * base_acc
    raw = M.compute_all(z[600:], y[600:])
    out = M.compute_all_probs(fc(z[600:], feats[600:]), y[600:])
    assert out["cls/NLL"] < raw["cls/NLL"]
    with torch.no_grad():
        ref = torch.softmax(head(feats[600:].clamp(-fc.clip, fc.clip)), 1)
    assert torch.allclose(fc(z[600:], feats[600:]), ref, atol=1e-6)


def test_consistency_calibration_is_seeded_and_calibrates():
    zv, yv = _calibrated_task(10, 400, temperature=4.0)
    zt, yt = _calibrated_task(11, 300, temperature=4.0)
    kw = {"num_samples": 200, "sigmas": [0.3, 1.0, 3.0, 10.0], "seed": 3}
    a = CALIBRATORS["cc"](**kw).fit(zv, yv)
    b = CALIBRATORS["cc"](**kw).fit(zv, yv)
    assert a.sigma == b.sigma and a.sigma in kw["sigmas"]
    assert torch.equal(a(zt), b(zt))
    assert not torch.equal(a(zt), CALIBRATORS["cc"](**{**kw, "seed": 4}).fit(zv, yv)(zt))
    # vote frequencies: multiples of 1/num_samples
    assert torch.allclose(a(zt) * 200, (a(zt) * 200).round(), atol=1e-3)
    assert M.ece(a(zt), yt) < M.compute_all(zt, yt)["cal/ECE"]


def test_alien_head_learns_error_signal_hidden_in_features():
    g = torch.Generator().manual_seed(12)
    n, k = 1200, 4
    z = torch.randn(n, k, generator=g) * 3
    hard = torch.rand(n, generator=g) < 0.4  # flagged in the features, invisible in logits
    y = torch.where(hard, torch.randint(0, k, (n,), generator=g), z.argmax(1))
    feats = torch.cat([hard.float()[:, None], torch.randn(n, 3, generator=g)], 1)
    alien = AlienHead(epochs=60, hidden=16, seed=0).fit(z[:600], y[:600], feats[:600])
    correct = z[600:].argmax(1) == y[600:]
    ent = -(torch.softmax(z[600:], 1) * torch.log_softmax(z[600:], 1)).sum(1)
    before = M.selective_metrics(-ent, correct)["sc/AUROC"]
    after = M.selective_metrics(-alien.uncertainty(z[600:], feats[600:]), correct)["sc/AUROC"]
    assert after > before + 0.1
    untrained = AlienHead(epochs=0).fit(z[:600], y[:600], feats[:600])
    assert torch.allclose(untrained.uncertainty(z[600:], feats[600:]), ent.double(), atol=1e-5)


def test_bad_inputs_name_the_problem():
    z, y, feats, head = _feature_task(13, 100)
    with pytest.raises(CSMError, match="val_features: calibrator 'fc' needs"):
        CALIBRATORS["fc"]().fit(z, y)
    with pytest.raises(CSMError, match="head: calibrator 'fc' needs"):
        CALIBRATORS["fc"]().fit(z, y, feats)
    bad_y = y.clone()
    bad_y[0] = 4  # 4 classes: valid labels are 0..3
    with pytest.raises(CSMError, match=r"val_labels: 1 value\(s\) outside the class range"):
        CALIBRATORS["ts"]().fit(z, bad_y)
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(CSMError, match="val_logits: 1 non-finite"):
        CALIBRATORS["ts"]().fit(bad, y)
    ts = CALIBRATORS["ts"]().fit(z, y)
    with pytest.raises(CSMError, match="logits: 5 classes but calibrator 'ts' was fitted on 4"):
        ts(torch.zeros(2, 5))
    with pytest.raises(CSMError, match="noise"):
        CALIBRATORS["cc"](noise="laplace")


def test_ts_keeps_identity_when_validation_has_no_error(caplog):
    # Every val prediction correct: NLL decreases monotonically as T -> 0, so T is unidentifiable.
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (60,), generator=g)
    z = torch.randn(60, 5, generator=g)
    z[torch.arange(60), y] += 4.0  # argmax == label for every sample
    ts = CALIBRATORS["ts"]().fit(z, y)
    assert ts.temperature == 1.0 and "not identifiable" in caplog.text
    assert ts.params()["fallback"] == "every validation prediction is correct"
    # one error makes T identifiable again, and the fit stays inside the bounds
    y2 = y.clone()
    y2[0] = (y[0] + 1) % 5
    t = CALIBRATORS["ts"]().fit(z, y2).temperature
    assert 0.05 <= t <= 100.0 and t != 1.0


@pytest.mark.parametrize("name", ["ts", "vs", "hist", "isotonic", "fc", "cc"])
def test_every_calibrator_falls_back_to_identity_without_errors_or_rows(name, caplog):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 4, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        z = head(feats)
    y = z.argmax(1)  # error-free validation split
    kw = {"num_samples": 20} if name == "cc" else {}
    test_z = torch.randn(7, 3, generator=g, dtype=torch.float64)
    test_f = torch.randn(7, 4, generator=g, dtype=torch.float64)
    for zz, yy, ff in ((z, y, feats), (z[:3], (y[:3] + 1) % 3, feats[:3])):  # no errors; 3 rows
        caplog.clear()
        cal = CALIBRATORS[name](**kw).fit(zz, yy, ff, head)
        assert "not identifiable" in caplog.text and cal.fallback
        out = cal(test_z, test_f) if cal.needs_features else cal(test_z)
        assert torch.allclose(out, torch.softmax(test_z, 1).float())


def test_ts_ece_criterion_is_the_grid_point_with_lowest_val_ece():
    zv, yv = _calibrated_task(3, 500, temperature=3.0)
    grid = [0.5, 1.0, 2.0, 3.0, 4.0]
    ts = CALIBRATORS["ts"](criterion="ece", grid=grid).fit(zv, yv)
    eces = [M.compute_all(zv.double() / t, yv)["cal/ECE"] for t in grid]
    assert ts.temperature == grid[int(np.argmin(eces))]
    assert ts.params()["criterion"] == "ece"
    default = CALIBRATORS["ts"](criterion="ece")
    assert min(default.grid) == pytest.approx(0.1) and max(default.grid) == pytest.approx(10.0)
    with pytest.raises(CSMError, match="criterion"):
        CALIBRATORS["ts"](criterion="brier")


def test_ts_warns_when_t_sits_on_a_bound(caplog):
    zv, yv = _calibrated_task(4, 400, temperature=8.0)  # logits 8x too sharp: T near 8
    ts = CALIBRATORS["ts"](max_temperature=2.0).fit(zv, yv)
    assert ts.temperature == 2.0 and "sits on the bound" in caplog.text
    caplog.clear()
    wide = CALIBRATORS["ts"]().fit(zv, yv)  # default range [1e-3, 1e3] does not bind
    assert 2.0 < wide.temperature < 1e3 and "sits on the bound" not in caplog.text


def test_feature_clipping_default_criterion_is_val_ece_without_accuracy_constraint():
    z, y, feats, head = _feature_task(9, 600)
    grid = [0.05, 0.2, 1.0, 5.0]
    fc = CALIBRATORS["fc"](grid=grid).fit(z, y, feats, head)
    assert fc.criterion == "ece" and fc.min_acc_ratio == 0.0
    with torch.no_grad():
        scores = {c: M.compute_all(head(feats.clamp(-c, c)), y)["cal/ECE"] for c in grid}
        scores[float("inf")] = M.compute_all(head(feats), y)["cal/ECE"]
    assert fc.clip == min(scores, key=scores.get)


@pytest.mark.parametrize("name", ["none", "ts", "vs", "hist", "isotonic", "fc", "cc", "alien"])
def test_calibrated_logits_and_module_give_the_calibrated_probabilities(name):
    z, y, feats, head = _feature_task(7, 400)
    kwargs = {"cc": dict(num_samples=50, sigmas=[0.5, 2.0]), "alien": dict(epochs=5, hidden=8)}
    cal = CALIBRATORS[name](**kwargs.get(name, {})).fit(z[:300], y[:300], feats[:300], head)
    f = feats[300:] if cal.needs_features else None
    out = cal.logits(z[300:], f)
    assert out.shape == (100, 4) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert torch.allclose(torch.softmax(out.double(), 1).float(), cal(z[300:], f), atol=1e-6)
    module = cal.as_module()
    assert isinstance(module, torch.nn.Module)
    assert torch.equal(module(z[300:], f), out)
    M.compute_all(out, y[300:])  # calibrated logits are valid logits for every metric


def test_ts_and_vs_modules_return_scaled_logits_of_the_wrapped_model():
    zv, yv = _calibrated_task(8, 600, k=3, temperature=2.5)
    ts = CALIBRATORS["ts"]().fit(zv, yv)
    vs = CALIBRATORS["vs"]().fit(zv, yv)
    model = torch.nn.Linear(2, 3)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model(x)
        scaled = ts.as_module(model)(x)
    assert torch.allclose(scaled, raw / ts.temperature, atol=1e-6)  # torch-uncertainty's z / T
    assert torch.allclose(vs.logits(raw), (raw.double() * vs.w + vs.b).float(), atol=1e-6)
    assert torch.allclose(vs.as_module(model)(x), vs.logits(raw))
    assert torch.equal(CALIBRATORS["none"]().fit(zv, yv).logits(raw), raw)
    with pytest.raises(CSMError, match="not fitted"):
        CALIBRATORS["ts"]().as_module()
    with pytest.raises(CSMError, match="features"):
        CALIBRATORS["fc"]().fit(*_feature_task(9, 200)).as_module(model)


def test_histogram_logits_are_the_log_of_its_table_and_finite_at_zero():
    # hand-made table: class 0 always 0.0 and class 1 always 1.0 after renormalisation
    hb = HistogramBinning(n_bins=2)
    hb.num_classes, hb.table = 2, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    out = hb.logits(torch.tensor([[0.3, -0.2], [-1.0, 1.0]]))
    assert torch.equal(out[:, 1], torch.zeros(2))  # log 1
    assert bool((out[:, 0] < -700).all()) and bool(torch.isfinite(out).all())  # log 0, clamped
