"""Files of a synthetic dataset: atomic Arrow/JSON writes, the manifest and the shard records.

On-disk layout of ``DIR``::

    DIR/csm_synthetic.json            manifest: parameters, class names, info, annotations, state
    DIR/.csm/shards/00003.json        one record per finished shard (rows, bytes, sha256)
    DIR/train/data-00003-of-00010.arrow   shard 3 (Arrow stream; features in the schema metadata;
                                      ``data-00003-of-00010-<sha256[:12]>.arrow`` once an
                                      annotation is activated, listed in the manifest)
    DIR/train/state.json, DIR/train/dataset_info.json, DIR/dataset_dict.json   (after finalize)
    DIR/README.md                     the dataset card (YAML ``configs`` point at the shards)
    DIR/annotations/<name>/labels-00003-of-00010-<sha>.arrow   label-only data of annotation
                                      ``name`` (see :mod:`csm.synthetic.variants`)

Every file is written to a temporary name and renamed (:func:`csm.utils.atomic_path`); a shard's
record is written only after its rename, so a recorded shard is complete. Renames are atomic with
respect to process crashes and kills; files are not fsync'ed (that costs more than the annotation
itself on slow disks), so after a power loss the sha256 check that ``--resume`` and ``csm
annotate`` run on every recorded shard is what detects a damaged one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from csm.errors import CSMError
from csm.synthetic.schema import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    RECORDS_DIR,
    png_to_array,
    undecodable_error,
)
from csm.utils import atomic_path, atomic_write_text


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


def read_verified_table(path: Path, record: dict[str, Any]) -> pa.Table:
    """Read a recorded Arrow file once, checking its bytes against the record's sha256.

    The file is read into memory a single time; its sha256 (recorded when it was written) is
    computed over those bytes and the table parsed from the same buffer, so what a reader trains
    on is exactly what was written, at the cost of one hash per shard.

    Raises:
        CSMError: The file is missing, truncated, altered (even at the same size) or unreadable.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CSMError(
            f"{path}: the file is missing or unreadable ({exc}); regenerate it (`csm generate "
            "--resume` for an image shard, `csm annotate` for labels)"
        ) from None
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CSMError(
            f"{path}: its content differs from what was written (sha256 or size changed); "
            "regenerate it (`csm generate --resume` after deleting its record under .csm/shards "
            "for an image shard, `csm annotate` again for labels)"
        )
    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as exc:
        raise CSMError(f"{path}: the file is corrupt ({exc}); regenerate it") from None


def map_verified_table(path: Path, record: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
    """Read a recorded Arrow file once, checking its sha256, and memory-map the same file.

    The lazy counterpart of :func:`read_verified_table`. The file is opened with
    ``pyarrow.memory_map``; through that map's own descriptor its bytes are read once
    (``os.pread``), their sha256 is checked against the record and a table is parsed from them, as
    :func:`read_verified_table` does. The same file is also parsed zero-copy from the map, so what
    is verified is the very file mapped. Take the small columns from the read table (then drop
    it: it holds the whole file) and the large ones from the mapped table, whose pages stay on
    disk (in the page cache, shared by every process that maps the file) until a row is read. csm
    never rewrites a recorded file in place (every write is a new file renamed over the old), so
    the mapped bytes stay the verified ones.

    Returns:
        ``(read, mapped)``: the table of the bytes read, and the memory-mapped table.

    Raises:
        CSMError: The file is missing, truncated, altered (even at the same size) or unreadable.
    """
    try:
        source = pa.memory_map(str(path), "r")
    except OSError as exc:
        raise CSMError(
            f"{path}: the file is missing or unreadable ({exc}); regenerate it (`csm generate "
            "--resume` for an image shard, `csm annotate` for labels)"
        ) from None
    with source:
        fd, parts, offset = source.fileno(), [], 0
        size = os.fstat(fd).st_size
        while size == record["bytes"] and offset < size:
            if not (part := os.pread(fd, min(size - offset, 1 << 30), offset)):
                break
            parts.append(part)  # (one part unless the file is over 1 GiB)
            offset += len(part)
        data = b"".join(parts)
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise CSMError(
                f"{path}: its content differs from what was written (sha256 or size changed); "
                "regenerate it (`csm generate --resume` after deleting its record under "
                ".csm/shards for an image shard, `csm annotate` again for labels)"
            )
        try:
            read = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
            mapped = pa.ipc.open_stream(source).read_all()  # zero-copy: outlives the close
        except pa.ArrowInvalid as exc:
            raise CSMError(f"{path}: the file is corrupt ({exc}); regenerate it") from None
    return read, mapped


def shard_name(index: int, num_shards: int) -> str:
    """File name of shard ``index`` of ``num_shards``."""
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


def verify_shard(path: Path, record: dict[str, Any], full: bool) -> None:
    """Check a recorded file's size (and sha256 if ``full``); raise :class:`CSMError` if off."""
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
    """Records of all shards, in order; missing records raise :class:`CSMError`.

    Once an annotation has been activated the manifest lists the main shards itself
    (``manifest["shards"]``, written in one atomic replace: the commit point of the switch-over,
    see :mod:`csm.synthetic.variants`); before that, the per-shard records under ``.csm/shards``
    that ``csm generate`` writes are the list.
    """
    if manifest.get("shards") is not None:
        return [dict(r) for r in manifest["shards"]]
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


def check_dataset(
    out_dir: str | Path, full: bool = False, *, activating_ok: bool = False
) -> tuple[dict[str, Any], list[dict]]:
    """Validate a finished dataset: manifest, records, shard sizes (and sha256 if ``full``).

    Args:
        out_dir: The dataset directory.
        full: Also check every shard's sha256.
        activating_ok: Accept a dataset whose activation of an annotation was interrupted (its
            main shards mix two annotations); only the activation itself passes this.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest.get("finalized"):
        raise CSMError(
            f"{out_dir}: the dataset is not finished; run `csm generate --resume` with the same "
            "parameters to complete it"
        )
    if manifest.get("activating") and not activating_ok:
        name = manifest["activating"]
        raise CSMError(
            f"{out_dir}: activating annotation {name!r} was interrupted; run `csm annotate "
            f"{out_dir} --name {name} --activate` to finish it"
        )
    records = shard_records(out_dir, manifest)
    for record in records:
        verify_shard(out_dir / record["file"], record, full=full)
    return manifest, records


def decode_images(
    table: pa.Table, where: str, alloc: Callable[[tuple[int, ...]], np.ndarray] | None = None
) -> np.ndarray:
    """Decode the ``image`` column of a shard table to uint8 (N, C, H, W).

    Args:
        table: The shard's table.
        where: The shard's name in error messages.
        alloc: ``alloc(shape)`` returns the uint8 array of that shape the images are decoded
            straight into (e.g. a view of shared memory), instead of one stacked at the end.

    Raises:
        CSMError: An image does not decode, or the images differ in shape.
    """
    blobs = table.column("image").combine_chunks().field("bytes").to_pylist()
    out: np.ndarray | None = None
    for i, blob in enumerate(blobs):
        try:
            array = png_to_array(blob)
        except Exception as exc:  # PIL raises many types for corrupt data
            group = table.column("group_id")[i].as_py()
            raise undecodable_error(f"{where} row {i} (group {group})", exc) from exc
        if out is None:
            shape = (len(blobs), *array.shape)
            out = alloc(shape) if alloc is not None else np.empty(shape, dtype=np.uint8)
        elif array.shape != out.shape[1:]:
            shapes = sorted({out.shape[1:], array.shape})
            raise CSMError(f"{where}: images of different shapes {shapes}; regenerate the data")
        out[i] = array
    return out if out is not None else np.zeros((0, 1, 1, 1), dtype=np.uint8)
