"""Train-time calibration methods: one registry the trainer drives with one interface.

The trainer builds a method from its hyper-parameters and asks it for the loss of each batch::

    method = build_method(cfg.method, {"gamma": 2.0, ...})  # the options set for the run
    for stage in method.stages(cfg.epochs):               # one stage; refcal: two
        params = stage.parameters(model)                  # model (+ refcal projection head)
        ...  # for each batch of stage.epochs epochs:
        loss, logs = stage.loss(model, batch, StepState(epoch, step, stage_no, generator))
        ...
        method.on_epoch_end()

* :class:`Batch` holds real images ``x`` (float, [0, 1]), integer labels ``y`` ``(N,)``, the
  dataset ``index`` of each image ``(N,)`` (CRL keys its history by it) and, for ``csm``, the
  synthetic images ``syn_x`` and their dense soft labels ``syn_y`` ``(M, K)``.
* :class:`StepState` carries the epoch, step, stage (1 or 2) and the ``torch.Generator`` every
  random choice of a method (mixup coefficients and partners) is drawn from.
* ``logs`` maps names (``"loss"``, ``"loss/ce"``, ...) to detached 0-dim tensors; call
  ``float()`` when writing them, so no device sync happens per step unless you log.
* Hyper-parameters are declared ONCE, as the constructor's ``Annotated[type, help]`` keyword
  arguments (for plain losses, the loss's constructor): :meth:`Method.params` reads them as
  :class:`Param` records, :func:`all_method_params` merges them across methods (the trainer
  derives its ``--gamma``, ``--alpha``, ... flags and their ``--help`` from it) and
  :func:`accepted_params` says what one method accepts. :func:`build_method` takes a flat dict,
  drops ``None`` values and keys the method does not use, and passes the rest as constructor
  keyword arguments. Out-of-range values raise :class:`~csm.errors.CSMError` naming them.
* Models expose ``model(x) -> logits``, ``model.forward_features(x) -> (N, D)`` and
  ``model.head`` (the last ``nn.Linear``); methods that need features use them.
* Methods with state to checkpoint (CRL history, RefCal projection) implement
  ``state_dict()`` / ``load_state_dict()``; save them with the trainer's checkpoint.
* Training plan: :meth:`Method.stages` returns the :class:`Stage` list the trainer runs in
  order (epochs, trainable parameters, loss, whether the trainer augments, whether the stage
  trains the classifier). Most methods have one stage; ``refcal`` has two: SupCon on two views
  (:meth:`RefCalMethod.pretrain_loss`, no classifier yet), then ``model.head`` on the frozen
  encoder with the method named by ``stage2_method``; :meth:`RefCalMethod.stage_epochs` splits
  the epoch budget.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body, self.head = nn.Flatten(), nn.Linear(4, 3)
    ...     def forward_features(self, x):
    ...         return self.body(x)
    ...     def forward(self, x):
    ...         return self.head(self.forward_features(x))
    >>> method = build_method("focal", {"gamma": 2.0, "alpha": None})
    >>> batch = Batch(torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1]), torch.arange(5))
    >>> loss, logs = method.compute_loss(Tiny(), batch, StepState())
    >>> loss.ndim, sorted(logs)
    (0, ['loss'])
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csm.errors import CSMError
from csm.training.batch_transforms import (
    Mixup,
    RankMixupTransform,
    RegMixupTransform,
    SupConViews,
)
from csm.training.losses import (
    LOSSES,
    BrierScore,
    CalibrationLoss,
    ClueLoss,
    CrossEntropy,
    KLDivergence,
    check_choice,
    check_range,
    correctness_ranking_loss,
    supcon_loss,
)

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "Batch",
    "CorrectnessHistory",
    "Method",
    "Param",
    "Stage",
    "StepState",
    "accepted_params",
    "all_method_params",
    "build_method",
    "declared_params",
    "method_param_names",
    "unwrap",
]


# --------------------------------------------------------------------------- data passed in
@dataclass
class Batch:
    """One training batch.

    Attributes:
        x: ``(N, C, H, W)`` float real images in [0, 1] (already augmented by the trainer).
        y: ``(N,)`` int64 labels (or ``(N, K)`` dense targets).
        index: ``(N,)`` int64 dataset indices of the real images (CRL history key).
        syn_x: ``(M, C, H, W)`` synthetic images, or None.
        syn_y: ``(M, K)`` float soft labels of the synthetic images, or None.
    """

    x: Tensor
    y: Tensor
    index: Tensor | None = None
    syn_x: Tensor | None = None
    syn_y: Tensor | None = None


@dataclass
class StepState:
    """Where the trainer is; ``generator`` is the source of every random choice of a method.

    ``augment`` is the trainer's random augmentation ``augment(x) -> x'`` (bound to its
    generator and to this process's rows of the global batch); a stage that draws its own views
    (:attr:`Stage.augment` False, e.g. RefCal's SupCon stage) calls it.
    """

    epoch: int = 0
    step: int = 0
    stage: int = 1
    generator: torch.Generator | None = None
    augment: Callable[[Tensor], Tensor] | None = None


LossFn = Callable[[nn.Module, Batch, StepState], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a method, read from its constructor's ``Annotated`` argument.

    Attributes:
        name: Argument name (also the ``csm train`` flag, ``--name``).
        type: ``float``, ``int``, ``str`` or ``bool``.
        default: The method's default.
        help: One-line description.
    """

    name: str
    type: type
    default: Any
    help: str


@dataclass
class Stage:
    """One stage of a method's training plan (:meth:`Method.stages`).

    Attributes:
        epochs: Epochs spent in this stage.
        parameters: ``parameters(model)`` -> the parameters optimised in this stage.
        loss: ``loss(model, batch, state) -> (loss, logs)``.
        augment: The trainer augments the real images before ``loss`` (False: the loss draws
            its own views through ``state.augment``).
        trains_classifier: The stage trains the classifier, so its epochs are validated and
            take part in model selection.
        name: Short label (logs).
        lr: The stage's peak learning rate, or None for the run's ``--lr`` (RefCal's stage 2:
            5, as its reference). The trainer must build this stage's optimiser and schedule
            with it.
        weight_decay: The stage's weight decay, or None for the run's ``--weight-decay``
            (RefCal's stage 2: 0).
    """

    epochs: int
    parameters: Callable[[nn.Module], list[nn.Parameter]]
    loss: LossFn
    augment: bool = True
    trains_classifier: bool = True
    name: str = "train"
    lr: float | None = None
    weight_decay: float | None = None


def declared_params(fn: Callable[..., Any]) -> dict[str, Param]:
    """The hyper-parameters of a constructor: its ``Annotated[type, help]`` keyword arguments."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out: dict[str, Param] = {}
    for name, p in inspect.signature(fn).parameters.items():
        hint = hints.get(name)
        if typing.get_origin(hint) is Annotated and p.default is not p.empty:
            tp, help_text = typing.get_args(hint)[:2]
            out[name] = Param(name, tp, p.default, help_text)
    return out


def _detach(logs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in logs.items()}


def unwrap(model: nn.Module) -> nn.Module:
    """The user model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "head"):
        model = model.module
    return model


def _num_classes(model: nn.Module) -> int:
    head = getattr(unwrap(model), "head", None)
    k = getattr(head, "out_features", None)
    if k is None:
        raise ValueError("model: expected model.head to be the final nn.Linear (out_features = K)")
    return int(k)


def _dense_labels(y: Tensor, model: nn.Module) -> Tensor:
    if y.is_floating_point():
        return y.float()
    return F.one_hot(y.long(), _num_classes(model)).float()


# --------------------------------------------------------------------------- base class
class Method:
    """Base class of a train-time method; see the module docstring for the protocol."""

    name: ClassVar[str] = ""
    needs_synthetic: ClassVar[bool] = False

    # -- construction from a flat hyper-parameter dict ---------------------------------------
    @classmethod
    def params(cls) -> dict[str, Param]:
        """The hyper-parameters this method declares (its constructor's ``Annotated`` args)."""
        return declared_params(cls.__init__)

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Hyper-parameters this method accepts, mapped to their defaults."""
        return {name: p.default for name, p in cls.params().items()}

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> Method:
        """Build from a flat dict, ignoring ``None`` values and keys this method does not use."""
        accepted = cls.param_defaults()
        kwargs = {k: v for k, v in (params or {}).items() if k in accepted and v is not None}
        return cls(**kwargs)

    def hparams(self) -> dict[str, Any]:
        """The resolved hyper-parameters (for run records)."""
        return {k: getattr(self, k) for k in self.param_defaults() if hasattr(self, k)}

    # -- training protocol -------------------------------------------------------------------
    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the scalar loss of a batch and detached logs."""
        raise NotImplementedError  # pragma: no cover

    def extra_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules owned by the method that the trainer must optimise (built on first call)."""
        return []

    def all_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every module of the method trained in any stage (the trainer wraps them with the
        model, so one DistributedDataParallel forward covers them)."""
        return self.extra_modules(model)

    def stage_parameters(self, model: nn.Module, stage: int = 1) -> list[nn.Parameter]:
        """Parameters to optimise in a stage: the model's plus the method's extra modules."""
        params = list(model.parameters())
        for module in self.extra_modules(model):
            params.extend(module.parameters())
        return list(dict.fromkeys(params))

    def stages(self, epochs: int) -> list[Stage]:
        """The training plan: one stage training everything with :meth:`compute_loss`.

        Args:
            epochs: The run's epoch budget.

        Returns:
            The stages in order (their ``epochs`` sum to ``epochs``).
        """
        return [Stage(epochs, lambda model: self.stage_parameters(model, 1), self.compute_loss)]

    def on_epoch_end(self) -> None:
        """Hook called by the trainer after every epoch (methods without epoch state ignore it)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to checkpoint with the trainer state (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{self.name}: unexpected method state keys {sorted(state)}")


def _check_synthetic(batch: Batch, name: str) -> None:
    if batch.syn_x is None or batch.syn_y is None:
        raise CSMError(
            f"synthetic: method {name!r} needs synthetic images; pass --synthetic DIR "
            "(a dataset written by `csm generate`)"
        )


# --------------------------------------------------------------------------- plain losses
class LossMethod(Method):
    """A method that is just a loss on ``model(x)``: ``loss_cls`` from
    :data:`csm.training.losses.LOSSES`.

    The constructor takes the loss's own keyword arguments.
    """

    loss_cls: ClassVar[type[CalibrationLoss]] = CrossEntropy

    def __init__(self, **params: Any) -> None:
        accepted = self.param_defaults()
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise CSMError(
                f"{self.name}: unknown hyper-parameter {unknown[0]!r}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
        self.loss = self.loss_cls(**params)
        for k in accepted:
            setattr(self, k, getattr(self.loss, k))

    @classmethod
    def params(cls) -> dict[str, Param]:
        return declared_params(cls.loss_cls.__init__)

    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.loss(model(batch.x), batch.y)
        return loss, _detach({"loss": loss})


def _loss_method(name: str, loss_name: str, doc: str) -> type[LossMethod]:
    cls = type(
        f"{LOSSES[loss_name].__name__}Method",
        (LossMethod,),
        {"name": name, "loss_cls": LOSSES[loss_name], "__doc__": doc, "__module__": __name__},
    )
    return cls


CEMethod = _loss_method("ce", "ce", "Cross-entropy on the real images.")
LSMethod = _loss_method("ls", "ls", "Label smoothing (alpha = 0.1), see LabelSmoothing.")
BrierMethod = _loss_method("brier", "brier", "Multi-class Brier score, see BrierScore.")
FocalMethod = _loss_method("focal", "focal", "Focal loss (gamma = 3), see FocalLoss.")
FLSD53Method = _loss_method("flsd53", "flsd53", "Sample-dependent focal loss FLSD-53.")
DualFocalMethod = _loss_method("dual_focal", "dual_focal", "Dual focal loss (gamma = 2).")
BSCEGRAMethod = _loss_method("bsce_gra", "bsce_gra", "BSCE-GRA (beta = 2, gamma = 2).")
MMCEMethod = _loss_method("mmce", "mmce", "Cross-entropy + 2 * MMCE, see MMCELoss.")
MbLSMethod = _loss_method("mbls", "mbls", "Margin-based label smoothing (m = 10, 0.1).")


# --------------------------------------------------------------------------- CLUE
def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


class ClueMethod(Method):
    """CLUE (arXiv 2505.22803): align the loss with the predictive uncertainty.

    ``u`` is the entropy of the MC-dropout average of ``mc_samples`` stochastic forward passes
    when the model has active dropout in training mode (the first pass also gives the loss);
    without dropout every pass is identical, so one pass is used. See
    :class:`csm.training.losses.ClueLoss` for ``alpha`` and ``mode``. Logs the batch means of
    ``L_e`` (``loss/err``) and ``u`` (``loss/u``); why alpha = 0.5 under-fits the short CPU
    recipes is in ``docs/fidelity.md`` ("Issue 13: CLUE under-fits").

    Args:
        alpha: weight of the error term in [0, 1] (0.5, [unverified]).
        mode: ``"batch_mean"`` (default) or ``"per_sample"``.
        mc_samples: stochastic passes for ``u`` when dropout exists, >= 1.
    """

    name = "clue"

    def __init__(
        self,
        alpha: Annotated[float, "weight of the error term in [0, 1]"] = 0.5,
        mode: Annotated[str, "statistic alignment: batch_mean or per_sample"] = "batch_mean",
        mc_samples: Annotated[int, "MC-dropout passes when the model has dropout"] = 4,
    ) -> None:
        self.loss = ClueLoss(alpha=alpha, mode=mode)
        self.alpha, self.mode = self.loss.alpha, self.loss.mode
        self.mc_samples = int(check_range("mc_samples", mc_samples, 1.0))
        self._dropout_cache: dict[int, bool] = {}

    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch.x)
        key = id(model)
        if key not in self._dropout_cache:
            self._dropout_cache[key] = _has_dropout(model)
        mc_probs = None
        if self.mc_samples > 1 and model.training and self._dropout_cache[key]:
            probs = F.softmax(logits.float(), dim=1)
            for _ in range(self.mc_samples - 1):
                probs = probs + F.softmax(model(batch.x).float(), dim=1)
            mc_probs = probs / self.mc_samples
        loss = self.loss(logits, batch.y, mc_probs=mc_probs)
        with torch.no_grad():
            err, u = self.loss.components(logits, batch.y, mc_probs)
        return loss, _detach({"loss": loss, "loss/err": err.mean(), "loss/u": u.mean()})


# --------------------------------------------------------------------------- CRL
class CorrectnessHistory:
    """Per-sample correctness counts keyed by dataset index (grows to the largest index seen).

    ``frequency(i) = times correct / times seen`` (0 for unseen samples): the running
    correctness frequency over epochs of CRL. Under multi-process training each process keeps
    the history of the samples it sees.
    """

    def __init__(self) -> None:
        self.correct = torch.zeros(0, dtype=torch.float64)
        self.seen = torch.zeros(0, dtype=torch.float64)

    def _grow(self, index: Tensor) -> None:
        if self.correct.device != index.device:
            self.correct, self.seen = self.correct.to(index.device), self.seen.to(index.device)
        needed = int(index.max().item()) + 1 if index.numel() else 0
        if needed > self.correct.numel():
            pad = needed - self.correct.numel()
            zeros = torch.zeros(pad, dtype=torch.float64, device=index.device)
            self.correct = torch.cat([self.correct, zeros])
            self.seen = torch.cat([self.seen, zeros.clone()])

    def frequency(self, index: Tensor) -> Tensor:
        """Correctness frequency of the samples ``index`` (float64)."""
        self._grow(index)
        seen = self.seen[index]
        return torch.where(
            seen > 0, self.correct[index] / seen.clamp_min(1), torch.zeros_like(seen)
        )

    def update(self, index: Tensor, correct: Tensor) -> None:
        """Record whether each sample ``index`` was classified correctly."""
        self._grow(index)
        self.correct.index_add_(0, index, correct.to(self.correct))
        self.seen.index_add_(0, index, torch.ones_like(self.seen[index]))


class CRLMethod(Method):
    """Correctness Ranking Loss (Moon et al., "Confidence-Aware Learning for Deep Neural
    Networks", ICML 2020): ``CE + weight * correctness_ranking_loss``.

    The ranking term uses the correctness frequencies from before this step; the step's
    correctness is recorded afterwards. Needs ``batch.index``.

    Args:
        weight: lambda >= 0 (default 1).
    """

    name = "crl"

    def __init__(self, weight: Annotated[float, "ranking-loss weight >= 0"] = 1.0) -> None:
        self.weight = check_range("weight", weight, 0.0)
        self.ce = CrossEntropy()
        self.history = CorrectnessHistory()

    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.index is None:
            raise ValueError("batch.index: crl needs the dataset index of every image")
        logits = model(batch.x).float()
        ce = self.ce(logits, batch.y)
        conf, pred = F.softmax(logits, dim=1).max(dim=1)
        index = batch.index.long()
        rank = correctness_ranking_loss(conf, self.history.frequency(index))
        labels = batch.y.argmax(dim=1) if batch.y.is_floating_point() else batch.y
        self.history.update(index, (pred == labels).detach())
        loss = ce + self.weight * rank
        return loss, _detach({"loss": loss, "loss/ce": ce, "loss/rank": rank})

    def state_dict(self) -> dict[str, Tensor]:
        return {"correct": self.history.correct.cpu(), "seen": self.history.seen.cpu()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.history.correct = state["correct"].to(torch.float64).clone()
        self.history.seen = state["seen"].to(torch.float64).clone()


# --------------------------------------------------------------------------- mixup family
class MixupMethod(Method):
    """Mixup (Zhang et al., ICLR 2018): soft cross-entropy on mixed images and mixed targets.

    Args:
        alpha: Beta(alpha, alpha) concentration > 0 (default 0.2).
    """

    name = "mixup"
    transform_cls: ClassVar[type[Mixup]] = Mixup

    def __init__(
        self, alpha: Annotated[float, "Beta(alpha, alpha) concentration > 0"] = 0.2
    ) -> None:
        self.transform = self.transform_cls(alpha)
        self.alpha = self.transform.alpha
        self.ce = CrossEntropy()

    def _mix(
        self, model: nn.Module, batch: Batch, state: StepState | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        y = _dense_labels(batch.y, model)
        generator = state.generator if state is not None else None
        x_mixed, y_mixed = self.transform(batch.x, y, generator)
        return y, x_mixed, y_mixed

    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        _, x_mixed, y_mixed = self._mix(model, batch, state)
        loss = self.ce(model(x_mixed), y_mixed)
        return loss, _detach({"loss": loss})


class RegMixupMethod(MixupMethod):
    """RegMixup (Pinto et al., NeurIPS 2022): ``CE(clean) + weight * CE(mixed)``.

    Clean and mixed images go through the model in one concatenated batch.

    Args:
        alpha: Beta concentration > 0 (default 10).
        weight: eta >= 0 (default 1).
    """

    name = "regmixup"
    transform_cls = RegMixupTransform

    def __init__(
        self,
        alpha: Annotated[float, "Beta(alpha, alpha) concentration > 0"] = 10.0,
        weight: Annotated[float, "weight eta of the mixed term >= 0"] = 1.0,
    ) -> None:
        super().__init__(alpha)
        self.weight = check_range("weight", weight, 0.0)

    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        y, x_mixed, y_mixed = self._mix(model, batch, state)
        n = batch.x.shape[0]
        logits = model(torch.cat([batch.x, x_mixed]))
        clean = self.ce(logits[:n], batch.y)
        mixed = self.ce(logits[n:], y_mixed)
        loss = clean + self.weight * mixed
        return loss, _detach({"loss": loss, "loss/clean": clean, "loss/mixed": mixed})


@contextlib.contextmanager
def frozen_bn_running_stats(model: nn.Module) -> Iterator[None]:
    """Forwards inside leave every BatchNorm's running mean and variance unchanged.

    In train mode BatchNorm still normalises with the batch's own statistics; only the running
    update (``running = (1 - momentum) * running + momentum * batch``) is disabled, by setting
    ``momentum = 0`` (``num_batches_tracked`` still counts). Restored on exit.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum in zip(bns, saved, strict=True):
            m.momentum = momentum


class RankMixupMethod(MixupMethod):
    """RankMixup (Noh et al., ICCV 2023) with the mixup ranking loss (MRL).

    ``CE(clean) + weight * (1/N) sum_i mask_i ReLU(max_k z~_ik - max_k z_ik + margin)``: the top
    logit of a mixed image must sit at least ``margin`` below that of its clean source ``i`` (the
    image carrying weight ``lam``). As in the reference (cvlab-yonsei/RankMixup
    ``calibrate/losses/rankmixup.py``, ``RankMixup_MRL``), ``mask_i`` is 0 when the mixed target
    of row ``i`` is still one-hot (the partner is the image itself or has the same label, or
    ``lam`` is 0 or 1): such a pair is not a mix, so it is never ranked; the mean still divides
    by N. Clean and mixed images go through separate forwards (``model(inputs)`` then
    ``forward_multimixup`` in the reference's ``calibrate/engine/trainer.py``), so BatchNorm
    normalises each with its own statistics; ``joint_forward=True`` concatenates them. Both
    reference forwards run in train mode, so BatchNorm's running statistics (used at evaluation)
    are updated by the clean *and* the mixed batch and describe neither (on mnist5k the running
    variance was 0.80-0.87x the clean one in the first BN layer and 1.15-1.57x in the last, and
    val accuracy fell 6-7 points; ``docs/fidelity.md``). ``mixed_bn_update=False`` (not the
    reference) keeps the mixed forward's batch statistics for training but leaves the running
    statistics to the clean batches; the loss and its gradients are unchanged. Defaults from the
    reference's CIFAR configs: alpha 2 (``configs/model/resnet50_mixup.yaml``), margin 2 and
    weight 0.1 (``configs/loss/mrl.yaml``). The M-NDCG variant is not implemented.

    Args:
        alpha: Beta concentration > 0 (default 2.0).
        margin: m >= 0 (default 2).
        weight: w >= 0 (default 0.1).
        joint_forward: forward clean and mixed images as one batch (default False).
        mixed_bn_update: let the mixed forward update BatchNorm running statistics (default
            True, as the reference; separate forwards only).
    """

    name = "rankmixup"
    transform_cls = RankMixupTransform

    def __init__(
        self,
        alpha: Annotated[float, "Beta(alpha, alpha) concentration > 0"] = 2.0,
        margin: Annotated[float, "ranking margin >= 0"] = 2.0,
        weight: Annotated[float, "weight of the ranking term >= 0"] = 0.1,
        joint_forward: Annotated[bool, "forward clean and mixed images as one batch"] = False,
        mixed_bn_update: Annotated[
            bool, "mixed forward updates BatchNorm running stats (reference: true)"
        ] = True,
    ) -> None:
        super().__init__(alpha)
        self.margin = check_range("margin", margin, 0.0)
        self.weight = check_range("weight", weight, 0.0)
        self.joint_forward = bool(joint_forward)
        self.mixed_bn_update = bool(mixed_bn_update)

    @staticmethod
    def ranking_loss(
        clean_logits: Tensor, mixed_logits: Tensor, mixed_target: Tensor, margin: float
    ) -> Tensor:
        """MRL: ``(1/N) sum_i mask_i ReLU(max z~_i - max z_i + margin)``; ``mask_i = 0`` where
        ``mixed_target`` row i is one-hot (within 1e-6), i.e. row i was not really mixed."""
        gap = mixed_logits.float().max(dim=1).values - clean_logits.float().max(dim=1).values
        mixed = (mixed_target.max(dim=1).values < 1.0 - 1e-6).to(gap.dtype)
        return (mixed * F.relu(gap + margin)).mean()

    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        _, x_mixed, y_mixed = self._mix(model, batch, state)
        n = batch.x.shape[0]
        if self.joint_forward:
            logits = model(torch.cat([batch.x, x_mixed])).float()
            clean_logits, mixed_logits = logits[:n], logits[n:]
        else:
            clean_logits = model(batch.x).float()
            if self.mixed_bn_update:
                mixed_logits = model(x_mixed).float()
            else:
                with frozen_bn_running_stats(model):
                    mixed_logits = model(x_mixed).float()
        clean = self.ce(clean_logits, batch.y)
        mrl = self.ranking_loss(clean_logits, mixed_logits, y_mixed, self.margin)
        loss = clean + self.weight * mrl
        return loss, _detach({"loss": loss, "loss/ce": clean, "loss/mrl": mrl})


# --------------------------------------------------------------------------- CSM
CSM_LOSSES: dict[str, type[CalibrationLoss]] = {
    "l2": BrierScore,
    "soft_ce": CrossEntropy,
    "kl": KLDivergence,
}
"""Loss on the synthetic part of a CSM batch."""


class CSMMethod(Method):
    """Calibration-aware semantic mixing (Luo et al., ICML 2025, arXiv 2504.13548).

    ``L = CE(z_real, y) + synthetic_weight * (1/M) sum_i loss(z_syn_i, soft_label_i)`` with
    ``csm_loss`` ``"l2"`` (multi-class Brier to the soft labels, the paper's choice),
    ``"soft_ce"`` or ``"kl"``. Real and synthetic images pass through the model separately
    (paper default; BatchNorm statistics per part) or as one concatenated batch
    (``joint_forward=True``).

    Args:
        csm_loss: ``"l2"``, ``"soft_ce"`` or ``"kl"``.
        synthetic_weight: weight of the synthetic term >= 0 (paper: 1).
        joint_forward: forward real and synthetic together.
    """

    name = "csm"
    needs_synthetic = True

    def __init__(
        self,
        csm_loss: Annotated[str, "loss on synthetic soft labels: l2 (paper), soft_ce or kl"] = "l2",
        synthetic_weight: Annotated[float, "weight of the synthetic term >= 0 (paper: 1)"] = 1.0,
        joint_forward: Annotated[bool, "forward real and synthetic as one batch"] = False,
    ) -> None:
        self.csm_loss = check_choice("csm_loss", csm_loss, tuple(CSM_LOSSES))
        self.synthetic_weight = check_range("synthetic_weight", synthetic_weight, 0.0)
        self.joint_forward = bool(joint_forward)
        self.real_loss = CrossEntropy()
        self.syn_loss = CSM_LOSSES[self.csm_loss]()

    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        _check_synthetic(batch, self.name)
        if self.joint_forward:
            n = batch.x.shape[0]
            logits = model(torch.cat([batch.x, batch.syn_x.to(batch.x.dtype)]))
            real_logits, syn_logits = logits[:n], logits[n:]
        else:
            real_logits, syn_logits = model(batch.x), model(batch.syn_x)
        real = self.real_loss(real_logits, batch.y)
        syn = self.syn_loss(syn_logits, batch.syn_y)
        loss = real + self.synthetic_weight * syn
        return loss, _detach({"loss": loss, "loss/real": real, "loss/synthetic": syn})


# --------------------------------------------------------------------------- RefCal
class _FrozenEncoder(nn.Module):
    """View of a model whose encoder is frozen (eval mode, no grad) and whose head trains."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model = unwrap(model)
        self.__dict__["_encoder"] = model  # not registered: only the head is a submodule
        self.head = model.head

    def forward_features(self, x: Tensor) -> Tensor:
        encoder = self.__dict__["_encoder"]
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                feats = encoder.forward_features(x)
        finally:
            encoder.train(was_training)
        return feats.detach()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class RefCalMethod(Method):
    """RefCal (arXiv 2605.23249): refinement-first training in two stages.

    Reference code: rhebbalaguppe/RefCal (``main_refcal.py`` for stage 1, ``main_linear.py`` for
    stage 2; its ``ReadMe.md`` runs stage 2 with ``--learning_rate 5``, and ``main_linear.py``'s
    default weight decay is 0).

    Stage 1 trains the encoder with the supervised contrastive loss (Khosla et al., 2020;
    tau = ``temperature``, scaled by ``tau / base_temperature`` as the reference's ``SupConLoss``)
    on two views of each image, through an L2-normalised projection head
    ``Linear(D, D) -> ReLU -> Linear(D, proj_dim)`` owned by the method (returned by
    :meth:`extra_modules`; the trainer optimises it with the model). With ``views="simclr"``
    (default) each view is the trainer's augmentation (crop with padding, flip where the dataset
    allows it) followed by :class:`~csm.training.batch_transforms.SupConViews` (random resized
    crop, colour jitter, random grayscale, the reference's view transform); ``views="trainer"``
    uses the trainer's augmentation alone. The paper derives this loss from the refinement
    objective ``sum_i [min_p 1/2 ||z_i - z_p||^2 - min_n 1/2 ||z_i - z_n||^2]``. Stage 2 trains
    ``model.head`` on the frozen encoder (eval mode, no gradient) with ``stage2_method`` (any
    method but refcal: ce, ls, mmce, crl, ...), whose hyper-parameters come from the same flat
    dict (:meth:`from_params`), at learning rate ``head_lr`` and weight decay
    ``head_weight_decay`` (:attr:`Stage.lr`, :attr:`Stage.weight_decay`; 0 keeps the run's
    value for ``head_lr``).

    Multi-process training: stage 1 leaves the head unused and stage 2 the encoder, and the
    projection head is not part of the model. The trainer therefore wraps model and projection
    (:meth:`all_modules`) in one module whose forward is the stage's loss
    (:class:`csm.training.trainer.StepModule`) and prepares it with
    ``find_unused_parameters=True``. The SupCon loss of a process sees only its own rows'
    positives, so unlike a per-sample mean it depends on the number of processes; the
    :class:`SupConViews` draws come from the method's generator, which every process seeds alike.

    Args:
        temperature: SupCon tau > 0 (default 0.1, the reference README's ``--temp 0.1``).
        proj_dim: projection size >= 1 (default 128).
        stage2_method: method for stage 2 (default ``"ce"``).
        pretrain_fraction: share of the epochs spent in stage 1, in (0, 1) (default 0.5).
        base_temperature: SupCon base tau of the ``tau / base_tau`` scale (default 0.07, the
            reference's); 0 leaves the scale out.
        head_lr: stage-2 peak learning rate (default 5, the reference's); 0 uses ``--lr``.
        head_weight_decay: stage-2 weight decay >= 0 (default 0, the reference's).
        views: stage-1 views, ``"simclr"`` (default) or ``"trainer"``.
        stage2_params: hyper-parameters of the stage-2 method.
    """

    name = "refcal"

    def __init__(
        self,
        temperature: Annotated[float, "stage-1 SupCon temperature > 0"] = 0.1,
        proj_dim: Annotated[int, "projection head output size"] = 128,
        stage2_method: Annotated[str, "stage-2 method on the frozen encoder (ce, ls, ...)"] = "ce",
        pretrain_fraction: Annotated[float, "share of the epochs in stage 1, in (0, 1)"] = 0.5,
        base_temperature: Annotated[float, "SupCon base temperature (0: no tau/base scale)"] = 0.07,
        head_lr: Annotated[float, "stage-2 learning rate (reference 5; 0: the run's --lr)"] = 5.0,
        head_weight_decay: Annotated[float, "stage-2 weight decay (reference 0)"] = 0.0,
        views: Annotated[str, "stage-1 views: simclr (reference) or trainer"] = "simclr",
        stage2_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.temperature = check_range("temperature", temperature, 0.0, low_open=True)
        self.proj_dim = int(check_range("proj_dim", proj_dim, 1.0))
        self.pretrain_fraction = check_range(
            "pretrain_fraction", pretrain_fraction, 0.0, 1.0, low_open=True
        )
        if self.pretrain_fraction >= 1.0:
            raise CSMError(
                f"pretrain_fraction={self.pretrain_fraction}: out of range; must be "
                "< 1 so stage 2 gets epochs"
            )
        self.base_temperature = check_range("base_temperature", base_temperature, 0.0)
        self.head_lr = check_range("head_lr", head_lr, 0.0)
        self.head_weight_decay = check_range("head_weight_decay", head_weight_decay, 0.0)
        self.views = check_choice("views", views, ("simclr", "trainer"))
        self.view_transform = SupConViews() if self.views == "simclr" else None
        choices = tuple(n for n in METHODS if n != "refcal")
        self.stage2_method = check_choice("stage2_method", stage2_method, choices)
        self.inner = METHODS[self.stage2_method].from_params(stage2_params)
        self.needs_synthetic = self.inner.needs_synthetic  # type: ignore[misc]
        self.projection: nn.Module | None = None
        self._pending: dict[str, Tensor] = {}
        self.augment: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> Method:
        """Own keys build RefCal; the whole dict also goes to the stage-2 method."""
        params = dict(params or {})
        own = {k: v for k, v in params.items() if k in cls.param_defaults() and v is not None}
        return cls(**own, stage2_params=params)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "stage2": self.inner.hparams()}

    def stage_epochs(self, total_epochs: int) -> tuple[int, int]:
        """Split ``total_epochs`` into (stage 1, stage 2) epochs, each at least 1."""
        if total_epochs < 2:
            raise CSMError(f"epochs={total_epochs}: refcal needs at least 2 epochs (one per stage)")
        first = min(max(1, round(total_epochs * self.pretrain_fraction)), total_epochs - 1)
        return first, total_epochs - first

    def stages(self, epochs: int) -> list[Stage]:
        """Stage 1: SupCon on two views through the projection (no classifier yet); stage 2:
        ``model.head`` on the frozen encoder with ``stage2_method``."""
        first, second = self.stage_epochs(epochs)
        return [
            Stage(
                first,
                lambda model: self.stage_parameters(model, 1),
                self._supcon_step,
                augment=False,
                trains_classifier=False,
                name="supcon",
            ),
            Stage(
                second,
                lambda model: self.stage_parameters(model, 2),
                self._head_step,
                name="head",
                lr=self.head_lr or None,
                weight_decay=self.head_weight_decay,
            ),
        ]

    def _supcon_step(
        self, model: nn.Module, batch: Batch, state: StepState
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.pretrain_loss(model, batch, augment=state.augment, state=state)

    def _head_step(
        self, model: nn.Module, batch: Batch, state: StepState
    ) -> tuple[Tensor, dict[str, Tensor]]:
        frozen = _FrozenEncoder(model)
        frozen.train(model.training)
        return self.inner.compute_loss(frozen, batch, state)

    def extra_modules(self, model: nn.Module) -> list[nn.Module]:
        if self.projection is None:
            head = unwrap(model).head
            dim = int(head.in_features)
            ref = head.weight
            self.projection = nn.Sequential(
                nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, self.proj_dim)
            ).to(device=ref.device, dtype=ref.dtype)
            if self._pending:
                self.projection.load_state_dict(self._pending)
                self._pending = {}
        return [self.projection]

    def stage_parameters(self, model: nn.Module, stage: int = 1) -> list[nn.Parameter]:
        if stage == 1:
            params = list(model.parameters()) + list(self.extra_modules(model)[0].parameters())
            return list(dict.fromkeys(params))
        params = list(unwrap(model).head.parameters())
        for module in self.inner.extra_modules(_FrozenEncoder(model)):
            params.extend(module.parameters())
        return list(dict.fromkeys(params))

    def all_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every module the method trains besides the model (projection + stage-2 extras)."""
        return self.extra_modules(model) + self.inner.extra_modules(_FrozenEncoder(model))

    def pretrain_loss(
        self,
        model: nn.Module,
        batch: Batch,
        augment: Callable[[Tensor], Tensor] | None = None,
        state: StepState | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Stage-1 SupCon loss on two views of ``batch.x`` (see the class docstring).

        Args:
            model: the classifier (its ``forward_features`` is the encoder).
            batch: real images and integer labels.
            augment: ``augment(x) -> x'`` random augmentation (the trainer binds its generator);
                defaults to ``self.augment``.
            state: its ``generator`` drives the :class:`SupConViews` draws (None: torch's global
                generator).

        Returns:
            ``(loss, logs)``.
        """
        augment = augment if augment is not None else self.augment
        if augment is None:
            raise ValueError(
                "augment: refcal stage 1 needs an augmentation callable "
                "(pass augment= or set method.augment)"
            )
        projection = self.extra_modules(model)[0]
        generator = state.generator if state is not None else None
        views = torch.cat([self._view(augment, batch.x, generator) for _ in range(2)])
        feats = unwrap(model).forward_features(views)
        if projection[0].weight.device != feats.device:
            projection.to(feats.device)  # in place: the optimizer keeps the same parameters
        z = F.normalize(projection(feats).float(), dim=1)
        labels = batch.y.argmax(dim=1) if batch.y.is_floating_point() else batch.y
        base = self.base_temperature or None
        loss = supcon_loss(z, torch.cat([labels, labels]), self.temperature, base)
        return loss, _detach({"loss": loss, "loss/supcon": loss})

    def _view(
        self, augment: Callable[[Tensor], Tensor], x: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """One stage-1 view: the trainer's augmentation, then the SupCon view transform."""
        view = augment(x)
        if self.view_transform is None:
            return view
        return self.view_transform(view, generator)

    def compute_loss(
        self, model: nn.Module, batch: Batch, state: StepState | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if state is not None and state.stage == 1:
            return self.pretrain_loss(model, batch, augment=state.augment, state=state)
        return self._head_step(model, batch, state or StepState(stage=2))

    def on_epoch_end(self) -> None:
        self.inner.on_epoch_end()

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        if self.projection is not None:
            state.update(
                {
                    f"projection.{k}": v.detach().cpu()
                    for k, v in self.projection.state_dict().items()
                }
            )
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        proj = {k[len("projection.") :]: v for k, v in state.items() if k.startswith("projection.")}
        inner = {k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")}
        self.inner.load_state_dict(inner)
        if self.projection is not None:
            self.projection.load_state_dict(proj)
        else:
            self._pending = proj


# --------------------------------------------------------------------------- registry
METHODS: dict[str, type[Method]] = {
    "ce": CEMethod,
    "ls": LSMethod,
    "brier": BrierMethod,
    "focal": FocalMethod,
    "flsd53": FLSD53Method,
    "dual_focal": DualFocalMethod,
    "bsce_gra": BSCEGRAMethod,
    "mmce": MMCEMethod,
    "mbls": MbLSMethod,
    "crl": CRLMethod,
    "mixup": MixupMethod,
    "regmixup": RegMixupMethod,
    "rankmixup": RankMixupMethod,
    "clue": ClueMethod,
    "refcal": RefCalMethod,
    "csm": CSMMethod,
}
"""Method name -> class. Build with :func:`build_method`."""


def _method_cls(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise CSMError(
            f"method={name!r}: unknown method; choose one of {', '.join(METHODS)}"
        ) from None


def method_param_names(name: str) -> dict[str, Any]:
    """Hyper-parameters of method ``name`` with their defaults (``{}`` for ce and brier).

    RefCal additionally forwards the flat dict to its ``stage2_method``, so the stage-2
    method's parameters also apply to it.
    """
    return _method_cls(name).param_defaults()


def build_method(name: str, params: Mapping[str, Any] | None = None) -> Method:
    """Build method ``name`` from a flat hyper-parameter dict.

    ``None`` values and keys the method does not accept are ignored, so a trainer can pass all
    its method options at once.

    Raises:
        CSMError: unknown method or an out-of-range hyper-parameter.
    """
    method = _method_cls(name).from_params(params)
    logger.debug("method %s with %s", name, method.hparams())
    return method


def accepted_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Param]:
    """The hyper-parameters method ``name`` accepts given ``params``.

    RefCal forwards the flat dict to its ``stage2_method``, so it also accepts that method's.

    Raises:
        CSMError: unknown method (or unknown refcal ``stage2_method``).
    """
    cls = _method_cls(name)
    accepted = dict(cls.params())
    if cls is RefCalMethod:
        inner = (params or {}).get("stage2_method") or accepted["stage2_method"].default
        accepted.update(
            {k: v for k, v in accepted_params(inner).items() if k not in accepted}
            if inner in METHODS and inner != "refcal"
            else {}
        )
    return accepted


def all_method_params() -> dict[str, Param]:
    """Every hyper-parameter name used by any method -> one :class:`Param` (derived help).

    The help lists each method that uses the name with its own meaning and default, e.g.
    ``gamma``: ``focal: focusing parameter >= 0 (default 3.0); dual_focal, bsce_gra: ...``.
    A trainer declares one optional config field per name (None = the method's default).

    Raises:
        TypeError: two methods declare the same name with different types.
    """
    uses: dict[str, list[tuple[str, Param]]] = {}
    for method_name, cls in METHODS.items():
        for name, p in cls.params().items():
            uses.setdefault(name, []).append((method_name, p))
    out: dict[str, Param] = {}
    for name, entries in uses.items():
        types = {p.type for _, p in entries}
        if len(types) > 1:
            raise TypeError(
                f"method parameter {name!r} declared with types {sorted(map(str, types))}"
            )
        groups: dict[tuple[str, str], list[str]] = {}
        for method_name, p in entries:
            groups.setdefault((p.help, repr(p.default)), []).append(method_name)
        help_text = "; ".join(
            f"{', '.join(ms)}: {h} (default {d})" for (h, d), ms in groups.items()
        )
        out[name] = Param(name, types.pop(), None, help_text)
    return out
