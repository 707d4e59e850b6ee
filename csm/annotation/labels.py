"""Label modes of ``csm annotate``: how an image's soft label is made from the encoder's outputs.

CSM (Luo et al., "Beyond One-Hot Labels: Semantic Mixing for Model Calibration", ICML 2025,
arXiv 2504.13548) labels a synthetic image ``x`` of pair ``(a, b)`` from the projection
``λ̂`` of its feature on the segment between the class prototypes, squashed with a *fixed*
``sigmoid(s · (λ̂ − ½))``, ``s = 4`` in the reference code. The fixed squash is label
smoothing by construction: a pure endpoint (``λ̂ = 1``) gets ``sigmoid(2) ≈ 0.88`` whatever the
encoder's real confidence on such images is. The modes here (``--label-mode``) keep the paper's
signal (the encoder's view of the image) but *calibrate* the map from that signal to a
probability on **real held-out images**, where the right answer is known:

``squash`` (default, the paper's)
    ``soft[a] = sigmoid(s · (λ̂ − ½))`` with the given ``s``; nothing is fitted.

``judge``
    ``soft[a] = P(a | x, {a, b}) = sigmoid((z_a − z_b) / T)``, the judge's temperature-scaled
    softmax restricted to ``{a, b}`` and renormalised. The judge is the encoder's own classifier
    when it has one (``classifier:RUN``), else a prototype classifier whose logits are the cosine
    similarities of ``f(x)`` to the class prototypes. ``T`` is fitted by temperature scaling
    (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017; NLL criterion,
    :class:`csm.calibration.calibrators.TemperatureScaling` with its guard against error-free
    or tiny validation sets) on the judge's logits of the real dataset's **validation** split
    (:func:`csm.data.real.load_real`, the split seed recorded), which neither the judge's
    training nor the prototypes saw. Why: a judge's raw logits are not probabilities (a trained
    network is over-confident, cosine similarities live in [-1, 1]); ``T`` is the one scale that
    makes them honest on real images, and the restriction of ``softmax(z / T)`` to ``{a, b}``
    is exactly ``sigmoid((z_a − z_b) / T)``.

``pair-fit``
    ``soft[a] = sigmoid(s_ab · (λ̂ − t_ab))`` with a slope and an offset per pair, fitted on the
    real **validation** images of classes ``a`` and ``b`` by a logistic regression of
    ``1[y = a]`` on their projection ``λ̂`` (Platt, "Probabilistic Outputs for Support Vector
    Machines and Comparisons to Regularized Likelihood Methods", 1999: a sigmoid fitted to a
    score on held-out data). Why: the confidence a pure endpoint deserves is the confidence the
    encoder's projection really has on real images of the two classes, which varies by pair
    (close classes overlap, far ones do not), and the midpoint where the encoder is undecided
    need not be ``½``. Regulariser: real validation images of two classes are often perfectly
    separable by ``λ̂``, where the maximum-likelihood slope diverges (every ``soft`` would become
    0 or 1). The fit is therefore the MAP under an isotropic Gaussian prior, an L2 penalty
    ``((s − s₀)² + β²) / (2σ²)`` in the parametrisation ``logit = s · (λ̂ − ½) + β``
    (``t = ½ − β / s``), centred on the paper's squash (``s₀`` = ``--squash``, ``t₀ = ½``, i.e.
    ``β₀ = 0``) with standard deviation ``σ`` = ``--pair-fit-prior-sd``. The objective is
    convex, so Newton's method gives the unique optimum deterministically; with few images the
    fit stays near the paper's squash, with many it follows the data; the prior is symmetric
    under swapping ``a`` and ``b`` (the swapped pair gets ``(s, 1 − t)``). Pairs with fewer than
    ``--pair-fit-min-val`` validation images of either class, or whose fitted slope is not
    positive (the projection does not order the two classes on real data), keep the paper's
    ``(s₀, ½)`` with a warning naming the pair.

Every fitted parameter, the real split it was fitted on and its size are returned by the
``record`` methods, which ``csm annotate`` writes into the manifest and the dataset card.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from csm.calibration.calibrators import TemperatureScaling
from csm.errors import CSMError

logger = logging.getLogger(__name__)

LABEL_MODES = ("squash", "judge", "pair-fit")
#: The paper's offset ``t`` of the squash ``sigmoid(s · (λ̂ − t))``.
PAPER_OFFSET = 0.5
#: Names an annotation gets by default in each fitted label mode.
DEFAULT_NAMES = {"judge": "judge-ts", "pair-fit": "pair-fit"}
_NEWTON_ITERS = 100

__all__ = [
    "DEFAULT_NAMES",
    "LABEL_MODES",
    "PAPER_OFFSET",
    "JudgeCalibration",
    "PairFit",
    "PairSquash",
    "check_label_options",
    "fit_judge",
    "fit_pair_squash",
    "fit_pairs",
    "fit_summary",
    "pair_margin",
    "project_products",
    "prototype_logits",
]


def check_label_options(label_mode: str, mode: str, prior_sd: float, min_val: int) -> None:
    """Raise one :class:`CSMError` line naming a bad label option and its fix.

    Args:
        label_mode: ``squash``, ``judge`` or ``pair-fit``.
        mode: The annotation mode (``projection`` or ``judge``).
        prior_sd: ``σ`` of the pair-fit prior.
        min_val: Fewest validation images per class for a pair fit.
    """
    if label_mode not in LABEL_MODES:
        raise CSMError(
            f"label_mode={label_mode!r}: unknown label mode; use one of {', '.join(LABEL_MODES)}"
        )
    if label_mode == "pair-fit" and mode != "projection":
        raise CSMError(
            f"label_mode='pair-fit': fits the squash of the prototype projection, which "
            f"--mode {mode} does not compute; use --mode projection"
        )
    if not math.isfinite(prior_sd) or prior_sd <= 0:
        raise CSMError(f"pair_fit_prior_sd={prior_sd}: must be a positive number (e.g. 4.0)")
    if min_val < 1:
        raise CSMError(f"pair_fit_min_val={min_val}: must be >= 1 (e.g. 10)")


# ------------------------------------------------------------------------------------ judge
def prototype_logits(features: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each feature to each class prototype, ``(N, K)`` float64.

    The logits of the prototype classifier (nearest prototype by angle) that serves as the
    judge for encoders without a classification head.
    """
    f = features.double()
    p = protos.double()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-300)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return f @ p.T


def project_products(
    fp: torch.Tensor,
    pp: torch.Tensor,
    rows: torch.Tensor,
    class_a: torch.Tensor,
    class_b: torch.Tensor,
) -> torch.Tensor:
    """λ̂ = <f − p_b, p_a − p_b> / ||p_a − p_b||² from the products ``fp = F Pᵀ`` and
    ``pp = P Pᵀ`` (float64), for the features ``F[rows]`` against the pairs ``(class_a,
    class_b)``.

    The core of :func:`csm.annotation.annotate.project`; given the products once, any number of
    (image, pair) rows costs no further matmul (the pair fit projects every real val image on
    every pair of its class).

    Raises:
        CSMError: Two prototypes coincide (the projection is undefined).
    """
    num = fp[rows, class_a] - fp[rows, class_b] - pp[class_b, class_a] + pp[class_b, class_b]
    denom = pp[class_a, class_a] - 2 * pp[class_a, class_b] + pp[class_b, class_b]
    if (denom <= 1e-12 * pp.diagonal().max().clamp_min(1e-300)).any():
        raise CSMError("prototypes: two classes have identical prototypes; use another encoder")
    return num / denom


def pair_margin(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``z[i, a_i] − z[i, b_i]`` per row, float64."""
    rows = torch.arange(len(a))
    return (z[rows, a] - z[rows, b]).double()


@dataclass
class JudgeCalibration:
    """A judge's temperature, fitted on real validation logits; maps pair margins to soft[a].

    Attributes:
        judge: ``classifier`` (the encoder's head) or ``prototype-cosine``.
        temperature: The fitted ``T`` (1.0 when the guard fell back).
        fallback: Why the guard kept ``T = 1`` (error-free or tiny split), else ``None``.
        val_size: Real validation images the fit saw.
        val_nll: Their NLL at ``T = 1``.
        val_nll_calibrated: Their NLL at the fitted ``T``.
        val_accuracy: The judge's accuracy on them.
    """

    judge: str
    temperature: float
    fallback: str | None
    val_size: int
    val_nll: float
    val_nll_calibrated: float
    val_accuracy: float

    def share(self, margin: torch.Tensor) -> np.ndarray:
        """``sigmoid((z_a − z_b) / T)`` as float64."""
        return torch.sigmoid(margin.double() / self.temperature).numpy()

    def record(self) -> dict[str, Any]:
        """The fit as a JSON-able dict (the manifest's ``label_fit``)."""
        return {
            "judge": self.judge,
            "temperature": self.temperature,
            "criterion": "nll",
            "guard_fallback": self.fallback,
            "val_size": self.val_size,
            "val_nll": self.val_nll,
            "val_nll_calibrated": self.val_nll_calibrated,
            "val_accuracy": self.val_accuracy,
        }


def fit_judge(val_logits: torch.Tensor, val_labels: torch.Tensor, judge: str) -> JudgeCalibration:
    """Temperature of a judge by :class:`TemperatureScaling` (NLL) on real validation logits.

    Args:
        val_logits: ``(N, K)`` logits of the real validation images.
        val_labels: ``(N,)`` their labels.
        judge: ``classifier`` or ``prototype-cosine`` (recorded).

    Raises:
        CSMError: Empty or malformed logits.
    """
    if val_logits.ndim != 2 or val_logits.shape[0] == 0:
        raise CSMError(
            "real dataset: its val split has no image, so the judge's temperature cannot be "
            "fitted; use a real dataset with a validation split (csm data-info shows it)"
        )
    ts = TemperatureScaling(criterion="nll").fit(val_logits, val_labels)
    z, y = val_logits.double(), val_labels.long()
    t = float(ts.temperature)
    nll = torch.nn.functional.cross_entropy
    fit = JudgeCalibration(
        judge=judge,
        temperature=t,
        fallback=ts.fallback,
        val_size=int(len(y)),
        val_nll=float(nll(z, y)),
        val_nll_calibrated=float(nll(z / t, y)),
        val_accuracy=float((z.argmax(1) == y).double().mean()),
    )
    logger.info(
        "judge (%s): T = %.4g on %d real val images (NLL %.4f -> %.4f)%s",
        judge,
        t,
        fit.val_size,
        fit.val_nll,
        fit.val_nll_calibrated,
        f"; guard: {fit.fallback}" if fit.fallback else "",
    )
    return fit


# ------------------------------------------------------------------------------------ pair fit
def _objective(
    theta: np.ndarray, x: np.ndarray, sign: np.ndarray, prior: np.ndarray, prec: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """Penalised NLL of ``logit = s · x + β`` (``x = λ̂ − ½``), its gradient and Hessian."""
    s, beta = theta
    eta = s * x + beta
    m = sign * eta  # margin of each label
    loss = float(np.logaddexp(0.0, -m).sum() + 0.5 * prec * np.sum((theta - prior) ** 2))
    p = 0.5 * (1.0 + np.tanh(0.5 * eta))  # sigmoid, stable
    r = p - (sign > 0)  # d loss / d eta
    w = p * (1.0 - p)
    grad = np.array([np.dot(r, x), r.sum()]) + prec * (theta - prior)
    hess = np.array([[np.dot(w, x * x), np.dot(w, x)], [np.dot(w, x), w.sum()]])
    return loss, grad, hess + prec * np.eye(2)


def fit_pair_squash(
    lam_hat: np.ndarray, is_a: np.ndarray, prior_s: float = 4.0, prior_sd: float = 4.0
) -> tuple[float, float]:
    """MAP ``(s, t)`` of ``P(y = a | λ̂) = sigmoid(s · (λ̂ − t))`` (see the module docstring).

    Minimises ``Σ log(1 + exp(−±(s · (λ̂ − ½) + β))) + ((s − s₀)² + β²) / (2σ²)`` by damped
    Newton steps (convex, so the optimum is unique and the result deterministic), then
    ``t = ½ − β / s``.

    Args:
        lam_hat: Projections of the real validation images of the two classes.
        is_a: Whether each image is of class ``a``.
        prior_s: ``s₀``, the centre of the prior on the slope (the paper's squash).
        prior_sd: ``σ``, the prior's standard deviation.

    Returns:
        ``(s, t)``; ``t`` is ``nan`` when the fitted slope is not positive.
    """
    x = np.asarray(lam_hat, dtype=np.float64) - PAPER_OFFSET
    sign = np.where(np.asarray(is_a, dtype=bool), 1.0, -1.0)
    prior = np.array([float(prior_s), 0.0])
    prec = 1.0 / float(prior_sd) ** 2
    theta = prior.copy()
    loss, grad, hess = _objective(theta, x, sign, prior, prec)
    for _ in range(_NEWTON_ITERS):
        step = np.linalg.solve(hess, grad)
        rate = 1.0
        while rate > 1e-10:  # backtracking: the loss never increases
            cand = theta - rate * step
            c_loss, c_grad, c_hess = _objective(cand, x, sign, prior, prec)
            if c_loss <= loss:
                break
            rate *= 0.5
        else:
            break
        theta, loss, grad, hess = cand, c_loss, c_grad, c_hess
        if np.max(np.abs(rate * step)) < 1e-12 or np.max(np.abs(grad)) < 1e-12:
            break
    s, beta = float(theta[0]), float(theta[1])
    return s, (PAPER_OFFSET - beta / s if s > 0 else math.nan)


@dataclass
class PairFit:
    """One pair's fitted squash (``a < b``; ``λ̂`` points towards ``a``)."""

    s: float
    t: float
    n_val_a: int
    n_val_b: int
    fallback: str | None = None


@dataclass
class PairSquash:
    """Per-pair squashes fitted on real validation images; maps ``λ̂`` to soft[a].

    Attributes:
        fits: ``(a, b)`` with ``a < b`` -> its :class:`PairFit`.
        prior_s: ``s₀`` (also the fallback slope).
        prior_sd: ``σ`` of the prior.
        min_val: Fewest validation images per class for a fit.
        val_size: Real validation images available.
        class_names: Names of the classes (for the record).
    """

    fits: dict[tuple[int, int], PairFit]
    prior_s: float
    prior_sd: float
    min_val: int
    val_size: int
    class_names: list[str] = field(default_factory=list)

    def share(self, lam_hat: np.ndarray, class_a: np.ndarray, class_b: np.ndarray) -> np.ndarray:
        """``sigmoid(s_ab · (λ̂ − t_ab))`` as float32 (a swapped pair uses ``(s, 1 − t)``)."""
        a = np.asarray(class_a, dtype=np.int64)
        b = np.asarray(class_b, dtype=np.int64)
        k = max([len(self.class_names), *(hi + 1 for _, hi in self.fits)])
        slope = np.full((k, k), np.nan)  # slope[a, b], offset[a, b]: one lookup per row
        offset = np.full((k, k), np.nan)
        for (lo, hi), fit in self.fits.items():
            slope[lo, hi] = slope[hi, lo] = fit.s
            offset[lo, hi], offset[hi, lo] = fit.t, 1.0 - fit.t
        s, t = slope[a, b], offset[a, b]
        if np.isnan(s).any():
            i = int(np.flatnonzero(np.isnan(s))[0])
            raise CSMError(f"pair-fit: pair ({a[i]}, {b[i]}) was not fitted; annotate again")
        x = torch.as_tensor(np.asarray(lam_hat, dtype=np.float64))
        share = torch.sigmoid(torch.from_numpy(s) * (x - torch.from_numpy(t)))
        return share.numpy().astype(np.float32)

    def record(self) -> dict[str, Any]:
        """The fits as a JSON-able dict (the manifest's ``label_fit``)."""
        names = self.class_names
        pairs = {
            f"{names[a]}|{names[b]}": {
                "s": f.s,
                "t": f.t,
                "n_val_a": f.n_val_a,
                "n_val_b": f.n_val_b,
                "fallback": f.fallback,
            }
            for (a, b), f in sorted(self.fits.items())
        }
        return {
            "regulariser": "gaussian-prior-map",
            "prior": {"s": self.prior_s, "t": PAPER_OFFSET, "sd": self.prior_sd},
            "min_val_per_class": self.min_val,
            "val_size": self.val_size,
            "num_fallback": sum(f.fallback is not None for f in self.fits.values()),
            "pairs": pairs,
        }


def fit_pairs(
    pairs: list[tuple[int, int]],
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    protos: torch.Tensor,
    *,
    class_names: list[str],
    prior_s: float = 4.0,
    prior_sd: float = 4.0,
    min_val: int = 10,
) -> PairSquash:
    """Fit :func:`fit_pair_squash` for every unordered pair in ``pairs`` on real val images.

    Args:
        pairs: ``(class_a, class_b)`` pairs present in the synthetic data (either order).
        val_features: Encoder features of the real validation images.
        val_labels: Their labels.
        protos: The class prototypes (real train images).
        class_names: Class names, for warnings and the record.
        prior_s: ``s₀``, the prior's centre and the fallback slope.
        prior_sd: ``σ``.
        min_val: Fewest validation images of each class for a fit.
    """
    y = val_labels.long()
    p = protos.double()
    fp, pp = val_features.double() @ p.T, p @ p.T  # once: every pair reuses them
    members = {k: torch.nonzero(y == k).flatten() for k in range(p.shape[0])}
    fits: dict[tuple[int, int], PairFit] = {}
    for lo, hi in sorted({(min(q), max(q)) for q in pairs}):
        n_a, n_b = len(members[lo]), len(members[hi])
        pair = f"{class_names[lo]}|{class_names[hi]}"
        reason = None
        if min(n_a, n_b) < min_val:
            reason = f"{n_a} and {n_b} real val images (< {min_val} per class)"
        else:
            rows = torch.cat([members[lo], members[hi]])
            a, b = torch.full((len(rows),), lo), torch.full((len(rows),), hi)
            lam = project_products(fp, pp, rows, a, b).numpy()
            s, t = fit_pair_squash(lam, np.arange(len(rows)) < n_a, prior_s, prior_sd)
            if s > 0 and math.isfinite(t):
                fits[(lo, hi)] = PairFit(s, t, n_a, n_b)
                continue
            reason = f"fitted slope {s:.3g} <= 0 (lam_hat does not order the classes)"
        logger.warning(
            "pair-fit: pair %s has %s; it keeps the paper's squash s = %g, t = %g",
            pair,
            reason,
            prior_s,
            PAPER_OFFSET,
        )
        fits[(lo, hi)] = PairFit(float(prior_s), PAPER_OFFSET, n_a, n_b, reason)
    return PairSquash(fits, float(prior_s), float(prior_sd), min_val, int(len(y)), class_names)


def fit_summary(label_mode: str, record: dict[str, Any]) -> str:
    """One line on a fit for logs and the CLI summary."""
    if label_mode == "judge":
        guard = f", guard: {record['guard_fallback']}" if record.get("guard_fallback") else ""
        return (
            f"{record['judge']} judge, T = {record['temperature']:.4g} on "
            f"{record['val_size']} real val images{guard}"
        )
    slopes = [p["s"] for p in record["pairs"].values()]
    lo, hi = (min(slopes), max(slopes)) if slopes else (math.nan, math.nan)
    return (
        f"{len(slopes)} pairs fitted on {record['val_size']} real val images, s in "
        f"[{lo:.3g}, {hi:.3g}], {record['num_fallback']} kept the paper's squash"
    )
