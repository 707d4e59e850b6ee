"""``csm inspect MODEL_OR_DATASET``: a quality report of a class-conditional generator.

A judge classifier (``--judge classifier:RUN``, :mod:`csm.annotation.encoders`) looks at class-mixed
groups, either generated here from a ``csm fit-diffusion`` MODEL folder (a small seeded synthetic
dataset written by :func:`csm.generation.generate.generate` into ``OUT/samples``: every class
pair ``--groups-per-pair`` times, ``--group-size`` images per group at ``λ = 0, 1/(G-1), ..., 1``)
or read from a ``csm generate`` DATASET folder (``DIR``, or ``DIR:NAME`` for one of its named
annotations; :func:`csm.synthetic.load_synthetic_tensors`). Definitions (all in
``inspect.json``):

* **Pure-class samples** are the group ends: λ = 1 is class a, λ = 0 is class b (the condition is
  exactly one class embedding). **Recognition** of class c is the share of its pure samples the
  judge classifies as c (arg-max over all classes), next to the judge's accuracy on the real test
  images of c for reference.
* The **judge soft label** of an image of pair (a, b) is ``p_a / (p_a + p_b) = sigmoid(z_a - z_b)``
  (the rule of ``csm annotate --mode judge``). **λ curves**: its mean per pair and λ
  (:func:`csm.annotation.annotate.annotation_report`).
* A group is **monotone** when its soft label never falls by more than ``--tolerance`` from one λ
  to the next: ``soft(λ_{i+1}) >= soft(λ_i) - tolerance`` for every consecutive pair of its λ.
  The **monotone share** is the share of such groups (overall and per pair).
* An image is **flipped** when the judge's dominant class of the pair (``soft >= 0.5``: a) differs
  from the one λ says (``λ > 0.5``: a); images at λ = 0.5 exactly have no dominant class and are
  left out. The **flipped share** is the share of flipped images among the others.
* **Spread** (``spread``): how evenly the confidences cover [0, 1]
  (:func:`csm.generation.schedule.confidence_spread`): the histogram of soft[a] and its
  Kolmogorov-Smirnov distance to U(0, 1) over all images, over the group interiors (the ends are
  λ = 0 and 1 in every schedule) and per λ-rank (an image's position in its group by λ), for the
  dataset's own annotated soft labels (``spread.annotated``; a dataset not yet annotated has
  soft[a] = λ) and for the judge's (``spread.judge``). ``spread.lambda_schedule`` says whether
  the λ grid was uniform or targeted (``csm generate --lambda-schedule targeted``), so the
  reports of a uniform-grid and a targeted dataset compare directly.
* **Diversity** of class c: the mean pairwise distance between its pure generated samples, in
  pixels (RMS over pixels in [0, 1]) and in judge features (L2), next to the same for as many real
  train images of c (drawn with ``--seed``); a ratio well below 1 means mode collapse.

Pictures: ``real_vs_generated.png`` (per class: real images | generated pure samples),
``lambda_sweeps.png`` (one group per pair, λ and judge soft label under every image),
``lambda_curves.png``, ``recognition.png``, ``diversity.png`` and ``confidence_spread.png``
(histograms of the annotated and the judge soft[a], stacked by λ-rank, against U(0, 1)). The
output folder carries the ownership marker of ``csm inspect`` and is written only when new, empty
or owned by it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csm.errors import CSMError
from csm.utils import check_output, claim_output

logger = logging.getLogger(__name__)

KIND = "inspect"
REPORT_NAME = "inspect.json"
SAMPLES_DIR = "samples"
PICTURES = (
    "real_vs_generated.png",
    "lambda_sweeps.png",
    "lambda_curves.png",
    "recognition.png",
    "diversity.png",
    "confidence_spread.png",
)
__all__ = ["PICTURES", "REPORT_NAME", "InspectConfig", "inspect", "inspect_report", "spread_report"]


@dataclass
class InspectConfig:
    """Options of ``csm inspect``."""

    source: str = field(
        default="",
        metadata={"help": "a csm fit-diffusion MODEL folder or a csm generate DATASET folder"},
    )
    judge: str = field(
        default="", metadata={"help": "judge classifier, classifier:<run dir of csm train>"}
    )
    out: str = field(default="", metadata={"help": "report folder (default: ./inspect-<name>)"})
    real: str = field(
        default="",
        metadata={"help": "real dataset spec (default: the one the generator was trained on)"},
    )
    real_seed: int = field(default=0, metadata={"help": "seed of the real dataset's split"})
    groups_per_pair: int = field(default=2, metadata={"help": "MODEL: groups per class pair"})
    group_size: int = field(default=5, metadata={"help": "MODEL: images per group (λ grid)"})
    steps: int = field(default=25, metadata={"help": "MODEL: denoising steps"})
    guidance: float = field(default=1.0, metadata={"help": "MODEL: guidance (1 = off)"})
    scheduler: str = field(default="ddim", metadata={"help": "MODEL: ddim, dpm++, euler, heun"})
    mix_mode: str = field(default="embedding", metadata={"help": "MODEL: embedding or eps"})
    seed: int = field(default=0, metadata={"help": "seed of the groups and of the real draws"})
    tolerance: float = field(
        default=0.05, metadata={"help": "allowed drop of soft[a] between consecutive λ"}
    )
    show: int = field(default=8, metadata={"help": "images per class in real_vs_generated.png"})
    batch_size: int = field(default=64, metadata={"help": "images per pipeline / judge call"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier report"})


# ------------------------------------------------------------------------------------ checks
def _dataset_dir(source: str) -> Path:
    """The folder of a DATASET source ``DIR`` or ``DIR:NAME``."""
    from csm.synthetic import parse_spec

    return parse_spec(source)[0].expanduser()


def _check_annotation(source: str) -> None:
    """Refuse a ``DIR:NAME`` whose annotation ``NAME`` the dataset does not have."""
    from csm.synthetic import annotation_names, parse_spec, read_manifest

    folder, name = parse_spec(source)
    names = annotation_names(read_manifest(folder.expanduser()))
    if name is not None and name not in names:
        raise CSMError(
            f"MODEL_OR_DATASET {source}: no annotation named {name!r}; available: "
            f"{', '.join(names)}"
        )


def _source_kind(source: str) -> str:
    from csm.synthetic import MANIFEST_NAME

    path = Path(source).expanduser()
    if (path / "model_index.json").is_file():
        return "model"
    if (_dataset_dir(source) / MANIFEST_NAME).is_file():
        _check_annotation(source)
        return "dataset"
    raise CSMError(
        f"MODEL_OR_DATASET {source}: neither a generator folder (model_index.json, from csm "
        f"fit-diffusion) nor a synthetic dataset ({MANIFEST_NAME}, from csm generate)"
    )


def _check_options(cfg: InspectConfig) -> None:
    from csm.generation.mixing import lambdas
    from csm.generation.pipeline import MIX_MODES, SCHEDULERS

    if not cfg.source:
        raise CSMError("MODEL_OR_DATASET: missing; pass a generator or synthetic dataset folder")
    if not cfg.judge.startswith("classifier:"):
        raise CSMError(
            f"--judge {cfg.judge!r}: must be classifier:<run dir of csm train> (it classifies)"
        )
    for name in ("groups_per_pair", "steps", "batch_size", "show"):
        if getattr(cfg, name) < 1:
            raise CSMError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 1")
    lambdas(cfg.group_size)  # G >= 2
    if cfg.seed < 0:
        raise CSMError(f"--seed {cfg.seed}: must be >= 0")
    if not math.isfinite(cfg.guidance) or cfg.guidance < 0:
        raise CSMError(f"--guidance {cfg.guidance}: must be a finite number >= 0 (1 = off)")
    if not math.isfinite(cfg.tolerance) or not 0 <= cfg.tolerance < 1:
        raise CSMError(f"--tolerance {cfg.tolerance}: must be in [0, 1), e.g. 0.05")
    if cfg.scheduler not in SCHEDULERS:
        raise CSMError(f"--scheduler {cfg.scheduler!r}: choose one of {sorted(SCHEDULERS)}")
    if cfg.mix_mode not in MIX_MODES:
        raise CSMError(f"--mix-mode {cfg.mix_mode!r}: choose one of {list(MIX_MODES)}")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` csm inspect may not write (:func:`csm.utils.check_output`), or one that
    holds an earlier report while ``--overwrite`` is not given."""
    if check_output(out, KIND, overwrite=overwrite) and not overwrite:
        raise CSMError(f"--out {out}: holds an earlier csm inspect report; pass --overwrite")


# ------------------------------------------------------------------------------------ inputs
def _provenance(cfg: InspectConfig, kind: str) -> tuple[list[str], str | None, int]:
    """Class names, recorded real dataset spec and image side of the MODEL or DATASET."""
    if kind == "model":
        from csm.generation.pipeline import CSMMixingPipeline

        pipe = CSMMixingPipeline.from_pretrained(cfg.source)
        model = pipe.transformer if pipe.backbone == "dit" else pipe.unet
        size = model.config.sample_size
        train = pipe.training_config() or {}
        spec = train.get("dataset_spec") or train.get("dataset")
        return list(pipe.class_names), spec, int(size if isinstance(size, int) else size[0])
    from csm.synthetic import check_dataset, read_manifest, read_table
    from csm.synthetic.storage import decode_images

    folder = _dataset_dir(cfg.source)
    manifest = read_manifest(folder)
    _, records = check_dataset(folder)
    first = folder / records[0]["file"]
    side = decode_images(read_table(first).slice(0, 1), str(first)).shape[-1]
    names = list(manifest["params"]["class_names"])
    return names, (manifest["params"].get("info") or {}).get("dataset"), int(side)


def _inputs(cfg: InspectConfig, kind: str) -> tuple[Any, Any]:
    """The judge encoder and the real dataset, checked against the source's class names."""
    from csm.annotation.encoders import load_encoder
    from csm.data.real import load_real

    names, recorded, side = _provenance(cfg, kind)
    spec = cfg.real or recorded
    if not spec:
        raise CSMError(
            f"--real: missing; {cfg.source} does not record its real dataset; pass --real SPEC"
        )
    real = load_real(spec, image_size=side, seed=cfg.real_seed)
    judge = load_encoder(cfg.judge, cfg.device)
    for what, other in (
        ("real dataset " + repr(spec), real.class_names),
        (cfg.judge, judge.class_names),
    ):
        if list(other) != names:
            raise CSMError(
                f"{what}: class names {list(other)[:10]} differ from {cfg.source}'s {names[:10]}; "
                "pass the dataset (and a judge trained on it) the generator was trained on"
            )
    return judge, real


def _generate(cfg: InspectConfig, out: Path, num_classes: int) -> Path:
    """Write the small seeded synthetic dataset of a MODEL into ``out/samples``."""
    from csm.generation.generate import GenerateConfig, generate
    from csm.generation.mixing import num_pairs

    samples = out / SAMPLES_DIR
    gen = GenerateConfig(
        model=cfg.source,
        out=str(samples),
        groups=cfg.groups_per_pair * num_pairs(num_classes),
        group_size=cfg.group_size,
        steps=cfg.steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        scheduler=cfg.scheduler,
        mix_mode=cfg.mix_mode,
        device=cfg.device,
    )
    logger.info("inspect: %s", generate(gen))
    return samples


# ------------------------------------------------------------------------------------ measures
def _pair_soft(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Judge soft label of class a on pair (a, b): ``sigmoid(z_a - z_b)``."""
    rows = torch.arange(len(a))
    z = logits.double()
    return torch.sigmoid(z[rows, a] - z[rows, b]).numpy()


def monotone_groups(
    group_id: np.ndarray, lam: np.ndarray, soft_a: np.ndarray, tolerance: float
) -> dict[int, bool]:
    """Per group: whether ``soft_a`` never drops by more than ``tolerance`` as λ grows."""
    result = {}
    for g in np.unique(group_id):
        m = group_id == g
        order = np.argsort(lam[m], kind="stable")
        s = soft_a[m][order]
        result[int(g)] = bool(np.all(np.diff(s) >= -tolerance)) if len(s) > 1 else True
    return result


def flipped_share(lam: np.ndarray, soft_a: np.ndarray) -> float:
    """Share of images (λ != 0.5) whose judge-dominant class of the pair differs from λ's."""
    lam = np.round(np.asarray(lam, dtype=np.float64), 6)
    keep = lam != 0.5
    if not keep.any():
        return 0.0
    return float(np.mean((soft_a[keep] >= 0.5) != (lam[keep] > 0.5)))


def mean_pairwise_distance(x: torch.Tensor) -> float | None:
    """Mean L2 distance over all pairs of rows of ``x`` (``None`` for fewer than 2 rows)."""
    if len(x) < 2:
        return None
    d = torch.cdist(x.double(), x.double())
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as rows in [0, 1] scaled so that the L2 distance is an RMS over pixels
    (none: a dataset without pure images, e.g. ``--lambda-ends targeted``)."""
    if len(images) == 0:
        return torch.zeros(0, 1, dtype=torch.float64)
    flat = images.reshape(len(images), -1).double() / 255.0
    return flat / math.sqrt(max(1, flat.shape[1]))


def _diversity(
    judge: Any, pure: dict[int, torch.Tensor], real: Any, seed: int, batch_size: int
) -> dict[str, Any]:
    """Per class: pixel and judge-feature diversity of pure generated vs as many real images."""
    rng = torch.Generator().manual_seed(seed)
    out = {}
    for c, images in pure.items():
        pool = real.train.images[real.train.labels == c]
        idx = torch.randperm(len(pool), generator=rng)[: len(images)]
        ref = pool[idx]
        gen_f = judge.encode_batched(images, batch_size) if len(images) else torch.zeros(0, 1)
        real_f = judge.encode_batched(ref, batch_size) if len(ref) else torch.zeros(0, 1)
        row = {
            "n": int(len(images)),
            "pixel_generated": mean_pairwise_distance(_pixels(images)),
            "pixel_real": mean_pairwise_distance(_pixels(ref)),
            "feature_generated": mean_pairwise_distance(gen_f),
            "feature_real": mean_pairwise_distance(real_f),
        }
        for kind in ("pixel", "feature"):
            g, r = row[f"{kind}_generated"], row[f"{kind}_real"]
            row[f"{kind}_ratio"] = g / r if g is not None and r else None
        out[real.class_names[c]] = row
    return out


def spread_report(syn: Any, judge_soft: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
    """The confidence spread of a dataset's annotated and judge soft labels of class a.

    Args:
        syn: :class:`csm.synthetic.SyntheticTensors` (its ``soft_labels`` are the annotation's).
        judge_soft: (N,) the judge's soft label of class a.
        info: The dataset's generation info (``lambda_schedule`` when targeted).

    Returns:
        ``{"annotation", "lambda_schedule", "pilot", "annotated", "judge"}``: the last two are
        :func:`csm.generation.schedule.confidence_spread` reports.
    """
    from csm.generation.schedule import confidence_spread

    rows = torch.arange(len(syn.lam))
    annotated = syn.soft_labels[rows, syn.class_a].double().numpy()
    gid, lam = syn.group_id.numpy(), syn.lam.double().numpy()
    schedule = info.get("lambda_schedule") or {}
    pilot = schedule.get("pilot") or {}
    return {
        "annotation": syn.annotation,
        "lambda_schedule": schedule.get("mode", "uniform"),
        "pilot": f"{pilot.get('name')}:{pilot.get('annotation')}" if pilot else None,
        "annotated": confidence_spread(annotated, gid, lam),
        "judge": confidence_spread(judge_soft, gid, lam),
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def inspect_report(
    syn: Any, judge: Any, real: Any, cfg: InspectConfig
) -> tuple[dict[str, Any], np.ndarray]:
    """The report of synthetic tensors ``syn`` judged by ``judge`` (see module docstring).

    Args:
        syn: :class:`csm.synthetic.SyntheticTensors` of the groups to judge.
        judge: A classifier encoder (:class:`csm.annotation.encoders.ClassifierEncoder`).
        real: The real dataset (:class:`csm.data.real.RealData`) with the same classes.
        cfg: The options (``tolerance``, ``seed``, ``batch_size``).

    Returns:
        The report dict (written as ``inspect.json``) and the judge soft label of class a of
        every image.
    """
    from csm.annotation.annotate import annotation_report

    names = list(syn.class_names)
    lam = syn.lam.double().numpy()
    logits = judge.logits(syn.images, cfg.batch_size)
    soft = _pair_soft(logits, syn.class_a, syn.class_b)
    ends = np.isclose(lam, 1.0) | np.isclose(lam, 0.0)
    cls = torch.where(torch.from_numpy(np.isclose(lam, 1.0)), syn.class_a, syn.class_b)
    pred = logits.argmax(1)
    real_pred = judge.logits(real.test.images, cfg.batch_size).argmax(1)
    recognition, pure = {}, {}
    for c, name in enumerate(names):
        m = torch.from_numpy(ends) & (cls == c)
        rm = real.test.labels == c
        pure[c] = syn.images[m]
        recognition[name] = {
            "n": int(m.sum()),
            "generated": float((pred[m] == c).double().mean()) if m.any() else None,
            "real_test": float((real_pred[rm] == c).double().mean()) if rm.any() else None,
        }
    gid = syn.group_id.numpy()
    mono = monotone_groups(gid, lam, soft, cfg.tolerance)
    curves = annotation_report(lam, soft, syn.class_a.numpy(), syn.class_b.numpy(), names)
    for pair in curves["pairs"].values():
        a, b = names.index(pair["class_a"]), names.index(pair["class_b"])
        groups = np.unique(gid[(syn.class_a.numpy() == a) & (syn.class_b.numpy() == b)])
        pair["monotone_share"] = float(np.mean([mono[int(g)] for g in groups]))
    diversity = _diversity(judge, pure, real, cfg.seed, cfg.batch_size)
    return {
        "num_images": int(len(lam)),
        "num_groups": len(mono),
        "class_names": names,
        "recognition": recognition,
        "recognition_mean": _mean([r["generated"] for r in recognition.values()]),
        "real_test_recognition_mean": _mean([r["real_test"] for r in recognition.values()]),
        "tolerance": cfg.tolerance,
        "monotone_share": float(np.mean(list(mono.values()))) if mono else 0.0,
        "flipped_share": flipped_share(lam, soft),
        "lambda": curves["lambda"],
        "soft_a_mean": curves["share_a_mean"],
        "pairs": curves["pairs"],
        "diversity": diversity,
        "diversity_ratio_mean": {
            k: _mean([d[f"{k}_ratio"] for d in diversity.values()]) for k in ("pixel", "feature")
        },
    }, soft


# ------------------------------------------------------------------------------------ pictures
def _bars(ax: Any, names: list[str], series: dict[str, list[float | None]], ylabel: str) -> None:
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
        ys = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, label=label)
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _summary_figures(rep: dict[str, Any], out: Path, title: str) -> None:
    """recognition.png and diversity.png."""
    import matplotlib.pyplot as plt

    from csm.evaluation.plots import save_figure

    names = rep["class_names"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 3.0))
    rec = rep["recognition"]
    _bars(
        ax,
        names,
        {k: [rec[n][k] for n in names] for k in ("generated", "real_test")},
        "judge recognition",
    )
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{title}: pure-class samples recognised by the judge", fontsize=9)
    save_figure(fig, out / "recognition.png")
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4.0, 0.5 * len(names) + 2), 3.0))
    div = rep["diversity"]
    for ax, (kind, label) in zip(axes, (("pixel", "RMS pixel"), ("feature", "judge feature"))):
        series = {k: [div[n][f"{kind}_{k}"] for n in names] for k in ("generated", "real")}
        _bars(ax, names, series, f"mean pairwise {label} distance")
        ratio = rep["diversity_ratio_mean"][kind]
        ax.set_title(f"{label}: generated / real = {ratio:.2f}" if ratio else label, fontsize=9)
    fig.suptitle(f"{title}: diversity of pure-class samples per class", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "diversity.png")


def _grid_figures(
    rep: dict[str, Any], syn: Any, soft: np.ndarray, real: Any, cfg: InspectConfig, out: Path
) -> None:
    """real_vs_generated.png, lambda_sweeps.png and lambda_curves.png."""
    from csm.evaluation.plots import (
        captioned_images_figure,
        mosaic_figure,
        save_figure,
        soft_label_figure,
    )

    names, lam = rep["class_names"], syn.lam.double().numpy()
    rng = torch.Generator().manual_seed(cfg.seed)
    blank = np.full(tuple(syn.images.shape[1:]), 255, dtype=np.uint8)
    ends = torch.from_numpy(np.isclose(lam, 1.0) | np.isclose(lam, 0.0))
    cls = torch.where(torch.from_numpy(np.isclose(lam, 1.0)), syn.class_a, syn.class_b)
    rows = []
    for c in range(len(names)):
        pool = real.train.images[real.train.labels == c]
        picked = pool[torch.randperm(len(pool), generator=rng)[: cfg.show]].numpy()
        gen = syn.images[ends & (cls == c)][: cfg.show].numpy()
        row = [*picked, *[blank] * (cfg.show - len(picked))]
        rows.append(row + [*gen, *[blank] * (cfg.show - len(gen))])
    cols = [f"real {i}" for i in range(cfg.show)] + [f"gen {i}" for i in range(cfg.show)]
    fig = mosaic_figure(rows, names, cols, title="real | generated (pure class)",
                        gap_after=cfg.show - 1)  # fmt: skip
    save_figure(fig, out / "real_vs_generated.png")
    gid = syn.group_id.numpy()
    images, captions, width = [], [], 0
    for pair in rep["pairs"].values():
        a, b = names.index(pair["class_a"]), names.index(pair["class_b"])
        first = int(gid[(syn.class_a.numpy() == a) & (syn.class_b.numpy() == b)].min())
        idx = np.flatnonzero(gid == first)
        idx = idx[np.argsort(lam[idx], kind="stable")]
        width = max(width, len(idx))
        for j, i in enumerate(idx):
            head = f"{names[a]}|{names[b]} " if j == 0 else ""
            images.append(syn.images[i].numpy())
            captions.append(f"{head}λ={lam[i]:.2f}\nsoft[a]={soft[i]:.2f}")
    sweep_title = "one group per pair: λ and judge soft label of class a"
    fig = captioned_images_figure(images, captions, ncols=width)
    inches = fig.get_figheight()  # tall: keep the title and margins a fixed size in inches
    fig.subplots_adjust(top=1 - 0.5 / inches, bottom=0.4 / inches)
    fig.suptitle(sweep_title, fontsize=9, y=1 - 0.15 / inches)
    save_figure(fig, out / "lambda_sweeps.png")
    pair_id = syn.class_a * len(names) + syn.class_b
    title = (f"judge soft label vs λ; monotone {100 * rep['monotone_share']:.0f}%, "
             f"flipped {100 * rep['flipped_share']:.1f}%")  # fmt: skip
    fig = soft_label_figure(syn.lam, torch.from_numpy(soft), pair_id, title=title)
    save_figure(fig, out / "lambda_curves.png")


def _spread_figure(rep: dict[str, Any], syn: Any, soft: np.ndarray, out: Path) -> None:
    """confidence_spread.png: annotated and judge soft[a], stacked by λ-rank, against U(0, 1)."""
    import matplotlib.pyplot as plt

    from csm.evaluation.plots import save_figure
    from csm.generation.schedule import lambda_ranks

    spread = rep["spread"]
    rows = torch.arange(len(syn.lam))
    values = {
        "annotated": syn.soft_labels[rows, syn.class_a].double().numpy(),
        "judge": soft,
    }
    ranks = lambda_ranks(syn.group_id.numpy(), syn.lam.double().numpy())
    edges = np.asarray(spread["annotated"]["histogram"]["edges"])
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True)
    cmap = plt.get_cmap("viridis")
    top = max(1, int(ranks.max()))
    for ax, (key, x) in zip(axes, values.items()):
        parts = [np.clip(x[ranks == r], 0, 1) for r in np.unique(ranks)]
        colors = [cmap(r / top) for r in np.unique(ranks)]
        labels = [f"rank {r}" for r in np.unique(ranks)]
        ax.hist(parts, bins=edges, stacked=True, density=True, color=colors, label=labels)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label="U(0, 1)")
        what = f"annotated ({spread['annotation']})" if key == "annotated" else "judge"
        ax.set_title(f"{what} soft[a]: KS to U(0,1) = {spread[key]['ks']:.3f}", fontsize=9)
        ax.set_xlabel("soft label of class a")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("density")
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"{rep['source']['name']}: confidence spread, λ schedule {spread['lambda_schedule']}",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, out / "confidence_spread.png")


# ------------------------------------------------------------------------------------ command
def _summary(rep: dict[str, Any], out: Path) -> str:
    rec = ", ".join(
        f"{n}:{r['generated']:.2f}" if r["generated"] is not None else f"{n}:-"
        for n, r in rep["recognition"].items()
    )
    div = rep["diversity_ratio_mean"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (
        f"inspected {rep['num_images']} images ({rep['num_groups']} groups) -> {out}; "
        f"recognition of pure samples per class: {rec} (mean {fmt(rep['recognition_mean'])}, "
        f"real test {fmt(rep['real_test_recognition_mean'])}); monotone groups "
        f"{100 * rep['monotone_share']:.1f}% (tolerance {rep['tolerance']}); flipped "
        f"{100 * rep['flipped_share']:.1f}%; diversity generated/real pixel {fmt(div['pixel'])}, "
        f"feature {fmt(div['feature'])}; spread ({rep['spread']['lambda_schedule']} λ): KS of "
        f"soft[a] to U(0,1) {rep['spread']['annotated']['ks']:.3f} annotated "
        f"({rep['spread']['annotation']}), {rep['spread']['judge']['ks']:.3f} judge"
    )


def inspect(cfg: InspectConfig) -> str:
    """Run ``csm inspect`` (see module docstring); returns a one-line summary.

    Raises:
        CSMError: A bad option, a source that is neither a generator nor a synthetic dataset, a
            judge that is not a classifier or whose classes differ, or an output folder in the way.
    """
    from csm.synthetic import load_synthetic_tensors, read_manifest
    from csm.synthetic.storage import write_json_atomic

    _check_options(cfg)
    kind = _source_kind(cfg.source)
    name = (Path(cfg.source) if kind == "model" else _dataset_dir(cfg.source)).resolve().name
    out = Path(cfg.out or f"inspect-{name}")
    _check_out(out, cfg.overwrite)
    judge, real = _inputs(cfg, kind)
    claim_output(out, KIND, overwrite=cfg.overwrite)  # every input is valid: only now write
    dataset = _generate(cfg, out, real.num_classes) if kind == "model" else cfg.source
    syn = load_synthetic_tensors(dataset, option="MODEL_OR_DATASET")
    rep, soft = inspect_report(syn, judge, real, cfg)
    folder = out / SAMPLES_DIR if kind == "model" else _dataset_dir(cfg.source)
    rep["spread"] = spread_report(syn, soft, read_manifest(folder)["params"].get("info") or {})
    rep["source"] = {"kind": kind, "name": name}
    rep["judge"] = cfg.judge.split(":", 1)[0] + ":" + Path(cfg.judge.split(":", 1)[1]).name
    rep["real"] = {"dataset": real.spec, "seed": real.seed}
    if kind == "model":
        keys = ("groups_per_pair", "group_size", "steps", "guidance", "scheduler", "mix_mode")
        rep["generation"] = {k: getattr(cfg, k) for k in (*keys, "seed")}
    title = rep["source"]["name"]
    _grid_figures(rep, syn, soft, real, cfg, out)
    _summary_figures(rep, out, title)
    _spread_figure(rep, syn, soft, out)
    write_json_atomic(rep, out / REPORT_NAME)
    return _summary(rep, out)
