"""Losses against hand-computed values and independent NumPy formulas on tiny batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csm.errors import CSMError
from csm.training.losses import (
    FLSD53,
    LOSSES,
    BrierScore,
    ClueLoss,
    CrossEntropy,
    DualFocalLoss,
    FocalLoss,
    GradientBSCE,
    KLDivergence,
    LabelSmoothing,
    MarginLabelSmoothing,
    MMCELoss,
    correctness_ranking_loss,
    supcon_loss,
)

# Four samples, three classes. Sample 1 has y as its smallest probability (dual focal p_j = 0),
# sample 3 has p_y < 0.2 (FLSD-53 switches to gamma 5), sample 1 is misclassified (MMCE).
Z = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.5, 2.5, -0.5]])
Y = np.array([0, 0, 1, 0])
SOFT = np.array([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0], [0.5, 0.25, 0.25]])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


P = _softmax(Z)
ONE_HOT = np.eye(3)[Y]


def _t(a: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype)


def _val(loss, z=Z, target=None) -> float:
    target = torch.tensor(Y) if target is None else target
    return float(loss(_t(z, torch.float32), target))


# ------------------------------------------------------------------ literal hand computations
def test_tiny_literal_values() -> None:
    z = torch.zeros(1, 2)  # p = (1/2, 1/2)
    y = torch.tensor([0])
    assert float(CrossEntropy()(z, y)) == pytest.approx(math.log(2))
    assert float(BrierScore()(z, y)) == pytest.approx(0.5)  # (1/2 - 1)^2 + (1/2)^2
    assert float(FocalLoss(gamma=1.0)(z, y)) == pytest.approx(0.5 * math.log(2))
    # label smoothing alpha=0.5, K=2: target (3/4, 1/4); CE = log 2 since p uniform
    assert float(LabelSmoothing(alpha=0.5)(z, y)) == pytest.approx(math.log(2))
    # dual focal: p_j is none strictly below 1/2 -> 0, so it is focal with gamma 2
    assert float(DualFocalLoss(gamma=2.0)(z, y)) == pytest.approx(0.25 * math.log(2))
    # KL to its own distribution is 0
    assert float(KLDivergence()(z, torch.tensor([[0.5, 0.5]]))) == pytest.approx(0.0, abs=1e-7)
    # MbLS: gaps (0, 4) with margin 1 -> penalties (0, 3), weight 0.1; summed over classes
    z2 = torch.tensor([[4.0, 0.0]])
    expected = math.log(1 + math.exp(-4.0)) + 0.1 * 3.0
    mbls_sum = MarginLabelSmoothing(margin=1.0, weight=0.1, class_reduction="sum")
    assert float(mbls_sum(z2, y)) == pytest.approx(expected)


# ------------------------------------------------------------------ NumPy references
def test_cross_entropy_hard_and_soft() -> None:
    assert _val(CrossEntropy()) == pytest.approx(np.mean(-np.log(P[np.arange(4), Y])), rel=1e-6)
    ref = np.mean(-(SOFT * np.log(P)).sum(1))
    assert _val(CrossEntropy(), target=_t(SOFT, torch.float32)) == pytest.approx(ref, rel=1e-6)


def test_label_smoothing() -> None:
    alpha = 0.1
    per = [(1 - alpha) * -np.log(P[i, Y[i]]) + alpha * np.mean(-np.log(P[i])) for i in range(4)]
    assert _val(LabelSmoothing(alpha)) == pytest.approx(np.mean(per), rel=1e-6)


def test_brier() -> None:
    assert _val(BrierScore()) == pytest.approx(np.mean(((P - ONE_HOT) ** 2).sum(1)), rel=1e-6)
    ref = np.mean(((P - SOFT) ** 2).sum(1))
    assert _val(BrierScore(), target=_t(SOFT, torch.float32)) == pytest.approx(ref, rel=1e-6)


def test_kl_soft() -> None:
    ref = np.mean(
        [sum(t * math.log(t / p) for t, p in zip(SOFT[i], P[i]) if t > 0) for i in range(4)]
    )
    assert _val(KLDivergence(), target=_t(SOFT, torch.float32)) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 3.0])
def test_focal(gamma: float) -> None:
    py = P[np.arange(4), Y]
    ref = np.mean(-((1 - py) ** gamma) * np.log(py))
    assert _val(FocalLoss(gamma)) == pytest.approx(ref, rel=1e-5)
    soft_ref = np.mean(-(SOFT * (1 - P) ** gamma * np.log(P)).sum(1))
    soft = _val(FocalLoss(gamma), target=_t(SOFT, torch.float32))
    assert soft == pytest.approx(soft_ref, rel=1e-5)


def test_flsd53_switches_gamma() -> None:
    py = P[np.arange(4), Y]
    assert py[3] < 0.2 < py.min(initial=1, where=np.arange(4) != 3)
    gammas = np.where(py < 0.2, 5.0, 3.0)
    ref = np.mean(-((1 - py) ** gammas) * np.log(py))
    assert _val(FLSD53()) == pytest.approx(ref, rel=1e-5)
    # and it differs from plain focal gamma=3 only because of sample 3
    assert _val(FLSD53()) != pytest.approx(_val(FocalLoss(3.0)), rel=1e-4)


def test_dual_focal() -> None:
    gamma = 2.0
    per = []
    for i in range(4):
        py = P[i, Y[i]]
        lower = [p for p in P[i] if p < py]
        pj = max(lower) if lower else 0.0
        per.append(-((1 - py + pj) ** gamma) * math.log(py))
    assert _val(DualFocalLoss(gamma)) == pytest.approx(np.mean(per), rel=1e-5)


def test_dual_focal_ties_use_strictly_lower() -> None:
    z = torch.tensor([[1.0, 1.0, 0.0]])  # p_y ties with class 1; p_j must be p_2
    p = torch.softmax(z, 1)[0]
    ref = -((1 - p[0] + p[2]) ** 2) * torch.log(p[0])
    assert float(DualFocalLoss(2.0)(z, torch.tensor([0]))) == pytest.approx(float(ref), rel=1e-6)


def test_bsce_gra_value_and_stop_gradient() -> None:
    beta, gamma = 2.0, 2.0
    w = (np.abs(ONE_HOT - P) ** beta).sum(1) ** (gamma / beta)
    ce = -np.log(P[np.arange(4), Y])
    assert _val(GradientBSCE(beta, gamma)) == pytest.approx(np.mean(w * ce), rel=1e-5)
    # gradient = w_i * (p - e_y) / N: the weight is not differentiated
    z = _t(Z, torch.float32).requires_grad_()
    GradientBSCE(beta, gamma)(z, torch.tensor(Y)).backward()
    expected = w[:, None] * (P - ONE_HOT) / 4
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_bsce_gra_beta_one() -> None:
    w = np.abs(ONE_HOT - P).sum(1) ** 3.0
    ce = -np.log(P[np.arange(4), Y])
    assert _val(GradientBSCE(beta=1.0, gamma=3.0)) == pytest.approx(np.mean(w * ce), rel=1e-5)


def test_mmce() -> None:
    conf, pred = P.max(1), P.argmax(1)
    a = (pred == Y).astype(float)
    assert a.tolist() == [1.0, 0.0, 1.0, 0.0]
    mmce2 = (
        sum(
            (a[i] - conf[i]) * (a[j] - conf[j]) * math.exp(-abs(conf[i] - conf[j]) / 0.4)
            for i in range(4)
            for j in range(4)
        )
        / 16
    )
    ce = np.mean(-np.log(P[np.arange(4), Y]))
    assert _val(MMCELoss(weight=2.0)) == pytest.approx(ce + 2.0 * math.sqrt(mmce2), rel=1e-5)
    # weight 0 is plain cross-entropy
    assert _val(MMCELoss(weight=0.0)) == pytest.approx(ce, rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mbls(reduction: str) -> None:
    margin, weight = 1.0, 0.1
    gaps = np.maximum(Z.max(1, keepdims=True) - Z - margin, 0)
    pen = gaps.sum(1) if reduction == "sum" else gaps.mean(1)
    ce = -np.log(P[np.arange(4), Y])
    loss = MarginLabelSmoothing(margin=margin, weight=weight, class_reduction=reduction)
    assert _val(loss) == pytest.approx(np.mean(ce + weight * pen), rel=1e-5)


def test_clue_modes() -> None:
    ce = -np.log(P[np.arange(4), Y])
    u = -(P * np.log(P)).sum(1)
    alpha = 0.3
    batch = alpha * ce.mean() + (1 - alpha) * (ce.mean() - u.mean()) ** 2
    per = np.mean(alpha * ce + (1 - alpha) * (ce - u) ** 2)
    assert _val(ClueLoss(alpha, "batch_mean")) == pytest.approx(batch, rel=1e-5)
    assert _val(ClueLoss(alpha, "per_sample")) == pytest.approx(per, rel=1e-5)
    # an explicit MC-dropout average replaces the entropy source
    mc = np.full((4, 3), 1 / 3)
    ref = alpha * ce.mean() + (1 - alpha) * (ce.mean() - math.log(3)) ** 2
    got = ClueLoss(alpha)(_t(Z, torch.float32), torch.tensor(Y), mc_probs=_t(mc, torch.float32))
    assert float(got) == pytest.approx(ref, rel=1e-5)
    err, unc = ClueLoss.components(_t(Z, torch.float32), torch.tensor(Y))
    np.testing.assert_allclose(err.numpy(), ce, rtol=1e-5)
    np.testing.assert_allclose(unc.numpy(), u, rtol=1e-5)


# ------------------------------------------------------------------ properties of every loss
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_soft_and_hard_paths_agree_on_one_hot(name: str) -> None:
    loss = LOSSES[name]()
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)) * 3
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    hard, soft = loss(z, y), loss(z, F.one_hot(y, 5).float())
    assert float(hard) == pytest.approx(float(soft), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_gradients_and_scalar(name: str) -> None:
    z = (torch.randn(8, 4, generator=torch.Generator().manual_seed(2)) * 5).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = LOSSES[name]()(z, y)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_logits_are_upcast(name: str) -> None:
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0])
    loss = LOSSES[name]()
    assert loss(z.bfloat16(), y).dtype == torch.float32
    assert float(loss(z.bfloat16(), y)) == pytest.approx(float(loss(z.bfloat16().float(), y)))


def test_target_shape_errors() -> None:
    z = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="target"):
        FocalLoss()(z, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="target"):
        CrossEntropy()(z, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    ("factory", "param"),
    [
        (lambda: FocalLoss(gamma=-1.0), "gamma"),
        (lambda: LabelSmoothing(alpha=1.5), "alpha"),
        (lambda: LabelSmoothing(alpha=-0.1), "alpha"),
        (lambda: FLSD53(threshold=2.0), "threshold"),
        (lambda: DualFocalLoss(gamma=float("nan")), "gamma"),
        (lambda: GradientBSCE(beta=0.0), "beta"),
        (lambda: MMCELoss(bandwidth=0.0), "bandwidth"),
        (lambda: MMCELoss(weight=-2.0), "weight"),
        (lambda: MarginLabelSmoothing(margin=-1.0), "margin"),
        (lambda: MarginLabelSmoothing(class_reduction="max"), "class_reduction"),
        (lambda: ClueLoss(alpha=2.0), "alpha"),
        (lambda: ClueLoss(mode="median"), "mode"),
        (lambda: FocalLoss(gamma="high"), "gamma"),
    ],
)
def test_bad_hyper_parameters_name_the_parameter(factory, param: str) -> None:
    with pytest.raises(CSMError) as err:
        factory()
    message = str(err.value)
    assert message.startswith(param + "=") and "\n" not in message


# ------------------------------------------------------------------ building blocks
def test_correctness_ranking_loss() -> None:
    kappa = np.array([0.9, 0.6, 0.7, 0.5])
    cbar = np.array([1.0, 0.5, 0.5, 0.0])
    ref = np.mean(
        [
            max(
                0.0,
                -np.sign(cbar[i] - cbar[(i + 1) % 4]) * (kappa[i] - kappa[(i + 1) % 4])
                + abs(cbar[i] - cbar[(i + 1) % 4]),
            )
            for i in range(4)
        ]
    )
    # pairs: (0,1): -(0.3)+0.5=0.2; (1,2): 0; (2,3): -(0.2)+0.5=0.3; (3,0): -(0.4)+1=0.6
    assert ref == pytest.approx((0.2 + 0.0 + 0.3 + 0.6) / 4)
    got = correctness_ranking_loss(_t(kappa, torch.float32), _t(cbar, torch.float32))
    assert float(got) == pytest.approx(ref, rel=1e-6)


def test_supcon_matches_explicit_formula() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 4))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = np.array([0, 1, 2, 0, 1, 0])
    tau = 0.1
    per = []
    for i in range(6):
        denom = sum(math.exp(z[i] @ z[a] / tau) for a in range(6) if a != i)
        pos = [p for p in range(6) if p != i and labels[p] == labels[i]]
        if pos:
            per.append(-np.mean([math.log(math.exp(z[i] @ z[p] / tau) / denom) for p in pos]))
    got = supcon_loss(_t(z, torch.float32), torch.tensor(labels), tau)
    assert float(got) == pytest.approx(np.mean(per), rel=1e-4)


def test_mbls_default_averages_the_margin_penalty_over_classes() -> None:
    # reference LogitMarginL1: relu(max_j z_j - z_k - m).mean() over the (N, K) distances.
    # 3 classes, z = (5, 1, -2), m = 2: distances (0, 4, 7) -> penalties (0, 2, 5), mean 7/3
    z = torch.tensor([[5.0, 1.0, -2.0]])
    y = torch.tensor([1])
    ce = -math.log(math.exp(1.0) / (math.exp(5.0) + math.exp(1.0) + math.exp(-2.0)))
    got = float(MarginLabelSmoothing(margin=2.0, weight=0.1)(z, y))
    assert got == pytest.approx(ce + 0.1 * 7.0 / 3.0, rel=1e-6)
    summed = float(MarginLabelSmoothing(margin=2.0, weight=0.1, class_reduction="sum")(z, y))
    assert summed == pytest.approx(ce + 0.1 * 7.0, rel=1e-6)


def test_bsce_gra_reference_defaults_are_norm_1_gamma_1() -> None:
    # weight = ||e_y - p||_1: p = softmax(0, ln 3) = (1/4, 3/4), y = 0 -> |3/4| + |3/4| = 3/2
    z = torch.tensor([[0.0, math.log(3.0)]])
    loss = GradientBSCE()
    assert (loss.beta, loss.gamma) == (1.0, 1.0)
    assert float(loss(z, torch.tensor([0]))) == pytest.approx(1.5 * math.log(4.0), rel=1e-6)


def test_supcon_reference_scale_tau_over_base_tau() -> None:
    # rows 0 and 1 share a class; row 2 is alone (no positive, not an anchor)
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    plain = float(supcon_loss(z, labels, 0.1))
    scaled = float(supcon_loss(z, labels, 0.1, base_temperature=0.07))
    assert scaled == pytest.approx(plain * 0.1 / 0.07, rel=1e-6)
    # by hand for anchor 0: sims/tau (6, 0) to rows (1, 2); -log(e^6 / (e^6 + e^0))
    a0 = math.log1p(math.exp(-6.0))
    a1 = -math.log(math.exp(6.0) / (math.exp(6.0) + math.exp(8.0)))
    assert plain == pytest.approx((a0 + a1) / 2, rel=1e-5)


# ------------------------------------------------------------------ reduction, as torch's losses
def test_reduction_none_gives_the_hand_computed_per_sample_values() -> None:
    z, y = _t(Z, torch.float32), torch.tensor(Y)
    ce = -np.log(P[np.arange(4), Y])
    np.testing.assert_allclose(CrossEntropy(reduction="none")(z, y).numpy(), ce, rtol=1e-6)
    brier = ((P - SOFT) ** 2).sum(1)
    got = BrierScore(reduction="none")(z, _t(SOFT, torch.float32))
    np.testing.assert_allclose(got.numpy(), brier, rtol=1e-6)
    focal = -((1 - P[np.arange(4), Y]) ** 2) * np.log(P[np.arange(4), Y])
    np.testing.assert_allclose(FocalLoss(2.0, reduction="none")(z, y).numpy(), focal, rtol=1e-5)
    assert float(FocalLoss(2.0, reduction="sum")(z, y)) == pytest.approx(focal.sum(), rel=1e-5)
    # torch's own cross-entropy with the same reduction
    for red in ("none", "sum", "mean"):
        ref = F.cross_entropy(z, y, reduction=red)
        assert torch.allclose(CrossEntropy(reduction=red)(z, y), ref)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mean_is_sum_over_n_and_none_is_per_sample(name: str) -> None:
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(3)) * 2
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    for target in (y, F.one_hot(y, 5).float() * 0.8 + 0.04):
        mean = LOSSES[name](reduction="mean")(z, target)
        total = LOSSES[name](reduction="sum")(z, target)
        each = LOSSES[name](reduction="none")(z, target)
        assert mean.ndim == 0 and total.ndim == 0 and each.shape == (6,)
        assert float(mean) == pytest.approx(float(total) / 6, rel=1e-5)
        assert float(each.sum()) == pytest.approx(float(total), rel=1e-5)
        assert float(mean) == pytest.approx(float(LOSSES[name]()(z, target)), rel=1e-6)
    with pytest.raises(CSMError, match="reduction='avg'"):
        LOSSES[name](reduction="avg")
