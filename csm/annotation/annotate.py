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

Prototypes are computed once per (encoder, real dataset) and cached as safetensors. Every image is
encoded exactly once, in batches, while the next shard is decoded in a background thread. New
shards are staged under ``DIR/.csm/annotate`` and swapped in only after every shard succeeded, so
a failure leaves the dataset untouched; annotating again replaces the previous annotation (it is
computed from the images and λ only, never from earlier soft labels). A report (JSON + PNG) of
the annotated share of class ``a`` against λ per pair, and the share of images whose dominant
class differs from what λ says, is written next to the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from csm.annotation.encoders import ImageEncoder, load_encoder
from csm.errors import CSMError
from csm.synthetic.dataset import (
    RECORDS_DIR,
    arrow_column,
    check_dataset,
    decode_images,
    read_manifest,
    read_table,
    soft_targets,
    synthetic_features,
    update_shard_record,
    write_dataset_metadata,
    write_json_atomic,
    write_table_atomic,
)
from csm.utils import atomic_path

logger = logging.getLogger(__name__)

MODES = ("projection", "judge")
REPORT_JSON = "annotation_report.json"
REPORT_PNG = "annotation_report.png"


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
    batch_size: int = field(default=256, metadata={"help": "images per encoder forward"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    real_seed: int = field(default=0, metadata={"help": "seed of the real dataset's split"})
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
    sums: torch.Tensor | None = None
    for start in tqdm(
        range(0, len(labels), batch_size), desc="prototypes", unit="batch", leave=False
    ):
        feats = encoder.encode(images[start : start + batch_size]).double()
        if sums is None:
            sums = torch.zeros(k, feats.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels[start : start + batch_size], feats)
    counts = torch.bincount(labels, minlength=k).double()
    if sums is None or (counts == 0).any():
        empty = [real.class_names[i] for i in range(k) if counts[i] == 0]
        raise CSMError(
            f"real dataset {real.spec!r}: classes {empty} have no training image; "
            "prototypes need at least one image per class"
        )
    protos = sums / counts[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(
            {"prototypes": protos.contiguous(), "counts": counts},
            str(tmp),
            metadata={
                "encoder": encoder.spec,
                "dataset": real.spec,
                "class_names": json.dumps(real.class_names),
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
    rows = torch.arange(len(class_a))
    num = fp[rows, class_a] - fp[rows, class_b] - pp[class_b, class_a] + pp[class_b, class_b]
    denom = pp[class_a, class_a] - 2 * pp[class_a, class_b] + pp[class_b, class_b]
    if (denom <= 1e-12 * pp.diagonal().max().clamp_min(1e-300)).any():
        raise CSMError("prototypes: two classes have identical prototypes; use another encoder")
    return num / denom


def squash(lam_hat: torch.Tensor | np.ndarray, s: float) -> np.ndarray:
    """``sigmoid(s · (λ̂ − 0.5))`` as float32."""
    x = torch.as_tensor(np.asarray(lam_hat, dtype=np.float64))
    return torch.sigmoid(s * (x - 0.5)).numpy().astype(np.float32)


# ------------------------------------------------------------------------------------ annotation
def _image_hw(path: Path) -> tuple[int, int, int]:
    table = read_table(path).slice(0, 1)
    return tuple(decode_images(table, str(path)).shape[1:])  # type: ignore[return-value]


def _annotated_table(
    table: pa.Table, features: Any, share_a: np.ndarray, lam_hat: np.ndarray
) -> pa.Table:
    """``table`` with ``label``, ``lam_hat``, ``confidence`` and ``soft_label`` replaced."""
    k = features["label"].num_classes
    a = table.column("class_a").to_numpy()
    b = table.column("class_b").to_numpy()
    soft, label, conf = soft_targets(share_a, a, b, k)
    new = {
        "label": label,
        "lam_hat": lam_hat.astype(np.float32),
        "confidence": conf,
        "soft_label": soft,
    }
    schema = features.arrow_schema
    arrays = [
        arrow_column(new[name], fld.type)
        if name in new
        else table.column(name).combine_chunks().cast(fld.type)
        for name, fld in zip(schema.names, schema, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


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
) -> dict[str, Any]:
    """Annotate a finished synthetic dataset in place (atomically); returns the report dict.

    Args:
        dataset: Synthetic dataset directory.
        encoder: The image encoder (see :mod:`csm.annotation.encoders`).
        real: The real dataset (:class:`csm.data.real.RealData`) for prototypes; needed in
            ``projection`` mode; in ``judge`` mode only its class names are checked if given.
        squash_s: ``s`` of the squash (projection mode).
        mode: ``projection`` or ``judge``.
        batch_size: Images per encoder forward.
        cache_dir: Prototype cache root.
        report: Write ``annotation_report.json`` and ``.png`` into the dataset folder.

    Raises:
        CSMError: Unknown mode, class names that differ, a truncated shard or an undecodable image.
    """
    dataset = Path(dataset)
    if mode not in MODES:
        raise CSMError(f"mode={mode!r}: unknown annotation mode; use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise CSMError(f"batch_size={batch_size}: must be >= 1")
    if not math.isfinite(squash_s) or squash_s <= 0:
        raise CSMError(f"squash={squash_s}: must be a positive number (paper code: 4.0 or 2.3)")
    manifest, records = check_dataset(dataset, full=True)
    names = list(manifest["params"]["class_names"])
    if real is not None and list(real.class_names) != names:
        raise CSMError(
            f"real dataset {real.spec!r}: class names {list(real.class_names)[:10]} differ "
            f"from the synthetic dataset's {names[:10]}; annotate with the dataset the "
            "generator was trained on"
        )
    if mode == "judge":
        if not encoder.can_classify:
            encoder.logits(torch.zeros(0))  # raises the CSMError naming the spec
        if encoder.class_names is not None and list(encoder.class_names) != names:
            raise CSMError(
                f"encoder {encoder.spec!r}: classifier classes {encoder.class_names[:10]} differ "
                f"from the synthetic dataset's {names[:10]}; use a classifier trained on the same "
                "dataset"
            )
        protos = None
    else:
        if real is None:
            raise CSMError("real: projection mode needs the real dataset; pass --real SPEC")
        protos = class_prototypes(encoder, real, batch_size=batch_size, cache_dir=cache_dir)
    features = synthetic_features(names)
    stage = dataset / RECORDS_DIR.parent / "annotate"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    total = sum(r["rows"] for r in records)
    paths = [dataset / r["file"] for r in records]
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("lam", "share", "a", "b")}

    def load(path: Path) -> tuple[pa.Table, np.ndarray]:
        table = read_table(path)
        return table, decode_images(table, str(path))

    try:
        with (
            ThreadPoolExecutor(max_workers=1) as pool,
            tqdm(total=total, desc="annotate", unit="img") as bar,
        ):
            future = pool.submit(load, paths[0]) if paths else None
            for i, path in enumerate(paths):
                table, pixels = future.result()
                if i + 1 < len(paths):
                    future = pool.submit(load, paths[i + 1])
                a = torch.from_numpy(table.column("class_a").to_numpy().astype(np.int64))
                b = torch.from_numpy(table.column("class_b").to_numpy().astype(np.int64))
                images = torch.from_numpy(pixels)
                share, lam_hat = [], []
                for start in range(0, len(a), batch_size):
                    stop = start + batch_size
                    if mode == "judge":
                        z = encoder.logits(images[start:stop]).double()
                        ia, ib = a[start:stop], b[start:stop]
                        rows = torch.arange(len(ia))
                        s = torch.sigmoid(z[rows, ia] - z[rows, ib]).numpy()
                        share.append(s)
                        lam_hat.append(s)
                    else:
                        f = encoder.encode(images[start:stop])
                        lh = project(f, protos, a[start:stop], b[start:stop]).numpy()
                        lam_hat.append(lh)
                        share.append(squash(lh, squash_s))
                    bar.update(min(stop, len(a)) - start)
                share_a = (
                    np.concatenate(share).astype(np.float32) if share else np.zeros(0, np.float32)
                )
                lam_hat_a = np.concatenate(lam_hat) if lam_hat else np.zeros(0)
                new = _annotated_table(table, features, share_a, lam_hat_a)
                write_table_atomic(new, stage / path.name)
                cols["lam"].append(table.column("lam").to_numpy())
                cols["share"].append(share_a)
                cols["a"].append(a.numpy())
                cols["b"].append(b.numpy())
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # every shard succeeded: swap the staged shards in, then re-record and rewrite the metadata
    for record, path in zip(records, paths, strict=True):
        os.replace(stage / path.name, path)
        update_shard_record(dataset, record["shard"], path, record["rows"])
    shutil.rmtree(stage, ignore_errors=True)
    annotation = {
        "mode": mode,
        "encoder": encoder.spec,
        "encoder_fingerprint": encoder.fingerprint(),
        "squash": float(squash_s) if mode == "projection" else None,
        "real_dataset": getattr(real, "spec", None),
        "real_seed": getattr(real, "seed", None),
    }
    rep = annotation_report(
        np.concatenate(cols["lam"]),
        np.concatenate(cols["share"]),
        np.concatenate(cols["a"]),
        np.concatenate(cols["b"]),
        names,
    )
    annotation["mismatch_share"] = rep["mismatch_share"]
    manifest = read_manifest(dataset)
    manifest["annotation"] = annotation
    write_json_atomic(manifest, dataset / "csm_synthetic.json")
    write_dataset_metadata(dataset)
    rep["annotation"] = annotation
    if report:
        write_json_atomic(rep, dataset / REPORT_JSON)
        plot_report(rep, dataset / REPORT_PNG)
    logger.info(
        "annotated %d images; dominant class differs from lambda's for %.1f%%",
        total,
        100 * rep["mismatch_share"],
    )
    return rep


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
    grid = sorted(set(lam.tolist()))
    pairs: dict[str, Any] = {}
    for a, b in sorted(set(zip(class_a.tolist(), class_b.tolist(), strict=True))):
        m = (class_a == a) & (class_b == b)
        pairs[f"{class_names[a]}|{class_names[b]}"] = {
            "class_a": class_names[a],
            "class_b": class_names[b],
            "share_a": [
                float(share_a[m & (lam == g)].mean()) if (m & (lam == g)).any() else None
                for g in grid
            ],
        }
    overall = [float(share_a[lam == g].mean()) for g in grid]
    mismatch = float(np.mean((share_a >= 0.5) != (lam >= 0.5))) if len(lam) else 0.0
    return {
        "lambda": grid,
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
        f"{ann.get('mode', '')} {ann.get('encoder', '')}\n"
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


def annotate(cfg: AnnotateConfig) -> str:
    """Run ``csm annotate`` (see module docstring); returns a one-line summary."""
    from csm.data.real import load_real

    for name in ("dataset", "encoder"):
        if not getattr(cfg, name):
            raise CSMError(
                f"{name}: missing; pass {'DATASET' if name == 'dataset' else '--encoder'}"
            )
    if cfg.mode not in MODES:
        raise CSMError(f"mode={cfg.mode!r}: unknown annotation mode; use one of {', '.join(MODES)}")
    manifest, records = check_dataset(cfg.dataset)
    real = None
    if cfg.real:
        c, h, w = _image_hw(Path(cfg.dataset) / records[0]["file"])
        real = load_real(cfg.real, image_size=h, seed=cfg.real_seed)
        if list(real.class_names) != list(manifest["params"]["class_names"]):
            raise CSMError(
                f"real dataset {cfg.real!r}: class names {list(real.class_names)[:10]} differ from "
                f"the synthetic dataset's {manifest['params']['class_names'][:10]}; pass the "
                "dataset "
                "the generator was trained on"
            )
    elif cfg.mode == "projection":
        raise CSMError("real: missing; projection mode needs --real SPEC for the class prototypes")
    encoder = load_encoder(cfg.encoder, cfg.device)
    rep = annotate_dataset(
        cfg.dataset,
        encoder,
        real=real,
        squash_s=cfg.squash,
        mode=cfg.mode,
        batch_size=cfg.batch_size,
        cache_dir=cfg.cache_dir,
        report=cfg.report,
    )
    from csm.config import save_config

    save_config(cfg, Path(cfg.dataset) / ".csm", name="annotate_config.yaml")
    curve = ", ".join(
        f"{g:.2f}:{v:.2f}" for g, v in zip(rep["lambda"], rep["share_a_mean"], strict=True)
    )
    return (
        f"annotated {rep['num_images']} images in {cfg.dataset} ({cfg.mode}, {cfg.encoder}); "
        f"mean soft[a] by lambda: {curve}; dominant class differs from lambda: "
        f"{100 * rep['mismatch_share']:.1f}%"
    )
