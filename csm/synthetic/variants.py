"""Named annotations of one generation, stored as label-only data over the same images.

Several annotations of one synthetic dataset (λ labels, squash s = 2, 4, 8, judge mode, ...) live
side by side. Each named annotation ``NAME`` keeps only the four label columns
(:data:`~csm.synthetic.schema.LABEL_COLUMNS`) plus ``group_id`` as the row key, one small Arrow
file per image shard, in the same row order::

    DIR/annotations/NAME/labels-00003-of-00010-<sha256[:12]>.arrow
    DIR/annotations/NAME/annotation_report.json, annotation_report.png

and the manifest records, per annotation, its parameters and every file's rows, size and sha256
(``manifest["annotations"][NAME]``). The name ``lambda`` is built in: soft labels that follow the
generation ratio, computed from the ``lam`` column. Training picks one by name
(``csm train --synthetic DIR:NAME``, :func:`csm.synthetic.reader.load_synthetic_tensors`) without
touching the images.

The *active* annotation (``manifest["annotation"]``) is the one whose columns are also in the main
shards, because Arrow and ``datasets`` cannot join columns of different files on load: plain
``datasets.load_from_disk(DIR)``, ``datasets.load_dataset(DIR)`` and ``csm push`` read the main
shards only. Trade-off: writing a named annotation costs only its label files (a few bytes per
image); *activating* one (:func:`activate`) rewrites the main shards once (image bytes copied,
nothing re-encoded), so switching the active annotation costs one pass over the data while
training on any named one costs nothing extra.

Activation is a pointer switch, all-or-nothing under ``kill -9`` at any moment: the new main
shards are written beside the old ones under content-addressed names
(``train/data-00003-of-00010-<sha256[:12]>.arrow``), then one atomic replace of the manifest,
which lists the main shards (``manifest["shards"]``), commits the switch for csm's readers; the
files that list the shards for plain ``datasets`` (``train/state.json`` for ``load_from_disk``,
the card's ``configs`` for ``load_dataset``) are each replaced atomically after it, and only then
are the old shards deleted. Every reader therefore sees the old or the new annotation, never a
mix; :func:`recover` (run by every ``csm annotate``) finishes the metadata of a committed switch
or deletes the staged files of an uncommitted one.

Label files are content-addressed (the name carries the file's sha256) and the manifest is the
commit point: annotating again with the same name writes new files, switches the manifest to them
and only then deletes the old ones, so a kill at any moment leaves either the old or the new
annotation, never a mix, and an annotation replaces, never compounds.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from csm.errors import CSMError
from csm.synthetic.card import write_dataset_metadata
from csm.synthetic.schema import (
    ANNOTATIONS_DIR,
    LABEL_COLUMNS,
    LAMBDA_NAME,
    MANIFEST_NAME,
    REPORT_JSON,
    REPORT_PNG,
    SPLIT,
    arrow_column,
    label_columns,
    label_schema,
    soft_targets,
    synthetic_schema,
    table_from_columns,
)
from csm.synthetic.storage import (
    check_dataset,
    file_sha256,
    read_manifest,
    read_table,
    read_verified_table,
    shard_records,
    update_shard_record,
    verify_shard,
    write_json_atomic,
)
from csm.utils import atomic_path, clean_temp_files, kill_point, lock_output

logger = logging.getLogger(__name__)

__all__ = [
    "activate",
    "active_name",
    "annotation_names",
    "check_name",
    "default_name",
    "label_table",
    "parse_spec",
    "read_labels",
    "recover",
    "with_labels",
    "write_annotation",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_name(mode: str, squash: float | None) -> str:
    """The default name of an annotation: ``judge``, or ``s<squash>`` (``s4``, ``s2.3``)."""
    return "judge" if mode == "judge" else f"s{float(squash):g}"


def check_name(name: str) -> str:
    """Return ``name`` if it can name a written annotation, else raise :class:`CSMError`."""
    if not _NAME_RE.match(name) or name == LAMBDA_NAME:
        raise CSMError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 64, not "
            f"{LAMBDA_NAME!r}, which is built in), e.g. --name s4"
        )
    return name


def annotation_names(manifest: dict[str, Any]) -> list[str]:
    """Every annotation a dataset offers: the built-in ``lambda``, then the written ones."""
    return [LAMBDA_NAME, *sorted(manifest.get("annotations") or {})]


def active_name(manifest: dict[str, Any]) -> str | None:
    """Name of the annotation in the main shards (``lambda`` before any; ``None``: unnamed)."""
    ann = manifest.get("annotation")
    return LAMBDA_NAME if ann is None else ann.get("name")


def parse_spec(spec: str | Path) -> tuple[Path, str | None]:
    """Split ``DIR[:NAME]`` into the directory and the annotation name (``None``: the active)."""
    text = str(spec)
    if Path(text).is_dir() or ":" not in text:
        return Path(text), None
    folder, _, name = text.rpartition(":")
    return Path(folder), name or None


def _label_file(index: int, num_shards: int, digest: str) -> str:
    return f"labels-{index:05d}-of-{num_shards:05d}-{digest[:12]}.arrow"


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def label_table(
    class_names: list[str],
    group_id: np.ndarray,
    share_a: np.ndarray,
    lam_hat: np.ndarray,
    class_a: np.ndarray,
    class_b: np.ndarray,
) -> pa.Table:
    """The label-only table of one shard: ``group_id`` (row key) + the label columns."""
    columns = label_columns(share_a, lam_hat, class_a, class_b, len(class_names))
    columns["group_id"] = np.asarray(group_id, dtype=np.int64)
    return table_from_columns(label_schema(class_names), columns)


def stage_label_file(
    out_dir: str | Path, name: str, record: dict[str, Any], table: pa.Table, num_shards: int
) -> dict[str, Any]:
    """Write annotation ``name``'s label table of the image shard of ``record`` under its
    content-addressed name; unreferenced (and removed by :func:`recover`) until
    :func:`commit_annotation` lists it. Returns its file record."""
    if table.num_rows != record["rows"]:
        raise CSMError(f"annotation {name}: shard {record['shard']} has {record['rows']} rows")
    data = _table_bytes(table)
    digest = hashlib.sha256(data).hexdigest()
    path = Path(out_dir) / ANNOTATIONS_DIR / name / _label_file(record["shard"], num_shards, digest)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    rel = f"{ANNOTATIONS_DIR}/{name}/{path.name}"
    return {"shard": record["shard"], "file": rel, "rows": table.num_rows, "bytes": len(data)} | {
        "sha256": digest
    }


def commit_annotation(
    out_dir: str | Path,
    name: str,
    info: dict[str, Any],
    files: list[dict[str, Any]],
    metadata: bool = True,
) -> dict[str, Any]:
    """Record annotation ``name`` (its staged label ``files``, one per shard) in the manifest —
    the commit point — then delete its older label files (see :func:`write_annotation`)."""
    out_dir = Path(out_dir)
    entry = {**info, "name": name, "shards": files}
    manifest = read_manifest(out_dir)
    manifest.setdefault("annotations", {})[name] = entry
    if not metadata:
        manifest["metadata_pending"] = True
    write_json_atomic(manifest, out_dir / MANIFEST_NAME)  # the commit point
    keep = {Path(f["file"]).name for f in files}
    for stale in (out_dir / ANNOTATIONS_DIR / name).glob("labels-*.arrow"):
        if stale.name not in keep:
            stale.unlink()
    if metadata:
        write_dataset_metadata(out_dir)  # the card lists the annotations
    return entry


def write_annotation(
    out_dir: str | Path,
    name: str,
    info: dict[str, Any],
    tables: list[pa.Table],
    metadata: bool = True,
) -> dict[str, Any]:
    """Store annotation ``name`` (one label table per image shard, in order); replaces any old one.

    Args:
        out_dir: The finished synthetic dataset.
        name: The annotation's name.
        info: What the manifest records of it (encoder, mode, fit, splits).
        tables: Its label tables, one per image shard, in shard order.
        metadata: Rewrite the card and metadata now. ``False`` when :func:`activate` follows at
            once (it rewrites them anyway): the manifest is then committed with
            ``metadata_pending``, so the card is still rewritten by :func:`recover` if a kill
            comes between the two.

    Returns:
        The manifest entry written (``info`` + ``name`` + the file records).
    """
    out_dir = Path(out_dir)
    check_name(name)
    recover(out_dir)
    manifest, records = check_dataset(out_dir)
    if len(tables) != len(records):
        raise CSMError(f"annotation {name}: {len(tables)} label tables for {len(records)} shards")
    files = [
        stage_label_file(out_dir, name, record, table, len(records))
        for record, table in zip(records, tables, strict=True)
    ]
    return commit_annotation(out_dir, name, info, files, metadata)


def _unknown(where: str, name: str, manifest: dict[str, Any]) -> CSMError:
    return CSMError(
        f"{where}: no annotation named {name!r}; available: "
        f"{', '.join(annotation_names(manifest))} (`csm annotate DIR --name NAME` writes one)"
    )


def read_labels(
    out_dir: str | Path,
    manifest: dict[str, Any],
    name: str,
    shard: int,
    main: pa.Table,
    full: bool = True,
) -> dict[str, np.ndarray]:
    """Label columns of annotation ``name`` for image shard ``shard`` (its table ``main``).

    ``lambda`` is computed from ``main``'s ``lam``; a written annotation is read from its file,
    checked against its record (sha256, read once; ``full=False``: size only) and keyed by
    ``group_id``.

    Returns:
        ``label``, ``lam_hat``, ``confidence`` (N,) and ``soft_label`` (N, K) as numpy arrays.
    """
    a = main.column("class_a").to_numpy()
    b = main.column("class_b").to_numpy()
    if name == LAMBDA_NAME:
        lam = main.column("lam").to_numpy()
        soft, label, conf = soft_targets(lam, a, b, len(manifest["params"]["class_names"]))
        nan = np.full(len(lam), np.nan, dtype=np.float32)
        return {"label": label, "lam_hat": nan, "confidence": conf, "soft_label": soft}
    entry = (manifest.get("annotations") or {}).get(name)
    if entry is None:
        raise _unknown(str(out_dir), name, manifest)
    record = entry["shards"][shard]
    path = Path(out_dir) / record["file"]
    if full:
        table = read_verified_table(path, record)
    else:
        verify_shard(path, record, full=False)
        table = read_table(path)
    return label_columns_of(table, main, name, shard, where=str(path))


def label_columns_of(
    table: pa.Table, main: pa.Table, name: str, shard: int, where: str | None = None
) -> dict[str, Any]:
    """The label columns of annotation ``name``'s label ``table`` for image shard ``shard`` (its
    table ``main``), as :func:`read_labels` gives them, checked to key ``main``'s rows
    (``where``: the table's name in the error, default the annotation's)."""
    where = where or f"annotation {name}"
    if not np.array_equal(table.column("group_id").to_numpy(), main.column("group_id").to_numpy()):
        raise CSMError(
            f"{where}: its rows do not match image shard {shard}; annotate again with --name {name}"
        )
    cols = {c: table.column(c).to_numpy() for c in ("label", "lam_hat", "confidence")}
    soft = table.column("soft_label").to_pylist()
    cols["soft_label"] = np.asarray(soft, dtype=np.float32).reshape(table.num_rows, -1)
    return cols


def with_labels(table: pa.Table, class_names: list[str], labels: dict[str, Any]) -> pa.Table:
    """``table`` (a main shard) with its :data:`LABEL_COLUMNS` replaced by ``labels``."""
    schema = synthetic_schema(class_names)
    arrays = [
        arrow_column(labels[name], fld.type)
        if name in LABEL_COLUMNS
        else table.column(name).combine_chunks().cast(fld.type)
        for name, fld in zip(schema.names, schema, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _finish_swaps(out_dir: Path) -> None:
    """Re-record the shards that an activation of an older csm (which swapped shards in place,
    one rename at a time, under a manifest ``activating`` flag) already swapped in, so that the
    dataset passes its checks and the activation can simply run again."""
    manifest = read_manifest(out_dir)
    pending = manifest.get("activating_shards") or {}
    for record in shard_records(out_dir, manifest) if pending else []:
        path, new = out_dir / record["file"], pending.get(str(record["shard"]))
        if new and record["sha256"] != new["sha256"] and path.is_file():
            if path.stat().st_size == new["bytes"] and file_sha256(path) == new["sha256"]:
                update_shard_record(out_dir, record["shard"], path, record["rows"])


def _shard_file(index: int, num_shards: int, digest: str) -> str:
    return f"data-{index:05d}-of-{num_shards:05d}-{digest[:12]}.arrow"


def stage_shard(
    out_dir: str | Path,
    class_names: list[str],
    record: dict[str, Any],
    num_shards: int,
    labels_for: Callable[[pa.Table], dict[str, Any]],
) -> dict[str, Any]:
    """Write the main shard of ``record`` with the labels ``labels_for(its table)`` gives
    (:func:`read_labels`' columns) under a new content-addressed name next to the current one
    (nothing is replaced; unreferenced, and removed by :func:`recover`, until
    :func:`commit_activation`); returns its new record."""
    out_dir = Path(out_dir)
    main = read_verified_table(out_dir / record["file"], record)
    data = _table_bytes(with_labels(main, class_names, labels_for(main)))
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{SPLIT}/{_shard_file(record['shard'], num_shards, digest)}"
    path = out_dir / rel
    done = path.is_file() and path.stat().st_size == len(data) and file_sha256(path) == digest
    if not done:  # (a kill before the commit may have left it complete: content-addressed)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return {**record, "file": rel, "bytes": len(data), "sha256": digest}


def _stage_shards(
    out_dir: Path, manifest: dict[str, Any], records: list[dict[str, Any]], name: str
) -> list[dict[str, Any]]:
    """:func:`stage_shard` of every main shard with annotation ``name``'s labels, read from its
    files; returns the new shard records."""
    names = list(manifest["params"]["class_names"])
    return [
        stage_shard(
            out_dir,
            names,
            record,
            len(records),
            lambda main, i=record["shard"]: read_labels(out_dir, manifest, name, i, main, True),
        )
        for record in records
    ]


def activate(out_dir: str | Path, name: str) -> None:
    """Make annotation ``name`` the one in the main shards (see the module docstring).

    The switch-over is all-or-nothing under a kill at any moment: the new main shards are
    written under new content-addressed names beside the current ones, then one atomic replace
    of the manifest (which lists the main shards) commits the switch; the dataset's metadata
    (``train/state.json``, the card, the report) is then rewritten from the manifest and the old
    shards deleted. A kill before the commit leaves the old annotation (the staged files are
    unreferenced and removed by the next run); a kill after it leaves the new one for csm and
    the old, intact, for plain ``datasets`` until :func:`recover` (run by every ``csm annotate``)
    finishes the metadata.

    Raises:
        CSMError: Unknown name, or a damaged shard or label file (nothing is changed then).
    """
    out_dir = Path(out_dir)
    _finish_swaps(out_dir)
    recover(out_dir, metadata=False)  # the metadata is rewritten once, after the commit
    manifest, records = check_dataset(out_dir, activating_ok=True)
    if name not in annotation_names(manifest):
        raise _unknown(str(out_dir), name, manifest)
    commit_activation(out_dir, name, _stage_shards(out_dir, manifest, records, name))


def commit_activation(out_dir: str | Path, name: str, staged: list[dict[str, Any]]) -> None:
    """Switch the manifest to the staged main shards of annotation ``name`` (the commit point of
    :func:`activate`), then rewrite the metadata and delete the old shards (:func:`recover`)."""
    out_dir = Path(out_dir)
    kill_point("activate:staged")
    manifest = read_manifest(out_dir)
    entry = (manifest.get("annotations") or {}).get(name)
    manifest["annotation"] = (
        None if entry is None else {k: v for k, v in entry.items() if k != "shards"}
    )
    manifest.pop("activating", None)
    manifest.pop("activating_shards", None)
    manifest.update(shards=staged, metadata_pending=True)
    write_json_atomic(manifest, out_dir / MANIFEST_NAME)  # the commit point
    kill_point("activate:committed")
    recover(out_dir)
    logger.info("activated annotation %r in %s", name, out_dir)


def recover(out_dir: str | Path, metadata: bool = True) -> bool:
    """Finish or clean up whatever a kill interrupted in a finished dataset; idempotent.

    After a committed activation whose metadata is pending, rewrite the report, ``state.json``,
    ``dataset_info.json`` and the card from the manifest, then clear the flag; delete main
    shards and label files that the manifest does not reference (old ones of a finished
    switch-over, staged ones of an uncommitted one or of an annotation never committed) and
    the temporary files of interrupted writes. Changes nothing in a consistent dataset. Call it
    only from the one process that writes the dataset.

    Args:
        out_dir: The dataset.
        metadata: Also rewrite pending metadata (``False``: only delete what is unreferenced,
            for a caller that commits with ``metadata_pending`` itself and recovers after).

    Returns:
        Whether anything was changed.
    """
    lock_output(out_dir, "csm annotate", flag="dataset")  # a second writer stops here
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest.get("finalized"):
        return False
    changed = False
    if metadata and manifest.get("metadata_pending"):
        if active_name(manifest) is not None:  # an unnamed (older) annotation keeps its report
            _copy_report(out_dir, active_name(manifest))
        write_dataset_metadata(out_dir)
        del manifest["metadata_pending"]
        write_json_atomic(manifest, out_dir / MANIFEST_NAME)
        changed = True
    if (out_dir / SPLIT).is_dir():
        keep = {Path(r["file"]).name for r in shard_records(out_dir, manifest)}
        for stale in sorted((out_dir / SPLIT).glob("data-*.arrow")):
            if stale.name not in keep:
                stale.unlink()
                changed = True
    entries = manifest.get("annotations") or {}
    for ann, entry in entries.items():
        keep = {Path(f["file"]).name for f in entry["shards"]}
        for stale in sorted((out_dir / ANNOTATIONS_DIR / ann).glob("labels-*.arrow")):
            if stale.name not in keep:
                stale.unlink()
                changed = True
    # label files staged for an annotation that a kill stopped before its commit
    for stale in sorted((out_dir / ANNOTATIONS_DIR).glob("*/labels-*.arrow")):
        if stale.parent.name not in entries:
            stale.unlink()
            changed = True
            if not any(stale.parent.iterdir()):
                stale.parent.rmdir()
    return bool(clean_temp_files(out_dir)) or changed


def _copy_report(out_dir: Path, name: str) -> None:
    """Put annotation ``name``'s report at the top of the dataset (none for ``lambda``)."""
    for report in (REPORT_JSON, REPORT_PNG):
        src = out_dir / ANNOTATIONS_DIR / name / report
        if src.is_file():
            with atomic_path(out_dir / report) as tmp:
                shutil.copyfile(src, tmp)
        else:
            (out_dir / report).unlink(missing_ok=True)
