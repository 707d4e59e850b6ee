"""Calibrated reannotation of a synthetic dataset (``csm annotate``).

Luo et al., "Beyond One-Hot Labels: Semantic Mixing for Model Calibration", ICML 2025,
arXiv 2504.13548, calibrated reannotation: the generation ratio λ is not the confidence an image
deserves, because the denoiser responds non-linearly to the mixed class embedding. With an image
encoder ``f`` and class prototypes ``p_k`` (mean ``f(x)`` over the real training images of class
``k``), an image ``x`` of pair ``(a, b)`` gets

    λ̂ = <f(x) − p_b, p_a − p_b> / ||p_a − p_b||²      (unclipped projection, column ``lam_hat``)
    soft[a] = sigmoid(s · (λ̂ − 0.5)),  soft[b] = 1 − soft[a]      (``--squash s``, default 4.0)

``--mode judge`` (ablation) instead uses a classifier's probabilities restricted to ``{a, b}`` and
renormalised: ``soft[a] = p_a / (p_a + p_b) = sigmoid(z_a − z_b)`` (``lam_hat`` records it).

``--label-mode`` (:mod:`csm.annotation.labels`, docs/labels.md) says how ``soft[a]`` is made from
that signal: ``squash`` (default, the above, unchanged), or calibrated on the real dataset's val
split (``--real``): ``judge`` (``sigmoid((z_a − z_b) / T)`` with ``T`` fitted by temperature
scaling; the judge is the encoder's classifier, else cosine similarity to the prototypes) or
``pair-fit`` (``sigmoid(s_ab · (λ̂ − t_ab))`` fitted per pair by a regularised logistic fit).
The fit, the split and its size are recorded with the annotation (``label_fit``).

Each annotation is stored under a name (``--name``, default ``s<squash>`` or ``judge``) as
label-only data next to the images (:mod:`csm.synthetic.variants`), so several annotations of
one generation live side by side and ``csm train --synthetic DIR:NAME`` picks one. Annotating
again with the same name replaces it (it is computed from the images and λ only, never from
earlier soft labels). ``--activate`` also makes it the annotation in the main shards, which plain
``datasets.load_dataset(DIR)`` and ``csm push`` read (by default: when no annotation is active
yet, or when NAME is the active one); ``csm annotate DIR --name NAME --activate`` without an
encoder only switches the active annotation.

Prototypes are computed once per (encoder, real dataset) and cached as safetensors. Every image is
encoded exactly once, in batches, while DataLoader worker processes (``--num-workers``, default
one per spare core) decode the next shards into shared memory. Under
``accelerate launch`` each process encodes its contiguous share of the shards (and of the real
images' batches for the prototypes); the main process gathers the results and is the only one
that writes, so the labels are byte-identical to one process's. Nothing is written before every
shard succeeded. A report (JSON + PNG) of the annotated share of class ``a`` against λ per pair,
and the share of images whose dominant class differs from what λ says, is written next to the
annotation's labels (and at the top of the dataset for the active one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm.auto import tqdm

from csm.annotation.encoders import ImageEncoder, load_encoder
from csm.annotation.labels import (
    DEFAULT_NAMES,
    JudgeCalibration,
    check_label_options,
    fit_judge,
    fit_pairs,
    fit_summary,
    pair_margin,
    project_products,
    prototype_logits,
)
from csm.annotation.writeback import WriteBack
from csm.errors import CSMError
from csm.synthetic.card import public_ref
from csm.synthetic.schema import ANNOTATIONS_DIR, LAMBDA_NAME, REPORT_JSON, REPORT_PNG
from csm.synthetic.storage import check_dataset, decode_images, read_table, write_json_atomic
from csm.synthetic.variants import (
    activate as activate_annotation,
)
from csm.synthetic.variants import (
    active_name,
    check_name,
    commit_activation,
    commit_annotation,
    default_name,
    label_table,
    recover,
    write_annotation,
)
from csm.utils import atomic_path, distributed_state, kill_point, process_rows

logger = logging.getLogger(__name__)

MODES = ("projection", "judge")
__all__ = [
    "MODES",
    "REPORT_JSON",
    "REPORT_PNG",
    "AnnotateConfig",
    "annotate",
    "annotate_dataset",
    "annotation_report",
    "class_prototypes",
    "project",
    "squash",
]


@dataclass
class AnnotateConfig:
    """Options of ``csm annotate``."""

    dataset: str = field(
        default="", metadata={"help": "synthetic dataset directory (csm generate)"}
    )
    real: str = field(
        default="",
        metadata={
            "help": "real dataset spec whose train split gives the class prototypes (e.g. digits)"
        },
    )
    encoder: str = field(
        default="", metadata={"help": "clip:<id|dir>, hf:<id|dir> or classifier:<run dir>"}
    )
    squash: float = field(
        default=4.0,
        metadata={
            "help": "s in sigmoid(s*(lam_hat-0.5)); paper code: 4.0 (CIFAR-10), 2.3 (CIFAR-100)"
        },
    )
    mode: str = field(
        default="projection",
        metadata={"help": "projection (CSM) or judge (classifier probabilities on {a,b})"},
    )
    label_mode: str = field(
        default="squash",
        metadata={
            "help": "squash (the paper's fixed sigmoid(s*(lam_hat-0.5))), judge (the judge's "
            "P(a|x,{a,b}) with a temperature fitted on the real val split) or pair-fit (per-pair "
            "s, t fitted on the real val split); see docs/labels.md"
        },
    )
    pair_fit_prior_sd: float = field(
        default=4.0,
        metadata={
            "help": "pair-fit: sd of the Gaussian prior on (s, beta) centred on the paper's "
            "squash (--squash, t = 0.5); smaller stays closer to it"
        },
    )
    pair_fit_min_val: int = field(
        default=10,
        metadata={
            "help": "pair-fit: fewest real val images of each class of a pair to fit it (else "
            "the paper's squash, with a warning)"
        },
    )
    name: str = field(
        default="",
        metadata={
            "help": "name of this annotation (default: s<squash>, e.g. s4, or judge; "
            "judge-ts or pair-fit for those label modes); "
            "train on it with --synthetic DIR:NAME; the same name replaces it"
        },
    )
    activate: bool | None = field(
        default=None,
        metadata={
            "help": "also write it into the main shards, which datasets.load_dataset and csm "
            "push read (default: when none is active yet or NAME is the active one); without "
            "--encoder only switches the active annotation to NAME"
        },
    )
    batch_size: int = field(default=256, metadata={"help": "images per encoder forward"})
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "processes decoding the images while the encoder runs (default: one per "
            "spare core, at most 8; 0: decode in the main process); labels do not depend on it"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    real_seed: int = field(default=0, metadata={"help": "seed of the real dataset's split"})
    real_val_fraction: float = field(
        default=0.1, metadata={"help": "val share of the real split (as the runs' --val-fraction)"}
    )
    real_train_per_class: int | None = field(
        default=None,
        metadata={"help": "training images per class of the real split (as --train-per-class)"},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "prototype cache (default $CSM_CACHE_DIR or ~/.cache/csm)"}
    )
    report: bool = field(default=True, metadata={"help": "write the confidence-vs-lambda report"})


# ------------------------------------------------------------------------------------ prototypes
def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("CSM_CACHE_DIR") or Path.home() / ".cache" / "csm"
    return Path(root) / "prototypes"


def prototype_key(encoder: ImageEncoder, real: Any) -> str:
    """Cache key of the prototypes of ``encoder`` on ``real`` (a
    :class:`csm.data.real.RealData`)."""
    ident = json.dumps(
        {
            "encoder": encoder.fingerprint(),
            "dataset": real.spec,
            "seed": real.seed,
            "image_shape": list(real.image_shape),
            "train_size": len(real.train),
            "class_names": list(real.class_names),
        },
        sort_keys=True,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


@torch.inference_mode()
def class_prototypes(
    encoder: ImageEncoder,
    real: Any,
    batch_size: int = 256,
    cache_dir: str | None = None,
) -> torch.Tensor:
    """Mean encoder feature of the real train images per class, ``(K, D)`` float64; cached.

    Under ``accelerate launch`` the processes split the batches
    (:meth:`~csm.annotation.encoders.ImageEncoder.encode_batched`); the sums are accumulated batch
    by batch in the same order as in one process, so the prototypes are bit-identical.

    Raises:
        CSMError: A class has no training image.
    """
    from safetensors.torch import load_file, save_file

    path = _cache_root(cache_dir) / f"{prototype_key(encoder, real)}.safetensors"
    if path.is_file():
        logger.info("prototypes from cache %s", path)
        return load_file(str(path))["prototypes"]
    k = real.num_classes
    images, labels = real.train.images, real.train.labels
    counts = torch.bincount(labels, minlength=k).double()
    if len(labels) == 0 or (counts == 0).any():
        empty = [real.class_names[i] for i in range(k) if counts[i] == 0]
        raise CSMError(
            f"real dataset {real.spec!r}: classes {empty} have no training image; "
            "prototypes need at least one image per class"
        )
    state = distributed_state()
    chunk = batch_size * 16 * state.num_processes  # whole batches; bounded memory
    sums = torch.zeros(0)
    for c in tqdm(
        range(0, len(labels), chunk),
        desc="prototypes",
        unit="chunk",
        leave=False,
        disable=not state.is_main_process,
    ):
        feats = encoder.encode_batched(images[c : c + chunk], batch_size, shard=True).double()
        if c == 0:
            sums = torch.zeros(k, feats.shape[1], dtype=torch.float64)
        for s in range(0, feats.shape[0], batch_size):  # the same sums as batch by batch
            sums.index_add_(0, labels[c + s : c + s + batch_size], feats[s : s + batch_size])
    protos = sums / counts[:, None]
    if not state.is_main_process:
        return protos  # only the main process writes
    with atomic_path(path) as tmp:
        save_file(
            {"prototypes": protos.contiguous(), "counts": counts},
            str(tmp),
            # one entry: safetensors' metadata is a hash map whose order varies between
            # processes, so several keys would make the file's bytes differ run to run
            metadata={
                "source": json.dumps(
                    {"encoder": encoder.spec, "dataset": real.spec, "class_names": real.class_names}
                )
            },
        )
    return protos


def project(
    features: torch.Tensor, protos: torch.Tensor, class_a: torch.Tensor, class_b: torch.Tensor
) -> torch.Tensor:
    """λ̂ = <f − p_b, p_a − p_b> / ||p_a − p_b||² per row (float64, unclipped).

    Computed from one product ``F Pᵀ`` (N x K) and the prototype Gram matrix, so the cost is one
    small matmul whatever the number of pairs.

    Raises:
        CSMError: Two prototypes coincide (the projection is undefined).
    """
    p = protos.double()
    fp = features.double() @ p.T  # <f, p_k>
    pp = p @ p.T  # <p_j, p_k>
    return project_products(fp, pp, torch.arange(len(class_a)), class_a, class_b)


def squash(lam_hat: torch.Tensor | np.ndarray, s: float) -> np.ndarray:
    """``sigmoid(s · (λ̂ − 0.5))`` as float32."""
    x = torch.as_tensor(np.asarray(lam_hat, dtype=np.float64))
    return torch.sigmoid(s * (x - 0.5)).numpy().astype(np.float32)


# ------------------------------------------------------------------------------------ annotation
def _image_hw(path: Path) -> tuple[int, int, int]:
    table = read_table(path).slice(0, 1)
    return tuple(decode_images(table, str(path)).shape[1:])  # type: ignore[return-value]


def _check_options(mode: str, batch_size: int, squash_s: float) -> None:
    if mode not in MODES:
        raise CSMError(f"mode={mode!r}: unknown annotation mode; use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise CSMError(f"batch_size={batch_size}: must be >= 1")
    if not math.isfinite(squash_s) or squash_s <= 0:
        raise CSMError(f"squash={squash_s}: must be a positive number (paper code: 4.0 or 2.3)")


def _prototypes_for(
    encoder: ImageEncoder,
    real: Any | None,
    names: list[str],
    mode: str,
    batch_size: int,
    cache_dir: str | None,
    label_mode: str = "squash",
) -> torch.Tensor | None:
    """Check the encoder and real data against the dataset; the prototypes (projection mode),
    none when the encoder's own classifier is the judge (``label_mode="judge"``)."""
    if real is not None and list(real.class_names) != names:
        raise CSMError(
            f"real dataset {real.spec!r}: class names {list(real.class_names)[:10]} differ "
            f"from the synthetic dataset's {names[:10]}; annotate with the dataset the "
            "generator was trained on"
        )
    if mode == "projection" and not (label_mode == "judge" and encoder.can_classify):
        if real is None:
            raise CSMError("real: projection mode needs the real dataset; pass --real SPEC")
        return class_prototypes(encoder, real, batch_size=batch_size, cache_dir=cache_dir)
    if not encoder.can_classify:
        encoder.logits(torch.zeros(0))  # raises the CSMError naming the spec
    if encoder.class_names is not None and list(encoder.class_names) != names:
        raise CSMError(
            f"encoder {encoder.spec!r}: classifier classes {encoder.class_names[:10]} differ "
            f"from the synthetic dataset's {names[:10]}; use a classifier trained on the same "
            "dataset"
        )
    return None


def _shard_labels(
    pixels: np.ndarray,
    a: torch.Tensor,
    b: torch.Tensor,
    encoder: ImageEncoder,
    protos: torch.Tensor | None,
    squash_s: float | JudgeCalibration,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(soft[a] float32, lam_hat float64)`` of one shard's images, batch by batch.

    ``squash_s`` is the squash's ``s``, or the fitted judge of ``--label-mode judge``: then
    soft[a] is its ``sigmoid((z_a − z_b) / T)`` (the classifier's logits without prototypes,
    else the cosine logits to the prototypes) and ``lam_hat`` stays what the mode records.
    """
    judge = squash_s if isinstance(squash_s, JudgeCalibration) else None
    images = torch.from_numpy(pixels)
    if protos is None:  # judge
        z = encoder.logits(images, batch_size).double()
    else:
        feats = encoder.encode_batched(images, batch_size)
    share, lam_hat = [], []
    for start in range(0, len(a), batch_size):
        ia, ib = a[start : start + batch_size], b[start : start + batch_size]
        if protos is None:
            zb, rows = z[start : start + batch_size], torch.arange(len(ia))
            margin = zb[rows, ia] - zb[rows, ib]
            s = torch.sigmoid(margin).numpy()
            share.append(s if judge is None else judge.share(margin))
            lam_hat.append(s)
        else:
            fb = feats[start : start + batch_size]
            lh = project(fb, protos, ia, ib).numpy()
            lam_hat.append(lh)
            if judge is None:
                share.append(squash(lh, squash_s))
            else:
                share.append(judge.share(pair_margin(prototype_logits(fb, protos), ia, ib)))
    share_a = np.concatenate(share).astype(np.float32) if share else np.zeros(0, np.float32)
    return share_a, (np.concatenate(lam_hat) if lam_hat else np.zeros(0))


LABEL_COLUMNS = ("class_a", "class_b", "lam", "group_id")
MAX_DEFAULT_WORKERS = 8


def default_num_workers(processes: int = 1) -> int:
    """Decoding processes per annotating process by default: one per core beyond the one that
    runs the encoder, at most :data:`MAX_DEFAULT_WORKERS`; 0 (decode in the main process) when
    the ``processes`` annotating processes have one core each or less."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cores // max(1, processes) - 1))


#: Shards of at least this many pixel bytes reach the main process through shared memory; smaller
#: ones are pickled through the worker's pipe, which costs less than shared memory's fixed
#: ~1 ms per hand-over (a file descriptor passed over a socket) below ~2 MB (512 images of
#: 16 px: 0.13 MB; of 32 px RGB: 1.6 MB; of 224 px RGB: 77 MB).
SHARED_MIN_BYTES = 2 << 20


def _load_shard(path: Path) -> tuple[dict[str, np.ndarray], torch.Tensor | np.ndarray]:
    """A shard's label columns (:data:`LABEL_COLUMNS`) and images, uint8 ``(N, C, H, W)``.

    In a DataLoader worker a shard of :data:`SHARED_MIN_BYTES` or more is decoded straight into
    shared memory (a tensor), so it reaches the main process without being copied or pickled; a
    smaller one is returned as a numpy array, pickled by value.

    Raises:
        CSMError: The shard is truncated or an image does not decode.
    """
    table = read_table(path)
    worker = get_worker_info() is not None
    holder: list[torch.Tensor] = []

    def alloc(shape: tuple[int, ...]) -> np.ndarray:
        if not worker or int(np.prod(shape)) < SHARED_MIN_BYTES:
            return np.empty(shape, dtype=np.uint8)
        holder.append(torch.empty(shape, dtype=torch.uint8).share_memory_())
        return holder[0].numpy()

    array = decode_images(table, str(path), alloc)
    return {c: table.column(c).to_numpy() for c in LABEL_COLUMNS}, holder[0] if holder else array


class _ShardImages(Dataset):
    """Item ``i``: :func:`_load_shard` of ``paths[i]`` and the labels written meanwhile (with a
    :class:`~csm.annotation.writeback.WriteBack`: :meth:`~WriteBack.take`), or its CSMError's
    message (which the main process raises as it is; a DataLoader would rewrap the exception
    with the worker's traceback). With a write-back, one more item per worker,
    ``("written", WriteBack.flush())``, ends the run."""

    def __init__(self, paths: list[Path], writeback: WriteBack | None = None) -> None:
        self.paths, self.writeback = paths, writeback

    def __len__(self) -> int:
        return len(self.paths) + (self.writeback.workers if self.writeback else 0)

    def __getitem__(self, i: int) -> tuple[Any, ...] | str:
        try:
            if i >= len(self.paths):
                return ("written", self.writeback.flush())
            written = self.writeback.take() if self.writeback else []
            return (*_load_shard(self.paths[i]), written)
        except CSMError as exc:
            return str(exc)


def _as_is(item: Any) -> Any:
    return item


def _decoded_shards(
    paths: list[Path],
    num_workers: int,
    writeback: WriteBack | None = None,
    on_written: Callable[[list[Any]], None] | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], torch.Tensor | np.ndarray]]:
    """The shards at ``paths``, in order, loaded by :func:`_load_shard` in ``num_workers``
    DataLoader worker processes (each up to two shards ahead), or in this process if 0.

    The workers only read and decode (one thread each); what they deliver does not depend on
    their number. The first shard is decoded here, while the workers start on the next ones, so
    the encoder does not wait for a worker's start-up and first decode (~40 ms on this CPU).
    Closing the generator (or its end, or an error) stops them. With a ``writeback`` (for
    ``min(num_workers, len(paths) - 1)`` workers), the workers also write the labels the caller
    sends (:mod:`csm.annotation.writeback`); what they wrote reaches ``on_written``, and after the
    last shard the generator sends the end marks and collects the rest.

    Raises:
        CSMError: A shard is truncated or an image does not decode.
        RuntimeError, EOFError, ConnectionError: A worker died (:func:`_worker_death`; the
            RuntimeError can come from DataLoader's SIGCHLD handler anywhere in this process).
    """
    workers = min(num_workers, len(paths) - 1)
    if workers < 1:
        yield from (_load_shard(p) for p in paths)
        return
    loader = iter(
        DataLoader(
            _ShardImages(paths[1:], writeback),
            batch_size=None,
            num_workers=workers,
            collate_fn=_as_is,
            prefetch_factor=2,
            multiprocessing_context="fork" if writeback else None,
        )
    )  # the workers start now
    items, done = len(paths) - 1 + (writeback.workers if writeback else 0), False
    try:
        yield _load_shard(paths[0])
        for k in range(items):
            item = next(loader)
            if isinstance(item, str):
                raise CSMError(item)
            *shard, written = item
            if on_written is not None:
                on_written(written)
            if shard[0] == "written":
                continue
            yield tuple(shard)
            if writeback is not None and k == len(paths) - 2:
                writeback.end()  # the caller has sent the last shard's labels
        done = True
    finally:
        if done:  # every item is in: the workers' shutdown (~10 ms of joins) off this thread
            threading.Thread(target=_shut_down, args=(loader,), daemon=True).start()
        del loader  # else the last reference: the workers stop now, even under a traceback


def _reused(buffers: dict[tuple[int, ...], np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """``pixels`` copied into the one buffer of its shape: every shard's forward then reads the
    same memory (each shard arrives in fresh pages; a 0.13 MB copy per 16-px shard)."""
    buf = buffers.get(pixels.shape)
    if buf is None:
        buf = buffers[pixels.shape] = np.empty(pixels.shape, dtype=pixels.dtype)
    np.copyto(buf, pixels)
    return buf


def _shut_down(loader: Iterator[Any]) -> None:
    """Let an exhausted DataLoader iterator stop and join its workers (in a thread of its own)."""
    with contextlib.suppress(Exception):
        next(loader, None)


def _worker_death(exc: BaseException, num_workers: int) -> str | None:
    """The one-line error when ``exc`` says that a decoding worker died, else ``None``.

    A killed worker (out of memory, a signal) shows as DataLoader's RuntimeError, or as an
    EOFError or ConnectionError when it dies while its shard is handed over.
    """
    died = isinstance(exc, EOFError | ConnectionError) or "DataLoader worker" in str(exc)
    if not num_workers or not died:
        return None
    return (
        f"a process decoding the images died ({type(exc).__name__}: {exc}); nothing was "
        "written; run again, with fewer --num-workers if memory is short (0: decode in the main "
        "process)"
    )


def _encode_shards(
    dataset: Path,
    records: list[dict[str, Any]],
    encoder: ImageEncoder,
    protos: torch.Tensor | None,
    squash_s: float | JudgeCalibration,
    batch_size: int,
    state: Any,
    num_workers: int = 0,
    writeback: WriteBack | None = None,
) -> list[dict[str, Any]]:
    """Labels of this process's contiguous share of the shards, gathered in shard order on every
    process; ``num_workers`` processes decode the next shards while the encoder runs
    (:func:`_decoded_shards`) and, with a ``writeback`` (one process), write each shard's labels
    as they are sent (what they wrote collects in ``writeback.received``)."""
    mine = records[process_rows(len(records), state.process_index, state.num_processes)]
    paths = [dataset / r["file"] for r in mine]
    received = None if writeback is None else writeback.received.extend
    shards = _decoded_shards(paths, num_workers, writeback, received)
    out: list[dict[str, Any]] = []
    error = None
    try:  # closing stops the workers; a worker's death during it is caught as well
        with (
            contextlib.closing(shards),
            tqdm(
                total=sum(r["rows"] for r in mine),
                desc="annotate",
                unit="img",
                disable=not state.is_main_process,
            ) as bar,
        ):
            buffers: dict[tuple[int, ...], np.ndarray] = {}
            for record, (cols, pixels) in zip(mine, shards, strict=True):
                a, b = (torch.from_numpy(cols[c].astype(np.int64)) for c in ("class_a", "class_b"))
                share, lam_hat = _shard_labels(
                    _reused(buffers, np.asarray(pixels)),
                    a,
                    b,
                    encoder,
                    protos,
                    squash_s,
                    batch_size,
                )
                out.append({**cols, "share": share, "lam_hat": lam_hat, "shard": record["shard"]})
                if writeback is not None:
                    writeback.send(len(out) - 1, out[-1])
                    kill_point("annotate:sent")
                bar.update(len(share))
    except CSMError as exc:  # every process learns it (no process waits forever below)
        error = str(exc)
    except (RuntimeError, EOFError, ConnectionError) as exc:
        error = _worker_death(exc, num_workers)
        if error is None:
            raise
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(error, out)])
        error = next((e for e, _ in gathered if e), None)
        out = [shard for _, part in gathered for shard in part]
    if error:
        raise CSMError(error)
    return out


def _commit(
    dataset: Path,
    name: str,
    info: dict[str, Any],
    results: list[dict[str, Any]],
    names: list[str],
    report: bool,
    world_size: int,
    activate: bool = False,
    writeback: WriteBack | None = None,
) -> dict[str, Any]:
    """Write annotation ``name``'s label data and report, and with ``activate`` make it the
    active one (main process only); the report dict.

    The annotation is committed first; activated, it leaves the card to the activation (one
    render). With a ``writeback``, its workers have staged the label files and main shards
    (:mod:`csm.annotation.writeback`): only the manifests are written here."""
    rep = annotation_report(
        *(np.concatenate([r[c] for r in results]) for c in ("lam", "share", "class_a", "class_b")),
        names,
    )
    info["mismatch_share"] = rep["mismatch_share"]
    if writeback is not None:
        files, staged = _written(writeback, results)
        commit_annotation(dataset, name, info, files, metadata=not activate)
    else:
        tables = [
            label_table(names, r["group_id"], r["share"], r["lam_hat"], r["class_a"], r["class_b"])
            for r in results
        ]
        write_annotation(dataset, name, info, tables, metadata=not activate)
    rep["annotation"] = {**info, "name": name}
    rep["world_size"] = world_size
    folder = dataset / ANNOTATIONS_DIR / name
    if report:
        write_json_atomic(rep, folder / REPORT_JSON)
        plot_report(rep, folder / REPORT_PNG)
    else:
        for stale in (REPORT_JSON, REPORT_PNG):
            (folder / stale).unlink(missing_ok=True)
    kill_point("annotate:committed")
    if activate and writeback is not None:
        commit_activation(dataset, name, staged)
    elif activate:
        activate_annotation(dataset, name)
    return rep


def _written(
    writeback: WriteBack, results: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The label files and staged main shards the workers wrote, in shard order; a shard they
    did not write (none should be missing) is written here."""
    done = {i: (file, main) for i, file, main in writeback.received}
    for i in range(len(results)):
        if i not in done:
            logger.warning("shard %d: labels not written by a decoding worker; writing them", i)
            done[i] = writeback.write(i, results[i])[1:]
    files = [done[i][0] for i in range(len(results))]
    staged = [done[i][1] for i in range(len(results)) if done[i][1] is not None]
    return files, staged


def _on_main(state: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on the main process only; its result (or CSMError) reaches every process."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn(*args)
        except CSMError as exc:
            error = str(exc)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, error = broadcast_object_list([result, error])
    if error:
        raise CSMError(error)
    return result


def _real_val(real: Any | None, label_mode: str) -> Any:
    """The real val split a fitted label mode is fitted on (raises when there is none)."""
    if real is None:
        raise CSMError(
            f"real: --label-mode {label_mode} is fitted on the real dataset's val split; pass "
            "--real SPEC"
        )
    if len(real.val) == 0:
        raise CSMError(
            f"real dataset {real.spec!r}: its val split is empty, so --label-mode {label_mode} "
            "has nothing to fit on; use a dataset with validation images or --label-mode squash"
        )
    return real.val


def _label_rule(
    label_mode: str,
    encoder: ImageEncoder,
    real: Any | None,
    protos: torch.Tensor | None,
    squash_s: float,
    batch_size: int,
    state: Any,
) -> tuple[float | JudgeCalibration, torch.Tensor | None]:
    """What :func:`_shard_labels` gets (``s``, or the judge fitted on real val) and, for
    ``pair-fit``, the real val images' features (encoded before the synthetic ones, so a
    failure comes before the long pass)."""
    if label_mode == "squash":
        return squash_s, None
    val = _real_val(real, label_mode)
    if label_mode == "pair-fit":
        return squash_s, encoder.encode_batched(val.images, batch_size, shard=True)
    if protos is None:  # the encoder's own classification head is the judge
        z, judge = encoder.logits(val.images, batch_size).double(), "classifier"
    else:
        feats = encoder.encode_batched(val.images, batch_size, shard=True)
        z, judge = prototype_logits(feats, protos), "prototype-cosine"
    return _on_main(state, fit_judge, z, val.labels, judge), None  # one T for every process


def _apply_pair_fit(
    results: list[dict[str, Any]],
    val_feats: torch.Tensor,
    real: Any,
    protos: torch.Tensor,
    names: list[str],
    fit: tuple[float, float, int],
    state: Any,
) -> dict[str, Any]:
    """Fit the squash of every pair in ``results`` on the real val images (main process, the
    fits broadcast), replace the results' soft[a] by it; the fits' record."""
    prior_s, prior_sd, min_val = fit
    a = np.concatenate([r["class_a"] for r in results]).astype(np.int64)
    b = np.concatenate([r["class_b"] for r in results]).astype(np.int64)
    pairs = [tuple(p) for p in np.unique(np.stack([a, b], 1), axis=0).tolist()] if len(a) else []

    def fit_all() -> Any:
        return fit_pairs(
            pairs,
            val_feats,
            real.val.labels,
            protos,
            class_names=names,
            prior_s=prior_s,
            prior_sd=prior_sd,
            min_val=min_val,
        )

    squashes = _on_main(state, fit_all)
    for r in results:
        r["share"] = squashes.share(r["lam_hat"], r["class_a"], r["class_b"])
    return squashes.record()


def annotate_dataset(
    dataset: str | Path,
    encoder: ImageEncoder,
    *,
    real: Any | None = None,
    squash_s: float = 4.0,
    mode: str = "projection",
    batch_size: int = 256,
    cache_dir: str | None = None,
    report: bool = True,
    name: str | None = None,
    activate: bool | None = None,
    num_workers: int | None = None,
    label_mode: str = "squash",
    pair_fit_prior_sd: float = 4.0,
    pair_fit_min_val: int = 10,
) -> dict[str, Any]:
    """Annotate a finished synthetic dataset as annotation ``name``; returns the report dict.

    Args:
        dataset: Synthetic dataset directory.
        encoder: The image encoder (see :mod:`csm.annotation.encoders`).
        real: The real dataset (:class:`csm.data.real.RealData`) for prototypes; needed in
            ``projection`` mode; in ``judge`` mode only its class names are checked if given.
        squash_s: ``s`` of the squash (projection mode).
        mode: ``projection`` or ``judge``.
        batch_size: Images per encoder forward.
        cache_dir: Prototype cache root.
        report: Write ``annotation_report.json`` and ``.png`` next to the labels.
        name: The annotation's name (default :func:`~csm.synthetic.variants.default_name`,
            or ``judge-ts`` / ``pair-fit`` for those label modes); an existing annotation of
            that name is replaced.
        activate: Also write it into the main shards (``None``: when none is active yet or
            ``name`` is the active one).
        num_workers: Processes decoding the images while the encoder runs (``None``:
            :func:`default_num_workers`; 0: in this process). The labels do not depend on it.
        label_mode: ``squash`` (the paper's), ``judge`` or ``pair-fit``
            (:mod:`csm.annotation.labels`); the fitted ones need ``real``, whose val split
            they are fitted on, and record the fit as ``label_fit`` in the manifest.
        pair_fit_prior_sd: ``σ`` of the pair-fit prior (centred on ``squash_s``, ``t = ½``).
        pair_fit_min_val: Fewest real val images per class of a pair to fit it.

    Raises:
        CSMError: Unknown mode, class names that differ, a truncated shard or an undecodable image.
    """
    dataset = Path(dataset)
    _check_options(mode, batch_size, squash_s)
    check_label_options(label_mode, mode, pair_fit_prior_sd, pair_fit_min_val)
    name = check_name(name or DEFAULT_NAMES.get(label_mode) or default_name(mode, squash_s))
    manifest, records = check_dataset(dataset, full=True)
    names = list(manifest["params"]["class_names"])
    protos = _prototypes_for(encoder, real, names, mode, batch_size, cache_dir, label_mode)
    state = distributed_state()
    workers = default_num_workers(state.num_processes) if num_workers is None else num_workers
    if workers < 0:
        raise CSMError(f"num_workers={num_workers}: must be >= 0 (0: decode in the main process)")
    logger.info("decoding images in %d worker process(es)", workers)
    rule, val_feats = _label_rule(label_mode, encoder, real, protos, squash_s, batch_size, state)
    if activate is None:
        activate = active_name(manifest) in (LAMBDA_NAME, None, name)
    wb = _writeback(dataset, name, names, records, activate, workers, label_mode, state)
    try:
        results = _encode_shards(
            dataset, records, encoder, protos, rule, batch_size, state, workers, wb
        )
    except BaseException:
        if wb is not None:
            recover(dataset)  # what the workers staged, unreferenced, is removed
        raise
    label_fit = rule.record() if isinstance(rule, JudgeCalibration) else None
    if label_mode == "pair-fit":
        fit = (squash_s, pair_fit_prior_sd, pair_fit_min_val)
        label_fit = _apply_pair_fit(results, val_feats, real, protos, names, fit, state)
    info = _annotation_info(encoder, real, mode, squash_s, label_mode, label_fit, protos is None)
    world = state.num_processes
    args = (dataset, name, info, results, names, report, world, activate, wb)
    rep = _on_main(state, _commit, *args)
    logger.info(
        "annotated %d images as %r; dominant class differs from lambda's for %.1f%%",
        rep["num_images"],
        name,
        100 * rep["mismatch_share"],
    )
    return rep


def _annotation_info(
    encoder: ImageEncoder,
    real: Any | None,
    mode: str,
    squash_s: float,
    label_mode: str,
    label_fit: dict[str, Any] | None,
    no_prototypes: bool,
) -> dict[str, Any]:
    """What the manifest records of an annotation: encoder, mode, squash, the real data and
    splits behind it, and a fitted label mode's fit."""
    info = {
        "mode": mode,
        "encoder": encoder.spec,
        "encoder_fingerprint": encoder.fingerprint(),
        "squash": float(squash_s) if mode == "projection" else None,
        "real_dataset": getattr(real, "spec", None),
        "real_seed": getattr(real, "seed", None),
    }
    if real is not None:  # provenance: csm train checks the encoder and --real splits
        info["real_split"] = real.split_record()
    if getattr(encoder, "split", None) is not None:
        info["encoder_split"] = encoder.split
    if label_fit is not None:  # the default (squash) records exactly what it always did
        judge_head = label_mode == "judge" and no_prototypes  # lam_hat: sigmoid(z_a - z_b)
        info.update(
            mode="judge" if judge_head else mode,
            squash=float(squash_s) if label_mode == "pair-fit" else None,
            label_mode=label_mode,
            label_fit=label_fit,
            real_split="val",
            real_val_size=len(real.val),
        )
        logger.info("labels (%s): %s", label_mode, fit_summary(label_mode, label_fit))
    return info


def _writeback(
    dataset: Path,
    name: str,
    names: list[str],
    records: list[dict[str, Any]],
    activate: bool,
    workers: int,
    label_mode: str,
    state: Any,
) -> WriteBack | None:
    """The workers' write-back (:mod:`csm.annotation.writeback`), where it applies: one process,
    at least one decoding worker, labels final shard by shard (not ``pair-fit``)."""
    n = min(workers, len(records) - 1)
    if state.num_processes > 1 or n < 1 or label_mode == "pair-fit":
        return None
    recover(dataset)  # from here on, nothing unreferenced may be deleted until the commit
    queue = multiprocessing.get_context("fork").Queue()
    return WriteBack(dataset, name, names, records, activate, n, queue)


def annotation_report(
    lam: np.ndarray,
    share_a: np.ndarray,
    class_a: np.ndarray,
    class_b: np.ndarray,
    class_names: list[str],
) -> dict[str, Any]:
    """Per-pair and overall mean annotated share of class a at each λ, and the mismatch share.

    The mismatch share is the fraction of images whose dominant class after annotation
    (``soft[a] >= 0.5``) differs from the one λ says (``λ >= 0.5``).
    """
    lam = np.round(np.asarray(lam, dtype=np.float64), 6)
    share_a = np.asarray(share_a, dtype=np.float64)
    grid, at = np.unique(lam, return_inverse=True)
    ab = np.stack([np.asarray(class_a), np.asarray(class_b)], axis=1).reshape(-1, 2)
    keys, pair = np.unique(ab, axis=0, return_inverse=True)
    cells = pair.reshape(-1) * len(grid) + at.reshape(-1)  # (pair, λ) cell of every image
    size = len(keys) * len(grid)
    count = np.bincount(cells, minlength=size).reshape(len(keys), len(grid))
    total = np.bincount(cells, weights=share_a, minlength=size).reshape(count.shape)
    pairs: dict[str, Any] = {}
    for (a, b), n, t in zip(keys.tolist(), count, total, strict=True):
        pairs[f"{class_names[a]}|{class_names[b]}"] = {
            "class_a": class_names[a],
            "class_b": class_names[b],
            "share_a": [float(x / c) if c else None for x, c in zip(t, n, strict=True)],
        }
    overall = (total.sum(axis=0) / np.maximum(count.sum(axis=0), 1)).tolist()
    mismatch = float(np.mean((share_a >= 0.5) != (lam >= 0.5))) if len(lam) else 0.0
    return {
        "lambda": grid.tolist(),
        "share_a_mean": overall,
        "mismatch_share": mismatch,
        "num_images": int(len(lam)),
        "pairs": pairs,
    }


def plot_report(rep: dict[str, Any], path: Path) -> None:
    """PNG of the annotated share of class a against λ: one thin line per pair, the mean bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    grid = rep["lambda"]
    many = len(rep["pairs"]) > 10
    for key, pair in rep["pairs"].items():
        xs = [g for g, v in zip(grid, pair["share_a"], strict=True) if v is not None]
        ys = [v for v in pair["share_a"] if v is not None]
        ax.plot(xs, ys, lw=0.6, alpha=0.35 if many else 0.8, label=None if many else key)
    ax.plot(grid, rep["share_a_mean"], color="black", lw=2.2, marker="o", label="mean")
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="λ (diagonal)")
    ax.set_xlabel("generation ratio λ (weight of class a)")
    ax.set_ylabel("annotated soft label of class a")
    ann = rep.get("annotation") or {}
    ax.set_title(
        f"{ann.get('mode', '')} {public_ref(ann.get('encoder', ''))}\n"  # no local paths
        f"dominant class differs from λ: {100 * rep['mismatch_share']:.1f}%",
        fontsize=8,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def _switch_active(cfg: AnnotateConfig) -> str:
    """``csm annotate DIR --name NAME --activate`` without an encoder: switch the active one."""
    state = distributed_state()
    _on_main(state, activate_annotation, cfg.dataset, cfg.name)
    return (
        f"activated annotation {cfg.name!r} in {cfg.dataset}: datasets.load_dataset and csm push "
        "now give its labels"
    )


def _finish_interrupted_activation(dataset: str) -> None:
    """Finish (or clean up after) a switch-over or label write that a kill interrupted, so that
    a rerun of ``csm annotate`` continues instead of refusing the dataset; a no-op on a
    consistent dataset (:func:`csm.synthetic.variants.recover`)."""
    from csm.synthetic import read_manifest
    from csm.synthetic.variants import recover

    if read_manifest(dataset).get("finalized") and _on_main(distributed_state(), recover, dataset):
        logger.warning("%s: finished what an interrupted csm annotate left behind", dataset)


def _warn_other_split(encoder: Any, real: Any, cfg: AnnotateConfig) -> None:
    """Warn when a classifier encoder was trained on images outside the ``--real`` training split
    (another split seed, val fraction or ``--train-per-class`` subset): its training images then
    include val or test images of the split the labels are fitted and used with."""
    from csm.data.real import split_difference

    split = getattr(encoder, "split", None)
    if split is None or real is None or split["dataset"] != real.spec:
        return
    why = split_difference(real.split_record(), split, this="--real")
    if why is None:
        return
    logger.warning(
        "--encoder %s was trained on another split of %s than --real's: %s; train the encoder "
        "with the split of the runs (--data-seed %d, their --val-fraction and --train-per-class) "
        "or pass that split as --real-seed / --real-val-fraction / --real-train-per-class",
        cfg.encoder,
        real.spec,
        why,
        cfg.real_seed,
    )


def annotate(cfg: AnnotateConfig) -> str:
    """Run ``csm annotate`` (see module docstring); returns a one-line summary."""
    from csm.data.real import load_real

    if not cfg.dataset:
        raise CSMError("dataset: missing; pass DATASET")
    if not cfg.encoder:
        if cfg.activate and cfg.name:
            return _switch_active(cfg)
        raise CSMError(
            "encoder: missing; pass --encoder (or --name NAME --activate to switch the active "
            "annotation)"
        )
    if cfg.mode not in MODES:
        raise CSMError(f"mode={cfg.mode!r}: unknown annotation mode; use one of {', '.join(MODES)}")
    _check_options(cfg.mode, cfg.batch_size, cfg.squash)
    check_label_options(cfg.label_mode, cfg.mode, cfg.pair_fit_prior_sd, cfg.pair_fit_min_val)
    if cfg.label_mode != "squash" and not cfg.real:
        _real_val(None, cfg.label_mode)  # raises: a fitted label mode needs --real
    if cfg.name:
        check_name(cfg.name)
    _finish_interrupted_activation(cfg.dataset)
    manifest, records = check_dataset(cfg.dataset)
    real = None
    if cfg.real:
        c, h, w = _image_hw(Path(cfg.dataset) / records[0]["file"])
        real = load_real(
            cfg.real,
            image_size=h,
            seed=cfg.real_seed,
            val_fraction=cfg.real_val_fraction,
            train_per_class=cfg.real_train_per_class,
        )
        if list(real.class_names) != list(manifest["params"]["class_names"]):
            raise CSMError(
                f"real dataset {cfg.real!r}: class names {list(real.class_names)[:10]} differ from "
                f"the synthetic dataset's {manifest['params']['class_names'][:10]}; pass the "
                "dataset the generator was trained on"
            )
    elif cfg.mode == "projection":
        raise CSMError("real: missing; projection mode needs --real SPEC for the class prototypes")
    encoder = load_encoder(cfg.encoder, cfg.device)
    _warn_other_split(encoder, real, cfg)
    rep = annotate_dataset(
        cfg.dataset,
        encoder,
        real=real,
        squash_s=cfg.squash,
        mode=cfg.mode,
        batch_size=cfg.batch_size,
        cache_dir=cfg.cache_dir,
        report=cfg.report,
        name=cfg.name or None,
        activate=cfg.activate,
        num_workers=cfg.num_workers,
        label_mode=cfg.label_mode,
        pair_fit_prior_sd=cfg.pair_fit_prior_sd,
        pair_fit_min_val=cfg.pair_fit_min_val,
    )
    from csm.config import save_config

    name = rep["annotation"]["name"]
    state = distributed_state()
    if state.is_main_process:
        save_config(cfg, Path(cfg.dataset) / ANNOTATIONS_DIR / name, name="annotate_config.yaml")
    state.wait_for_everyone()  # the CLI then leaves the process group (csm.cli)
    curve = ", ".join(
        f"{g:.2f}:{v:.2f}" for g, v in zip(rep["lambda"], rep["share_a_mean"], strict=True)
    )
    how = cfg.mode
    if cfg.label_mode != "squash":  # the mode recorded says what lam_hat is
        fit = fit_summary(cfg.label_mode, rep["annotation"]["label_fit"])
        how = f"{rep['annotation']['mode']}, {cfg.label_mode}: {fit}"
    return (
        f"annotated {rep['num_images']} images in {cfg.dataset} as {name!r} ({how}, "
        f"{cfg.encoder}; train on it with --synthetic {cfg.dataset}:{name}); mean soft[a] by "
        f"lambda: {curve}; dominant class differs from lambda: "
        f"{100 * rep['mismatch_share']:.1f}%"
    )
