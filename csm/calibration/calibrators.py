"""Post-hoc calibrators, fitted on validation logits and applied to test logits.

Every calibrator follows one protocol::

    cal = CALIBRATORS["ts"]()              # hyper-parameters as keyword arguments
    cal.fit(val_logits, val_labels)        # + val_features=..., head=... when cal.needs_features
    probs = cal(test_logits)               # (N, K) probabilities; + features=... when needed

Logits go in, always (never probabilities); ``fit`` sees only the validation split. ``__call__``
returns probabilities whose rows sum to 1 (some calibrators output exact zeros, so evaluate them
with :func:`csm.calibration.metrics.compute_all_probs`, which clamps before the log in NLL). Fitted
calibrators expose their parameters as attributes (``temperature``, ``clip``, ``sigma``...) and as a
JSON-able :meth:`Calibrator.params` for the evaluation record.

Calibrated logits, as torch-uncertainty's scalers return them (``TemperatureScaler`` and
friends are ``nn.Module`` s whose ``forward`` gives logits): :meth:`Calibrator.logits` is the
calibrator's own logit map where it has one (``z / T`` for ``ts``, ``w * z + b`` for ``vs``, the
head on clipped features for ``fc``, ``z`` for ``none`` and ``alien``) and the log of the
calibrated probabilities otherwise (``hist``, ``isotonic``, ``cc``; zeros become
``log(float64 tiny)`` ~ -708 so the logits stay finite); either way
``softmax(cal.logits(z)) == cal(z)``. :meth:`Calibrator.as_module` wraps a fitted calibrator, and
optionally the model in front of it, as an ``nn.Module`` (:class:`CalibratedModule`)::

    scaled = CALIBRATORS["ts"]().fit(val_logits, val_labels).as_module(model)
    logits = scaled(images)                 # == model(images) / T

Registry :data:`CALIBRATORS`:

* ``none``: plain softmax (the uncalibrated baseline).
* ``ts``: temperature scaling (Guo et al. 2017).
* ``vs``: vector scaling (Guo et al. 2017).
* ``hist``: one-vs-rest histogram binning (Zadrozny & Elkan 2001), renormalised.
* ``isotonic``: one-vs-rest isotonic regression (Zadrozny & Elkan 2002), renormalised.
* ``fc``: feature clipping (Tao et al., arXiv 2410.19796); needs features and the linear head.
* ``cc``: consistency calibration (Tao et al., arXiv 2410.12295); seeded Monte-Carlo.
* ``alien``: ALIEN-style uncertainty head (arXiv 2505.15443); needs features. It leaves the
  probabilities unchanged and adds :meth:`AlienHead.uncertainty` for selective classification.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from csm.calibration.metrics import bin_indices, binned_errors, binned_sums, validate_logits
from csm.errors import CSMError

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATORS",
    "AlienHead",
    "CalibratedModule",
    "Calibrator",
    "ConsistencyCalibration",
    "FeatureClipping",
    "HistogramBinning",
    "Identity",
    "IsotonicCalibration",
    "TemperatureScaling",
    "VectorScaling",
]

Tensorish = torch.Tensor | np.ndarray


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels)


def _ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label ECE (equal-width bins) of probabilities, for model selection on validation."""
    conf, pred = probs.max(1)
    return float(binned_errors(*binned_sums(conf, pred == labels, n_bins))["cal/ECE"])


def _lbfgs(params: list[torch.Tensor], closure: Callable[[], torch.Tensor], iters: int) -> None:
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=iters,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = closure()
        loss.backward()
        return loss

    opt.step(step)


def _renormalise(q: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum; rows summing to 0 fall back to ``fallback`` (the softmax)."""
    s = q.sum(dim=1, keepdim=True)
    return torch.where(s > 0, q / s.clamp(min=torch.finfo(q.dtype).tiny), fallback)


class Calibrator:
    """Base class: validation, the fitted check and the protocol shared by all calibrators.

    Subclasses implement ``_fit(z, y, features, head)`` and ``_apply(z, features) -> probs``.

    Guard (every calibrator with ``guarded = True``, i.e. all but ``none`` and ``alien``): a
    validation split with no misclassified row, or with fewer than ``min_val_samples`` rows,
    cannot identify a calibration map (temperature scaling's NLL keeps falling as T -> 0,
    histogram binning and isotonic regression learn "always right", consistency calibration
    picks the noise that makes every row one-hot). ``fit`` then logs a warning naming the
    reason, records it in :attr:`fallback` and the calibrator returns the plain softmax
    (identity), instead of a map that makes every test error certain.
    """

    name: str = ""
    needs_features: bool = False
    guarded: bool = True
    min_val_samples: int = 5

    def __init__(self) -> None:
        self.num_classes: int | None = None
        self.fallback: str | None = None

    # ---------------------------------------------------------------- protocol
    def fit(
        self,
        val_logits: Tensorish,
        val_labels: Tensorish,
        val_features: Tensorish | None = None,
        head: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Calibrator:
        """Fits on the validation split.

        Args:
            val_logits: (N, K) validation logits.
            val_labels: (N,) validation labels.
            val_features: (N, D) penultimate features (needed when ``needs_features``).
            head: the model's last layer mapping features to logits (needed by ``fc``).

        Returns:
            ``self``.

        Raises:
            CSMError: invalid inputs, or features/head missing for a calibrator that needs them.
        """
        z, y = validate_logits(val_logits, val_labels, name="val_logits", labels_name="val_labels")
        feats = self._features(val_features, z.shape[0], "val_features")
        self.num_classes = z.shape[1]
        self.fallback = self._unidentifiable(z, y) if self.guarded else None
        if self.fallback is not None:
            logger.warning(
                "calibrator %r: %s, so the calibration map is not identifiable; using the plain "
                "softmax (identity)",
                self.name,
                self.fallback,
            )
            self._fit_identity()
            return self
        with torch.enable_grad():
            self._fit(z.detach().double(), y, feats, head)
        return self

    def _unidentifiable(self, z: torch.Tensor, y: torch.Tensor) -> str | None:
        """Why the validation split cannot identify a map (None when it can)."""
        if z.shape[0] < self.min_val_samples:
            return f"the validation split has {z.shape[0]} rows (< {self.min_val_samples})"
        if bool((z.argmax(dim=1) == y).all()):
            return "every validation prediction is correct"
        return None

    def _fit_identity(self) -> None:
        """Set the fitted parameters to the identity map (called by the guard)."""

    def __call__(self, logits: Tensorish, features: Tensorish | None = None) -> torch.Tensor:
        """Calibrated probabilities (N, K), float32, rows summing to 1."""
        z, feats = self._inputs(logits, features)
        if self.fallback is not None:
            return torch.softmax(z, dim=1).float().contiguous()
        with torch.no_grad():
            return self._apply(z, feats).float().contiguous()

    def logits(self, logits: Tensorish, features: Tensorish | None = None) -> torch.Tensor:
        """Calibrated logits (N, K), float32: ``softmax(cal.logits(z)) == cal(z)``.

        The calibrator's own logit map (``z / T``, ``w * z + b``, ...) where it has one, else
        ``log`` of the calibrated probabilities, clamped at the smallest float64 so they stay
        finite (see the module docstring).
        """
        z, feats = self._inputs(logits, features)
        if self.fallback is not None:
            return z.float().contiguous()
        with torch.no_grad():
            return self._logits(z, feats).float().contiguous()

    def as_module(self, model: nn.Module | None = None) -> CalibratedModule:
        """This fitted calibrator as an ``nn.Module`` returning calibrated logits.

        Args:
            model: Optional classifier in front of it: ``forward(x)`` is then
                ``self.logits(model(x))`` (torch-uncertainty's ``TemperatureScaler(model)``).
        """
        return CalibratedModule(self, model)

    def _inputs(
        self, logits: Tensorish, features: Tensorish | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validated float64 logits and features of a fitted calibrator."""
        if self.num_classes is None:
            raise CSMError(
                f"calibrator {self.name!r}: not fitted; call fit(val_logits, val_labels) first"
            )
        z, _ = validate_logits(logits)
        if z.shape[1] != self.num_classes:
            raise CSMError(
                f"logits: {z.shape[1]} classes but calibrator {self.name!r} was fitted on "
                f"{self.num_classes}; apply it to the model it was fitted for"
            )
        if self.fallback is not None:
            return z.double(), None
        return z.double(), self._features(features, z.shape[0], "features")

    def _logits(self, z: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Calibrated logits; default: log of the probabilities, zeros clamped to float64 tiny."""
        return self._apply(z, features).clamp(min=torch.finfo(torch.float64).tiny).log()

    def params(self) -> dict:
        """The fitted parameters as a JSON-able dict."""
        return {}

    # ---------------------------------------------------------------- helpers
    def _features(self, feats: Tensorish | None, n: int, what: str) -> torch.Tensor | None:
        if not self.needs_features:
            return None
        if feats is None:
            raise CSMError(
                f"{what}: calibrator {self.name!r} needs the penultimate features; pass "
                "model.forward_features(x) for the same samples"
            )
        f = torch.as_tensor(feats)
        if f.dim() != 2 or f.shape[0] != n:
            raise CSMError(
                f"{what}: expected shape ({n}, D) to match the logits, got {tuple(f.shape)}"
            )
        f = f.double()
        if not bool(torch.isfinite(f).all()):
            raise CSMError(f"{what}: {int((~torch.isfinite(f)).sum())} non-finite value(s)")
        return f

    def _fit(self, z, y, features, head) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, z, features) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Identity(Calibrator):
    """Plain softmax: the uncalibrated baseline."""

    name = "none"
    guarded = False

    def _fit(self, z, y, features, head) -> None:
        return None

    def _apply(self, z, features) -> torch.Tensor:
        return torch.softmax(z, dim=1)

    def _logits(self, z, features) -> torch.Tensor:
        return z


class TemperatureScaling(Calibrator):
    """softmax(z / T) with T fitted on the validation split (Guo et al., ICML 2017).

    ``criterion="nll"`` (default): T minimises validation NLL, optimised as ``log T`` (so T stays
    positive) with L-BFGS (strong Wolfe line search) in float64, as Guo et al. and their
    reference ``gpleiss/temperature_scaling`` (``temperature_scaling.py``, which uses L-BFGS on
    NLL). ``criterion="ece"``: T is the point of ``grid`` (default 100 log-spaced values over
    [0.1, 10]) with the lowest validation ECE (15 equal-width bins), the criterion of the CSM
    paper's tables (issue 13's reading of E-Galois/CSM; the grid's spacing could not be
    verified there); ties go to the T closest to 1.

    T is limited to ``[min_temperature, max_temperature]`` (default [1e-3, 1e3], wide enough
    not to bind on a trained network); when the fit lands on a bound a warning names it, never
    silently. Error-free or tiny validation splits fall back to T = 1 (see :class:`Calibrator`).

    Args:
        max_iter: L-BFGS iterations (``nll``).
        min_temperature: Lower bound of T.
        max_temperature: Upper bound of T.
        criterion: ``"nll"`` or ``"ece"``.
        grid: candidate temperatures for ``ece`` (default ``geomspace(0.1, 10, 100)``).
    """

    name = "ts"

    def __init__(
        self,
        max_iter: int = 200,
        min_temperature: float = 1e-3,
        max_temperature: float = 1e3,
        criterion: str = "nll",
        grid: list[float] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < min_temperature <= 1 <= max_temperature:
            raise CSMError(
                f"temperature bounds [{min_temperature}, {max_temperature}]: need "
                "0 < min <= 1 <= max"
            )
        if criterion not in ("nll", "ece"):
            raise CSMError(f"criterion={criterion!r}: unknown; use nll or ece")
        self.max_iter = max_iter
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        self.criterion = criterion
        self.grid = list(np.geomspace(0.1, 10.0, 100)) if grid is None else list(grid)
        if not self.grid or min(self.grid) <= 0:
            raise CSMError("grid: temperatures must be a non-empty list of positive numbers")
        self.temperature: float | None = None

    def _fit_identity(self) -> None:
        self.temperature = 1.0

    def _fit(self, z, y, features, head) -> None:
        if self.criterion == "ece":
            eces = [_ece(torch.softmax(z / t, dim=1), y) for t in self.grid]
            best = min(range(len(self.grid)), key=lambda i: (eces[i], abs(math.log(self.grid[i]))))
            t = float(self.grid[best])
        else:
            log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
            _lbfgs([log_t], lambda: _nll(z / log_t.exp(), y), self.max_iter)
            t = float(log_t.detach().exp())
        clamped = min(max(t, self.min_temperature), self.max_temperature)
        if clamped != t or clamped in (self.min_temperature, self.max_temperature):
            logger.warning(
                "temperature scaling: fitted T = %.4g sits on the bound [%g, %g]; T = %.4g. "
                "Widen min_temperature / max_temperature if the model needs it",
                t,
                self.min_temperature,
                self.max_temperature,
                clamped,
            )
        self.temperature = clamped
        logger.info("temperature scaling (%s): T = %.4f", self.criterion, self.temperature)

    def _apply(self, z, features) -> torch.Tensor:
        return torch.softmax(self._logits(z, features), dim=1)

    def _logits(self, z, features) -> torch.Tensor:
        return z / self.temperature

    def params(self) -> dict:
        return {
            "temperature": self.temperature,
            "criterion": self.criterion,
            **({"fallback": self.fallback} if self.fallback is not None else {}),
        }


class VectorScaling(Calibrator):
    """softmax(w * z + b) with per-class w, b minimising validation NLL (Guo et al., ICML 2017).

    Args:
        max_iter: L-BFGS iterations.
        weight_decay: L2 penalty on ``(w - 1, b)`` (0 = plain maximum likelihood).
    """

    name = "vs"

    def __init__(self, max_iter: int = 200, weight_decay: float = 0.0) -> None:
        super().__init__()
        if weight_decay < 0:
            raise CSMError(f"weight_decay: {weight_decay} < 0; use 0 or a small positive value")
        self.max_iter = max_iter
        self.weight_decay = weight_decay
        self.w: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    def _fit(self, z, y, features, head) -> None:
        k = z.shape[1]
        w = torch.ones(k, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            reg = self.weight_decay * (((w - 1) ** 2).sum() + (b**2).sum())
            return _nll(z * w + b, y) + reg

        _lbfgs([w, b], loss, self.max_iter)
        self.w, self.b = w.detach(), b.detach()

    def _apply(self, z, features) -> torch.Tensor:
        return torch.softmax(self._logits(z, features), dim=1)

    def _logits(self, z, features) -> torch.Tensor:
        return z * self.w + self.b

    def params(self) -> dict:
        if self.fallback is not None:
            return {"fallback": self.fallback}
        return {"w": self.w.tolist(), "b": self.b.tolist()}


class HistogramBinning(Calibrator):
    """One-vs-rest histogram binning (Zadrozny & Elkan, ICML 2001), renormalised.

    For every class k the softmax probability p_k is binned into ``n_bins`` equal-width bins
    (the :mod:`csm.calibration.metrics` convention) and replaced by the validation frequency of ``y
    = k`` in that bin. Bins with no validation sample keep their centre. Rows are renormalised to
    sum to 1; a row whose binned values are all 0 falls back to the softmax.

    Args:
        n_bins: equal-width bins per class.
    """

    name = "hist"

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        if n_bins < 1:
            raise CSMError(f"n_bins: {n_bins} is not a positive integer; use e.g. 15")
        self.n_bins = n_bins
        self.table: torch.Tensor | None = None  # (K, n_bins)

    def _fit(self, z, y, features, head) -> None:
        p = torch.softmax(z, dim=1)
        n, k = p.shape
        key = (bin_indices(p, self.n_bins) + torch.arange(k) * self.n_bins).flatten()
        count = torch.bincount(key, minlength=k * self.n_bins).double()
        onehot = nn.functional.one_hot(y, k).double().flatten()
        hits = torch.zeros(k * self.n_bins, dtype=torch.float64).index_add_(0, key, onehot)
        centres = (torch.arange(self.n_bins, dtype=torch.float64) + 0.5) / self.n_bins
        table = torch.where(count > 0, hits / count.clamp(min=1), centres.repeat(k))
        self.table = table.view(k, self.n_bins)

    def _apply(self, z, features) -> torch.Tensor:
        p = torch.softmax(z, dim=1)
        q = self.table.gather(1, bin_indices(p, self.n_bins).T).T
        return _renormalise(q, p)

    def params(self) -> dict:
        if self.fallback is not None:
            return {"fallback": self.fallback}
        return {"n_bins": self.n_bins, "table": self.table.tolist()}


class IsotonicCalibration(Calibrator):
    """One-vs-rest isotonic regression (Zadrozny & Elkan, KDD 2002), renormalised.

    Fits ``sklearn.isotonic.IsotonicRegression(out_of_bounds="clip")`` of ``1[y = k]`` on p_k for
    every class; rows are renormalised, all-zero rows fall back to the softmax.
    """

    name = "isotonic"

    def __init__(self) -> None:
        super().__init__()
        self.models: list = []

    def _fit(self, z, y, features, head) -> None:
        from sklearn.isotonic import IsotonicRegression

        p = torch.softmax(z, dim=1).numpy()
        yy = y.numpy()
        self.models = []
        for k in range(p.shape[1]):
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            iso.fit(p[:, k], (yy == k).astype(np.float64))
            self.models.append(iso)

    def _apply(self, z, features) -> torch.Tensor:
        p = torch.softmax(z, dim=1)
        pn = p.numpy()
        q = np.stack([m.predict(pn[:, k]) for k, m in enumerate(self.models)], axis=1)
        return _renormalise(torch.from_numpy(np.ascontiguousarray(q)).double(), p)

    def params(self) -> dict:
        if self.fallback is not None:
            return {"fallback": self.fallback}
        return {
            "thresholds_x": [m.X_thresholds_.tolist() for m in self.models],
            "thresholds_y": [m.y_thresholds_.tolist() for m in self.models],
        }


def _as_head(head) -> Callable[[torch.Tensor], torch.Tensor]:
    if head is None:
        raise CSMError(
            "head: calibrator 'fc' needs the model's last layer (model.head) to map clipped "
            "features to logits; pass head=model.head"
        )
    if not callable(head):
        raise CSMError(f"head: {type(head).__name__} is not callable; pass model.head")

    def run(f: torch.Tensor) -> torch.Tensor:
        if isinstance(head, nn.Module):
            param = next(head.parameters(), None)
            dtype = param.dtype if param is not None else torch.float32
            with torch.no_grad():
                return head(f.to(dtype)).double()
        with torch.no_grad():
            return torch.as_tensor(head(f)).double()

    return run


class FeatureClipping(Calibrator):
    """Feature clipping (Tao et al., "Feature Clipping for Uncertainty Calibration", 2024).

    Penultimate features are clamped to ``[-c, c]`` and passed through the head again. ``c`` is
    chosen on the validation split from ``grid`` (log-spaced 0.01..20) plus "no clipping".
    ``criterion="ece"`` (default) takes the value with the lowest validation ECE (15 equal-width
    bins) with no accuracy constraint, as the reference code does (issue 13's reading of the
    Feature Clipping repository; see ``docs/fidelity.md``); ``criterion="nll"`` takes the lowest
    validation NLL among the values keeping accuracy >= ``min_acc_ratio`` x the unclipped
    accuracy (our earlier default). Ties keep the larger c (less clipping). The logits passed to
    ``__call__`` are only checked for shape: the output is computed from the features.

    Args:
        grid: candidate clip values (default ``geomspace(0.01, 20, 64)``).
        min_acc_ratio: accuracy constraint relative to the unclipped model (default: 0 for
            ``ece``, i.e. none; 0.99 for ``nll``).
        criterion: ``"ece"`` or ``"nll"``.
    """

    name = "fc"
    needs_features = True

    def __init__(
        self,
        grid: list[float] | None = None,
        min_acc_ratio: float | None = None,
        criterion: str = "ece",
    ) -> None:
        super().__init__()
        self.grid = list(np.geomspace(0.01, 20.0, 64)) if grid is None else list(grid)
        if not self.grid or min(self.grid) <= 0:
            raise CSMError("grid: clip values must be a non-empty list of positive numbers")
        if criterion not in ("ece", "nll"):
            raise CSMError(f"criterion={criterion!r}: unknown; use ece or nll")
        self.criterion = criterion
        default_ratio = 0.0 if criterion == "ece" else 0.99
        self.min_acc_ratio = default_ratio if min_acc_ratio is None else float(min_acc_ratio)
        self.clip: float | None = None
        self._head: Callable | None = None

    def _score(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        if self.criterion == "ece":
            return _ece(torch.softmax(logits, dim=1), y)
        return float(_nll(logits, y))

    def _fit_identity(self) -> None:
        self.clip = math.inf

    def _fit(self, z, y, features, head) -> None:
        run = _as_head(head)
        base = run(features)
        if base.shape != z.shape:
            raise CSMError(
                f"head: maps features to shape {tuple(base.shape)} but val_logits are "
                f"{tuple(z.shape)}; pass the head of the model that produced the logits"
            )
        base_acc = float((base.argmax(1) == y).double().mean())
        best = (self._score(base, y), math.inf)
        for c in sorted(self.grid, reverse=True):
            out = run(features.clamp(-c, c))
            acc = float((out.argmax(1) == y).double().mean())
            if acc >= self.min_acc_ratio * base_acc:
                score = self._score(out, y)
                if score < best[0]:
                    best = (score, float(c))
        self.clip = best[1]
        self._head = run
        logger.info("feature clipping: c = %s (val %s %.4f)", self.clip, self.criterion, best[0])

    def _apply(self, z, features) -> torch.Tensor:
        return torch.softmax(self._logits(z, features), dim=1)

    def _logits(self, z, features) -> torch.Tensor:
        return self._head(features.clamp(-self.clip, self.clip))

    def params(self) -> dict:
        if self.fallback is not None:
            return {"fallback": self.fallback}
        return {"clip": self.clip}


class ConsistencyCalibration(Calibrator):
    """Consistency calibration (Tao et al., arXiv 2410.12295).

    The logits are perturbed ``num_samples`` times with i.i.d. noise of scale ``sigma`` (Gaussian
    N(0, sigma^2) or uniform on [-sigma, sigma]); the probability of class k is the frequency with
    which k is the argmax (``mode="vote"``) or the mean softmax of the perturbed logits
    (``mode="mean"``). ``sigma`` is picked from ``sigmas`` by validation ECE (15 bins), with the
    same noise draws for every candidate. The noise comes from a ``torch.Generator`` seeded with
    ``seed`` at every call, so outputs are reproducible. Vote frequencies can be exactly 0;
    evaluate with :func:`csm.calibration.metrics.compute_all_probs` (clamped NLL).

    Args:
        num_samples: perturbations M.
        noise: ``"gaussian"`` or ``"uniform"``.
        mode: ``"vote"`` or ``"mean"``.
        sigmas: candidate scales (default log-spaced 0.01..10, 16 values).
        seed: seed of the noise.
    """

    name = "cc"
    _CHUNK = 1 << 21  # perturbed-logit elements per chunk (sigmas x draws x N x K)

    def __init__(
        self,
        num_samples: int = 1000,
        noise: str = "gaussian",
        mode: str = "vote",
        sigmas: list[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if noise not in ("gaussian", "uniform"):
            raise CSMError(f"noise: {noise!r} is not 'gaussian' or 'uniform'")
        if mode not in ("vote", "mean"):
            raise CSMError(f"mode: {mode!r} is not 'vote' or 'mean'")
        if num_samples < 1:
            raise CSMError(f"num_samples: {num_samples} < 1; use e.g. 1000")
        self.num_samples = num_samples
        self.noise = noise
        self.mode = mode
        self.sigmas = list(np.geomspace(0.01, 10.0, 16)) if sigmas is None else list(sigmas)
        self.seed = seed
        self.sigma: float | None = None

    def _perturbed(self, z: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
        """(len(sigmas), N, K) probabilities for every candidate sigma, shared noise."""
        n, k = z.shape
        n_s = len(sigmas)
        z = z.float()
        gen = torch.Generator().manual_seed(self.seed)
        out = torch.zeros(n_s, n, k, dtype=torch.float64)
        step = max(1, self._CHUNK // (n_s * n * k))
        s = torch.tensor(sigmas, dtype=torch.float32).view(-1, 1, 1, 1)
        base = (torch.arange(n_s).view(-1, 1, 1) * n + torch.arange(n).view(1, 1, -1)) * k
        for m0 in range(0, self.num_samples, step):
            m = min(step, self.num_samples - m0)
            if self.noise == "gaussian":
                eps = torch.randn(m, n, k, generator=gen)
            else:
                eps = torch.rand(m, n, k, generator=gen) * 2 - 1
            zz = z.unsqueeze(0) + s * eps.unsqueeze(0)  # (S, m, N, K)
            if self.mode == "vote":
                key = (base + zz.argmax(-1)).flatten()
                out.view(-1).index_add_(0, key, torch.ones(key.numel(), dtype=torch.float64))
            else:
                out += torch.softmax(zz, dim=-1).sum(1).double()
        return out / self.num_samples

    def _fit(self, z, y, features, head) -> None:
        probs = self._perturbed(z, self.sigmas)
        eces = []
        for q in probs:
            conf, pred = q.max(1)
            eces.append(binned_errors(*binned_sums(conf, pred == y, 15))["cal/ECE"])
        best = int(np.argmin(eces))
        self.sigma = float(self.sigmas[best])
        self.val_ece = float(eces[best])
        logger.info("consistency calibration: sigma = %.4g (val ECE %.4f)", self.sigma, eces[best])

    def _apply(self, z, features) -> torch.Tensor:
        return self._perturbed(z, [self.sigma])[0]

    def params(self) -> dict:
        if self.fallback is not None:
            return {"fallback": self.fallback}
        return {
            "sigma": self.sigma,
            "num_samples": self.num_samples,
            "noise": self.noise,
            "mode": self.mode,
            "seed": self.seed,
        }


def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z, dim=1)
    return -(logp.exp() * logp).sum(1)


class AlienHead(Calibrator):
    """ALIEN-style uncertainty head (after arXiv 2505.15443).

    ``u = H(softmax(z)) + g(h)``: predictive entropy plus a small MLP ``g`` on the penultimate
    features ``h`` (standardised with validation statistics), whose last layer starts at zero so
    ``u`` starts as the entropy. ``g`` is trained on the validation split to rank errors above
    correct predictions (target ``1 - a``): a pairwise logistic loss over (error, correct) pairs
    plus ``reg * mean(g(h)^2)`` keeping ``u`` near the entropy. The paper's exact regularisers are
    unverified; these are this implementation's choices. Probabilities are the unchanged softmax;
    use :meth:`uncertainty` with :func:`csm.calibration.metrics.selective_metrics` (on ``-u``) to
    score it.

    Args:
        hidden: hidden width of ``g``.
        epochs: full-batch Adam steps.
        lr: Adam learning rate.
        reg: weight of the penalty keeping ``u`` near the entropy.
        max_pairs: (error, correct) pairs sampled per step.
        seed: seed of the initialisation and of the pair sampling.
    """

    name = "alien"
    needs_features = True
    guarded = False  # leaves the probabilities unchanged; its head handles error-free splits

    def __init__(
        self,
        hidden: int = 64,
        epochs: int = 200,
        lr: float = 1e-2,
        reg: float = 0.1,
        max_pairs: int = 65536,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.hidden, self.epochs, self.lr, self.reg = hidden, epochs, lr, reg
        self.max_pairs, self.seed = max_pairs, seed
        self.g: nn.Sequential | None = None
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None

    def _g(self, features: torch.Tensor) -> torch.Tensor:
        return self.g(((features - self._mean) / self._std).float()).squeeze(1).double()

    def _fit(self, z, y, features, head) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        d = features.shape[1]
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.g = nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
        nn.init.zeros_(self.g[2].weight)
        nn.init.zeros_(self.g[2].bias)
        self._mean = features.mean(0)
        self._std = features.std(0, unbiased=False).clamp(min=1e-6)
        ent = _entropy(z)
        wrong = torch.nonzero(z.argmax(1) != y).flatten()
        right = torch.nonzero(z.argmax(1) == y).flatten()
        self.trained_on = {"errors": int(wrong.numel()), "correct": int(right.numel())}
        if wrong.numel() == 0 or right.numel() == 0:
            logger.warning(
                "alien: validation has %s; the head stays at the entropy",
                "no errors" if wrong.numel() == 0 else "no correct predictions",
            )
            return
        opt = torch.optim.Adam(self.g.parameters(), lr=self.lr)
        threads = torch.get_num_threads()
        # a tiny full-batch MLP: extra intra-op threads only add synchronisation cost
        torch.set_num_threads(1)
        try:
            self._train(opt, features, ent, wrong, right, gen)
        finally:
            torch.set_num_threads(threads)

    def _train(self, opt, features, ent, wrong, right, gen) -> None:
        for _ in range(self.epochs):
            n_pairs = min(self.max_pairs, wrong.numel() * right.numel())
            wi = wrong[torch.randint(wrong.numel(), (n_pairs,), generator=gen)]
            ri = right[torch.randint(right.numel(), (n_pairs,), generator=gen)]
            g = self._g(features)
            u = ent + g
            loss = nn.functional.softplus(u[ri] - u[wi]).mean() + self.reg * (g**2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def _apply(self, z, features) -> torch.Tensor:
        return torch.softmax(z, dim=1)

    def _logits(self, z, features) -> torch.Tensor:
        return z

    def uncertainty(self, logits: Tensorish, features: Tensorish) -> torch.Tensor:
        """Uncertainty ``u`` per sample (higher = more likely wrong), float64 (N,)."""
        if self.g is None:
            raise CSMError("calibrator 'alien': not fitted; call fit(...) with val_features first")
        z, _ = validate_logits(logits)
        feats = self._features(features, z.shape[0], "features")
        with torch.no_grad():
            return _entropy(z.double()) + self._g(feats)

    def params(self) -> dict:
        return {
            "hidden": self.hidden,
            "epochs": self.epochs,
            "lr": self.lr,
            "reg": self.reg,
            "seed": self.seed,
        }


class CalibratedModule(nn.Module):
    """A fitted :class:`Calibrator` as an ``nn.Module`` whose ``forward`` returns logits.

    Like torch-uncertainty's scalers (``TemperatureScaler`` etc., which are ``nn.Module`` s
    returning scaled logits), it can stand in for a classifier: wrap the model
    (``cal.as_module(model)``) and ``forward(x)`` gives the calibrated logits of ``model(x)``;
    without a model ``forward(logits)`` maps logits. The calibration map is frozen (fitted on
    validation, no gradient flows through it); outputs keep the input's device and dtype.

    Args:
        calibrator: A fitted calibrator.
        model: Optional classifier in front of it (``features=`` is then not accepted: a
            calibrator that needs features is given logits and features directly).
    """

    def __init__(self, calibrator: Calibrator, model: nn.Module | None = None) -> None:
        super().__init__()
        if calibrator.num_classes is None:
            raise CSMError(
                f"calibrator {calibrator.name!r}: not fitted; call fit(val_logits, val_labels) "
                "before as_module()"
            )
        if model is not None and calibrator.needs_features:
            raise CSMError(
                f"calibrator {calibrator.name!r} needs penultimate features; use as_module() "
                "without a model and call it with (logits, features)"
            )
        self.calibrator = calibrator
        self.model = model

    def forward(self, inputs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated logits of ``inputs`` (logits, or the model's inputs when wrapping one)."""
        z = self.model(inputs) if self.model is not None else inputs
        feats = None if features is None else features.detach().cpu()
        out = self.calibrator.logits(z.detach().cpu(), feats)
        return out.to(device=z.device, dtype=z.dtype if z.is_floating_point() else out.dtype)


CALIBRATORS: dict[str, type[Calibrator]] = {
    "none": Identity,
    "ts": TemperatureScaling,
    "vs": VectorScaling,
    "hist": HistogramBinning,
    "isotonic": IsotonicCalibration,
    "fc": FeatureClipping,
    "cc": ConsistencyCalibration,
    "alien": AlienHead,
}
"""Name -> calibrator class; construct with keyword hyper-parameters, then ``fit``."""
