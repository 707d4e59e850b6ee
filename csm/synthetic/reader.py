"""Readers of a finished synthetic dataset: a ``datasets.Dataset``, tensors, or lazy images.

:func:`load_synthetic` opens the main shards (the *active* annotation's labels) as a
``datasets.Dataset``; :func:`load_synthetic_tensors` reads ``DIR`` or ``DIR:NAME`` as tensors,
taking the soft labels of the named annotation (:mod:`csm.synthetic.variants`) from its
label-only files, so training on any annotation never rewrites or copies the images. By default
every image is decoded into one uint8 tensor; with ``lazy=True`` only the small per-image columns
are read into memory and the images stay in the memory-mapped Arrow shards
(:class:`SyntheticImages`), decoded when indexed: memory flat in the dataset's size, and shared
(page cache) by every process that reads the same dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from torch.utils.data import Dataset as TorchDataset

from csm.errors import CSMError
from csm.synthetic.schema import MANIFEST_NAME, SPLIT, png_to_array, undecodable_error
from csm.synthetic.storage import (
    check_dataset,
    decode_images,
    map_verified_table,
    read_verified_table,
)
from csm.synthetic.variants import active_name, annotation_names, parse_spec, read_labels

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticImages",
    "SyntheticTensors",
    "iter_shards",
    "load_synthetic",
    "load_synthetic_tensors",
]

Index = int | slice | torch.Tensor | np.ndarray | Sequence[int]


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


class SyntheticImages(TorchDataset):
    """The images of a synthetic dataset, decoded on demand from its memory-mapped shards.

    Indexed like the uint8 ``(N, C, H, W)`` tensor that :func:`load_synthetic_tensors` decodes
    by default, and with the same bytes: ``images[i]`` is one ``(C, H, W)`` image (the
    ``torch.utils.data.Dataset`` protocol) and ``images[idx]``, for an index tensor, array, list
    or slice, the ``(len(idx), C, H, W)`` batch in that order (repeats allowed). Only the rows
    asked for are read (PNG bytes from the mapped shard) and decoded with PIL; nothing is cached,
    so the process's own memory does not grow with the dataset.

    Args:
        shards: ``(path, table)`` of every shard in order, each table holding the ``image``
            column, memory-mapped (:func:`csm.synthetic.storage.map_verified_table`).
        group_id: ``(N,)`` group of every image (named in decoding errors).
        image_shape: ``(C, H, W)`` of every image; one of another shape raises when decoded.
    """

    def __init__(
        self,
        shards: list[tuple[str, pa.Table]],
        group_id: np.ndarray,
        image_shape: tuple[int, ...],
    ) -> None:
        self._blobs: list[pa.Array] = []  # the image bytes of every record batch, in order
        self._where: list[tuple[str, int]] = []  # (shard, its first row) of every batch
        starts = [0]
        for path, table in shards:
            row = 0
            for chunk in table.column("image").chunks:
                self._blobs.append(chunk.field("bytes"))
                self._where.append((path, row))
                row += len(chunk)
                starts.append(starts[-1] + len(chunk))
        self._starts = np.asarray(starts, dtype=np.int64)
        self._group_id = group_id
        self.image_shape = tuple(image_shape)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> torch.Size:
        """``(N, C, H, W)``, as the decoded tensor's."""
        return torch.Size((len(self), *self.image_shape))

    @property
    def dtype(self) -> torch.dtype:
        """``torch.uint8``."""
        return torch.uint8

    def __getitem__(self, index: Index) -> torch.Tensor:
        """One image ``(C, H, W)`` for an int, else the ``(n, C, H, W)`` batch of ``index``."""
        if isinstance(index, (int, np.integer)):
            return self.take([int(index)])[0]
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        return self.take(index)

    def take(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Decode the images of ``indices`` (any shape, flattened) into a uint8 batch.

        Raises:
            IndexError: An index is out of range.
            CSMError: An image does not decode or has another shape than the dataset's.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"synthetic image index out of range for {n} images")
        idx = np.where(idx < 0, idx + n, idx)
        chunks = np.searchsorted(self._starts, idx, side="right") - 1
        out = np.empty((idx.size, *self.image_shape), dtype=np.uint8)
        for k, (c, i) in enumerate(zip(chunks.tolist(), idx.tolist())):
            out[k] = self._decode(c, i - int(self._starts[c]))
        return torch.from_numpy(out)

    def _decode(self, chunk: int, row: int) -> np.ndarray:
        """Decode row ``row`` of record batch ``chunk``, checking its shape."""
        path, first = self._where[chunk]
        try:
            array = png_to_array(self._blobs[chunk][row].as_py())
        except Exception as exc:  # PIL raises many types for corrupt data
            group = int(self._group_id[int(self._starts[chunk]) + row])
            raise undecodable_error(f"{path} row {first + row} (group {group})", exc) from exc
        if tuple(array.shape) != self.image_shape:
            shapes = sorted({tuple(array.shape), self.image_shape})
            raise CSMError(f"{path}: images of different shapes {shapes}; regenerate the data")
        return array


@dataclass
class SyntheticTensors:
    """A synthetic dataset read for training.

    Attributes:
        images: uint8 (N, C, H, W): a tensor, or (``lazy=True``) a :class:`SyntheticImages`
            decoding rows from the mapped shards when indexed.
        soft_labels: float32 (N, K).
        class_a: int64 (N,).
        class_b: int64 (N,).
        group_id: int64 (N,).
        lam: float32 (N,) generation ratio.
        class_names: K names, in label order.
        annotation: Name of the annotation the soft labels come from (``None``: unnamed).
    """

    images: torch.Tensor | SyntheticImages
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


def _open_spec(
    spec: str | Path, option: str | None
) -> tuple[Path, str | None, dict[str, Any], list[dict[str, Any]]]:
    """``(DIR, NAME, manifest, shard records)`` of ``DIR`` or ``DIR:NAME``, validated."""
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
    return out_dir, name, manifest, records


def _first_image_shape(table: pa.Table, where: str) -> tuple[int, ...] | None:
    """``(C, H, W)`` of a shard's first image (None for an empty shard)."""
    if table.num_rows == 0:
        return None
    try:
        return tuple(png_to_array(table.column("image")[0]["bytes"].as_py()).shape)
    except Exception as exc:  # PIL raises many types for corrupt data
        group = table.column("group_id")[0].as_py()
        raise undecodable_error(f"{where} row 0 (group {group})", exc) from exc


def _soft_labels(table: pa.Table, k: int, where: str) -> np.ndarray:
    """The ``soft_label`` column as float32 ``(N, K)``, without a Python object per value."""
    column = table.column("soft_label")
    if column.null_count:
        raise CSMError(f"{where}: soft_label has missing values; regenerate the dataset")
    values = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    flat = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
    return flat.astype(np.float32).reshape(table.num_rows, k)


def _read_shard(
    out_dir: Path, manifest: dict[str, Any], name: str | None, record: dict[str, Any], lazy: bool
) -> tuple[dict[str, np.ndarray], np.ndarray | pa.Table]:
    """The per-image columns of one shard (copies) and its images.

    Returns:
        ``(columns, images)``: ``soft``, ``class_a``, ``class_b``, ``group_id``, ``lam``; and the
        decoded uint8 ``(N, C, H, W)`` images, or (``lazy``) the shard's memory-mapped ``image``
        column as a table.
    """
    path = out_dir / record["file"]
    # sha256 once per shard: what we train on is what was written
    if lazy:  # the columns from the bytes read (dropped after this shard), the images mapped
        table, mapped = map_verified_table(path, record)
        images: np.ndarray | pa.Table = mapped.select(["image"])
    else:
        table = read_verified_table(path, record)
        images = decode_images(table, str(path))
    if name is None:
        soft = _soft_labels(table, len(manifest["params"]["class_names"]), str(path))
    else:
        soft = read_labels(out_dir, manifest, name, record["shard"], table)["soft_label"]
    columns = {"soft": soft}
    for col in ("class_a", "class_b", "group_id", "lam"):  # copies: never views of a shard
        columns[col] = np.array(table.column(col).to_numpy())
    if table.num_rows:
        shape = _first_image_shape(table, str(path)) if lazy else images.shape[1:]
        columns["shape"] = np.asarray(shape)
    return columns, images


def load_synthetic_tensors(
    spec: str | Path, option: str | None = None, *, lazy: bool = False
) -> SyntheticTensors:
    """Read ``DIR`` (the active annotation) or ``DIR:NAME`` as :class:`SyntheticTensors`.

    Args:
        spec: ``DIR`` or ``DIR:NAME``; ``NAME`` is ``lambda`` or an annotation ``csm annotate
            --name NAME`` wrote.
        option: The command-line option the spec came from (e.g. ``--synthetic``), named in the
            errors about the spec.
        lazy: Keep the images in the memory-mapped shards (:class:`SyntheticImages`, decoded
            when indexed; the first image of every shard is decoded here to check the shapes)
            instead of decoding them all into one tensor. The other columns are read into memory
            either way, and every value, decoded, is the same.

    Raises:
        CSMError: ``DIR`` is not a synthetic dataset, ``NAME`` is unknown (the message lists the
            available names), a shard or label file differs from what was written (every file
            read is checked against the sha256 recorded when it was written, once), or images
            differ in shape.
    """
    out_dir, name, manifest, records = _open_spec(spec, option)
    parts: dict[str, list[Any]] = {}
    for record in records:
        columns, images = _read_shard(out_dir, manifest, name, record, lazy)
        for key, value in [*columns.items(), ("images", images)]:
            parts.setdefault(key, []).append(value)
    group_id = np.concatenate(parts["group_id"]).astype(np.int64)
    shapes = {tuple(int(v) for v in s) for s in parts.get("shape", [])}
    if len(shapes) > 1:
        raise CSMError(
            f"{out_dir}: images of different shapes {sorted(shapes)}; regenerate the data"
        )
    if lazy:
        mapped = [(str(out_dir / r["file"]), t) for r, t in zip(records, parts["images"])]
        images: torch.Tensor | SyntheticImages = SyntheticImages(
            mapped, group_id, next(iter(shapes), (1, 1, 1))
        )
        logger.info("%s: %d synthetic images, decoded on demand", out_dir, len(images))
    else:
        images = torch.from_numpy(np.concatenate(parts["images"]))
    return SyntheticTensors(
        images=images,
        soft_labels=torch.from_numpy(np.concatenate(parts["soft"])),
        class_a=torch.from_numpy(np.concatenate(parts["class_a"]).astype(np.int64)),
        class_b=torch.from_numpy(np.concatenate(parts["class_b"]).astype(np.int64)),
        group_id=torch.from_numpy(group_id),
        lam=torch.from_numpy(np.concatenate(parts["lam"]).astype(np.float32)),
        class_names=list(manifest["params"]["class_names"]),
        annotation=active_name(manifest) if name is None else name,
    )
