"""Tests for the calibrated label modes (``--label-mode judge|pair-fit``) of ``csm annotate``.

The fits are checked against independent minimisations with scipy, the annotations against
hand computations (numpy) on tiny toy datasets built here; no download.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar

from csm.annotation.annotate import annotate_dataset, class_prototypes
from csm.annotation.labels import (
    fit_judge,
    fit_pair_squash,
    pair_margin,
    prototype_logits,
)
from csm.calibration.calibrators import TemperatureScaling
from csm.cli import main
from csm.data.real import RealData, Split
from csm.errors import CSMError
from csm.synthetic import load_synthetic_tensors, read_manifest
from csm.synthetic.schema import ANNOTATIONS_DIR
from tests.annotation.test_annotate import NAMES, PixelEncoder, _blend_dataset, _digest, _digits_syn
from tests.helpers import make_run


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _images(labels: torch.Tensor, seed: int, noise: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([40.0, 120.0, 200.0])[labels].view(-1, 1, 1, 1)
    jitter = torch.randint(-noise, noise, (len(labels), 1, 4, 4), generator=g).float()
    pattern = torch.linspace(-20, 20, 16).view(1, 1, 4, 4) * (labels.view(-1, 1, 1, 1) - 1)
    return (base + jitter + pattern).clamp(0, 255).round().to(torch.uint8)


def _real(val_counts=(12, 12, 12), seed: int = 0) -> RealData:
    """3 classes of 4x4 images; val is held out from train (noisier, so classes overlap)."""
    train_y = torch.arange(3).repeat_interleave(20)
    val_y = torch.cat([torch.full((n,), k) for k, n in enumerate(val_counts)]).long()
    train = Split(_images(train_y, seed, 30), train_y)
    val = Split(_images(val_y, seed + 1, 90), val_y)
    return RealData(train, val, val, list(NAMES), "toy-real", seed)


def _projection(f: np.ndarray, p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """λ̂ by the paper's formula, row by row (independent of csm's matrix form)."""
    return np.array(
        [
            np.dot(x - p[j], p[i] - p[j]) / np.dot(p[i] - p[j], p[i] - p[j])
            for x, i, j in zip(f, a, b)
        ]
    )


def _map_by_scipy(x, is_a, s0=4.0, sd=4.0) -> tuple[float, float]:
    """MAP (s, t) minimised directly in (s, t) coordinates by BFGS (an independent route)."""
    sign = np.where(is_a, 1.0, -1.0)

    def loss(theta):
        s, t = theta
        beta = s * (0.5 - t)
        return np.logaddexp(0, -sign * s * (x - t)).sum() + ((s - s0) ** 2 + beta**2) / (2 * sd**2)

    res = minimize(loss, [s0, 0.5], method="BFGS", options={"gtol": 1e-10})
    return float(res.x[0]), float(res.x[1])


@pytest.fixture
def toy(tmp_path):
    real, enc = _real(), PixelEncoder()
    protos = class_prototypes(enc, real, cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "syn"
    _blend_dataset(out, protos.float())
    return real, enc, protos, out, str(tmp_path / "cache")


# ------------------------------------------------------------------------------------ fits
def test_pair_fit_is_the_map_of_the_penalised_logistic_likelihood():
    rng = np.random.default_rng(0)
    is_a = rng.random(60) < 0.5
    x = np.where(is_a, 0.8, 0.25) + rng.normal(0, 0.25, 60)  # overlapping classes
    s, t = fit_pair_squash(x, is_a, prior_s=4.0, prior_sd=4.0)
    s_ref, t_ref = _map_by_scipy(x, is_a)
    assert s == pytest.approx(s_ref, rel=1e-5) and t == pytest.approx(t_ref, abs=1e-5)
    assert fit_pair_squash(x, is_a) == (s, t)  # deterministic, bit for bit


def test_separable_pair_stays_finite_and_beats_the_fixed_squash():
    x = np.r_[np.linspace(0.8, 1.2, 30), np.linspace(-0.2, 0.2, 30)]  # perfectly separable
    is_a = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    s, t = fit_pair_squash(x, is_a)
    assert np.isfinite(s) and s == pytest.approx(_map_by_scipy(x, is_a)[0], rel=1e-5)
    assert _sigmoid(s * (1 - t)) > _sigmoid(4 * 0.5)  # a pure endpoint: more than 0.88
    wide, _ = fit_pair_squash(x, is_a, prior_sd=20.0)
    assert wide > s  # a weaker prior lets the separable data push the slope further
    # a tight prior keeps the paper's squash
    assert fit_pair_squash(x, is_a, prior_sd=1e-4) == pytest.approx((4.0, 0.5), abs=1e-3)


def test_pair_fit_is_symmetric_under_swapping_the_classes():
    rng = np.random.default_rng(1)
    is_a = rng.random(40) < 0.4
    x = np.where(is_a, 0.7, 0.2) + rng.normal(0, 0.3, 40)
    s, t = fit_pair_squash(x, is_a)
    s2, t2 = fit_pair_squash(1 - x, ~is_a)
    assert s2 == pytest.approx(s, rel=1e-9) and t2 == pytest.approx(1 - t, abs=1e-9)


def test_judge_temperature_is_the_nll_minimiser():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    z = 5 * torch.randn(200, 4, generator=g, dtype=torch.float64)
    z[torch.arange(200), y] += 3.0  # over-confident, ~75% right
    fit = fit_judge(z, y, "classifier")

    def nll(log_t):
        return float(torch.nn.functional.cross_entropy(z / np.exp(log_t), y))

    t_ref = float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))
    assert fit.temperature == pytest.approx(t_ref, rel=1e-4) and fit.temperature > 1
    assert fit.temperature == TemperatureScaling(criterion="nll").fit(z, y).temperature
    rec = fit.record()
    assert rec["guard_fallback"] is None and rec["val_size"] == 200 and rec["criterion"] == "nll"
    assert rec["val_nll_calibrated"] < rec["val_nll"]
    margin = torch.tensor([2.0, -1.0])
    np.testing.assert_allclose(fit.share(margin), _sigmoid(margin.numpy() / fit.temperature))


def test_judge_guard_keeps_t1_on_an_error_free_val_split():
    z = torch.eye(3, dtype=torch.float64).repeat(4, 1) * 5
    fit = fit_judge(z, torch.arange(3).repeat(4), "prototype-cosine")
    assert fit.temperature == 1.0 and "every validation prediction is correct" in fit.fallback
    assert fit.record()["guard_fallback"] == fit.fallback


def test_prototype_logits_are_cosines():
    f = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    torch.testing.assert_close(
        prototype_logits(f, p), torch.tensor([[0.6, 0.8], [0.0, -1.0]], dtype=torch.float64)
    )
    z = torch.tensor([[1.0, 2.0, 3.0]])
    assert pair_margin(z, torch.tensor([2]), torch.tensor([0])).item() == 2.0


# ------------------------------------------------------------------------------------ annotate
def test_pair_fit_annotation_matches_hand_fit_and_is_recorded(toy, caplog):
    real, enc, protos, out, cache = toy
    rep = annotate_dataset(out, enc, real=real, label_mode="pair-fit", cache_dir=cache)
    entry = read_manifest(out)["annotations"]["pair-fit"]
    assert rep["annotation"]["name"] == "pair-fit" and entry["label_mode"] == "pair-fit"
    assert entry["mode"] == "projection" and entry["squash"] == 4.0
    assert entry["real_split"] == "val" and entry["real_val_size"] == 36
    assert entry["encoder_fingerprint"] == "pixels-v1" and entry["real_seed"] == 0
    fit = entry["label_fit"]
    assert fit["prior"] == {"s": 4.0, "t": 0.5, "sd": 4.0} and fit["num_fallback"] == 0
    assert set(fit["pairs"]) == {"a|b", "a|c", "b|c"}
    p = protos.numpy()
    vf, vy = real.val.images.double().flatten(1).numpy(), real.val.labels.numpy()
    t = load_synthetic_tensors(f"{out}:pair-fit")
    feats = t.images.double().flatten(1).numpy()
    ca, cb = t.class_a.numpy(), t.class_b.numpy()
    for key, (i, j) in {"a|b": (0, 1), "a|c": (0, 2), "b|c": (1, 2)}.items():
        m = np.isin(vy, [i, j])
        lam = _projection(vf[m], p, np.full(m.sum(), i), np.full(m.sum(), j))
        s_ref, t_ref = _map_by_scipy(lam, vy[m] == i)
        got = fit["pairs"][key]
        assert got["s"] == pytest.approx(s_ref, rel=1e-5) and got["t"] == pytest.approx(
            t_ref, abs=1e-5
        )
        assert (got["n_val_a"], got["n_val_b"], got["fallback"]) == (12, 12, None)
        rows = (ca == i) & (cb == j)
        lam_syn = _projection(feats[rows], p, ca[rows], cb[rows])
        share = t.soft_labels.numpy()[rows][np.arange(rows.sum()), ca[rows]]
        np.testing.assert_allclose(share, _sigmoid(got["s"] * (lam_syn - got["t"])), atol=1e-5)
    card = (out / "README.md").read_text()
    assert "pair-fit" in card and "real val" in card
    # deterministic: another run gives the very same label bytes
    annotate_dataset(out, enc, real=real, label_mode="pair-fit", name="again", cache_dir=cache)
    files = [sorted((out / ANNOTATIONS_DIR / n).glob("*.arrow")) for n in ("pair-fit", "again")]
    assert [f.read_bytes() for f in files[0]] == [f.read_bytes() for f in files[1]]


def test_pair_with_too_few_val_images_keeps_the_paper_squash(tmp_path, caplog):
    real, enc = _real(val_counts=(12, 12, 3)), PixelEncoder()
    cache = str(tmp_path / "cache")
    out = tmp_path / "syn"
    _blend_dataset(out, class_prototypes(enc, real, cache_dir=cache).float())
    with caplog.at_level(logging.WARNING, logger="csm.annotation.labels"):
        annotate_dataset(
            out, enc, real=real, label_mode="pair-fit", pair_fit_min_val=5, cache_dir=cache
        )
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "pair a|c" in warned and "pair b|c" in warned and "pair a|b" not in warned
    fit = read_manifest(out)["annotations"]["pair-fit"]["label_fit"]
    assert fit["num_fallback"] == 2 and fit["pairs"]["a|b"]["fallback"] is None
    assert fit["pairs"]["a|c"] == {
        "s": 4.0,
        "t": 0.5,
        "n_val_a": 12,
        "n_val_b": 3,
        "fallback": "12 and 3 real val images (< 5 per class)",
    }
    annotate_dataset(out, enc, real=real, cache_dir=cache)  # the paper's squash, s4
    paper = load_synthetic_tensors(f"{out}:s4")
    fitted = load_synthetic_tensors(f"{out}:pair-fit")
    with_c = (paper.class_b == 2).numpy()
    assert with_c.any()
    assert np.array_equal(fitted.soft_labels.numpy()[with_c], paper.soft_labels.numpy()[with_c])


def test_prototype_judge_temperature_on_real_val(toy):
    real, enc, protos, out, cache = toy
    annotate_dataset(out, enc, real=real, label_mode="judge", cache_dir=cache, activate=True)
    manifest = read_manifest(out)
    entry = manifest["annotations"]["judge-ts"]
    assert manifest["annotation"]["name"] == "judge-ts"
    assert entry["label_mode"] == "judge" and entry["mode"] == "projection"
    assert entry["squash"] is None and entry["real_val_size"] == 36
    fit = entry["label_fit"]
    assert fit["judge"] == "prototype-cosine" and fit["val_size"] == 36

    p = protos.numpy() / np.linalg.norm(protos.numpy(), axis=1, keepdims=True)

    def cos(images):
        f = images.double().flatten(1).numpy()
        return (f / np.linalg.norm(f, axis=1, keepdims=True)) @ p.T

    zv, yv = torch.from_numpy(cos(real.val.images)), real.val.labels
    if fit["guard_fallback"] is None:
        t_ref = np.exp(
            minimize_scalar(
                lambda lt: float(torch.nn.functional.cross_entropy(zv / np.exp(lt), yv)),
                bounds=(-9, 3),
                method="bounded",
                options={"xatol": 1e-10},
            ).x
        )
        assert fit["temperature"] == pytest.approx(t_ref, rel=1e-4)
    else:
        assert fit["temperature"] == 1.0
    t = load_synthetic_tensors(f"{out}:judge-ts")
    z = cos(t.images)
    rows = np.arange(len(z))
    ca, cb = t.class_a.numpy(), t.class_b.numpy()
    expect = _sigmoid((z[rows, ca] - z[rows, cb]) / fit["temperature"])
    np.testing.assert_allclose(t.soft_labels.numpy()[rows, ca], expect, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "label_fit" in card and "judge" in card


def test_cli_classifier_judge_temperature(tmp_path, capsys):
    from csm.data.real import load_real
    from csm.training.runs import load_run

    digits = [str(i) for i in range(10)]
    run = make_run(tmp_path / "run", digits)
    out = tmp_path / "syn"
    _digits_syn(out, digits)
    args = ["annotate", str(out), "--real", "digits", "--encoder", f"classifier:{run}"]
    assert main([*args, "--device", "cpu", "--label-mode", "judge"]) == 0
    assert "judge, T = " in capsys.readouterr().out
    entry = read_manifest(out)["annotations"]["judge-ts"]
    assert entry["mode"] == "judge" and entry["label_fit"]["judge"] == "classifier"
    model = load_run(run).model
    val = load_real("digits", image_size=8, seed=0).val
    with torch.no_grad():
        zv = model(val.images.float() / 255).double()
    ref = TemperatureScaling(criterion="nll").fit(zv, val.labels).temperature
    assert entry["label_fit"]["temperature"] == pytest.approx(ref, rel=1e-5)
    assert entry["real_val_size"] == len(val)
    t = load_synthetic_tensors(f"{out}:judge-ts")
    with torch.no_grad():
        z = model(t.images.float() / 255).double()
    rows = torch.arange(len(z))
    expect = torch.sigmoid((z[rows, t.class_a] - z[rows, t.class_b]) / ref).float()
    torch.testing.assert_close(t.soft_labels[rows, t.class_a], expect, atol=1e-5, rtol=1e-5)
    saved = (out / ANNOTATIONS_DIR / "judge-ts" / "annotate_config.yaml").read_text()
    assert "label_mode: judge" in saved


def test_default_label_mode_is_the_paper_squash_unchanged(toy):
    real, enc, protos, out, cache = toy
    annotate_dataset(out, enc, real=real, cache_dir=cache)
    annotate_dataset(out, enc, real=real, label_mode="squash", name="explicit", cache_dir=cache)
    manifest = read_manifest(out)
    default, explicit = manifest["annotations"]["s4"], manifest["annotations"]["explicit"]
    keys = {"mode", "encoder", "encoder_fingerprint", "squash", "real_dataset", "real_seed"}
    keys |= {"real_split"}  # provenance (checked by csm train), not a label parameter
    assert set(default) == keys | {"mismatch_share", "name", "shards"}  # no label fit recorded
    assert [s["sha256"] for s in default["shards"]] == [s["sha256"] for s in explicit["shards"]]
    t = load_synthetic_tensors(f"{out}:s4")
    ca, cb = t.class_a.numpy(), t.class_b.numpy()
    lam_hat = _projection(t.images.double().flatten(1).numpy(), protos.numpy(), ca, cb)
    share = t.soft_labels.numpy()[np.arange(len(ca)), ca]
    np.testing.assert_allclose(share, _sigmoid(4 * (lam_hat - 0.5)), atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label-mode", "vote"], "label_mode='vote': unknown label mode; use one of squash"),
        (["--label-mode", "pair-fit", "--mode", "judge"], "label_mode='pair-fit'"),
        (["--label-mode", "judge"], "real: --label-mode judge is fitted on the real dataset"),
        (["--label-mode", "pair-fit", "--pair-fit-prior-sd", "0"], "pair_fit_prior_sd=0.0"),
        (["--label-mode", "pair-fit", "--pair-fit-min-val", "0"], "pair_fit_min_val=0"),
    ],
)
def test_bad_label_options_one_line_and_nothing_changes(tmp_path, capsys, extra, message):
    out = tmp_path / "syn"
    _digits_syn(out, [str(i) for i in range(10)])
    before = _digest(out)
    real = [] if extra == ["--label-mode", "judge"] else ["--real", "digits"]
    assert main(["annotate", str(out), "--encoder", "clip:none", *real, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert _digest(out) == before


def test_empty_val_split_is_an_error(toy):
    real, enc, protos, out, cache = toy
    empty = Split(real.val.images[:0], real.val.labels[:0])
    real = RealData(real.train, empty, real.test, list(NAMES), "toy-real", 0)
    before = _digest(Path(out))
    with pytest.raises(CSMError, match="val split is empty, so --label-mode pair-fit"):
        annotate_dataset(out, enc, real=real, label_mode="pair-fit", cache_dir=cache)
    assert _digest(Path(out)) == before
    with pytest.raises(CSMError, match="^label_mode='x'"):
        annotate_dataset(out, enc, real=real, label_mode="x", cache_dir=cache)
    assert json.loads((Path(out) / "csm_synthetic.json").read_text()).get("annotations") is None


def test_pair_whose_projection_does_not_order_the_classes_falls_back(caplog):
    from csm.annotation.labels import fit_pairs

    protos = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.arange(2).repeat_interleave(20)
    feats = torch.stack([1.0 - y.float(), torch.zeros(40)], 1)  # each class sits on the other
    with caplog.at_level(logging.WARNING, logger="csm.annotation.labels"):
        fit = fit_pairs([(1, 0)], feats, y, protos, class_names=["x", "y"])
    assert "pair x|y" in caplog.text and "does not order" in caplog.text
    assert (fit.fits[(0, 1)].s, fit.fits[(0, 1)].t) == (4.0, 0.5)
    assert fit.record()["num_fallback"] == 1
    share = fit.share(np.array([1.0, 0.0]), np.array([0, 1]), np.array([1, 0]))
    np.testing.assert_allclose(share, [_sigmoid(2.0), _sigmoid(-2.0)], rtol=1e-6)


@pytest.mark.skipif(sys.platform != "linux", reason="accelerate launch multi-process on linux")
def test_two_processes_fit_the_same_labels_as_one(tmp_path):
    from tests.annotation.test_annotate import _label_bytes
    from tests.helpers import launch_two

    digits = [str(i) for i in range(10)]
    run = make_run(tmp_path / "run", digits)
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        _digits_syn(out, digits)  # 2 shards: each process encodes one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): same float sums
    try:
        for mode in ("judge", "pair-fit"):
            args = ["--real", "digits", "--encoder", f"classifier:{run}", "--device", "cpu"]
            args += ["--batch-size", "64", "--label-mode", mode, "--pair-fit-min-val", "3"]
            assert main(["annotate", str(one), *args, "--cache-dir", str(tmp_path / "c1")]) == 0
            launch_two(
                "-m", "csm", "annotate", str(two), *args, "--cache-dir", str(tmp_path / "c2")
            )
    finally:
        torch.set_num_threads(threads)
    assert _label_bytes(one) == _label_bytes(two)  # labels, main shards and the manifest
    fits = [read_manifest(o)["annotations"]["pair-fit"]["label_fit"] for o in (one, two)]
    assert fits[0] == fits[1] and len(fits[0]["pairs"]) == 2
