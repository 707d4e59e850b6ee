"""The synthetic dataset's schema: columns, ``datasets`` features, constants and row building.

A csm synthetic dataset is a Hugging Face dataset of class-mixed images (Luo et al., "Beyond
One-Hot Labels: Semantic Mixing for Model Calibration", ICML 2025, arXiv 2504.13548). Columns:

- ``image`` (``Image``): the generated picture, stored losslessly as PNG.
- ``label`` (``ClassLabel``): the dominant class (``class_a`` when ``soft_label[a] >= 0.5``).
- ``class_a``, ``class_b`` (``ClassLabel``): the mixed pair; ``lam`` is the weight of ``class_a``.
- ``lam`` (float32): the generation ratio; 1 is pure ``class_a``, 0 pure ``class_b``.
- ``lam_hat`` (float32): the annotator's raw projection on the prototype segment (NaN before
  annotation; unclipped).
- ``confidence`` (float32): the soft label of ``label``, i.e. ``max(soft[a], soft[b])``.
- ``soft_label`` (``List(float32, length=K)``): the training target; non-zero on ``a``, ``b``
  only.
- ``group_id`` (int64), ``seed`` (int64): the group (one shared initial noise) and its seed.

Before annotation the soft label follows λ: ``soft[a] = λ``, ``soft[b] = 1 - λ``. The four
columns an annotation sets (:data:`LABEL_COLUMNS`) are also stored on their own, keyed by
``group_id`` and row order, for every named annotation (:mod:`csm.synthetic.variants`).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import ClassLabel, Features, Image, List, Value
from PIL import Image as PILImage

from csm.errors import CSMError

FORMAT_VERSION = 1
MANIFEST_NAME = "csm_synthetic.json"
SPLIT = "train"
RECORDS_DIR = Path(".csm") / "shards"
#: Named label-only annotations live under ``DIR/annotations/<name>/``.
ANNOTATIONS_DIR = "annotations"
#: The built-in annotation name: soft labels that follow the generation ratio λ.
LAMBDA_NAME = "lambda"
#: The annotation report (JSON + PNG), next to each annotation's labels and, for the active one,
#: at the top of the dataset directory.
REPORT_JSON = "annotation_report.json"
REPORT_PNG = "annotation_report.png"
#: The columns an annotation sets; the other columns are fixed at generation.
LABEL_COLUMNS = ("label", "lam_hat", "confidence", "soft_label")

CITATION = """@inproceedings{luo2025beyond,
  title     = {Beyond One-Hot Labels: Semantic Mixing for Model Calibration},
  author    = {Luo, Haoyang and Tao, Linwei and Dong, Minjing and Xu, Chang},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2025},
  eprint    = {2504.13548},
  archivePrefix = {arXiv}
}"""


# --------------------------------------------------------------------------------------- format
def synthetic_features(class_names: Sequence[str]) -> Features:
    """Return the ``datasets.Features`` of a synthetic dataset over ``class_names``."""
    names = list(class_names)
    return Features(
        {
            "image": Image(),
            "label": ClassLabel(names=names),
            "class_a": ClassLabel(names=names),
            "class_b": ClassLabel(names=names),
            "lam": Value("float32"),
            "lam_hat": Value("float32"),
            "confidence": Value("float32"),
            "soft_label": List(Value("float32"), length=len(names)),
            "group_id": Value("int64"),
            "seed": Value("int64"),
        }
    )


def soft_targets(
    share_a: np.ndarray, class_a: np.ndarray, class_b: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft labels on the pair only, the dominant label and its confidence.

    Args:
        share_a: (N,) weight of ``class_a`` in [0, 1].
        class_a: (N,) int class indices.
        class_b: (N,) int class indices.
        num_classes: K.

    Returns:
        ``(soft (N, K) float32, label (N,) int64, confidence (N,) float32)``; ties go to ``a``.
    """
    share_a = np.asarray(share_a, dtype=np.float32)
    class_a = np.asarray(class_a, dtype=np.int64)
    class_b = np.asarray(class_b, dtype=np.int64)
    n = share_a.shape[0]
    soft = np.zeros((n, num_classes), dtype=np.float32)
    rows = np.arange(n)
    soft[rows, class_b] = 1.0 - share_a
    soft[rows, class_a] = share_a
    label = np.where(share_a >= 0.5, class_a, class_b).astype(np.int64)
    confidence = np.maximum(share_a, 1.0 - share_a).astype(np.float32)
    return soft, label, confidence


def encode_png(image: np.ndarray) -> bytes:
    """Encode one uint8 image (C, H, W) with C in {1, 3} as PNG bytes (lossless)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3) or image.dtype != np.uint8:
        raise CSMError(
            f"image of shape {tuple(image.shape)} and dtype {image.dtype}: expected uint8 "
            "(C, H, W) "
            "with C = 1 or 3; convert the generator output before writing"
        )
    array = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_to_array(data: bytes) -> np.ndarray:
    """Decode PNG bytes to uint8 ``(C, H, W)`` (C = 1 for grayscale, else 3)."""
    img = PILImage.open(io.BytesIO(data), formats=("PNG",))  # the format always writes PNG
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.transpose(array, (2, 0, 1))


def undecodable_error(where: str, exc: Exception) -> CSMError:
    """The one-line error for an image at ``where`` that does not decode."""
    return CSMError(
        f"{where}: the image does not decode ({type(exc).__name__}: {exc}); regenerate this "
        "shard (delete its record under .csm/shards and run `csm generate --resume`)"
    )


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert float images in [0, 1] or uint8 images, (N, C, H, W), to uint8 numpy."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.cpu().numpy()
        return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images.astype(np.float32), 0, 1) * 255).astype(np.uint8)


def build_table(
    features: Features,
    images: torch.Tensor | np.ndarray,
    class_a: Sequence[int],
    class_b: Sequence[int],
    lam: Sequence[float],
    group_id: Sequence[int],
    seed: Sequence[int],
) -> pa.Table:
    """Build the Arrow table of freshly generated rows (soft labels follow λ, ``lam_hat`` NaN)."""
    pixels = to_uint8(images)
    k = features["label"].num_classes
    lam_arr = np.asarray(lam, dtype=np.float32)
    a = np.asarray(class_a, dtype=np.int64)
    b = np.asarray(class_b, dtype=np.int64)
    n = pixels.shape[0]
    if not (len(a) == len(b) == len(lam_arr) == len(group_id) == len(seed) == n):
        raise CSMError(
            f"rows: {n} images but {len(a)} class_a, {len(b)} class_b, {len(lam_arr)} lam, "
            f"{len(group_id)} group ids, {len(seed)} seeds; pass one value per image"
        )
    soft, label, conf = soft_targets(lam_arr, a, b, k)
    columns = {
        "image": [{"bytes": encode_png(img), "path": None} for img in pixels],
        "label": label,
        "class_a": a,
        "class_b": b,
        "lam": lam_arr,
        "lam_hat": np.full(n, np.nan, dtype=np.float32),
        "confidence": conf,
        "soft_label": soft,
        "group_id": np.asarray(group_id, dtype=np.int64),
        "seed": np.asarray(seed, dtype=np.int64),
    }
    return table_from_columns(features, columns)


def arrow_column(values: Any, typ: pa.DataType) -> pa.Array:
    """One Arrow array of type ``typ`` from a numpy vector, a numpy matrix (fixed-size lists)
    or a Python list."""
    if isinstance(values, np.ndarray) and values.ndim == 2 and pa.types.is_fixed_size_list(typ):
        flat = pa.array(values.reshape(-1), type=typ.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1]).cast(typ)
    return pa.array(values, type=typ)


@functools.lru_cache(maxsize=16)
def _schemas(names: tuple[str, ...]) -> tuple[pa.Schema, pa.Schema]:
    return synthetic_features(names).arrow_schema, label_features(names).arrow_schema


def synthetic_schema(class_names: Sequence[str]) -> pa.Schema:
    """The Arrow schema (with the HF feature metadata) of :func:`synthetic_features`, built once
    per class list (``Features.arrow_schema`` rebuilds it, ~1 ms, at every call; Arrow schemas
    are immutable, so sharing one is safe)."""
    return _schemas(tuple(class_names))[0]


def label_schema(class_names: Sequence[str]) -> pa.Schema:
    """The Arrow schema of :func:`label_features`, built once per class list."""
    return _schemas(tuple(class_names))[1]


def table_from_columns(features: Features | pa.Schema, columns: dict[str, Any]) -> pa.Table:
    """Arrow table with the exact schema (and HF feature metadata) of ``features``."""
    schema = features if isinstance(features, pa.Schema) else features.arrow_schema
    arrays = [
        arrow_column(columns[name], fld.type)
        for name, fld in zip(schema.names, schema, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def label_features(class_names: Sequence[str]) -> Features:
    """Features of a label-only annotation shard: ``group_id`` (the row key) + the label columns."""
    full = synthetic_features(class_names)
    return Features({name: full[name] for name in ("group_id", *LABEL_COLUMNS)})


def label_columns(
    share_a: np.ndarray, lam_hat: np.ndarray, class_a: np.ndarray, class_b: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    """The :data:`LABEL_COLUMNS` of rows whose class ``a`` gets the soft label ``share_a``."""
    soft, label, conf = soft_targets(share_a, class_a, class_b, k)
    return {
        "label": label,
        "lam_hat": np.asarray(lam_hat).astype(np.float32),
        "confidence": conf,
        "soft_label": soft,
    }
