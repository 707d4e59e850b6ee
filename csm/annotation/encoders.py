"""Image encoders for calibrated reannotation: ``clip:``, ``hf:`` and ``classifier:`` specs.

CSM's reannotation (Luo et al., "Beyond One-Hot Labels: Semantic Mixing for Model Calibration",
ICML 2025, arXiv 2504.13548, section on calibrated reannotation) projects an image's feature on the
segment between two class prototypes. The paper uses the CLIP ViT-B/32 image tower (Radford et al.,
"Learning Transferable Visual Models From Natural Language Supervision", ICML 2021), zero-shot,
with unnormalised features. Specs:

- ``clip:<model id or folder>``: ``CLIPVisionModelWithProjection``; features = ``image_embeds``
  (the projected, unnormalised image embedding). A full ``CLIPModel`` folder works too.
- ``hf:<model id or folder>``: any transformers vision backbone (``AutoModel``); features =
  ``pooler_output`` when the model has one, else the mean of ``last_hidden_state`` over tokens
  (or over space for convolutional maps).
- ``classifier:<run dir>``: the penultimate features (``forward_features``) of a classifier that
  ``csm train`` wrote, computed by the one inference loop
  (:func:`csm.training.inference.predict`); it also classifies, which ``csm annotate --mode
  judge`` needs.

Every encoder takes uint8 images ``(N, C, H, W)`` and does its own preprocessing in torch (resize,
channel adaptation, normalisation), so the plain forward and the annotation cost the same per
image. Models load offline from local folders or the local Hub cache, never with remote code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from csm.errors import CSMError
from csm.training.inference import Transform, predict
from csm.training.models import import_transformers
from csm.utils import distributed_state, process_rows, resolve_device

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise CSMError(f"images with {x.shape[1]} channels: the encoder expects {channels}")


def _dir_fingerprint(path: Path) -> str:
    """Identity of a model folder: names, sizes and modification times of its weight files."""
    entries = []
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".pt"}:
            st = f.stat()
            entries.append(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


class ImageEncoder:
    """Base class: ``encode(uint8 images) -> float32 features (N, D)`` on ``self.device``.

    Subclasses set ``self.model`` and implement :meth:`preprocess` and :meth:`features`.

    Attributes:
        spec: The spec the encoder was loaded from.
        device: Where the model runs.
    """

    spec: str
    device: torch.device
    model: torch.nn.Module

    def fingerprint(self) -> str:
        """A string that changes when the encoder (weights or preprocessing) changes."""
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` on any device -> model input on ``self.device``."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> features ``(N, D)``."""
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of uint8 images ``(N, C, H, W)`` as float32 ``(N, D)`` on the CPU."""
        return self.features(self.preprocess(images)).float().cpu()

    def encode_batched(
        self, images: torch.Tensor, batch_size: int, shard: bool = False
    ) -> torch.Tensor:
        """Features of all ``images``, :meth:`encode`-d ``batch_size`` at a time, on the CPU.

        With ``shard`` under ``accelerate launch``, the processes split the batches (whole
        batches, contiguous shares) and gather the features in order, so every process returns
        what one process would, bit for bit.
        """
        starts = list(range(0, images.shape[0], batch_size))
        state = distributed_state() if shard else None
        if state is None or state.num_processes == 1 or len(starts) < state.num_processes:
            return _cat([self.encode(images[s : s + batch_size]) for s in starts])
        from accelerate.utils import gather_object

        mine = starts[process_rows(len(starts), state.process_index, state.num_processes)]
        local = [self.encode(images[s : s + batch_size]) for s in mine]
        return _cat(gather_object(local))  # rank order = batch order

    @property
    def can_classify(self) -> bool:
        """Whether :meth:`logits` exists (``--mode judge``)."""
        return False

    @property
    def class_names(self) -> list[str] | None:
        """Class names of a classifier encoder, else ``None``."""
        return None

    def logits(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Class logits ``(N, K)``; only classifier encoders."""
        raise CSMError(
            f"encoder {self.spec!r}: cannot classify, so --mode judge is unavailable; use "
            "--encoder classifier:<run dir>"
        )


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0)


class _TransformersEncoder(ImageEncoder):
    """Shared preprocessing of transformers vision models (resize, center crop, normalise)."""

    def __init__(self, spec: str, target: str, device: torch.device) -> None:
        self.spec = spec
        self.target = target
        self.device = device
        import_transformers(f"encoder {spec!r}")  # one line naming the hf extra when absent
        self.model = self._load_model(target).to(device).eval()
        self._setup_preprocessing(target)

    def _load_model(self, target: str) -> torch.nn.Module:
        raise NotImplementedError

    def _setup_preprocessing(self, target: str) -> None:
        from transformers import AutoImageProcessor

        cfg = self.model.config
        vision = getattr(cfg, "vision_config", cfg)
        size = getattr(vision, "image_size", 224)
        size = size[0] if isinstance(size, list | tuple) else int(size)
        channels = int(getattr(vision, "num_channels", 3))
        default_mean, default_std = self._default_stats()
        mean, std, resize, crop = default_mean, default_std, size, size
        try:
            proc = AutoImageProcessor.from_pretrained(target)
        except (OSError, ValueError) as exc:
            logger.warning(
                "%s: no image processor (%s); using size %d and %s statistics",
                self.spec,
                type(exc).__name__,
                size,
                type(self).__name__,
            )
            proc = None
        if proc is not None:
            mean = tuple(getattr(proc, "image_mean", None) or mean)
            std = tuple(getattr(proc, "image_std", None) or std)
            psize = getattr(proc, "size", None)
            if isinstance(psize, dict) and psize:
                resize = int(psize.get("shortest_edge") or psize.get("height") or size)
            pcrop = getattr(proc, "crop_size", None)
            if isinstance(pcrop, dict) and pcrop and getattr(proc, "do_center_crop", True):
                crop = int(pcrop.get("height") or resize)
            else:
                crop = resize
        self.resize, self.crop, self.channels = resize, crop, channels
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._dtype = next(self.model.parameters()).dtype

    def _default_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return IMAGENET_MEAN, IMAGENET_STD

    def fingerprint(self) -> str:
        path = Path(self.target)
        ident = (
            _dir_fingerprint(path)
            if path.is_dir()
            else str(getattr(self.model.config, "_commit_hash", None) or self.target)
        )
        return f"{self.spec}|{ident}|{self.resize}|{self.crop}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        x = _adapt_channels(x, self.channels)
        h, w = x.shape[-2:]
        if min(h, w) != self.resize:
            scale = self.resize / min(h, w)
            new = (max(self.resize, round(h * scale)), max(self.resize, round(w * scale)))
            x = F.interpolate(
                x, size=new, mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0, 1)
        h, w = x.shape[-2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        mean = self.mean[:, : x.shape[1]] if self.mean.shape[1] >= x.shape[1] else self.mean
        std = self.std[:, : x.shape[1]] if self.std.shape[1] >= x.shape[1] else self.std
        return (x - mean).div_(std).to(self._dtype)  # one new tensor: the same floats


def _from_pretrained(loader: Any, target: str, spec: str) -> torch.nn.Module:
    try:
        return loader.from_pretrained(target, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CSMError(
            f"encoder {spec!r}: cannot load {target!r} ({type(exc).__name__}); pass a local model "
            "folder or a model id already in the Hugging Face cache (no downloads offline)"
        ) from exc


class ClipEncoder(_TransformersEncoder):
    """CLIP image tower; features are the unnormalised projected embeddings (the paper's)."""

    def _load_model(self, target: str) -> torch.nn.Module:
        from transformers import CLIPVisionModelWithProjection

        return _from_pretrained(CLIPVisionModelWithProjection, target, self.spec)

    def _default_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return CLIP_MEAN, CLIP_STD

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).image_embeds


class HFEncoder(_TransformersEncoder):
    """Any transformers vision backbone; pooled features."""

    def _load_model(self, target: str) -> torch.nn.Module:
        from transformers import AutoModel

        return _from_pretrained(AutoModel, target, self.spec)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)
        return pooled.flatten(1)


class ClassifierEncoder(ImageEncoder):
    """Penultimate features of a ``csm train`` run (``forward_features``); also classifies."""

    def __init__(self, spec: str, target: str, device: torch.device) -> None:
        from csm.training.runs import load_run, split_record_for

        self.spec = spec
        self.target = target
        self.device = device
        run_dir = Path(target)
        if not run_dir.is_dir():
            raise CSMError(
                f"encoder {spec!r}: {target} is not a directory; pass a run directory written by "
                "`csm train`"
            )
        loaded = load_run(run_dir)
        self.model = loaded.model.to(device).eval()
        cfg = loaded.config
        #: the split the classifier was trained on (:func:`csm.data.real.split_record`)
        self.split = split_record_for(cfg)
        self._class_names = list(loaded.class_names)
        meta: dict[str, Any] = {}
        if (run_dir / "model.json").is_file():
            meta = json.loads((run_dir / "model.json").read_text())
        self.image_size = meta.get("image_size")
        self.channels = meta.get("in_channels")
        weights = run_dir / "model.safetensors"
        self._ident = (
            hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
            if weights.is_file()
            else _dir_fingerprint(run_dir)
        )

    def fingerprint(self) -> str:
        return f"classifier|{self._ident}|{self.image_size}|{self.channels}"

    @property
    def can_classify(self) -> bool:
        return True

    @property
    def class_names(self) -> list[str] | None:
        return self._class_names

    def _transform(self, images: torch.Tensor) -> Transform | None:
        """The adaptation of ``images`` to the run's input (channels, size), or ``None``."""
        size = self.image_size
        channels = int(self.channels) if self.channels else images.shape[1]
        resize = bool(size) and tuple(images.shape[-2:]) != (size, size)
        if channels == images.shape[1] and not resize:
            return None

        def adapt(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            x = _adapt_channels(x, channels)
            if resize:
                x = F.interpolate(
                    x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
            return x

        return adapt

    def _predict(self, images: torch.Tensor, batch_size: int, features: bool, shard: bool) -> Any:
        return predict(
            self.model,
            images,
            max(1, batch_size),
            self.device,
            features=features,
            transform=self._transform(images),
            shard=shard,
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of uint8 images as one batch (through ``predict``)."""
        return self._predict(images, images.shape[0], True, False)[1]

    def encode_batched(
        self, images: torch.Tensor, batch_size: int, shard: bool = False
    ) -> torch.Tensor:
        """Features batch by batch through the one inference loop (sharded like ``predict``)."""
        return self._predict(images, batch_size, True, shard)[1]

    def logits(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Class logits ``(N, K)`` on the CPU, ``batch_size`` images per forward (default: all)."""
        return self._predict(images, batch_size or images.shape[0], False, False)


#: Encoder registry: spec prefix -> class taking ``(spec, target, device)``.
ENCODERS: dict[str, type[ImageEncoder]] = {
    "clip": ClipEncoder,
    "hf": HFEncoder,
    "classifier": ClassifierEncoder,
}


def load_encoder(spec: str, device: str = "auto") -> ImageEncoder:
    """Build the encoder named by ``spec`` (``clip:``, ``hf:`` or ``classifier:`` prefix).

    Raises:
        CSMError: Unknown prefix, empty target, or a model that cannot be loaded.
    """
    kind, sep, target = spec.partition(":")
    if not sep or kind not in ENCODERS or not target:
        raise CSMError(
            f"encoder {spec!r}: unknown encoder spec; use one of "
            f"{', '.join(k + ':<...>' for k in ENCODERS)} (e.g. classifier:runs/ce-digits)"
        )
    return ENCODERS[kind](spec, target, resolve_device(device))
