"""The synthetic dataset format: sharded, resumable writer, reader and dataset card.

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

Before annotation the soft label follows λ: ``soft[a] = λ``, ``soft[b] = 1 - λ``.

On-disk layout of ``DIR``::

    DIR/csm_synthetic.json            manifest: parameters, class names, info, annotation, state
    DIR/.csm/shards/00003.json        one record per finished shard (rows, bytes, sha256)
    DIR/train/data-00003-of-00010.arrow   shard 3 (Arrow stream; features in the schema metadata)
    DIR/train/state.json, DIR/train/dataset_info.json, DIR/dataset_dict.json   (after finalize)
    DIR/README.md                     the dataset card (YAML ``configs`` point at the shards)

So ``datasets.load_from_disk(DIR)`` returns a ``DatasetDict`` with a ``train`` split, and plain
``datasets.load_dataset(DIR)`` (no csm needed) reads the same shards through the card's ``configs``.

Writer contract: shard ``i`` holds the fixed group range ``shard_groups(i)``; the content of a
group is a pure function of its id and the base seed, so shards can be written in any order, by
any process, and re-written after a crash. A shard is written to a temporary name and renamed;
its record is written (also atomically) only after the rename, so a recorded shard is complete.
Renames are atomic with respect to process crashes and kills; files are not fsync'ed (that costs
more than the annotation itself on slow disks), so after a power loss the sha256 check that
``--resume`` runs on every recorded shard is what detects a damaged one.
``resume=True`` re-opens a directory, checks every recorded shard against its size and sha256,
and ``pending_shards()`` lists what is left. Only one shard is in memory at any time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import ClassLabel, Dataset, DatasetInfo, Features, Image, List, Value
from datasets.utils.py_utils import asdict
from PIL import Image as PILImage

from csm.errors import CSMError
from csm.utils import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "csm_synthetic.json"
SPLIT = "train"
RECORDS_DIR = Path(".csm") / "shards"

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


def _png_to_array(data: bytes) -> np.ndarray:
    img = PILImage.open(io.BytesIO(data), formats=("PNG",))  # the format always writes PNG
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.transpose(array, (2, 0, 1))


def _undecodable(where: str, exc: Exception) -> CSMError:
    return CSMError(
        f"{where}: the image does not decode ({type(exc).__name__}: {exc}); regenerate this "
        "shard (delete its record under .csm/shards and run `csm generate --resume`)"
    )


def decode_png(data: bytes, where: str) -> np.ndarray:
    """Decode PNG bytes to uint8 (C, H, W); ``where`` names the row in the error message."""
    try:
        return _png_to_array(data)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise _undecodable(where, exc) from exc


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


def table_from_columns(features: Features, columns: dict[str, Any]) -> pa.Table:
    """Arrow table with the exact schema (and HF feature metadata) of ``features``."""
    schema = features.arrow_schema
    arrays = [
        arrow_column(columns[name], fld.type)
        for name, fld in zip(schema.names, schema, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` as an Arrow stream to ``path`` via a temporary name and ``os.replace``."""
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        pa.ipc.new_stream(raw, table.schema) as writer,
    ):
        writer.write_table(table)


def write_json_atomic(data: Any, path: Path) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    write_text_atomic(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


def write_text_atomic(text: str, path: Path) -> None:
    """Write text to ``path`` through a temporary file and ``os.replace``."""
    atomic_write_text(path, text)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_table(path: Path) -> pa.Table:
    """Read one Arrow-stream shard; a truncated or corrupt file raises :class:`CSMError`."""
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise CSMError(
            f"{path}: the shard is truncated or corrupt ({exc}); delete its record under "
            ".csm/shards "
            "and run `csm generate --resume` to regenerate it"
        ) from exc


# -------------------------------------------------------------------------------------- manifest
def _shard_name(index: int, num_shards: int) -> str:
    return f"data-{index:05d}-of-{num_shards:05d}.arrow"


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Read ``csm_synthetic.json``; a directory without one raises :class:`CSMError`."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CSMError(
            f"{out_dir}: not a csm synthetic dataset (no {MANIFEST_NAME}); pass a directory "
            "written "
            "by `csm generate`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CSMError(
            f"{path}: the manifest is not valid JSON ({exc}); regenerate the dataset"
        ) from exc
    if manifest.get("format") != "csm-synthetic" or manifest.get("version") != FORMAT_VERSION:
        raise CSMError(
            f"{path}: unknown manifest format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; regenerate the dataset with this csm version"
        )
    return manifest


def size_category(n: int) -> str:
    """Hugging Face ``size_categories`` bucket for ``n`` rows."""
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if n < limit:
            return name
    return "n>10M"


class SyntheticWriter:
    """Sharded, resumable, atomic writer of a synthetic dataset.

    Args:
        out_dir: dataset directory (created; must be new or empty unless ``resume``).
        class_names: the real dataset's class names, in label order.
        info: generation parameters (model, scheduler, steps, guidance, group_size, pair walk,
            seed, ...) recorded in the manifest, the card and the dataset info. Must contain
            ``group_size``.
        groups_per_shard: groups per shard (the unit of writing and resuming).
        total_groups: number of groups in the finished dataset.
        resume: re-open an existing directory written with the same parameters.
        overwrite: delete an existing csm synthetic dataset at ``out_dir`` first.

    Raises:
        CSMError: the directory holds other data, or resuming with different parameters.
    """

    def __init__(
        self,
        out_dir: str | Path,
        class_names: Sequence[str],
        info: dict[str, Any],
        groups_per_shard: int,
        total_groups: int,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.class_names = list(class_names)
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise CSMError(
                f"class_names {self.class_names}: need at least two distinct names; check the model"
            )
        if groups_per_shard < 1:
            raise CSMError(f"groups_per_shard={groups_per_shard}: must be >= 1")
        if total_groups < 1:
            raise CSMError(f"groups={total_groups}: must be >= 1; ask for at least one group")
        if int(info.get("group_size", 0)) < 2:
            raise CSMError(f"group_size={info.get('group_size')}: must be >= 2")
        self.info = json.loads(json.dumps(info))  # plain JSON types, as recorded
        self.group_size = int(info["group_size"])
        self.groups_per_shard = int(groups_per_shard)
        self.total_groups = int(total_groups)
        self.num_shards = math.ceil(self.total_groups / self.groups_per_shard)
        self.features = synthetic_features(self.class_names)
        params = self._params()
        manifest_path = self.out_dir / MANIFEST_NAME
        if manifest_path.exists():
            if overwrite:
                read_manifest(self.out_dir)  # only ever delete a csm dataset
                shutil.rmtree(self.out_dir)
            elif not resume:
                raise CSMError(
                    f"{self.out_dir}: a synthetic dataset already exists; pass --resume to "
                    "continue "
                    "it or --overwrite to replace it"
                )
        elif self.out_dir.exists() and any(self.out_dir.iterdir()):
            raise CSMError(
                f"{self.out_dir}: the directory is not empty and is not a csm synthetic dataset; "
                "choose a new --out directory"
            )
        if manifest_path.exists():
            manifest = read_manifest(self.out_dir)
            if manifest["params"] != params:
                diff = sorted(
                    k
                    for k in set(params) | set(manifest["params"])
                    if params.get(k) != manifest["params"].get(k)
                )
                raise CSMError(
                    f"{self.out_dir}: --resume with different parameters ({', '.join(diff)}); "
                    "rerun "
                    "with the original parameters or write to a new --out directory"
                )
            self._check_records()
        else:
            manifest = {
                "format": "csm-synthetic",
                "version": FORMAT_VERSION,
                "params": params,
                "annotation": None,
                "finalized": False,
            }
            write_json_atomic(manifest, manifest_path)
        self.manifest = manifest

    def _params(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "info": self.info,
            "groups_per_shard": self.groups_per_shard,
            "total_groups": self.total_groups,
            "num_shards": self.num_shards,
        }

    # ---- shard bookkeeping
    def shard_groups(self, index: int) -> range:
        """The fixed range of group ids that shard ``index`` holds."""
        if not 0 <= index < self.num_shards:
            raise CSMError(f"shard {index}: out of range; the dataset has {self.num_shards} shards")
        start = index * self.groups_per_shard
        return range(start, min(start + self.groups_per_shard, self.total_groups))

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.out_dir / SPLIT / _shard_name(index, self.num_shards)

    def _record_path(self, index: int) -> Path:
        return self.out_dir / RECORDS_DIR / f"{index:05d}.json"

    def _check_records(self) -> None:
        for index in range(self.num_shards):
            record_path = self._record_path(index)
            if record_path.exists():
                _verify_shard(
                    self.shard_path(index), json.loads(record_path.read_text()), full=True
                )

    def pending_shards(self) -> list[int]:
        """Shards not yet written (every shard of a new dataset)."""
        return [i for i in range(self.num_shards) if not self._record_path(i).exists()]

    def write_shard(
        self,
        index: int,
        images: torch.Tensor | np.ndarray,
        class_a: Sequence[int],
        class_b: Sequence[int],
        lam: Sequence[float],
        group_id: Sequence[int],
        seed: Sequence[int],
    ) -> None:
        """Write shard ``index`` atomically, then its record.

        Rows must be exactly the groups of :meth:`shard_groups`, ``group_size`` rows each, in
        group order. ``images`` are uint8 or float in [0, 1], shape (N, C, H, W).
        """
        groups = self.shard_groups(index)
        expected = np.repeat(np.arange(groups.start, groups.stop), self.group_size)
        got = np.asarray(group_id, dtype=np.int64)
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise CSMError(
                f"shard {index}: rows must be groups {groups.start}..{groups.stop - 1} with "
                f"{self.group_size} images each, in order; got {len(got)} rows"
            )
        k = len(self.class_names)
        for name, values in (("class_a", class_a), ("class_b", class_b)):
            arr = np.asarray(values)
            if arr.size and (arr.min() < 0 or arr.max() >= k):
                raise CSMError(f"shard {index}: {name} outside 0..{k - 1}; check the generator")
        table = build_table(self.features, images, class_a, class_b, lam, group_id, seed)
        path = self.shard_path(index)
        write_table_atomic(table, path)
        record = {
            "shard": index,
            "file": f"{SPLIT}/{path.name}",
            "rows": table.num_rows,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
            "groups": [groups.start, groups.stop],
        }
        write_json_atomic(record, self._record_path(index))
        logger.debug("wrote shard %d (%d rows) to %s", index, table.num_rows, path)

    def finalize(self) -> Path:
        """Check every shard and write ``state.json``, ``dataset_info.json`` and the card."""
        pending = self.pending_shards()
        if pending:
            raise CSMError(
                f"{self.out_dir}: {len(pending)} of {self.num_shards} shards are not written "
                f"(first: {pending[0]}); run `csm generate --resume` to finish it"
            )
        self._check_records()
        write_dataset_metadata(self.out_dir)
        self.manifest["finalized"] = True  # last: a crash before this leaves it unfinished
        write_json_atomic(self.manifest, self.out_dir / MANIFEST_NAME)
        return self.out_dir


def _verify_shard(path: Path, record: dict[str, Any], full: bool) -> None:
    if not path.is_file():
        raise CSMError(
            f"{path}: the shard is missing; delete its record under .csm/shards and run "
            "`csm generate --resume` to regenerate it"
        )
    size = path.stat().st_size
    if size != record["bytes"] or (full and file_sha256(path) != record["sha256"]):
        raise CSMError(
            f"{path}: the shard is truncated or modified ({size} bytes, recorded "
            f"{record['bytes']}); "
            "delete its record under .csm/shards and run `csm generate --resume` to regenerate it"
        )


def shard_records(out_dir: str | Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of all shards, in order; missing records raise :class:`CSMError`."""
    out_dir = Path(out_dir)
    records = []
    for index in range(manifest["params"]["num_shards"]):
        path = out_dir / RECORDS_DIR / f"{index:05d}.json"
        if not path.is_file():
            raise CSMError(
                f"{out_dir}: shard {index} was never written; run `csm generate --resume` to finish"
            )
        records.append(json.loads(path.read_text()))
    return records


def update_shard_record(out_dir: str | Path, index: int, path: Path, rows: int) -> dict[str, Any]:
    """Re-record shard ``index`` after it was rewritten (annotation)."""
    out_dir = Path(out_dir)
    record_path = out_dir / RECORDS_DIR / f"{index:05d}.json"
    record = json.loads(record_path.read_text())
    record.update(rows=rows, bytes=path.stat().st_size, sha256=file_sha256(path))
    write_json_atomic(record, record_path)
    return record


# --------------------------------------------------------------------------- metadata and card
def dataset_info(manifest: dict[str, Any], num_rows: int, num_bytes: int) -> DatasetInfo:
    """The ``datasets.DatasetInfo`` of a synthetic dataset (parameters in the description)."""
    from datasets import SplitDict, SplitInfo

    params = manifest["params"]
    description = (
        "csm synthetic class-mixed images with calibrated soft labels. Parameters (JSON): "
        + json.dumps(
            {"generation": params["info"], "annotation": manifest.get("annotation")}, sort_keys=True
        )
    )
    splits = SplitDict()
    splits.add(SplitInfo(name=SPLIT, num_bytes=num_bytes, num_examples=num_rows))
    return DatasetInfo(
        description=description,
        citation=CITATION,
        homepage="https://arxiv.org/abs/2504.13548",
        license=str(params["info"].get("license", "other")),
        features=synthetic_features(params["class_names"]),
        splits=splits,
        dataset_size=num_bytes,
    )


def write_dataset_metadata(out_dir: str | Path) -> None:
    """(Re)write ``dataset_dict.json``, ``train/state.json``, ``train/dataset_info.json``, card."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    records = shard_records(out_dir, manifest)
    num_rows = sum(r["rows"] for r in records)
    num_bytes = sum(r["bytes"] for r in records)
    fingerprint = hashlib.sha256("".join(r["sha256"] for r in records).encode()).hexdigest()[:16]
    state = {
        "_data_files": [{"filename": Path(r["file"]).name} for r in records],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": SPLIT,
    }
    info = dataset_info(manifest, num_rows, num_bytes)
    write_json_atomic(state, out_dir / SPLIT / "state.json")
    write_text_atomic(json.dumps(asdict(info), indent=2), out_dir / SPLIT / "dataset_info.json")
    write_json_atomic({"splits": [SPLIT]}, out_dir / "dataset_dict.json")
    write_text_atomic(render_card(manifest, num_rows), out_dir / "README.md")


def _yaml_list(items: Sequence[str]) -> str:
    return "\n".join(f"- {json.dumps(str(x))}" for x in items)


def render_card(manifest: dict[str, Any], num_rows: int, data_files: str | None = None) -> str:
    """The dataset card (README.md): YAML header, generation, annotation, fields, limits, citation.

    Args:
        manifest: the dataset manifest.
        num_rows: number of rows.
        data_files: glob of the data files for the YAML ``configs`` (default: local Arrow shards;
            the Hub push uses its Parquet files).
    """
    params = manifest["params"]
    gen = params["info"]
    ann = manifest.get("annotation")
    names = params["class_names"]
    data_files = data_files or f"{SPLIT}/data-*.arrow"
    source = gen.get("dataset") or gen.get("source_dataset")
    pretty = gen.get("pretty_name") or f"CSM semantic-mixing synthetic data ({source or 'custom'})"
    yaml_lines = [
        "---",
        f"license: {json.dumps(str(gen.get('license', 'other')))}",
        "task_categories:\n- image-classification",
        f"size_categories:\n- {json.dumps(size_category(num_rows))}",
        f"pretty_name: {json.dumps(pretty)}",
        "tags:\n"
        + _yaml_list(["synthetic", "calibration", "semantic-mixing", "soft-labels", "csm"]),
        "source_datasets:\n" + _yaml_list([source] if source else ["original"]),
        "configs:\n- config_name: default\n  data_files:\n  - split: train\n"
        f"    path: {json.dumps(data_files)}",
        "---",
    ]
    gen_rows = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(gen.items()))
    if ann is None:
        ann_text = (
            "Not annotated yet: `soft_label` follows the generation ratio (`soft[a] = lam`, "
            "`soft[b] = 1 - lam`) and `lam_hat` is NaN. Run `csm annotate` to reannotate."
        )
    else:
        ann_rows = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(ann.items()))
        ann_text = (
            "Calibrated reannotation (Luo et al. 2025, section 2): class prototypes are the mean "
            "encoder feature of the real training images of each class; `lam_hat` is the scalar "
            "projection of an image's feature on the segment from prototype b to prototype a; "
            "`soft[a] = sigmoid(s * (lam_hat - 0.5))` (mode `projection`) or the judge "
            "classifier's "
            "probabilities restricted to {a, b} and renormalised (mode `judge`).\n\n"
            "| parameter | value |\n|---|---|\n" + ann_rows
        )
    body = f"""
# {pretty}

{num_rows} images that mix two classes each, made by semantic mixing with a class-conditional
diffusion model, for training classifiers whose confidence can be trusted (CSM, Luo et al.,
ICML 2025). Classes ({len(names)}): {", ".join(f"`{n}`" for n in names)} — identical, in
order, to the real dataset's.

## How it was generated

Groups of `group_size` images share one initial noise (one seed) at λ = 0, 1/(G−1), …, 1; the
class condition is λ·E[a] + (1−λ)·E[b]. Class pairs walk all unordered pairs a < b in order,
cycling; the pair and seed of group k are a pure function of (k, base seed).

| parameter | value |
|---|---|
{gen_rows}

## How it was annotated

{ann_text}

## Fields

| field | type | meaning |
|---|---|---|
| `image` | Image | the generated image (PNG, lossless) |
| `label` | ClassLabel | dominant class: `class_a` if `soft_label[class_a] >= 0.5` else `class_b` |
| `class_a`, `class_b` | ClassLabel | the mixed pair; `lam` weighs `class_a` |
| `lam` | float32 | generation ratio: 1 = pure `class_a`, 0 = pure `class_b` |
| `lam_hat` | float32 | raw, unclipped projection on the prototype segment (NaN before annotation) |
| `confidence` | float32 | soft label of `label`, i.e. `max(soft[a], soft[b])` |
| `soft_label` | List(float32, K) | training target, non-zero on `class_a` and `class_b` only |
| `group_id` | int64 | the group (shared initial noise) |
| `seed` | int64 | seed of the group's initial noise |

## Intended use and limits

Use as extra training data with soft targets (e.g. CE on real + Brier on synthetic) to improve
calibration of classifiers on the source dataset's classes. Not real data: do not evaluate on
it, and do not use it outside the source dataset's label space. Images inherit the biases and
failure modes of the diffusion model and the annotation encoder; the soft labels are as good as
the encoder's prototypes. The squash `s` acts as label smoothing on pure endpoints.

Load with `datasets.load_dataset("<this folder or repo>")` or, with csm,
`csm.synthetic.dataset.load_synthetic(dir)`.

## Citation

```bibtex
{CITATION}
```
"""
    return "\n".join(yaml_lines) + "\n" + body


# --------------------------------------------------------------------------------------- reader
def check_dataset(out_dir: str | Path, full: bool = False) -> tuple[dict[str, Any], list[dict]]:
    """Validate a finished dataset: manifest, records, shard sizes (and sha256 if ``full``)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest.get("finalized"):
        raise CSMError(
            f"{out_dir}: the dataset is not finished; run `csm generate --resume` with the same "
            "parameters to complete it"
        )
    records = shard_records(out_dir, manifest)
    for record in records:
        _verify_shard(out_dir / record["file"], record, full=full)
    return manifest, records


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
    """

    images: torch.Tensor
    soft_labels: torch.Tensor
    class_a: torch.Tensor
    class_b: torch.Tensor
    group_id: torch.Tensor
    lam: torch.Tensor
    class_names: list[str]


def iter_shards(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(index, path)`` of every shard of a finished dataset, in order (validated)."""
    out_dir = Path(out_dir)
    _, records = check_dataset(out_dir)
    return [(r["shard"], out_dir / r["file"]) for r in records]


def decode_images(table: pa.Table, where: str) -> np.ndarray:
    """Decode the ``image`` column of a shard table to uint8 (N, C, H, W)."""
    blobs = table.column("image").combine_chunks().field("bytes").to_pylist()
    arrays = []
    for i, blob in enumerate(blobs):
        try:
            arrays.append(_png_to_array(blob))
        except Exception as exc:  # PIL raises many types for corrupt data
            group = table.column("group_id")[i].as_py()
            raise _undecodable(f"{where} row {i} (group {group})", exc) from exc
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise CSMError(f"{where}: images of different shapes {sorted(shapes)}; regenerate the data")
    return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 1), dtype=np.uint8)


def load_synthetic_tensors(out_dir: str | Path) -> SyntheticTensors:
    """Decode a finished synthetic dataset into tensors (see :class:`SyntheticTensors`)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("images", "soft", "class_a", "class_b", "group_id", "lam")
    }
    for _, path in iter_shards(out_dir):
        table = read_table(path)
        parts["images"].append(decode_images(table, str(path)))
        parts["soft"].append(np.asarray(table.column("soft_label").to_pylist(), dtype=np.float32))
        for name in ("class_a", "class_b", "group_id", "lam"):
            parts[name].append(table.column(name).to_numpy())
    return SyntheticTensors(
        images=torch.from_numpy(np.concatenate(parts["images"])),
        soft_labels=torch.from_numpy(np.concatenate(parts["soft"])),
        class_a=torch.from_numpy(np.concatenate(parts["class_a"]).astype(np.int64)),
        class_b=torch.from_numpy(np.concatenate(parts["class_b"]).astype(np.int64)),
        group_id=torch.from_numpy(np.concatenate(parts["group_id"]).astype(np.int64)),
        lam=torch.from_numpy(np.concatenate(parts["lam"]).astype(np.float32)),
        class_names=list(manifest["params"]["class_names"]),
    )
