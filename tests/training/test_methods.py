"""Every method runs on tiny models with forward_features/head; CSM, CRL and RefCal as stated."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csm.errors import CSMError
from csm.training.batch_transforms import sample_beta
from csm.training.methods import (
    METHODS,
    Batch,
    CorrectnessHistory,
    RankMixupMethod,
    RefCalMethod,
    StepState,
    all_method_params,
    build_method,
    method_param_names,
    unwrap,
)

K = 3


class LinearNet(nn.Module):
    """Flatten -> Linear features -> Linear head (no BatchNorm, no dropout)."""

    def __init__(self, in_dim: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, dim), nn.Tanh())
        self.head = nn.Linear(dim, K)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class TinyCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> Dropout -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4, K)
        self.forwards = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.head(self.forward_features(x))


def _batch(n: int = 6, m: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        x=torch.rand(n, 1, 4, 4, generator=g),
        y=torch.arange(n) % K,
        index=torch.arange(n) * 2,
        syn_x=torch.rand(m, 1, 4, 4, generator=g),
        syn_y=torch.softmax(torch.randn(m, K, generator=g), dim=1),
    )


def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _run(name: str, model: nn.Module, batch: Batch, stage: int = 1, **params):
    method = build_method(name, params)
    if name == "refcal":
        method.augment = _flip
    state = StepState(epoch=0, step=0, stage=stage, generator=torch.Generator().manual_seed(0))
    return method, *method.compute_loss(model, batch, state)


def _value(name: str, model: nn.Module, batch: Batch, **params) -> float:
    return float(_run(name, model, batch, **params)[1].detach())


# ------------------------------------------------------------------ every method
@pytest.mark.parametrize("model_cls", [LinearNet, TinyCNN])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_finite_loss_and_gradients(name: str, model_cls) -> None:
    torch.manual_seed(0)
    model = model_cls()
    stages = [1, 2] if name == "refcal" else [1]
    for stage in stages:
        model.zero_grad()
        method, loss, logs = _run(name, model, _batch(), stage=stage)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert "loss" in logs and all(not v.requires_grad for v in logs.values())
        assert float(logs["loss"]) == pytest.approx(float(loss.detach()))
        loss.backward()
        extra = [p for mod in method.extra_modules(model) for p in mod.parameters()]
        grads = [p.grad for p in [*model.parameters(), *extra] if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def _blobs(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    centers = torch.randn(K, 16, generator=g) * 2.0
    x = centers[y] + 0.3 * torch.randn(n, 16, generator=g)
    return x.view(n, 1, 4, 4), y


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_learns_separable_blobs(name: str) -> None:
    torch.manual_seed(0)
    model = LinearNet()
    x, y = _blobs()
    method = build_method(name, {})
    if name == "refcal":
        method.augment = lambda t: t + 0.05 * torch.randn_like(t)
    g = torch.Generator().manual_seed(0)
    stages = list(range(1, len(method.stages(2)) + 1))  # refcal: SupCon, then the head
    for stage in stages:
        opt = torch.optim.SGD(method.stage_parameters(model, stage), lr=0.2, momentum=0.9)
        for step in range(25):
            sel = torch.randperm(60, generator=g)[:20]
            syn_y = F.one_hot(y[sel], K).float() * 0.8 + 0.2 / K
            batch = Batch(x[sel], y[sel], sel, x[sel] + 0.1, syn_y)
            loss, _ = method.compute_loss(model, batch, StepState(0, step, stage, g))
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        method.on_epoch_end()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean()
    assert acc >= 0.9, f"{name}: accuracy {acc:.2f}"


def test_mixup_methods_are_seeded() -> None:
    for name in ("mixup", "regmixup", "rankmixup"):
        model = LinearNet()
        a = _run(name, model, _batch())[1]
        b = _run(name, model, _batch())[1]
        assert float(a.detach()) == float(b.detach())


# ------------------------------------------------------------------ registry and params
def test_build_method_filters_params_and_validates() -> None:
    m = build_method("focal", {"gamma": 1.5, "alpha": None, "margin": 3.0})
    assert m.gamma == 1.5
    assert build_method("focal", {"gamma": None}).gamma == 3.0
    assert build_method("ls", {"alpha": 0.2}).alpha == 0.2
    assert build_method("mixup", {}).alpha == 0.2
    with pytest.raises(CSMError, match=r"^method='nope': unknown method; choose one of ce"):
        build_method("nope")
    with pytest.raises(CSMError, match=r"^gamma=-1.0"):
        build_method("focal", {"gamma": -1})
    with pytest.raises(CSMError, match=r"^alpha=1.5"):
        build_method("ls", {"alpha": 1.5})
    with pytest.raises(CSMError, match=r"^csm_loss='l1'"):
        build_method("csm", {"csm_loss": "l1"})
    with pytest.raises(CSMError, match="gamma"):
        METHODS["ce"](gamma=2.0)


def test_method_param_names() -> None:
    assert method_param_names("ce") == {}
    assert method_param_names("focal") == {"gamma": 3.0}
    assert method_param_names("mmce") == {"weight": 2.0, "bandwidth": 0.4}
    assert method_param_names("csm") == {
        "csm_loss": "l2",
        "synthetic_weight": 1.0,
        "joint_forward": False,
    }
    assert "stage2_method" in method_param_names("refcal")
    assert set(METHODS) == {
        "ce",
        "ls",
        "brier",
        "focal",
        "flsd53",
        "dual_focal",
        "bsce_gra",
        "mmce",
        "mbls",
        "crl",
        "mixup",
        "regmixup",
        "rankmixup",
        "clue",
        "refcal",
        "csm",
    }
    assert [n for n, c in METHODS.items() if c.needs_synthetic] == ["csm"]


# ------------------------------------------------------------------ CSM
def test_csm_loss_is_ce_on_real_plus_brier_on_synthetic() -> None:
    torch.manual_seed(0)
    model, batch = LinearNet(), _batch()
    _, loss, logs = _run("csm", model, batch)
    with torch.no_grad():
        ce = F.cross_entropy(model(batch.x), batch.y)
        p = torch.softmax(model(batch.syn_x), 1)
        brier = ((p - batch.syn_y) ** 2).sum(1).mean()
        soft_ce = -(batch.syn_y * torch.log(p)).sum(1).mean()
        kl = (batch.syn_y * torch.log(batch.syn_y / p)).sum(1).mean()
    assert float(loss.detach()) == pytest.approx(float(ce + brier), rel=1e-5)
    assert float(logs["loss/real"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(logs["loss/synthetic"]) == pytest.approx(float(brier), rel=1e-5)
    assert _value("csm", model, batch, csm_loss="soft_ce") == pytest.approx(
        float(ce + soft_ce), rel=1e-5
    )
    assert _value("csm", model, batch, csm_loss="kl", synthetic_weight=0.5) == (
        pytest.approx(float(ce + 0.5 * kl), rel=1e-5)
    )


def test_csm_joint_forward_matters_only_with_batchnorm() -> None:
    torch.manual_seed(0)
    linear, cnn, batch = LinearNet(), TinyCNN(), _batch()
    cnn.drop.p = 0.0
    sep = _value("csm", linear, batch)
    joint = _value("csm", linear, batch, joint_forward=True)
    assert sep == pytest.approx(joint, rel=1e-6)
    sep = _value("csm", cnn, batch)
    joint = _value("csm", cnn, batch, joint_forward=True)
    assert sep != pytest.approx(joint, rel=1e-6)  # per-part vs shared BatchNorm statistics
    cnn.forwards = 0
    _run("csm", cnn, batch)
    assert cnn.forwards == 2


def test_csm_without_synthetic_names_the_option() -> None:
    batch = _batch()
    batch.syn_x = batch.syn_y = None
    with pytest.raises(CSMError, match=r"^synthetic: .*--synthetic"):
        _run("csm", LinearNet(), batch)


# ------------------------------------------------------------------ mixup family values
def test_regmixup_and_rankmixup_values() -> None:
    torch.manual_seed(0)
    model, batch = LinearNet(), _batch()
    g = torch.Generator().manual_seed(0)
    lam = sample_beta(10.0, g)
    perm = torch.randperm(6, generator=g)
    y1 = F.one_hot(batch.y, K).float()
    with torch.no_grad():
        xm = lam * batch.x + (1 - lam) * batch.x[perm]
        ym = lam * y1 + (1 - lam) * y1[perm]
        clean = F.cross_entropy(model(batch.x), batch.y)
        mixed = -(ym * F.log_softmax(model(xm), 1)).sum(1).mean()
    assert _value("regmixup", model, batch) == pytest.approx(float(clean + mixed), 1e-5)

    g = torch.Generator().manual_seed(0)
    lam = sample_beta(2.0, g)  # the reference's CIFAR alpha
    perm = torch.randperm(6, generator=g)
    with torch.no_grad():
        xm = lam * batch.x + (1 - lam) * batch.x[perm]
        mixed_rows = (batch.y != batch.y[perm]).float()  # a same-label partner is no mix
        gap = model(xm).max(1).values - model(batch.x).max(1).values
        mrl = (mixed_rows * F.relu(gap + 2.0)).sum() / 6
    got = _value("rankmixup", model, batch)
    assert got == pytest.approx(float(clean + 0.1 * mrl), rel=1e-5)


def test_rankmixup_never_ranks_a_sample_mixed_with_itself() -> None:
    # hand example: rows 0 and 2 are mixed with themselves / a same-label partner, row 1 with
    # another class; only row 1 enters the mean (divided by N = 3, as the reference)
    clean = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    mixed = torch.tensor([[5.0, 0.0], [1.5, 0.5], [0.0, 9.0]])
    target = torch.tensor([[1.0, 0.0], [0.7, 0.3], [0.0, 1.0]])
    got = RankMixupMethod.ranking_loss(clean, mixed, target, margin=2.0)
    # row 1: relu(1.5 - 2.0 + 2) = 1.5
    assert float(got) == pytest.approx(1.5 / 3)
    # every row mixed with itself (one-hot mixed targets): the ranking term vanishes
    logits = torch.randn(6, K)
    one_hot = F.one_hot(torch.arange(6) % K, K).float()
    assert float(RankMixupMethod.ranking_loss(logits, logits + 5.0, one_hot, margin=2.0)) == 0.0


def test_rankmixup_separate_forwards_by_default() -> None:
    class CountingNet(LinearNet):
        def forward(self, x):
            self.batches.append(x.shape[0])
            return super().forward(x)

    torch.manual_seed(0)
    net, batch = CountingNet(), _batch()
    net.batches = []
    METHODS["rankmixup"]().compute_loss(net, batch, StepState(generator=torch.Generator()))
    assert net.batches == [6, 6]
    net.batches = []
    METHODS["rankmixup"](joint_forward=True).compute_loss(
        net, batch, StepState(generator=torch.Generator())
    )
    assert net.batches == [12]


@pytest.mark.parametrize("update", [True, False])
def test_rankmixup_mixed_bn_update(update: bool) -> None:
    """Reference default: the mixed forward also moves BN's running stats; with
    ``mixed_bn_update=False`` they equal those of the clean forward alone (hand EMA)."""
    torch.manual_seed(0)
    net, batch = TinyCNN(), _batch()
    net.drop.p = 0.0
    with torch.no_grad():
        feats = net.conv(batch.x)
    m = net.bn.momentum
    clean_mean = (1 - m) * 0.0 + m * feats.mean(dim=(0, 2, 3))
    method = METHODS["rankmixup"](mixed_bn_update=update)
    loss, _ = method.compute_loss(net, batch, StepState(generator=torch.Generator()))
    assert torch.isfinite(loss)
    assert net.bn.momentum == m  # restored
    same = torch.allclose(net.bn.running_mean, clean_mean, atol=1e-6)
    assert same is (not update)
    assert int(net.bn.num_batches_tracked) == 2


# ------------------------------------------------------------------ CLUE
def test_clue_uses_mc_dropout_only_when_dropout_exists() -> None:
    cnn = TinyCNN()
    cnn.forwards = 0
    _run("clue", cnn, _batch(), mc_samples=3)
    assert cnn.forwards == 3
    cnn.drop.p = 0.0
    cnn.forwards = 0
    method = build_method("clue", {"mc_samples": 3})
    method.compute_loss(cnn, _batch(), StepState())
    assert cnn.forwards == 1
    cnn.drop.p = 0.3
    cnn.eval()
    cnn.forwards = 0
    build_method("clue", {"mc_samples": 3}).compute_loss(cnn, _batch(), StepState())
    assert cnn.forwards == 1  # no dropout noise in eval mode


def test_clue_logs_mean_error_and_entropy() -> None:
    torch.manual_seed(0)
    net, batch = LinearNet(), _batch()
    _, logs = METHODS["clue"]().compute_loss(net, batch, StepState())
    with torch.no_grad():
        logits = net(batch.x)
    p = logits.softmax(1)
    assert float(logs["loss/err"]) == pytest.approx(float(F.cross_entropy(logits, batch.y)))
    assert float(logs["loss/u"]) == pytest.approx(float(-(p * p.log()).sum(1).mean()))


# ------------------------------------------------------------------ CRL
def test_correctness_history_frequency() -> None:
    h = CorrectnessHistory()
    idx = torch.tensor([0, 5])
    h.update(idx, torch.tensor([True, False]))
    h.update(idx, torch.tensor([True, True]))
    torch.testing.assert_close(
        h.frequency(torch.tensor([0, 5, 3, 9])),
        torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64),
    )


def test_crl_ranking_uses_history_and_state_round_trips() -> None:
    torch.manual_seed(0)
    model, batch = LinearNet(), _batch()
    method = build_method("crl", {"weight": 1.0})
    _, logs = method.compute_loss(model, batch, StepState())
    assert float(logs["loss/rank"]) == 0.0  # no history yet: all frequencies equal
    with torch.no_grad():
        p = torch.softmax(model(batch.x), 1)
    correct = (p.argmax(1) == batch.y).double()
    torch.testing.assert_close(method.history.frequency(batch.index), correct)
    method.on_epoch_end()
    # second epoch: rank term from the recorded frequencies
    conf = p.max(1).values
    c = correct.float()
    cj, kj = torch.roll(c, -1), torch.roll(conf, -1)
    expected = F.relu(-torch.sign(c - cj) * (conf - kj) + (c - cj).abs()).mean()
    _, logs2 = method.compute_loss(model, batch, StepState(epoch=1))
    assert float(logs2["loss/rank"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    restored = build_method("crl")
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(
        restored.history.frequency(batch.index), method.history.frequency(batch.index)
    )


# ------------------------------------------------------------------ RefCal
def test_refcal_stage_one_trains_encoder_and_projection_not_head() -> None:
    torch.manual_seed(0)
    model, batch = TinyCNN(), _batch()
    method = build_method("refcal", {"proj_dim": 5})
    loss, _ = method.pretrain_loss(model, batch, augment=_flip)
    loss.backward()
    (projection,) = method.extra_modules(model)
    assert projection[-1].out_features == 5
    assert model.conv.weight.grad is not None and projection[0].weight.grad is not None
    assert model.head.weight.grad is None
    assert {id(p) for p in method.stage_parameters(model, 1)} == {
        id(p) for p in [*model.parameters(), *projection.parameters()]
    }


def test_refcal_stage_two_freezes_encoder() -> None:
    torch.manual_seed(0)
    model, batch = TinyCNN(), _batch()
    method = build_method("refcal", {"stage2_method": "focal", "gamma": 1.5})
    assert method.inner.gamma == 1.5
    running = model.bn.running_mean.clone()
    model.train()
    loss, _ = method.compute_loss(model, batch, StepState(stage=2))
    loss.backward()
    assert model.conv.weight.grad is None and model.head.weight.grad is not None
    assert torch.equal(model.bn.running_mean, running)  # encoder ran in eval mode
    assert model.training and model.bn.training  # mode restored
    assert [id(p) for p in method.stage_parameters(model, 2)] == [
        id(p) for p in model.head.parameters()
    ]
    # stage-2 loss is the focal loss of the head on eval-mode features
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(batch.x), 1)[torch.arange(6), batch.y]
        ref = (-((1 - p) ** 1.5) * torch.log(p)).mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)


def test_refcal_validation_epochs_and_state() -> None:
    with pytest.raises(CSMError, match=r"^stage2_method='refcal'"):
        build_method("refcal", {"stage2_method": "refcal"})
    with pytest.raises(CSMError, match=r"^temperature="):
        build_method("refcal", {"temperature": 0.0})
    with pytest.raises(CSMError, match=r"^pretrain_fraction="):
        build_method("refcal", {"pretrain_fraction": 1.0})
    method = build_method("refcal", {"stage2_method": "crl"})
    assert method.stage_epochs(10) == (5, 5)
    assert method.stage_epochs(2) == (1, 1)
    assert build_method("refcal", {"pretrain_fraction": 0.9}).stage_epochs(4) == (3, 1)
    with pytest.raises(CSMError, match=r"^epochs=1"):
        method.stage_epochs(1)
    with pytest.raises(ValueError, match="augment"):
        method.pretrain_loss(LinearNet(), _batch())
    model = LinearNet()
    method.extra_modules(model)
    method.compute_loss(model, _batch(), StepState(stage=2))  # crl history fills
    state = method.state_dict()
    assert any(k.startswith("projection.") for k in state) and "inner.seen" in state
    fresh = build_method("refcal", {"stage2_method": "crl"})
    fresh.load_state_dict(state)  # projection not built yet: applied when built
    (proj,) = fresh.extra_modules(model)
    assert torch.equal(proj[0].weight, method.projection[0].weight)
    assert torch.equal(fresh.inner.history.seen, method.inner.history.seen)


def test_supcon_pretraining_separates_classes() -> None:
    torch.manual_seed(0)
    x, y = _blobs(n=30)
    model = LinearNet()
    method = build_method("refcal", {"proj_dim": 4})
    opt = torch.optim.SGD(method.stage_parameters(model, 1), lr=0.1)
    first = None
    for _ in range(30):
        loss, _ = method.pretrain_loss(model, Batch(x, y), augment=lambda t: t + 0.05 * t.sign())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    assert math.isfinite(float(loss.detach()))


def test_all_method_params_have_help_and_one_type() -> None:
    params = all_method_params()
    for cls in METHODS.values():
        for name, default in cls.param_defaults().items():
            assert params[name].type is type(default), name
            assert params[name].help
    assert params["gamma"].type is float and params["joint_forward"].type is bool
    assert params["mc_samples"].type is int and params["csm_loss"].type is str
    assert "focal: focusing parameter >= 0 (default 3.0)" in params["gamma"].help


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: forwards to ``.module``, has no ``head``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@pytest.mark.parametrize("name", ["mixup", "rankmixup", "refcal"])
def test_methods_reach_head_through_a_wrapper(name: str) -> None:
    torch.manual_seed(0)
    inner = LinearNet()
    wrapped = _Wrapper(inner)
    assert unwrap(wrapped) is inner and unwrap(inner) is inner
    for stage in [1, 2] if name == "refcal" else [1]:
        torch.manual_seed(1)
        a = _value(name, wrapped, _batch(), stage=stage)
        torch.manual_seed(1)
        b = _value(name, inner, _batch(), stage=stage)
        assert a == pytest.approx(b, rel=1e-6)


def test_every_method_parameter_is_a_train_flag() -> None:
    """TrainConfig's method fields are derived from the methods' declarations: every declared
    parameter is a field (default None, help from the declaration) and reaches its method."""
    import dataclasses

    from csm.training.config import TrainConfig, method_params

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, param in all_method_params().items():
        assert fields[name].default is None and fields[name].metadata["help"] == param.help
    for method, cls in METHODS.items():
        for name, param in cls.params().items():
            value = param.default if param.type is not bool else not param.default
            cfg = TrainConfig(method=method, **{name: value})
            assert method_params(cfg) == {name: value}
            assert build_method(method, method_params(cfg)).hparams()[name] == value


def test_method_options_are_checked_against_the_chosen_method() -> None:
    from csm.training.config import TrainConfig, method_params, only_method_options

    with pytest.raises(CSMError, match=r"--gamma 3.0: not an option of method ls; its options "):
        method_params(TrainConfig(method="ls", gamma=3.0))
    with pytest.raises(CSMError, match="--margin 1.0: not an option of method focal.*--gamma"):
        method_params(TrainConfig(method="focal", margin=1.0))
    # refcal hands the flat dict to its stage-2 method, so it accepts that method's options
    cfg = TrainConfig(method="refcal", stage2_method="focal", gamma=1.5)
    assert method_params(cfg) == {"stage2_method": "focal", "gamma": 1.5}
    with pytest.raises(CSMError, match="--gamma 1.5: not an option of method refcal"):
        method_params(TrainConfig(method="refcal", gamma=1.5))
    # one option set for many methods (csm benchmark): each keeps what it accepts
    kept = only_method_options(TrainConfig(method="ce", gamma=3.0, alpha=0.2))
    assert kept.gamma is None and kept.alpha is None
    assert only_method_options(TrainConfig(method="focal", gamma=3.0, alpha=0.2)).gamma == 3.0


def test_stage_plans() -> None:
    plan = build_method("focal", {}).stages(7)
    assert [(s.epochs, s.augment, s.trains_classifier) for s in plan] == [(7, True, True)]
    refcal = build_method("refcal", {"pretrain_fraction": 0.75})
    first, second = refcal.stages(4)
    assert (first.epochs, first.augment, first.trains_classifier) == (3, False, False)
    assert (second.epochs, second.augment, second.trains_classifier) == (1, True, True)
    model = LinearNet()
    assert {id(p) for p in second.parameters(model)} == {id(p) for p in model.head.parameters()}
    assert len(first.parameters(model)) == len(list(model.parameters())) + 4  # + projection
    x, y = _blobs(8)
    views = StepState(stage=1, augment=lambda t: t + 0.01)
    loss, logs = first.loss(model, Batch(x, y), views)
    assert torch.isfinite(loss) and "loss/supcon" in logs


# ------------------------------------------------------------------ RefCal (reference settings)
def test_refcal_stage2_carries_the_reference_lr_and_weight_decay() -> None:
    stages = METHODS["refcal"]().stages(10)
    assert [(s.lr, s.weight_decay) for s in stages] == [(None, None), (5.0, 0.0)]
    own = RefCalMethod(head_lr=0.0, head_weight_decay=1e-4).stages(10)[1]
    assert (own.lr, own.weight_decay) == (None, 1e-4)  # 0 keeps the run's --lr
    with pytest.raises(CSMError, match="views"):
        RefCalMethod(views="random")


def test_refcal_simclr_views_are_seeded_and_differ_from_trainer_views() -> None:
    torch.manual_seed(0)
    model, batch = LinearNet(), _batch()
    method = RefCalMethod()
    state = lambda: StepState(stage=1, generator=torch.Generator().manual_seed(3))  # noqa: E731
    a, _ = method.pretrain_loss(model, batch, augment=lambda t: t, state=state())
    b, _ = method.pretrain_loss(model, batch, augment=lambda t: t, state=state())
    assert float(a.detach()) == float(b.detach())
    plain = RefCalMethod(views="trainer")
    plain.projection = method.projection
    c, _ = plain.pretrain_loss(model, batch, augment=lambda t: t, state=state())
    assert float(c.detach()) != float(a.detach())
