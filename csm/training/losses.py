"""Train-time calibration losses: ``nn.Module``\\ s that take logits and integer or dense targets.

Every loss in :data:`LOSSES` is called as ``loss(logits, target)`` where ``logits`` is ``(N, K)``
and ``target`` is either integer class indices ``(N,)`` or dense (soft) targets ``(N, K)`` whose
rows sum to one (what the mixup family and the synthetic soft labels produce). On one-hot dense
targets every loss returns exactly what it returns on the matching integer targets. Losses are
computed in float32 (safe under bf16 autocast) and reduced over the batch as torch's losses are:
``reduction="mean"`` (default), ``"sum"`` or ``"none"`` (the ``(N,)`` per-sample values), so
``mean == sum / N``. A batch-level term (MMCE's penalty, CLUE's ``batch_mean`` alignment) is added
to every sample's value, which keeps ``mean`` equal to the loss of the paper.
Hyper-parameters are checked in ``__init__``; a bad value raises :class:`~csm.errors.CSMError`
naming the parameter.

Notation: ``p = softmax(z)``, ``t`` the (dense) target, ``e_y`` the one-hot target.

Besides the registry this module holds the pieces the methods in :mod:`csm.training.methods`
combine:
:func:`supcon_loss` (RefCal stage 1) and :func:`correctness_ranking_loss` (CRL).

Example:
    >>> import torch
    >>> from csm.training.losses import LOSSES
    >>> loss = LOSSES["focal"](gamma=3.0)
    >>> z = torch.tensor([[2.0, 0.0, -1.0]])
    >>> round(float(loss(z, torch.tensor([0]))), 5) == round(float(loss(z, torch.eye(3)[:1])), 5)
    True
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csm.errors import CSMError

__all__ = [
    "LOSSES",
    "BrierScore",
    "CalibrationLoss",
    "ClueLoss",
    "CrossEntropy",
    "DualFocalLoss",
    "FLSD53",
    "FocalLoss",
    "REDUCTIONS",
    "GradientBSCE",
    "KLDivergence",
    "LabelSmoothing",
    "MarginLabelSmoothing",
    "MMCELoss",
    "correctness_ranking_loss",
    "dense_target",
    "check_choice",
    "check_range",
    "entropy",
    "supcon_loss",
]


# --------------------------------------------------------------------------- helpers
def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> float:
    """Validate a hyper-parameter; raise a one-line CSMError naming it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CSMError(f"{name}={value!r}: not a number; pass a float") from None
    if not math.isfinite(value):
        raise CSMError(f"{name}={value}: must be finite; pass a finite float")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise CSMError(
            f"{name}={value}: out of range; must be {bound}"
            + (f" and <= {high}" if high is not None else "")
        )
    if high is not None and value > high:
        raise CSMError(
            f"{name}={value}: out of range; must be <= {high}"
            + (f" and >= {low}" if low is not None else "")
        )
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise CSMError(f"{name}={value!r}: unknown choice; use one of {', '.join(choices)}")
    return value


def dense_target(target: Tensor, logits: Tensor) -> Tensor:
    """Return ``target`` as dense float32 ``(N, K)`` matching ``logits``.

    Args:
        target: integer class indices ``(N,)`` or dense targets ``(N, K)``.
        logits: the ``(N, K)`` logits the target belongs to.

    Returns:
        Float32 tensor ``(N, K)``; integer targets become one-hot rows.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits: expected shape (N, K), got {tuple(logits.shape)}")
    n, k = logits.shape
    if target.is_floating_point():
        if target.shape != (n, k):
            raise ValueError(
                f"target: dense targets must have shape {(n, k)} like the logits, "
                f"got {tuple(target.shape)}"
            )
        return target.float()
    if target.shape != (n,):
        raise ValueError(
            f"target: integer targets must have shape ({n},), got {tuple(target.shape)}"
        )
    return F.one_hot(target.long(), k).float()


def _is_hard(target: Tensor) -> bool:
    return not target.is_floating_point()


#: Batch reductions, as in ``torch.nn`` losses.
REDUCTIONS = ("mean", "sum", "none")


class CalibrationLoss(nn.Module):
    """Base class: converts targets to dense form and computes a reduced loss in float32.

    Subclasses implement :meth:`dense_loss` (per-sample values, shape ``(N,)``) from float32
    logits and dense targets. Constructor arguments are ``Annotated[type, help]``: the methods
    that wrap a loss expose them as their hyper-parameters (:mod:`csm.training.methods`);
    ``reduction`` is plain (not a method hyper-parameter: training always takes the mean).

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` over the batch, as in
            ``torch.nn.CrossEntropyLoss``.
    """

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss over the batch, reduced by :attr:`reduction`.

        Args:
            logits: ``(N, K)`` unnormalised scores.
            target: ``(N,)`` int64 class indices or ``(N, K)`` dense targets.

        Returns:
            A scalar tensor (``mean``, ``sum``) or the ``(N,)`` per-sample values (``none``).
        """
        logits = logits.float()
        t = dense_target(target, logits)
        return self.reduce(self.dense_loss(logits, t))

    def reduce(self, values: Tensor) -> Tensor:
        """Per-sample ``values`` ``(N,)`` reduced by :attr:`reduction`."""
        if self.reduction == "sum":
            return values.sum()
        return values if self.reduction == "none" else values.mean()

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def _soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``-sum_k t_k log p_k``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


# --------------------------------------------------------------------------- losses
class CrossEntropy(CalibrationLoss):
    """Cross-entropy ``-sum_k t_k log p_k``; for integer targets ``-log p_y``."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if _is_hard(target):
            if logits.ndim != 2 or target.shape != (logits.shape[0],):
                raise ValueError(
                    f"target: integer targets must have shape ({logits.shape[0]},) "
                    f"for logits {tuple(logits.shape)}, got {tuple(target.shape)}"
                )
            return F.cross_entropy(logits.float(), target.long(), reduction=self.reduction)
        return super().forward(logits, target)

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return _soft_ce(logits, target)


class LabelSmoothing(CalibrationLoss):
    """Cross-entropy against ``(1 - alpha) t + alpha / K`` (Szegedy et al., 2016).

    Args:
        alpha: smoothing mass in [0, 1]; 0 is plain cross-entropy.
    """

    def __init__(
        self, alpha: Annotated[float, "smoothing mass in [0, 1]"] = 0.1, *, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction=reduction)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        k = logits.shape[1]
        return _soft_ce(logits, (1.0 - self.alpha) * target + self.alpha / k)


class BrierScore(CalibrationLoss):
    """Multi-class Brier score ``sum_k (p_k - t_k)^2`` (Brier, 1950), summed over classes.

    With dense targets this is the L2 loss CSM puts on synthetic soft labels.
    """

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return (F.softmax(logits, dim=1) - target).pow(2).sum(dim=1)


class KLDivergence(CalibrationLoss):
    """``KL(t || p) = sum_k t_k (log t_k - log p_k)`` with ``0 log 0 = 0``.

    Equals cross-entropy minus the (constant) target entropy, so 0 on a perfect fit. On integer
    targets it equals cross-entropy.
    """

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        target_entropy = torch.special.xlogy(target, target).sum(dim=1)
        return target_entropy + _soft_ce(logits, target)


def _focal_terms(logits: Tensor, gamma: Tensor | float) -> Tensor:
    """Element-wise ``-(1 - p_k)^gamma log p_k``."""
    logp = F.log_softmax(logits, dim=1)
    return -(1.0 - logp.exp()).clamp_min(0.0).pow(gamma) * logp


class FocalLoss(CalibrationLoss):
    """Focal loss ``-(1 - p_y)^gamma log p_y`` (Lin et al., 2017; Mukhoti et al., NeurIPS 2020).

    Dense targets give ``-sum_k t_k (1 - p_k)^gamma log p_k``.

    Args:
        gamma: focusing parameter >= 0 (0 is cross-entropy).
    """

    def __init__(
        self, gamma: Annotated[float, "focusing parameter >= 0"] = 3.0, *, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction=reduction)
        self.gamma = check_range("gamma", gamma, 0.0)

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return (target * _focal_terms(logits, self.gamma)).sum(dim=1)


class FLSD53(CalibrationLoss):
    """Sample-dependent focal loss FLSD-53 (Mukhoti et al., NeurIPS 2020).

    ``gamma = gamma_high`` when ``p_y < threshold`` else ``gamma_low`` (defaults 5, 3, 0.2); the
    choice of gamma carries no gradient. Dense targets apply the rule per class.

    Args:
        gamma_low: gamma for confident samples (``p_y >= threshold``), >= 0.
        gamma_high: gamma for low-probability samples, >= 0.
        threshold: probability threshold in [0, 1].
    """

    def __init__(
        self,
        gamma_low: Annotated[float, "gamma when p_y >= threshold"] = 3.0,
        gamma_high: Annotated[float, "gamma when p_y < threshold"] = 5.0,
        threshold: Annotated[float, "probability threshold"] = 0.2,
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.gamma_low = check_range("gamma_low", gamma_low, 0.0)
        self.gamma_high = check_range("gamma_high", gamma_high, 0.0)
        self.threshold = check_range("threshold", threshold, 0.0, 1.0)

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            p = F.softmax(logits, dim=1)
            gamma = torch.where(p < self.threshold, self.gamma_high, self.gamma_low)
        return (target * _focal_terms(logits, gamma)).sum(dim=1)


def _next_lower_prob(p: Tensor) -> Tensor:
    """For every entry ``p_k`` the largest probability of its row strictly below it (0 if none)."""
    ascending, _ = torch.sort(p, dim=1)
    count_below = torch.searchsorted(
        ascending.detach().contiguous(), p.detach().contiguous(), right=False
    )
    below = ascending.gather(1, (count_below - 1).clamp_min(0))
    return torch.where(count_below > 0, below, torch.zeros_like(below))


class DualFocalLoss(CalibrationLoss):
    """Dual focal loss ``-(1 - p_y + p_j)^gamma log p_y`` (Tao et al., ICML 2023).

    ``p_j`` is the largest probability strictly below ``p_y`` (0 when ``p_y`` is the smallest).
    Gradients flow through ``p_j`` as in the reference implementation. Dense targets apply the
    formula per class: ``-sum_k t_k (1 - p_k + p_j(k))^gamma log p_k``.

    Args:
        gamma: focusing parameter >= 0 (paper: 2 for CIFAR-10 ResNet-50).
    """

    def __init__(
        self, gamma: Annotated[float, "focusing parameter >= 0"] = 2.0, *, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction=reduction)
        self.gamma = check_range("gamma", gamma, 0.0)

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        logp = F.log_softmax(logits, dim=1)
        p = logp.exp()
        weight = (1.0 - p + _next_lower_prob(p)).clamp_min(0.0).pow(self.gamma)
        return -(target * weight * logp).sum(dim=1)


class GradientBSCE(CalibrationLoss):
    """BSCE-GRA: ``-sg(||t - p||_beta^gamma) * sum_k t_k log p_k``.

    From the unified focal-loss framework of arXiv 2503.22725: the Brier-style weight only scales
    the cross-entropy gradient (stop-gradient). Defaults beta = 1 (norm order) and gamma = 1, the
    reference code's defaults (issue 13's reading of the BSCE-GRA repository; see
    ``docs/fidelity.md``). The reference sums the loss over the batch; we average (every loss
    here is a batch mean, so one learning rate serves every method; a sum is the mean times the
    batch size, i.e. a 64x larger step at our batch size).

    Args:
        beta: order of the norm, > 0.
        gamma: exponent of the norm, >= 0.
    """

    def __init__(
        self,
        beta: Annotated[float, "norm order > 0"] = 1.0,
        gamma: Annotated[float, "focusing parameter >= 0"] = 1.0,
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.beta = check_range("beta", beta, 0.0, low_open=True)
        self.gamma = check_range("gamma", gamma, 0.0)

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        logp = F.log_softmax(logits, dim=1)
        with torch.no_grad():
            norm = torch.linalg.vector_norm(target - logp.exp(), ord=self.beta, dim=1)
            weight = norm.pow(self.gamma)
        return -weight * (target * logp).sum(dim=1)


class MMCELoss(CalibrationLoss):
    """Cross-entropy plus ``weight * MMCE`` (Kumar et al., ICML 2018).

    ``MMCE^2 = (1/N^2) sum_ij (a_i - c_i)(a_j - c_j) k(c_i, c_j)`` with confidence ``c = max p``,
    correctness ``a = 1[argmax p = y]`` and the Laplacian kernel
    ``k = exp(-|c_i - c_j| / bandwidth)``; the penalty is its square root (clamped at 1e-12 to
    keep the gradient finite). The kernel matrix is positive definite, so ``MMCE^2 >= 0``. It is a
    batch-level term: the mean of the loss is ``mean CE + weight * MMCE``. Dense targets use soft
    cross-entropy and the argmax class for correctness.

    Args:
        weight: lambda >= 0 (default 2, Mukhoti et al. 2020).
        bandwidth: kernel width > 0 (0.4 in the paper).
    """

    def __init__(
        self,
        weight: Annotated[float, "regulariser weight >= 0"] = 2.0,
        bandwidth: Annotated[float, "Laplacian kernel width > 0"] = 0.4,
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.weight = check_range("weight", weight, 0.0)
        self.bandwidth = check_range("bandwidth", bandwidth, 0.0, low_open=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()
        t = dense_target(target, logits)
        return self.reduce(_soft_ce(logits, t) + self.weight * self.mmce(logits, t))

    def mmce(self, logits: Tensor, target: Tensor) -> Tensor:
        """The (square-rooted) MMCE penalty of a batch."""
        p = F.softmax(logits.float(), dim=1)
        conf, pred = p.max(dim=1)
        correct = (pred == target.argmax(dim=1)).float()
        r = correct - conf
        kernel = torch.exp(-(conf[:, None] - conf[None, :]).abs() / self.bandwidth)
        mmce2 = (r[:, None] * r[None, :] * kernel).sum() / conf.numel() ** 2
        return mmce2.clamp_min(1e-12).sqrt()


class MarginLabelSmoothing(CalibrationLoss):
    """MbLS: cross-entropy plus ``weight * sum_k max(0, max_j z_j - z_k - margin)``.

    Liu et al., "The Devil is in the Margin: Margin-based Label Smoothing for Network
    Calibration", CVPR 2022; reference code ``by-liu/MbLS``, ``calibrate/losses/logit_margin_l1.py``
    (``LogitMarginL1``: ``F.relu(diff - margin).mean()`` over the ``(N, K)`` distances, i.e. the
    mean over classes and batch). ``class_reduction="mean"`` (the default) reproduces it; the
    paper's equation writes a sum over classes, ``class_reduction="sum"`` (K times stronger).

    Args:
        margin: tolerated logit distance m >= 0 (default 10).
        weight: lambda >= 0 (default 0.1).
        class_reduction: ``"mean"`` (reference code) or ``"sum"`` (paper equation) over classes.
    """

    def __init__(
        self,
        margin: Annotated[float, "logit margin >= 0"] = 10.0,
        weight: Annotated[float, "regulariser weight >= 0"] = 0.1,
        class_reduction: Annotated[
            str, "penalty over classes: mean (reference code) or sum"
        ] = "mean",
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.margin = check_range("margin", margin, 0.0)
        self.weight = check_range("weight", weight, 0.0)
        self.class_reduction = check_choice("class_reduction", class_reduction, ("sum", "mean"))

    def dense_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        gap = logits.max(dim=1, keepdim=True).values - logits
        penalty = F.relu(gap - self.margin)
        penalty = penalty.sum(dim=1) if self.class_reduction == "sum" else penalty.mean(dim=1)
        return _soft_ce(logits, target) + self.weight * penalty


def entropy(probs: Tensor) -> Tensor:
    """Per-row Shannon entropy (nats) of probability vectors, ``0 log 0 = 0``."""
    return -torch.special.xlogy(probs, probs).sum(dim=1)


class ClueLoss(CalibrationLoss):
    """CLUE: ``alpha * L_e + (1 - alpha) * (L_e - u)^2`` (arXiv 2505.22803).

    ``L_e`` is the cross-entropy and ``u`` the predictive entropy (of the MC-dropout average
    when the caller passes ``mc_probs``). CLUE aligns summary statistics: ``mode="batch_mean"``
    (default) uses ``alpha * mean(L_e) + (1 - alpha) * (mean(L_e) - mean(u))^2``;
    ``mode="per_sample"`` uses ``mean(alpha * L_e + (1 - alpha) * (L_e - u)^2)``. The default
    alpha = 0.5 is [unverified].

    Args:
        alpha: weight of the error term in [0, 1].
        mode: ``"batch_mean"`` or ``"per_sample"``.
    """

    def __init__(
        self,
        alpha: Annotated[float, "weight of the error term in [0, 1]"] = 0.5,
        mode: Annotated[str, "statistic alignment: batch_mean or per_sample"] = "batch_mean",
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.mode = check_choice("mode", mode, ("batch_mean", "per_sample"))

    @staticmethod
    def components(
        logits: Tensor, target: Tensor, mc_probs: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-row error ``L_e`` (cross-entropy) and uncertainty ``u`` (entropy), ``(N,)`` each."""
        logits = logits.float()
        err = _soft_ce(logits, dense_target(target, logits))
        probs = F.softmax(logits, dim=1) if mc_probs is None else mc_probs.float()
        return err, entropy(probs)

    def forward(self, logits: Tensor, target: Tensor, mc_probs: Tensor | None = None) -> Tensor:
        """Mean CLUE loss.

        Args:
            logits: ``(N, K)``.
            target: ``(N,)`` class indices or ``(N, K)`` dense targets.
            mc_probs: optional ``(N, K)`` MC-dropout averaged probabilities for ``u``.
        """
        err, u = self.components(logits, target, mc_probs)
        gap = err.mean() - u.mean() if self.mode == "batch_mean" else err - u
        return self.reduce(self.alpha * err + (1.0 - self.alpha) * gap**2)


LOSSES: dict[str, type[CalibrationLoss]] = {
    "ce": CrossEntropy,
    "ls": LabelSmoothing,
    "brier": BrierScore,
    "kl": KLDivergence,
    "focal": FocalLoss,
    "flsd53": FLSD53,
    "dual_focal": DualFocalLoss,
    "bsce_gra": GradientBSCE,
    "mmce": MMCELoss,
    "mbls": MarginLabelSmoothing,
    "clue": ClueLoss,
}
"""Loss name -> class. Construct with the loss's hyper-parameters as keyword arguments."""


# --------------------------------------------------------------------------- building blocks
def correctness_ranking_loss(confidence: Tensor, correctness: Tensor) -> Tensor:
    """Correctness ranking loss of CRL (Moon et al., ICML 2020), pairs by rolling the batch by one.

    ``mean_i max(0, -s_ij (k_i - k_j) + |c_i - c_j|)`` with ``j = i + 1 (mod N)``,
    ``s_ij = sign(c_i - c_j)``, ``k`` the confidence and ``c`` the per-sample running correctness
    frequency (no gradient).

    Args:
        confidence: ``(N,)`` max softmax probabilities (differentiable).
        correctness: ``(N,)`` correctness frequencies in [0, 1].

    Returns:
        Scalar mean over the N pairs.
    """
    correctness = correctness.to(confidence).detach()
    k_j = torch.roll(confidence, shifts=-1, dims=0)
    c_j = torch.roll(correctness, shifts=-1, dims=0)
    sign = torch.sign(correctness - c_j)
    return F.relu(-sign * (confidence - k_j) + (correctness - c_j).abs()).mean()


def supcon_loss(
    embeddings: Tensor,
    labels: Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
) -> Tensor:
    """Supervised contrastive loss ``L_out`` (Khosla et al., NeurIPS 2020).

    For every anchor ``i`` with positives ``P(i)`` (other rows with the same label):
    ``-(tau / base_tau) / |P(i)| sum_{p in P(i)} log(exp(z_i.z_p / tau) / sum_{a != i}
    exp(z_i.z_a / tau))``, averaged over anchors that have a positive. The ``tau / base_tau``
    factor is the reference code's (``SupConLoss`` in HobbitLong/SupContrast ``losses.py``, which
    RefCal's ``main_refcal.py`` uses, ``base_temperature=0.07``); ``base_temperature=None``
    leaves it out (factor 1).

    Args:
        embeddings: ``(M, D)`` L2-normalised embeddings (e.g. two views stacked).
        labels: ``(M,)`` integer labels.
        temperature: tau > 0.
        base_temperature: base_tau > 0 of the ``tau / base_tau`` scale, or None (no scale).

    Returns:
        Scalar loss.
    """
    z = embeddings.float()
    m = z.shape[0]
    sim = z @ z.T / temperature
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(dim=1)
    has_pos = n_pos > 0
    pos_log_prob = log_prob.masked_fill(~pos, 0.0).sum(dim=1)
    per_anchor = -pos_log_prob[has_pos] / n_pos[has_pos]
    if per_anchor.numel() == 0:
        return z.sum() * 0.0
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    return scale * per_anchor.mean()
