"""Image classifiers with normalisation inside and an exposed penultimate layer.

Every model takes float images in ``[0, 1]`` of shape ``(N, C, H, W)``; the per-dataset mean/std
normalisation is a module *inside* the model (its buffers are saved with the weights), so callers
never normalise. Every model exposes

- ``model(x) -> logits`` of shape ``(N, K)``,
- ``model.forward_features(x) -> (N, D)``, the penultimate features, and
- ``model.head``, the final :class:`torch.nn.Linear`, so ``model.head(model.forward_features(x))``
  equals ``model(x)`` (feature clipping, the ALIEN head and the ``classifier:`` annotation encoder
  rely on this).

Architectures (:data:`MODELS`):

- ``cnn``: a small 4-conv network for 8-28 px images (digits, MNIST).
- ``resnet18``/``resnet34``/``resnet50``/``resnet101``: CIFAR-style ResNets (3x3 stem, no max-pool)
  as in He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2.
- ``wrn28_10``: Wide ResNet 28-10 (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).
- ``densenet121``: DenseNet-BC-121 with a CIFAR stem (Huang et al., "Densely Connected
  Convolutional Networks", CVPR 2017).
- ``hf:<config>``: any ``transformers`` image-classification architecture built from a config (a
  local folder or ``config.json``, or a cached hub id), with random weights, or, with the model
  option ``pretrained=true`` (``--model-options pretrained=true``), starting from the folder's or
  Hub model's weights (``from_pretrained``; a head of another size is initialised afresh). Always
  ``trust_remote_code=False``; the resolved config is recorded so that a saved run rebuilds
  offline. Needs the ``hf`` extra (``pip install 'csm[hf]'``).

:func:`build_model` is the single entry point; :func:`model_spec` returns the JSON-able record
(``arch`` + build kwargs) that :func:`build_model_from_spec` turns back into the same network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from csm.errors import CSMError

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "ImageClassifier",
    "Normalize",
    "build_model",
    "build_model_from_spec",
    "model_spec",
]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics stored as buffers.

    Args:
        mean: Per-channel mean of the training images in ``[0, 1]`` units.
        std: Per-channel standard deviation (every entry must be positive).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel():
            raise CSMError(
                f"normalisation: mean has {mean_t.numel()} channels but std has {std_t.numel()}; "
                "give one value per image channel for both"
            )
        if bool((std_t <= 0).any()):
            raise CSMError(
                f"normalisation std {std_t.flatten().tolist()}: must be positive; "
                "recompute it from the training images"
            )
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class ImageClassifier(nn.Module):
    """Base class: ``normalize -> features -> head``.

    Subclasses implement :meth:`_features`, which maps *normalised* images to ``(N, D)`` features,
    and set ``self.head`` to the final :class:`torch.nn.Linear`.
    """

    head: nn.Linear

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, D)`` of images in ``[0, 1]``."""
        return self._features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` of images in ``[0, 1]``."""
        return self.head(self.forward_features(x))

    @property
    def num_features(self) -> int:
        """Dimension D of :meth:`forward_features`."""
        return self.head.in_features


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _norm_layer(kind: str, channels: int) -> nn.Module:
    factories: dict[str, Callable[[int], nn.Module]] = {
        "batch": nn.BatchNorm2d,
        "group": lambda c: nn.GroupNorm(min(8, c), c),
        "none": lambda c: nn.Identity(),
    }
    if kind not in factories:
        raise CSMError(
            f"norm {kind!r}: unknown normalisation layer; use one of {sorted(factories)}"
        )
    return factories[kind](channels)


# --------------------------------------------------------------------------------------------
# Small CNN
# --------------------------------------------------------------------------------------------
class SmallCNN(ImageClassifier):
    """Four 3x3 conv layers (32, 32, 64, 64 channels), one 2x2 max-pool, global average pool.

    Meant for 8-28 px images (digits, MNIST); D = 64.

    Args:
        num_classes: Number of classes K.
        in_channels: Image channels.
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        width: Channels of the first block (the second block has twice as many).
        norm: ``batch`` (default), ``group`` or ``none``. ``group``/``none`` make the result
            independent of how a batch is split across processes.
        dropout: Dropout probability before the head (0 disables; MC-dropout methods use it).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 32,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(mean, std)
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
                _norm_layer(norm, cout),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *block(in_channels, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(2 * w, num_classes)
        _init_weights(self)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.body(x))


# --------------------------------------------------------------------------------------------
# CIFAR ResNets
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ImageClassifier):
    """CIFAR-style ResNet: 3x3 stem conv (64 channels), no max-pool, four stages, global pool.

    Reference: He et al., CVPR 2016; the 3x3-stem variant used by the CSM paper and most
    calibration papers (e.g. Mukhoti et al., "Calibrating Deep Neural Networks using Focal Loss",
    NeurIPS 2020). ``width`` (model option, default 64 as in the paper) scales every stage's
    channels (``width, 2 width, 4 width, 8 width``): ``width=32`` keeps the depth and the
    residual structure at a quarter of the FLOPs, for CPU budgets.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 64,
    ) -> None:
        super().__init__(mean, std)
        if width < 1:
            raise CSMError(f"model option width={width}: give at least 1 (64: the paper's)")
        w = int(width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True)
        )
        cin = w
        stages = []
        for i, (planes, n) in enumerate(zip((w, 2 * w, 4 * w, 8 * w), layers, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        _init_weights(self)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


# --------------------------------------------------------------------------------------------
# Wide ResNet
# --------------------------------------------------------------------------------------------
class WideBasic(nn.Module):
    """Pre-activation wide block (BN-ReLU-conv x2, optional dropout in between)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(ImageClassifier):
    """WRN-depth-k (Zagoruyko & Komodakis, BMVC 2016); ``wrn28_10`` is depth 28, width 10.

    Args:
        depth: Total depth; ``(depth - 4)`` must be divisible by 6.
        widen: Width multiplier k.
        dropout: Dropout inside each block (0 by default, as in most calibration papers).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        depth: int = 28,
        widen: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(mean, std)
        if (depth - 4) % 6 != 0:
            raise CSMError(f"wide resnet depth {depth}: (depth - 4) must be divisible by 6; use 28")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBasic(cin, w, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.final = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(cin, num_classes)
        _init_weights(self)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.blocks(self.stem(x)))


# --------------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(True),
            nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth),
            nn.ReLU(True),
            nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.net(x)], dim=1)


class DenseNet(ImageClassifier):
    """DenseNet-BC with a CIFAR stem (3x3 conv with ``2 * growth`` channels, no pooling).

    ``densenet121`` uses blocks (6, 12, 24, 16), growth 32, compression 0.5.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        blocks: Sequence[int] = (6, 12, 24, 16),
        growth: int = 32,
        compression: float = 0.5,
    ) -> None:
        super().__init__(mean, std)
        c = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                cout = int(c * compression)
                layers += [
                    nn.BatchNorm2d(c),
                    nn.ReLU(True),
                    nn.Conv2d(c, cout, 1, bias=False),
                    nn.AvgPool2d(2),
                ]
                c = cout
        layers += [nn.BatchNorm2d(c), nn.ReLU(True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        _init_weights(self)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# --------------------------------------------------------------------------------------------
# transformers image classifiers
# --------------------------------------------------------------------------------------------
def import_transformers(what: str) -> Any:
    """The ``transformers`` module, or a one-line :class:`CSMError` naming the ``hf`` extra.

    Args:
        what: The option that needs it (e.g. ``"model 'hf:google/vit-base-patch16-224'"``).
    """
    try:
        import transformers
    except ImportError as exc:
        raise CSMError(
            f"{what}: needs the transformers package, which is not installed; "
            "install the extra: pip install 'csm[hf]'"
        ) from exc
    return transformers


class HFImageClassifier(ImageClassifier):
    """Wraps a ``transformers`` ``AutoModelForImageClassification``: from a config, or pretrained.

    The penultimate features are the input of the model's final ``nn.Linear`` (captured with a
    forward pre-hook), so the wrapper works for any architecture whose classifier ends in a linear
    layer applied to a pooled feature vector (ViT, DeiT, ConvNeXt, ResNet, Swin, ...).

    Args:
        num_classes: Number of classes K.
        in_channels: Image channels C.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        hf_config: The resolved transformers config (``model_spec``'s ``options.hf_config``).
        pretrained: A folder or Hub id (cached offline) whose weights initialise the network
            (``from_pretrained``; layers whose shape the config changed, e.g. the K-way head,
            are initialised afresh from torch's RNG). ``None``: random initialisation.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        hf_config: dict[str, Any],
        pretrained: str | None = None,
    ) -> None:
        super().__init__(mean, std)
        transformers = import_transformers("model 'hf:'")
        cfg_dict = dict(hf_config)
        model_type = cfg_dict.pop("model_type", None)
        if model_type is None:
            raise CSMError("hf config: has no 'model_type'; pass a transformers config.json")
        config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
        auto = transformers.AutoModelForImageClassification
        if pretrained:
            try:
                self.net = auto.from_pretrained(
                    pretrained, config=config, ignore_mismatched_sizes=True, trust_remote_code=False
                )
            except (OSError, ValueError) as err:
                raise CSMError(
                    f"hf:{pretrained}: cannot load pretrained weights ({type(err).__name__}); pass "
                    "a folder made with save_pretrained or a Hub id already in the cache, or drop "
                    "pretrained=true"
                ) from err
        else:
            self.net = auto.from_config(config, trust_remote_code=False)
        head = _find_head(self.net, num_classes)
        self.head = head
        self._captured: torch.Tensor | None = None
        head.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._captured = args[0]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        self._captured = None
        self.net(pixel_values=x)
        feats = self._captured
        self._captured = None
        if feats is None:  # pragma: no cover - guarded by _find_head at build time
            raise CSMError("hf model: the classifier head was not called; use another config")
        return feats.reshape(feats.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _find_head(net: nn.Module, num_classes: int) -> nn.Linear:
    linears = [
        m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    if not linears:
        raise CSMError(
            "hf model: found no final nn.Linear with num_labels outputs; use an "
            "image-classification config whose classifier ends in a linear layer"
        )
    return linears[-1]


def resolve_hf_config(
    source: str, num_classes: int, in_channels: int, image_size: int
) -> dict[str, Any]:
    """Load a transformers config (folder, config.json, or cached hub id) and adapt it.

    Sets ``num_labels``, ``num_channels`` and ``image_size`` where the config has them.

    Raises:
        CSMError: The config cannot be found or is not a transformers config.
    """
    AutoConfig = import_transformers(f"model 'hf:{source}'").AutoConfig  # noqa: N806

    path = Path(source)
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            if "model_type" not in data:
                raise CSMError(
                    f"{source}: config.json has no model_type; pass a transformers config"
                )
            config = AutoConfig.for_model(data.pop("model_type"), **data)
        else:
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except CSMError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise CSMError(
            f"hf:{source}: cannot load a transformers config ({type(err).__name__}); pass a "
            "folder or config.json made with save_pretrained, or a hub id already in the cache"
        ) from err
    config.num_labels = num_classes
    config.id2label = {i: str(i) for i in range(num_classes)}
    config.label2id = {str(i): i for i in range(num_classes)}
    if hasattr(config, "num_channels"):
        config.num_channels = in_channels
    if hasattr(config, "image_size"):
        config.image_size = image_size
    out = config.to_dict()
    out["model_type"] = config.model_type
    return out


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
def _resnet(
    block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int]
) -> Callable[..., nn.Module]:
    def build(
        num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], **kw: Any
    ) -> nn.Module:
        return CifarResNet(block, layers, num_classes, in_channels, mean, std, **kw)

    return build


MODELS: dict[str, Callable[..., ImageClassifier]] = {
    "cnn": SmallCNN,
    "resnet18": _resnet(BasicBlock, (2, 2, 2, 2)),
    "resnet34": _resnet(BasicBlock, (3, 4, 6, 3)),
    "resnet50": _resnet(Bottleneck, (3, 4, 6, 3)),
    "resnet101": _resnet(Bottleneck, (3, 4, 23, 3)),
    "wrn28_10": WideResNet,
    "densenet121": DenseNet,
}
"""Architecture name -> builder ``(num_classes, in_channels, mean, std, **options)``.
``hf:<config>`` is handled by :func:`build_model` on top of these."""


def model_spec(
    arch: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    **options: Any,
) -> dict[str, Any]:
    """The JSON-able record (``model.json``) from which :func:`build_model_from_spec` rebuilds.

    For ``hf:<config>`` the resolved transformers config is embedded under ``options.hf_config``
    so the model rebuilds without the original file or the network.
    """
    _check_arch(arch)
    if num_classes < 2:
        raise CSMError(f"num_classes {num_classes}: need at least 2 classes")
    if len(mean) != in_channels or len(std) != in_channels:
        raise CSMError(
            f"normalisation: mean/std have {len(mean)}/{len(std)} values for {in_channels} "
            "channels; give one per channel"
        )
    if arch.startswith("hf:") and "hf_config" not in options:
        options = {
            **options,
            "hf_config": resolve_hf_config(arch[3:], num_classes, in_channels, image_size),
        }
    return {
        "arch": arch,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "options": options,
    }


def build_model_from_spec(spec: dict[str, Any], load_pretrained: bool = True) -> ImageClassifier:
    """Build the network described by a :func:`model_spec` record.

    Args:
        spec: The record.
        load_pretrained: For ``hf:<id>`` with option ``pretrained=true``: start from the Hub /
            folder weights (training). ``False`` skips that download when the weights are
            replaced anyway (loading a saved run).

    Returns:
        The network: random weights from torch's RNG, or the pretrained ones.
    """
    arch = spec["arch"]
    _check_arch(arch)
    args = (spec["num_classes"], spec["in_channels"], spec["mean"], spec["std"])
    options = dict(spec.get("options") or {})
    if arch.startswith("hf:"):
        pretrained = options.pop("pretrained", False)
        if not isinstance(pretrained, bool):
            raise CSMError(f"model option pretrained={pretrained!r}: use pretrained=true or false")
        unknown = sorted(set(options) - {"hf_config"})
        if unknown:
            raise CSMError(f"model options {unknown}: not accepted by hf: models (only pretrained)")
        source = arch[3:] if pretrained and load_pretrained else None
        return HFImageClassifier(*args, hf_config=options["hf_config"], pretrained=source)
    try:
        return MODELS[arch](*args, **options)
    except TypeError as err:
        raise CSMError(f"model options {options}: not accepted by {arch} ({err})") from err


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    **options: Any,
) -> ImageClassifier:
    """Build a classifier with normalisation inside (random weights, seed from torch's RNG).

    Args:
        arch: A key of :data:`MODELS` or ``hf:<config folder | config.json | cached hub id>``.
        num_classes: Number of classes K.
        in_channels: Image channels C.
        image_size: Image side in pixels (used by ``hf:`` configs that fix the input size).
        mean: Per-channel normalisation mean in ``[0, 1]`` units.
        std: Per-channel normalisation std.
        **options: Architecture options (e.g. ``width``/``norm``/``dropout`` for ``cnn``).

    Raises:
        CSMError: Unknown architecture, bad statistics or an unusable ``hf:`` config.
    """
    return build_model_from_spec(
        model_spec(arch, num_classes, in_channels, image_size, mean, std, **options)
    )


def _check_arch(arch: str) -> None:
    if arch.startswith("hf:"):
        if len(arch) <= 3:
            raise CSMError("model 'hf:': missing config; use hf:<config folder or hub id>")
        return
    if arch not in MODELS:
        raise CSMError(
            f"model {arch!r}: unknown architecture; use one of {sorted(MODELS)} or hf:<config>"
        )
