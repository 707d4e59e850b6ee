"""csm.calibration.metrics against reference libraries (torchmetrics, relplot, scikit-learn) and
hand sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import relplot
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)
from torchmetrics.functional.classification.calibration_error import _ce_compute

from csm.calibration import metrics as M
from csm.errors import CSMError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster on a shared CPU; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(seed: int, n: int, k: int, scale: float = 2.0, signal: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * scale
    y = torch.randint(0, k, (n,), generator=g)
    z[torch.arange(n), y] += signal
    return z, y


def _top(p: torch.Tensor, y: torch.Tensor):
    c, pred = p.max(1)
    return c, (pred == y)


def _tm(p, y, norm):
    return float(multiclass_calibration_error(p, y, p.shape[1], 15, norm))


def _hand_binned(c: torch.Tensor, a: torch.Tensor, n_bins: int = 15):
    """Straight loops over bins with the documented convention (last bin closed)."""
    c64, a64 = c.double().tolist(), a.double().tolist()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=c.dtype).tolist()
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i, v in enumerate(c.tolist()):
        b = next(j for j in range(n_bins) if v < edges[j + 1] or j == n_bins - 1)
        bins[b].append(i)
    n = len(c64)
    ece = mce = oe = ue = 0.0
    for idx in bins:
        if not idx:
            continue
        conf = sum(c64[i] for i in idx) / len(idx)
        acc = sum(a64[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(acc - conf)
        mce = max(mce, abs(acc - conf))
        oe += len(idx) / n * conf * max(conf - acc, 0)
        ue += len(idx) / n * conf * max(acc - conf, 0)
    return {"cal/ECE": ece, "cal/MCE": mce, "cal/OE": oe, "cal/UE": ue}


# ------------------------------------------------------------------------------------ ECE / MCE
@pytest.mark.parametrize("seed,n,k", [(0, 3000, 10), (1, 500, 3), (2, 2000, 100), (3, 64, 2)])
def test_ece_mce_match_torchmetrics_on_random_inputs(seed, n, k):
    z, y = _data(seed, n, k)
    p = torch.softmax(z, 1)
    assert (p.max(1).values < 1).all()  # no saturated confidences here
    out = M.compute_all(z, y)
    assert out["cal/ECE"] == pytest.approx(_tm(p, y, "l1"), abs=1e-6)
    assert out["cal/MCE"] == pytest.approx(_tm(p, y, "max"), abs=1e-6)
    assert M.ece(p, y) == pytest.approx(out["cal/ECE"], abs=1e-12)
    assert M.mce(p, y) == pytest.approx(out["cal/MCE"], abs=1e-12)


def test_confidence_one_lands_in_last_bin_and_torchmetrics_difference_is_documented():
    # saturated float32 softmax: confidence exactly 1.0 for the first 40 rows
    z, y = _data(4, 200, 5)
    z[:40] = 0.0
    z[:40, 0] = 200.0
    y[:40] = torch.where(torch.arange(40) % 4 == 0, 1, 0)  # 30 correct, 10 wrong
    z[40:80] = 0.0
    z[40:80, 0] = 4.1  # confidence 0.938, in the last bin, all correct: under-confident
    y[40:80] = 0
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    assert int((c == 1.0).sum()) == 40
    hand = _hand_binned(c, a)
    out = M.compute_all(z, y)
    for key in hand:
        assert out[key] == pytest.approx(hand[key], abs=1e-9), key
    count, sconf, sacc = M.binned_sums(c, a, 15)  # the public kernels the calibrators use
    assert int(count[-1]) == int((c >= 14 / 15).sum()) and float(count.sum()) == 200
    for key, value in M.binned_errors(count, sconf, sacc).items():
        assert value == pytest.approx(hand[key], abs=1e-9), key
    assert M.bin_indices(torch.tensor([1.0, 0.0, 14 / 15])).tolist() == [14, 0, 14]
    # torchmetrics gives c == 1.0 a 16th bin of its own: its public value differs here ...
    assert abs(_tm(p, y, "l1") - out["cal/ECE"]) > 1e-3
    # ... and equals ours once its last edge is nudged above 1.0 (i.e. with our convention)
    edges = torch.linspace(0, 1, 16)
    edges[-1] = 1.0 + 1e-6
    ref = _ce_compute(c, a.float(), edges, norm="l1")
    ref_max = _ce_compute(c, a.float(), edges, norm="max")
    assert out["cal/ECE"] == pytest.approx(float(ref), abs=1e-6)
    assert out["cal/MCE"] == pytest.approx(float(ref_max), abs=1e-6)


def test_ties_match_references():
    # logits on a coarse grid: many identical confidences, tied probabilities within rows
    g = torch.Generator().manual_seed(5)
    z = torch.randint(0, 3, (600, 4), generator=g).float()
    y = torch.randint(0, 4, (600,), generator=g)
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    assert torch.unique(c).numel() < 30  # 600 samples, few distinct confidences
    out = M.compute_all(z, y)
    assert out["cal/ECE"] == pytest.approx(_tm(p, y, "l1"), abs=1e-6)
    assert out["cal/MCE"] == pytest.approx(_tm(p, y, "max"), abs=1e-6)
    assert out["sc/AUROC"] == pytest.approx(roc_auc_score(a.numpy(), c.numpy()), abs=1e-12)
    assert out["cls/OvO-AUROC"] == pytest.approx(
        roc_auc_score(y.numpy(), p.numpy(), multi_class="ovo"), abs=1e-12
    )
    assert out["cal/smECE"] == pytest.approx(
        relplot.smECE(c.double().numpy(), a.double().numpy()), abs=1e-8
    )


def test_single_class_present():
    z, _ = _data(6, 300, 6)
    y = torch.zeros(300, dtype=torch.long)
    p = torch.softmax(z, 1)
    out = M.compute_all(z, y)
    assert out["cal/ECE"] == pytest.approx(_tm(p, y, "l1"), abs=1e-6)
    assert out["cal/MCE"] == pytest.approx(_tm(p, y, "max"), abs=1e-6)
    c, a = _top(p, y)
    assert out["sc/AUROC"] == pytest.approx(roc_auc_score(a.numpy(), c.numpy()), abs=1e-12)
    assert math.isnan(out["cls/OvO-AUROC"])  # undefined with one class, not an exception


def test_fewer_samples_than_bins():
    z, y = _data(7, 6, 4)
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    out = M.compute_all(z, y)
    assert out["cal/ECE"] == pytest.approx(_tm(p, y, "l1"), abs=1e-6)
    assert out["cal/MCE"] == pytest.approx(_tm(p, y, "max"), abs=1e-6)
    # each sample is its own equal-mass bin: AdaECE = mean |a - c|, nothing dropped
    assert out["cal/AdaECE"] == pytest.approx(float((a.double() - c.double()).abs().mean()))
    one = M.compute_all(z[:1], y[:1])
    assert one["cal/ECE"] == pytest.approx(abs(float(a[0]) - float(c[0])), abs=1e-7)
    assert math.isnan(one["sc/AUROC"])


def test_over_and_under_confidence_by_hand():
    z, y = _data(8, 1000, 5, scale=3.0, signal=0.5)
    p = torch.softmax(z, 1)
    out = M.compute_all(z, y)
    hand = _hand_binned(*_top(p, y))
    for key in ("cal/OE", "cal/UE", "cal/ECE", "cal/MCE"):
        assert out[key] == pytest.approx(hand[key], abs=1e-9), key
    assert out["cal/OE"] > 0


# ---------------------------------------------------------------------------------------- AdaECE
def test_adaptive_ece_by_hand():
    z, y = _data(9, 1003, 7)
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    order = sorted(range(len(c)), key=lambda i: (-float(c[i]), i))[::-1]  # ascending
    n, b = len(order), 15
    total, sizes = 0.0, []
    for j in range(b):
        chunk = [order[i] for i in range(n) if (i * b) // n == j]
        sizes.append(len(chunk))
        total += abs(sum(float(a[i]) - float(c[i]) for i in chunk))
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert M.compute_all(z, y)["cal/AdaECE"] == pytest.approx(total / n, abs=1e-9)
    assert M.adaptive_ece(p, y) == pytest.approx(total / n, abs=1e-9)


# ---------------------------------------------------------------------------------- classwise
def _hand_classwise(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> float:
    """Classwise ECE by loops over classes and bins (module binning: last bin closed)."""
    n, k = p.shape
    edges = torch.linspace(0, 1, n_bins + 1, dtype=p.dtype)
    total = 0.0
    for j in range(k):
        col = p[:, j].contiguous()
        b = torch.bucketize(col, edges[1:-1], right=True)
        for i in range(n_bins):
            m = b == i
            total += abs(float((y[m] == j).double().sum()) - float(col[m].double().sum()))
    return total / (n * k)


@pytest.mark.parametrize("n_bins", [15, 40])
@pytest.mark.parametrize("case", ["all", "absent", "single"])
def test_classwise_ece_is_the_same_with_the_ovo_sweep_binning_it(case, n_bins):
    # with the OvO AUROC, the OvO sweep bins the entries >= e_1 of every class column (exact
    # fixed-point sums); without it the row pass does: the result must be bit-identical
    z, y = _data(60, 3000, 7, scale=3.0)
    z[:40] = 0.0
    z[:40, 2] = 130.0  # saturated rows: exact 0.0 and 1.0 probabilities
    if case == "absent":
        y[y == 3] = 0
    elif case == "single":
        y[:] = 5
    full = M.compute_all(z, y, n_bins=n_bins)
    part = M.compute_all(z, y, n_bins=n_bins, exclude={"cls/OvO-AUROC"})
    assert full["cal/ClasswiseECE"] == part["cal/ClasswiseECE"]
    ref = _hand_classwise(torch.softmax(z, 1), y, n_bins)
    assert full["cal/ClasswiseECE"] == pytest.approx(ref, abs=1e-12)
    assert math.isnan(full["cls/OvO-AUROC"]) == (case == "single")


def test_bins_without_binary_search_equal_bucketize():
    g = torch.Generator().manual_seed(61)
    for dtype in (torch.float32, torch.float64):
        for n_bins in (1, 2, 3, 7, 15, 16, 17, 100, 1000):
            edges = torch.linspace(0, 1, n_bins + 1, dtype=dtype)
            lo, hi = torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)
            v = torch.cat(
                [
                    torch.rand(20000, generator=g, dtype=dtype),
                    edges,
                    torch.nextafter(edges, lo),
                    torch.nextafter(edges, hi),
                ]
            ).clamp(0, 1)
            ref = torch.bucketize(v, edges[1:-1], right=True)
            assert torch.equal(torch.from_numpy(M._bin_np(v.numpy(), n_bins)), ref)
            assert torch.equal(M.bin_indices(v, n_bins), ref)


@pytest.mark.parametrize("seed,k", [(10, 5), (11, 12)])
def test_classwise_ece_matches_torchmetrics_binary(seed, k):
    z, y = _data(seed, 800, k)
    p = torch.softmax(z, 1)
    ref = np.mean(
        [
            float(binary_calibration_error(p[:, j].contiguous(), (y == j).long(), n_bins=15))
            for j in range(k)
        ]
    )
    assert M.compute_all(z, y)["cal/ClasswiseECE"] == pytest.approx(ref, abs=1e-6)
    assert M.classwise_ece(p, y) == pytest.approx(ref, abs=1e-6)


# -------------------------------------------------------------------------------------- smECE
@pytest.mark.parametrize(
    "seed,n,k,scale", [(12, 2000, 10, 2.0), (13, 300, 3, 6.0), (14, 50, 4, 0.3)]
)
def test_smece_matches_relplot(seed, n, k, scale):
    z, y = _data(seed, n, k, scale=scale)
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    ref = relplot.smECE(c.double().numpy(), a.double().numpy())
    assert M.compute_all(z, y)["cal/smECE"] == pytest.approx(ref, abs=1e-8)
    assert M.smooth_ece(p, y) == pytest.approx(ref, abs=1e-8)


def test_smece_with_saturated_confidences_matches_relplot():
    z, y = _data(15, 400, 5)
    z[:100] = 0.0
    z[:100, 2] = 300.0
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    ref = relplot.smECE(c.double().numpy(), a.double().numpy())
    assert M.compute_all(z, y)["cal/smECE"] == pytest.approx(ref, abs=1e-8)


# --------------------------------------------------------------------------------------- AUROCs
@pytest.mark.parametrize("seed,n,k", [(16, 1500, 10), (17, 200, 2), (18, 3000, 30)])
def test_aurocs_match_sklearn(seed, n, k):
    z, y = _data(seed, n, k)
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    zo, _ = _data(seed + 100, 700, k, signal=0.0)
    co = torch.softmax(zo, 1).max(1).values
    out = M.compute_all(z, y, ood_logits=zo)
    assert out["sc/AUROC"] == pytest.approx(roc_auc_score(a.numpy(), c.numpy()), abs=1e-12)
    if k == 2:  # scikit-learn takes the positive-class column for binary problems
        ref_ovo = roc_auc_score(y.numpy(), p[:, 1].numpy())
    else:
        ref_ovo = roc_auc_score(y.numpy(), p.numpy(), multi_class="ovo")
    assert out["cls/OvO-AUROC"] == pytest.approx(ref_ovo, abs=1e-12)
    is_id = np.r_[np.ones(n), np.zeros(700)]
    ref_ood = roc_auc_score(is_id, np.r_[c.numpy(), co.numpy()])
    assert out["ood/AUROC"] == pytest.approx(ref_ood, abs=1e-12)
    assert M.ood_auroc(p, torch.softmax(zo, 1)) == pytest.approx(ref_ood, abs=1e-12)


def test_ovo_skips_absent_classes_like_pairwise_sklearn():
    z, y = _data(19, 900, 6)
    y[y == 4] = 0  # class 4 absent
    p = torch.softmax(z, 1)
    present = [0, 1, 2, 3, 5]
    pairs = []
    for i, a_ in enumerate(present):
        for b_ in present[i + 1 :]:
            m = ((y == a_) | (y == b_)).numpy()
            ya = (y.numpy()[m] == a_).astype(int)
            auc_a = roc_auc_score(ya, p[:, a_].numpy()[m])
            auc_b = roc_auc_score(1 - ya, p[:, b_].numpy()[m])
            pairs.append((auc_a + auc_b) / 2)
    assert M.ovo_auroc(p, y) == pytest.approx(float(np.mean(pairs)), abs=1e-12)


# ------------------------------------------------------------------------ selective prediction
def _aurc_by_hand(c: torch.Tensor, a: torch.Tensor):
    order = sorted(range(len(c)), key=lambda i: (-float(c[i]), i))  # descending, stable
    errs, risks = 0, []
    for j, i in enumerate(order, start=1):
        errs += 1 - int(a[i])
        risks.append(errs / j)
    n, n_ok = len(order), int(a.sum())
    opt = [max(0, j - n_ok) / j for j in range(1, n + 1)]
    keep = math.ceil(0.8 * n)
    return np.mean(risks), np.mean(risks) - np.mean(opt), risks[keep - 1]


def test_aurc_e_aurc_risk80_by_hand_with_ties():
    g = torch.Generator().manual_seed(20)
    z = torch.randint(0, 4, (503, 3), generator=g).float()
    y = torch.randint(0, 3, (503,), generator=g)
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    aurc, eaurc, r80 = _aurc_by_hand(c, a)
    out = M.compute_all(z, y)
    assert out["sc/AURC"] == pytest.approx(aurc, abs=1e-12)
    assert out["sc/E-AURC"] == pytest.approx(eaurc, abs=1e-12)
    assert out["sc/Risk@80"] == pytest.approx(r80, abs=1e-12)
    assert M.aurc(p, y) == pytest.approx(aurc, abs=1e-12)
    assert M.e_aurc(p, y) == pytest.approx(eaurc, abs=1e-12)
    assert M.risk_at_coverage(p, y, 0.8) == pytest.approx(r80, abs=1e-12)
    sel = M.selective_metrics(c, a)
    assert sel["sc/AURC"] == pytest.approx(aurc, abs=1e-12)
    assert sel["sc/AUROC"] == pytest.approx(out["sc/AUROC"], abs=1e-12)


def test_ks_by_hand():
    z, y = _data(21, 700, 5)
    p = torch.softmax(z, 1)
    c, a = _top(p, y)
    order = np.argsort(c.numpy(), kind="stable")
    cum = np.cumsum(c.double().numpy()[order] - a.double().numpy()[order]) / len(c)
    assert M.compute_all(z, y)["cal/KS"] == pytest.approx(float(np.abs(cum).max()), abs=1e-9)


# ------------------------------------------------------------------------ NLL, Brier, accuracy
def test_nll_brier_accuracy_by_hand():
    z, y = _data(22, 1000, 8, scale=5.0)
    p = torch.softmax(z.double(), 1)
    out = M.compute_all(z, y)
    assert out["cls/NLL"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(z.double(), y)), rel=1e-6
    )
    onehot = torch.nn.functional.one_hot(y, 8).double()
    assert out["cls/Brier"] == pytest.approx(float(((p - onehot) ** 2).sum(1).mean()), abs=1e-6)
    assert out["cls/Acc"] == pytest.approx(float((p.argmax(1) == y).double().mean()))
    probs = M.compute_all_probs(torch.softmax(z, 1), y)
    for key, val in out.items():
        assert probs[key] == pytest.approx(val, abs=1e-5), key
    assert set(out) == {m for m in M.METRIC_NAMES if not m.startswith("ood/")}


def test_nll_from_logits_is_exact_when_probabilities_underflow():
    z = torch.tensor([[0.0, 200.0], [3.0, 0.0]])
    y = torch.tensor([0, 0])
    ref = float(torch.nn.functional.cross_entropy(z.double(), y))
    assert M.compute_all(z, y)["cls/NLL"] == pytest.approx(ref, rel=1e-6)
    # from probabilities the zero is clamped at 1e-12
    expect = (-math.log(1e-12) - math.log(float(torch.softmax(z[1], 0)[0]))) / 2
    assert M.compute_all_probs(torch.softmax(z, 1), y)["cls/NLL"] == pytest.approx(expect)


def test_reliability_bins_agree_with_ece():
    z, y = _data(23, 500, 4)
    z[:20] = 0.0
    z[:20, 1] = 500.0
    p = torch.softmax(z, 1)
    rb = M.reliability_bins(p, y, n_bins=15)
    assert len(rb.edges) == 16 and sum(rb.counts) == 500
    assert rb.counts[-1] >= 20  # confidence 1.0 in the last bin
    assert rb.ece == pytest.approx(M.compute_all(z, y)["cal/ECE"], abs=1e-12)
    empty = [i for i, n in enumerate(rb.counts) if n == 0]
    assert all(math.isnan(rb.accuracy[i]) for i in empty)


def test_concatenated_not_batch_averaged():
    z, y = _data(24, 1000, 5)
    whole = M.compute_all(z, y)["cal/ECE"]
    p = torch.softmax(z, 1)
    halves = [M.ece(p[s : s + 10], y[s : s + 10]) for s in range(0, 1000, 10)]
    assert whole == pytest.approx(_tm(p, y, "l1"), abs=1e-6)
    assert abs(whole - float(np.mean(halves))) > 1e-3


# ---------------------------------------------------------------------------------- bad input
def test_nan_and_inf_logits_are_reported_with_count_and_rows():
    z, y = _data(25, 50, 3)
    z[7, 1] = float("nan")
    z[7, 2] = float("nan")
    z[30, 0] = float("inf")
    with pytest.raises(CSMError) as e:
        M.compute_all(z, y)
    msg = str(e.value)
    assert msg.startswith("logits: 3 non-finite") and "2 NaN, 1 inf" in msg
    assert "rows 7, 30" in msg and "\n" not in msg
    zo = torch.zeros(4, 3)
    zo[2, 0] = -float("inf")
    with pytest.raises(CSMError, match="ood_logits: 1 non-finite"):
        M.compute_all(_data(25, 50, 3)[0], y, ood_logits=zo)


def test_finite_but_overflowing_rows_are_accepted():
    z = torch.full((4, 3), 3e38)
    z[:, 0] = 0.0
    out = M.compute_all(z, torch.tensor([1, 1, 2, 0]))
    assert out["cls/Acc"] == 0.5


@pytest.mark.parametrize(
    "labels,match",
    [
        (torch.tensor([0, 1, 3, 1]), r"labels: 1 value\(s\) outside the class range \[0, 2\]"),
        (torch.tensor([0, -1, 2, 1]), r"labels: 1 value\(s\) outside"),
        (torch.tensor([0, 1, 2]), r"labels: expected shape \(4,\)"),
        (torch.tensor([0.0, 1.0, 2.0, 1.0]), "labels: dtype torch.float32"),
    ],
)
def test_bad_labels(labels, match):
    with pytest.raises(CSMError, match=match):
        M.compute_all(torch.zeros(4, 3), labels)


def test_empty_and_misshapen_inputs():
    with pytest.raises(CSMError, match="logits: empty input"):
        M.compute_all(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(CSMError, match="logits: expected a 2-D"):
        M.compute_all(torch.zeros(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(CSMError, match="ood_logits: 4 columns"):
        M.compute_all(torch.zeros(2, 3), torch.tensor([0, 1]), ood_logits=torch.zeros(2, 4))
    with pytest.raises(CSMError, match="probs: 1 row"):
        M.compute_all_probs(torch.tensor([[0.5, 0.6], [0.5, 0.5]]), torch.tensor([0, 1]))
    with pytest.raises(CSMError, match="n_bins"):
        M.compute_all(torch.zeros(2, 3), torch.tensor([0, 1]), n_bins=0)


def test_exclude_leaves_out_metrics_and_rejects_unknown_names():
    z, y = _data(26, 300, 4)
    full = M.compute_all(z, y)
    part = M.compute_all(z, y, exclude={"cls/OvO-AUROC", "cal/smECE"})
    assert set(part) == set(full) - {"cls/OvO-AUROC", "cal/smECE"}
    assert all(part[key] == full[key] for key in part)
    with pytest.raises(CSMError, match="exclude: unknown metric name"):
        M.compute_all(z, y, exclude=["cal/ECE%"])


def test_half_precision_and_grad_logits_are_accepted():
    z, y = _data(27, 400, 5)
    ref = M.compute_all(z, y)
    half = M.compute_all(z.half(), y)  # upcast to float32
    assert half["cls/Acc"] == pytest.approx(ref["cls/Acc"], abs=0.01)
    assert M.compute_all(z.clone().requires_grad_(True), y) == ref


def test_every_single_metric_function_equals_its_compute_all_entry():
    z, y = _data(7, 400, 6)
    p = torch.softmax(z, 1).double()
    suite = M.compute_all_probs(p, y)
    single = {
        "cls/Acc": M.accuracy,
        "cls/NLL": M.nll,
        "cls/Brier": M.brier,
        "cal/ECE": M.ece,
        "cal/AdaECE": M.adaptive_ece,
        "cal/ECE-sweep": M.ece_sweep,
        "cal/dECE": M.debiased_ece,
        "cal/ClasswiseECE": M.classwise_ece,
        "cal/MCE": M.mce,
        "cal/OE": M.overconfidence_error,
        "cal/UE": M.underconfidence_error,
        "cal/smECE": M.smooth_ece,
        "cal/KS": M.ks_error,
        "sc/AUROC": M.misclassification_auroc,
        "sc/AURC": M.aurc,
        "sc/E-AURC": M.e_aurc,
        "sc/Risk@80": M.risk_at_coverage,
        "sc/AUGRC": M.augrc,
        "sc/Cov@5Risk": M.coverage_at_5_risk,
        "cal/KDE-ECE": M.kde_ece,
        "cal/MMCE": M.mmce,
        "cls/OvO-AUROC": M.ovo_auroc,
    }
    ood = {m for m in M.METRIC_INFO if m.startswith("ood/")}
    assert set(single) == set(M.METRIC_INFO) - ood  # one function per metric
    for key, fn in single.items():
        assert fn(p, y) == pytest.approx(suite[key], abs=1e-9), key
    assert suite["cal/OE"] > 0 and suite["cal/UE"] >= 0


# ------------------------------------------------------------------------- OvO AUROC, exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk,bits", [(64, 2), (1000, 6), (1 << 14, 18)])
def test_ovo_table_sweep_equals_sklearn_in_every_regime(monkeypatch, chunk, bits, dtype):
    # small chunks cut the label runs at many places; few table bits put most samples into
    # buckets that hold class-a values (the exact sorted subset); logits on a grid tie often
    monkeypatch.setattr(M, "_OVO_CHUNK", chunk)
    monkeypatch.setattr(M, "_OVO_TABLE_BITS", bits)
    g = torch.Generator().manual_seed(62)
    n, k = 5000, 6
    z = torch.randint(0, 4, (n, k), generator=g).float() + 0.5 * torch.randn(n, k, generator=g)
    z[::7] = torch.randint(0, 3, (len(range(0, n, 7)), k), generator=g).float()  # exact ties
    z[:25] = 0.0
    z[:25, 1] = 140.0  # saturated: exact 0.0 and 1.0
    y = torch.randint(0, k, (n,), generator=g)
    p = torch.softmax(z.to(dtype), 1)
    ref = roc_auc_score(y.numpy(), p.numpy(), multi_class="ovo", labels=list(range(k)))
    one = M.compute_all_probs(p, y)["cls/OvO-AUROC"]
    assert one == pytest.approx(ref, abs=1e-12)
    assert M.ovo_auroc(p, y) == one
    stream, other = M.MetricStream(k, from_probs=True), M.MetricStream(k, from_probs=True)
    stream.update(p[:1700], y[:1700])
    stream.update(p[1700:2100], y[1700:2100])
    other.update(p[2100:], y[2100:])
    assert stream.merge(other).compute()["cls/OvO-AUROC"] == one  # integer arithmetic


def test_stream_rejects_batches_of_another_dtype():
    z, y = _data(63, 50, 3)
    stream = M.MetricStream(3)
    stream.update(z[:20], y[:20])
    with pytest.raises(CSMError, match="dtype torch.float64.*float32"):
        stream.update(z[20:].double(), y[20:])
    other = M.MetricStream(3)
    other.update(z[20:].double(), y[20:])
    with pytest.raises(CSMError, match="merge"):
        stream.merge(other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed,n,k,grid", [(40, 900, 6, 3), (41, 600, 4, 2), (42, 1200, 9, 0)])
def test_ovo_auroc_equals_sklearn_with_ties(seed, n, k, grid, dtype):
    g = torch.Generator().manual_seed(seed)
    # grid > 0: logits on a coarse grid (many ties inside and across classes); rows 0-19
    # saturate (exact 0.0 and 1.0 probabilities in float32)
    z = (
        torch.randint(0, grid, (n, k), generator=g).float()
        if grid
        else torch.randn(n, k, generator=g)
    )
    z[:20] = 0.0
    z[:20, 0] = 120.0
    y = torch.randint(0, k, (n,), generator=g)
    p = torch.softmax(z.to(dtype), 1)
    ref = roc_auc_score(y.numpy(), p.numpy(), multi_class="ovo", labels=list(range(k)))
    assert M.ovo_auroc(p, y) == pytest.approx(ref, abs=1e-12)
    assert M.compute_all_probs(p, y)["cls/OvO-AUROC"] == pytest.approx(ref, abs=1e-12)


# ------------------------------------------------------------- AUGRC, Cov@5Risk, KDE-ECE, MMCE
def test_augrc_and_coverage_at_risk_follow_torch_uncertainty_formulas():
    g = torch.Generator().manual_seed(43)
    z = torch.randint(0, 4, (300, 3), generator=g).float() * 1.5  # tied confidences
    y = torch.randint(0, 3, (300,), generator=g)
    y[:150] = z[:150].argmax(1)  # accurate enough for a 5%-risk coverage
    c, a = _top(torch.softmax(z, 1), y)
    order = np.argsort(-c.numpy(), kind="stable")
    err = 1.0 - a.numpy()[order].astype(np.float64)
    n = len(err)
    risk = np.cumsum(err) / np.arange(1, n + 1)
    cov = np.arange(1, n + 1) / n
    augrc = np.trapezoid(risk * cov, cov) / (1 - 1 / n)
    ok = np.flatnonzero(risk <= 0.05)
    out = M.compute_all(z, y)
    assert ok.size and out["sc/Cov@5Risk"] == pytest.approx((ok[-1] + 1) / n, abs=1e-12)
    assert out["sc/AUGRC"] == pytest.approx(augrc, abs=1e-12)
    sel = M.selective_metrics(c, a)  # any score gets the same sc/ metrics
    assert sel["sc/AUGRC"] == out["sc/AUGRC"] and sel["sc/Cov@5Risk"] == out["sc/Cov@5Risk"]
    # all wrong: no coverage has risk <= 5%
    bad = M.compute_all(z, (z.argmax(1) + 1) % 3)
    assert bad["sc/Cov@5Risk"] == 0.0


def test_mmce_equals_the_double_sum():
    z, y = _data(44, 250, 5)
    z[:40] = torch.randint(0, 2, (40, 5)).float()  # ties
    c, a = _top(torch.softmax(z, 1), y)
    c64, r = c.double(), a.double() - c.double()
    kern = torch.exp(-(c64[:, None] - c64[None, :]).abs() / 0.4)
    ref = math.sqrt(float((r[:, None] * r[None, :] * kern).sum())) / len(c)
    assert M.compute_all(z, y)["cal/MMCE"] == pytest.approx(ref, rel=1e-10)


def _kde_ece_reference(conf: np.ndarray, correct: np.ndarray) -> float:
    """Zhang et al.'s ece_kde_binary step by step: np.add.at binning, a direct ("same")
    convolution instead of the FFT, and the reference's per-grid-point loop."""
    x = np.linspace(-0.6, 1.6, 2**14)
    dx = x[1] - x[0]
    bw = np.std(conf[correct]) * (2 * len(conf)) ** -0.2

    def kde(d):
        d = np.concatenate([-d[d < 0.5], d, 2 - d[d >= 0.5]])
        pos = (d - x[0]) / dx
        lo = np.clip(np.floor(pos).astype(int), 0, len(x) - 2)
        w = np.zeros(len(x))
        np.add.at(w, lo, 1 - (pos - lo))
        np.add.at(w, lo + 1, pos - lo)
        half = int(np.floor(3 * bw / dx))
        t = np.arange(-half, half + 1) * dx / (3 * bw)
        ker = 35 / 32 * np.clip(1 - t**2, 0, None) ** 3 / (3 * bw)
        dens = np.convolve(w / len(d), ker, mode="same") * 2
        dens[(x <= 0) | (x >= 1)] = 0
        return dens

    pp1, pp2 = kde(conf[correct]), kde(conf)
    perc = correct.mean()
    integral = np.zeros(len(x))
    for i in range(len(x)):
        if max(pp1[i], pp2[i]) > 1e-6:
            accu = min(perc * pp1[i] / pp2[i] if pp2[i] > 0 else np.inf, 1.0)
            integral[i] = abs(x[i] - accu) * pp2[i]
        elif i > 1:
            integral[i] = integral[i - 1]
    ind = (x >= 0) & (x <= 1)
    return np.trapezoid(integral[ind], x[ind]) / np.trapezoid(pp2[ind], x[ind])


@pytest.mark.parametrize("seed,n,k", [(45, 2000, 10), (46, 300, 3)])
def test_kde_ece_follows_the_reference_estimator(seed, n, k):
    z, y = _data(seed, n, k)
    c, a = _top(torch.softmax(z, 1), y)
    ref = _kde_ece_reference(c.double().numpy(), a.numpy())
    out = M.compute_all(z, y)
    assert out["cal/KDE-ECE"] == pytest.approx(ref, abs=1e-9)
    assert 0 < out["cal/KDE-ECE"] < 1


# --------------------------------------------------------------------------- OOD AUPR, FPR95
def test_ood_aupr_and_fpr95_match_sklearn_with_ties():
    z, y = _data(47, 500, 4)
    zo = torch.randn(300, 4, generator=torch.Generator().manual_seed(48))
    z[:50], zo[:50] = 0.0, 0.0  # tied MSP across the two sets
    out = M.compute_all(z, y, ood_logits=zo)
    msp = torch.cat([torch.softmax(z, 1).max(1).values, torch.softmax(zo, 1).max(1).values])
    is_ood = np.r_[np.zeros(500), np.ones(300)]
    score = -msp.double().numpy()  # torch-uncertainty: OOD positive, score -MSP
    assert out["ood/AUPR"] == pytest.approx(average_precision_score(is_ood, score), abs=1e-12)
    fpr, tpr, _ = roc_curve(is_ood, score, drop_intermediate=False)
    assert out["ood/FPR95"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-12)
    assert out["ood/AUROC"] == pytest.approx(roc_auc_score(1 - is_ood, -score), abs=1e-12)
    p_in, p_out = torch.softmax(z, 1), torch.softmax(zo, 1)
    assert M.ood_metrics(p_in, p_out)["ood/AUPR"] == pytest.approx(out["ood/AUPR"], abs=1e-12)


# ---------------------------------------------------------------------- aliases and streaming
def test_torch_uncertainty_aliases_are_accepted():
    z, y = _data(49, 200, 3)
    out = M.compute_all(z, y, exclude={"cal/aECE", "sc/Risk@80Cov"})
    assert "cal/AdaECE" not in out and "sc/Risk@80" not in out and "cal/ECE" in out
    assert M.canonical_metric("cal/aECE") == "cal/AdaECE"
    assert M.higher_is_better("sc/Risk@80Cov") is False and M.higher_is_better("sc/Cov@5Risk")
    with pytest.raises(CSMError, match="cal/bogus.*aliases"):
        M.canonical_metric("cal/bogus")


def test_stream_in_pieces_and_merged_equals_one_shot_with_ties():
    g = torch.Generator().manual_seed(50)
    z = torch.randint(0, 3, (700, 5), generator=g).float()  # heavy ties everywhere
    z[:30] = 0.0
    z[:30, 1] = 150.0  # saturated rows
    y = torch.randint(0, 5, (700,), generator=g)
    zo = torch.randint(0, 3, (200, 5), generator=g).float()
    one = M.compute_all(z, y, ood_logits=zo)
    first, second = M.MetricStream(5), M.MetricStream(5)
    first.update(z[:100], y[:100])
    first.update(z[100:333], y[100:333])
    second.update(z[333:], y[333:])  # another "process"
    first.update_ood(zo[:50])
    second.update_ood(zo[50:])
    streamed = first.merge(second).compute()
    assert list(streamed) == list(one)
    for key, val in one.items():
        sums = key in ("cls/NLL", "cls/Brier", "cal/ClasswiseECE")
        if math.isnan(val):
            assert math.isnan(streamed[key]), key
        else:
            assert streamed[key] == (pytest.approx(val, rel=1e-12) if sums else val), key
    probs = M.MetricStream(5, from_probs=True, exclude={"cls/OvO-AUROC"})
    probs.update(torch.softmax(z, 1), y)
    assert "cls/OvO-AUROC" not in probs.compute()
    with pytest.raises(CSMError, match="merge"):
        first.merge(probs)
    with pytest.raises(CSMError, match="no samples"):
        M.MetricStream(5).compute()
    with pytest.raises(CSMError, match="4 columns but the stream has 5"):
        M.MetricStream(5).update(z[:, :4], y % 4)
