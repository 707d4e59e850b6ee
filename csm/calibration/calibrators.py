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
    """

    name: str = ""
    needs_features: bool = False

    def __init__(self) -> None:
        self.num_classes: int | None = None

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
        with torch.enable_grad():
            self._fit(z.detach().double(), y, feats, head)
        return self

    def __call__(self, logits: Tensorish, features: Tensorish | None = None) -> torch.Tensor:
        """Calibrated probabilities (N, K), float32, rows summing to 1."""
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
        feats = self._features(features, z.shape[0], "features")
        with torch.no_grad():
            return self._apply(z.double(), feats).float().contiguous()

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

    def _fit(self, z, y, features, head) -> None:
        return None

    def _apply(self, z, features) -> torch.Tensor:
        return torch.softmax(z, dim=1)


class TemperatureScaling(Calibrator):
    """softmax(z / T) with T minimising validation NLL (Guo et al., ICML 2017).

    Optimises ``log T`` (so T stays positive) with L-BFGS (strong Wolfe line search), in float64,
    and clamps T to ``[min_temperature, max_temperature]``.

    When every validation prediction is correct the NLL keeps falling as T -> 0, so T is not
    identifiable from that split: the fit then keeps T = 1 (no change) and logs a warning, rather
    than returning a near-zero T that makes every test error infinitely confident.

    Args:
        max_iter: L-BFGS iterations.
        min_temperature: Lower bound of T.
        max_temperature: Upper bound of T.
    """

    name = "ts"

    def __init__(
        self, max_iter: int = 200, min_temperature: float = 0.05, max_temperature: float = 100.0
    ) -> None:
        super().__init__()
        if not 0 < min_temperature <= 1 <= max_temperature:
            raise CSMError(
                f"temperature bounds [{min_temperature}, {max_temperature}]: need "
                "0 < min <= 1 <= max"
            )
        self.max_iter = max_iter
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        self.temperature: float | None = None

    def _fit(self, z, y, features, head) -> None:
        if bool((z.argmax(dim=1) == y).all()):
            logger.warning(
                "temperature scaling: every validation prediction is correct, so T is not "
                "identifiable (NLL falls as T -> 0); keeping T = 1"
            )
            self.temperature = 1.0
            return
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        _lbfgs([log_t], lambda: _nll(z / log_t.exp(), y), self.max_iter)
        t = float(log_t.detach().exp())
        self.temperature = min(max(t, self.min_temperature), self.max_temperature)
        logger.info("temperature scaling: T = %.4f", self.temperature)

    def _apply(self, z, features) -> torch.Tensor:
        return torch.softmax(z / self.temperature, dim=1)

    def params(self) -> dict:
        return {"temperature": self.temperature}


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
        return torch.softmax(z * self.w + self.b, dim=1)

    def params(self) -> dict:
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
    chosen on the validation split from ``grid`` (log-spaced 0.01..20 plus "no clipping") as the
    value with the lowest NLL among those keeping accuracy >= ``min_acc_ratio`` x the unclipped
    accuracy. The logits passed to ``__call__`` are only checked for shape: the output is computed
    from the features.

    Args:
        grid: candidate clip values (default ``geomspace(0.01, 20, 64)``).
        min_acc_ratio: accuracy constraint relative to the unclipped model.
    """

    name = "fc"
    needs_features = True

    def __init__(self, grid: list[float] | None = None, min_acc_ratio: float = 0.99) -> None:
        super().__init__()
        self.grid = list(np.geomspace(0.01, 20.0, 64)) if grid is None else list(grid)
        if not self.grid or min(self.grid) <= 0:
            raise CSMError("grid: clip values must be a non-empty list of positive numbers")
        self.min_acc_ratio = min_acc_ratio
        self.clip: float | None = None
        self._head: Callable | None = None

    def _fit(self, z, y, features, head) -> None:
        run = _as_head(head)
        base = run(features)
        if base.shape != z.shape:
            raise CSMError(
                f"head: maps features to shape {tuple(base.shape)} but val_logits are "
                f"{tuple(z.shape)}; pass the head of the model that produced the logits"
            )
        base_acc = float((base.argmax(1) == y).double().mean())
        best = (float(_nll(base, y)), math.inf)
        for c in self.grid:
            out = run(features.clamp(-c, c))
            acc = float((out.argmax(1) == y).double().mean())
            if acc >= self.min_acc_ratio * base_acc:
                loss = float(_nll(out, y))
                if loss < best[0]:
                    best = (loss, float(c))
        self.clip = best[1]
        self._head = run
        logger.info("feature clipping: c = %s (val NLL %.4f)", self.clip, best[0])

    def _apply(self, z, features) -> torch.Tensor:
        return torch.softmax(self._head(features.clamp(-self.clip, self.clip)), dim=1)

    def params(self) -> dict:
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
