"""Readers of a finished synthetic dataset: a ``datasets.Dataset`` or tensors for training.

:func:`load_synthetic` opens the main shards (the *active* annotation's labels) as a
``datasets.Dataset``; :func:`load_synthetic_tensors` decodes ``DIR`` or ``DIR:NAME`` to tensors,
taking the soft labels of the named annotation (:mod:`csm.synthetic.variants`) from its
label-only files, so training on any annotation never rewrites or copies the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from csm.errors import CSMError
from csm.synthetic.schema import MANIFEST_NAME, SPLIT
from csm.synthetic.storage import check_dataset, decode_images, read_verified_table
from csm.synthetic.variants import active_name, annotation_names, parse_spec, read_labels

__all__ = ["SyntheticTensors", "iter_shards", "load_synthetic", "load_synthetic_tensors"]


def load_synthetic(out_dir: str | Path) -> Dataset:
    """Open a finished synthetic dataset as a ``datasets.Dataset`` (the ``train`` split)."""
    from datasets import load_from_disk

    check_dataset(out_dir)
    try:
        return load_from_disk(str(out_dir))[SPLIT]
    except (OSError, pa.ArrowInvalid) as exc:
        raise CSMError(
            f"{out_dir}: a shard cannot be read ({exc}); regenerate the dataset"
        ) from exc


@dataclass
class SyntheticTensors:
    """A synthetic dataset decoded to tensors for training.

    Attributes:
        images: uint8 (N, C, H, W).
        soft_labels: float32 (N, K).
        class_a: int64 (N,).
        class_b: int64 (N,).
        group_id: int64 (N,).
        lam: float32 (N,) generation ratio.
        class_names: K names, in label order.
        annotation: Name of the annotation the soft labels come from (``None``: unnamed).
    """

    images: torch.Tensor
    soft_labels: torch.Tensor
    class_a: torch.Tensor
    class_b: torch.Tensor
    group_id: torch.Tensor
    lam: torch.Tensor
    class_names: list[str]
    annotation: str | None = None


def iter_shards(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(index, path)`` of every shard of a finished dataset, in order (validated)."""
    out_dir = Path(out_dir)
    _, records = check_dataset(out_dir)
    return [(r["shard"], out_dir / r["file"]) for r in records]


def load_synthetic_tensors(spec: str | Path, option: str | None = None) -> SyntheticTensors:
    """Decode ``DIR`` (the active annotation) or ``DIR:NAME`` into :class:`SyntheticTensors`.

    Args:
        spec: ``DIR`` or ``DIR:NAME``; ``NAME`` is ``lambda`` or an annotation ``csm annotate
            --name NAME`` wrote.
        option: The command-line option the spec came from (e.g. ``--synthetic``), named in the
            errors about the spec.

    Raises:
        CSMError: ``DIR`` is not a synthetic dataset, ``NAME`` is unknown (the message lists the
            available names), or a shard or label file differs from what was written (every file
            read is checked against the sha256 recorded when it was written, once).
    """
    out_dir, name = parse_spec(spec)
    where = f"{option} {spec}" if option else str(spec)
    if not (out_dir / MANIFEST_NAME).is_file():
        raise CSMError(
            f"{where}: not a csm synthetic dataset (no {MANIFEST_NAME} in {out_dir}); pass DIR or "
            "DIR:NAME with DIR written by `csm generate`"
        )
    manifest, records = check_dataset(out_dir)
    if name is not None and name not in annotation_names(manifest):
        raise CSMError(
            f"{where}: no annotation named {name!r}; available: "
            f"{', '.join(annotation_names(manifest))}"
        )
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("images", "soft", "class_a", "class_b", "group_id", "lam")
    }
    for record in records:
        path = out_dir / record["file"]
        table = read_verified_table(path, record)  # sha256 once per shard: what we train on
        parts["images"].append(decode_images(table, str(path)))
        if name is None:
            soft = np.asarray(table.column("soft_label").to_pylist(), dtype=np.float32)
        else:
            soft = read_labels(out_dir, manifest, name, record["shard"], table)["soft_label"]
        parts["soft"].append(soft)
        for col in ("class_a", "class_b", "group_id", "lam"):
            parts[col].append(table.column(col).to_numpy())
    return SyntheticTensors(
        images=torch.from_numpy(np.concatenate(parts["images"])),
        soft_labels=torch.from_numpy(np.concatenate(parts["soft"])),
        class_a=torch.from_numpy(np.concatenate(parts["class_a"]).astype(np.int64)),
        class_b=torch.from_numpy(np.concatenate(parts["class_b"]).astype(np.int64)),
        group_id=torch.from_numpy(np.concatenate(parts["group_id"]).astype(np.int64)),
        lam=torch.from_numpy(np.concatenate(parts["lam"]).astype(np.float32)),
        class_names=list(manifest["params"]["class_names"]),
        annotation=active_name(manifest) if name is None else name,
    )
