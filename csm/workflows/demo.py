"""``csm demo``: the whole CSM pipeline on an embedded dataset, resumable, in minutes on a CPU.

Stages (each one is skipped when its output is already complete, so an interrupted demo restarts
where it stopped):

1. **diffusion** — fit a class-conditional UNet (:mod:`csm.generation.fit`) or reuse the one
   cached in ``--cache-dir`` (a fitted model is keyed by dataset, preset, steps and seed);
2. **generate** — sample ``--groups`` semantic-mixing groups of ``--group-size`` images
   (:mod:`csm.generation.generate`) into ``OUT/synthetic``;
3. **encoder** — train the CE classifier of seed 0 on the real train split; it is both a
   benchmark run and the ``classifier:`` encoder of the annotation;
4. **annotate** — calibrated reannotation of the synthetic images (:mod:`csm.annotation.annotate`);
5. **benchmark** — train ``--methods`` over ``--seeds`` seeds and evaluate them all
   (:mod:`csm.workflows.benchmark`), with temperature scaling fitted on ``val``;
6. **report** — ``OUT/report.md`` with ``OUT/figures/``: the λ-sweep grid (one row per class
   pair, λ under each column), example mixed images with their λ and soft label, real against
   generated images per class, the soft label against λ, train/val curves of every run (from its
   ``metrics.csv``), the leaderboard, accuracy and ECE under shift (``--corruptions``) and the
   reliability diagrams (bars faded by bin mass, counts shown).

Everything random comes from ``--seed`` (diffusion training, noise of each group, classifier
seeds ``0..seeds-1``), and every stage writes its resolved config next to its output.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from csm.config import save_config
from csm.errors import CSMError
from csm.utils import atomic_write_text, check_output, claim_output

logger = logging.getLogger(__name__)

DEMO_METHODS = ["ce", "ls", "focal", "mixup", "csm"]
#: The fast digits recipe (train/digits.yaml): small batches, cosine schedule, 2-px crop padding
#: (4 px of padding is heavy on 16-px digits and leaves the models under-confident).
DEMO_TRAIN_OPTIONS = ["batch_size=64", "lr=0.05", "schedule=cosine", "crop_padding=2"]


@dataclass
class DemoConfig:
    """Options of ``csm demo``."""

    dataset: str = field(default="digits", metadata={"help": "embedded dataset: digits or mnist5k"})
    out: str = field(default="demo-out", metadata={"help": "output folder (resumable)"})
    cache_dir: str = field(
        default=".cache/csm", metadata={"help": "where fitted diffusion models are reused from"}
    )
    preset: str = field(default="small", metadata={"help": "diffusion model size preset"})
    diffusion_steps: int | None = field(
        default=None, metadata={"help": "diffusion training steps (default: the preset's)"}
    )
    groups: int = field(default=160, metadata={"help": "semantic-mixing groups to generate"})
    group_size: int = field(default=8, metadata={"help": "images per group (lambda grid)"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps per generated image"})
    squash: float = field(default=4.0, metadata={"help": "reannotation squash s"})
    methods: list[str] = field(
        default_factory=lambda: list(DEMO_METHODS), metadata={"help": "methods to compare"}
    )
    seeds: int = field(default=3, metadata={"help": "classifier seeds per method"})
    epochs: int = field(default=15, metadata={"help": "classifier training epochs"})
    seed: int = field(default=0, metadata={"help": "seed of diffusion training and generation"})
    corruptions: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={"help": "test corruptions of the shifted-test table (all, none or names)"},
    )


def _stage(name: str, timings: dict[str, float], fn, *args, **kwargs) -> Any:
    logger.info("demo: %s ...", name)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - t0, 1)
    logger.info("demo: %s done in %.1f s", name, timings[name])
    return result


def diffusion_model(cfg: DemoConfig) -> Path:
    """Fit (or reuse, or resume) the cached class-conditional diffusion model."""
    from csm.generation.fit import FitDiffusionConfig, fit_diffusion

    steps = f"-{cfg.diffusion_steps}steps" if cfg.diffusion_steps else ""
    path = Path(cfg.cache_dir) / f"diffusion-{cfg.dataset}-{cfg.preset}{steps}-seed{cfg.seed}"
    if (path / "model_index.json").is_file():
        logger.info("demo: reusing the diffusion model in %s", path)
        return path
    from csm.data.real import load_real

    # The generator works at the real images' size, which is what the classifiers train on.
    size = load_real(cfg.dataset).image_shape[-1]
    fcfg = FitDiffusionConfig(
        dataset=cfg.dataset,
        image_size=size,
        out=str(path),
        preset=cfg.preset,
        steps=cfg.diffusion_steps,
        seed=cfg.seed,
        resume=path.is_dir() and any(path.iterdir()),
    )
    fit_diffusion(fcfg)
    return path


def synthetic_dataset(cfg: DemoConfig, model: Path) -> Path:
    """Generate the mixed groups into ``OUT/synthetic`` (resuming an interrupted run)."""
    from csm.generation.generate import GenerateConfig, generate
    from csm.synthetic import MANIFEST_NAME, read_manifest

    out = Path(cfg.out) / "synthetic"
    resume = (out / MANIFEST_NAME).is_file()
    if resume and read_manifest(out).get("finalized"):
        logger.info("demo: reusing the synthetic dataset in %s", out)
        return out
    gcfg = GenerateConfig(
        model=str(model),
        out=str(out),
        groups=cfg.groups,
        group_size=cfg.group_size,
        steps=cfg.sample_steps,
        seed=cfg.seed,
        resume=resume,
    )
    generate(gcfg)
    return out


def _benchmark_config(cfg: DemoConfig, synthetic: Path):
    from csm.workflows.benchmark import BenchmarkConfig

    return BenchmarkConfig(
        dataset=cfg.dataset,
        methods=list(cfg.methods),
        seeds=cfg.seeds,
        out=str(Path(cfg.out) / "benchmark"),
        # one generator (trained on split 0) serves every seed, so the runs share split 0
        data_seed=0,
        synthetic=str(synthetic),
        epochs=cfg.epochs,
        train_options=list(DEMO_TRAIN_OPTIONS),
        calibrators=["ts"],
        corruptions=list(cfg.corruptions),
    )


def encoder_run(cfg: DemoConfig, synthetic: Path) -> Path:
    """Train (or reuse) the CE run of seed 0, which is also the annotation encoder."""
    from csm.training.trainer import train
    from csm.workflows.benchmark import run_state, train_config_for

    bcfg = _benchmark_config(cfg, synthetic)
    claim_output(bcfg.out, "benchmark")  # the encoder run lives in the benchmark's folder
    tcfg = train_config_for(bcfg, "ce", 0)
    state = run_state(tcfg)
    if state != "complete":
        tcfg.resume = state == "partial"
        tcfg.overwrite = state == "broken"
        train(tcfg)
    return Path(tcfg.out)


def annotate_synthetic(cfg: DemoConfig, synthetic: Path, encoder: Path) -> dict[str, Any]:
    """Reannotate with the ``classifier:`` encoder unless already done with the same settings."""
    from csm.annotation.annotate import AnnotateConfig, annotate
    from csm.synthetic import read_manifest

    spec = f"classifier:{encoder}"
    ann = read_manifest(synthetic).get("annotation") or {}
    if ann.get("encoder") != spec or ann.get("squash") != cfg.squash:
        acfg = AnnotateConfig(
            dataset=str(synthetic), real=cfg.dataset, encoder=spec, squash=cfg.squash
        )
        logger.info("demo: %s", annotate(acfg))
    report = synthetic / "annotation_report.json"
    return json.loads(report.read_text()) if report.is_file() else {}


def _first_group_per_pair(t: Any) -> list[tuple[int, int, list[int]]]:
    """``(class_a, class_b, row indices sorted by λ)`` of the first group of every pair."""
    gid, lam = t.group_id.numpy(), t.lam.numpy()
    order = np.lexsort((lam, gid))
    seen: dict[tuple[int, int], int] = {}
    for i in order:
        seen.setdefault((int(t.class_a[i]), int(t.class_b[i])), int(gid[i]))
    return [(a, b, [int(i) for i in order if gid[i] == g]) for (a, b), g in sorted(seen.items())]


def lambda_sweep_png(synthetic: Path, path: Path) -> Path:
    """The λ sweep of every class pair: one row per pair (its first group), λ under each column."""
    from csm.evaluation.plots import mosaic_figure, save_figure
    from csm.synthetic import load_synthetic_tensors

    t = load_synthetic_tensors(synthetic)
    names = t.class_names
    rows = _first_group_per_pair(t)
    tiles = [[t.images[i].numpy() for i in idx] for _, _, idx in rows]
    labels = [f"{names[b]} → {names[a]}" for a, b, _ in rows]
    lams = [f"{float(t.lam[i]):.2f}" for i in rows[0][2]]
    title = f"Semantic mixing: {len(rows)} pairs (class b → class a), one shared noise per row"
    xlabel = "λ (weight of class a; 0 = pure class b, 1 = pure class a)"
    return save_figure(mosaic_figure(tiles, labels, lams, title, xlabel), path)


def examples_png(synthetic: Path, path: Path, seed: int, count: int = 12) -> Path:
    """Mixed images (0 < λ < 1, drawn with ``seed``) with their λ and soft label printed."""
    from csm.evaluation.plots import captioned_images_figure, save_figure
    from csm.synthetic import load_synthetic_tensors

    t = load_synthetic_tensors(synthetic)
    names = t.class_names
    interior = np.flatnonzero((t.lam.numpy() > 0) & (t.lam.numpy() < 1))
    pool = interior if interior.size else np.arange(len(t.lam))
    pick = np.sort(np.random.default_rng(seed).choice(pool, min(count, pool.size), replace=False))
    captions = []
    for i in pick:
        a, b = int(t.class_a[i]), int(t.class_b[i])
        soft = t.soft_labels[i]
        captions.append(
            f"{names[a]} + {names[b]}, λ = {float(t.lam[i]):.2f}\n"
            f"soft: {names[a]} {float(soft[a]):.2f}, {names[b]} {float(soft[b]):.2f}"
        )
    title = "Mixed images: generation λ (weight of the first class) and the soft label given"
    fig = captioned_images_figure([t.images[i].numpy() for i in pick], captions, 4, title)
    return save_figure(fig, path)


def real_vs_generated_png(dataset: str, synthetic: Path, path: Path, per_class: int = 4) -> Path:
    """Per class: real training images, then generated pure endpoints (λ = 1 of a, 0 of b)."""
    from csm.data.real import load_real
    from csm.evaluation.plots import mosaic_figure, save_figure
    from csm.synthetic import load_synthetic_tensors

    t = load_synthetic_tensors(synthetic)
    real = load_real(dataset).train
    lam = t.lam.numpy()
    tiles, labels = [], []
    for k, name in enumerate(t.class_names):
        ours = np.flatnonzero(
            ((lam == 1) & (t.class_a.numpy() == k)) | ((lam == 0) & (t.class_b.numpy() == k))
        )
        theirs = np.flatnonzero(real.labels.numpy() == k)[:per_class]
        row = [real.images[i].numpy() for i in theirs] + [
            t.images[i].numpy() for i in ours[:per_class]
        ]
        if row:
            tiles.append(row)
            labels.append(name)
    cols = [f"real {i + 1}" for i in range(per_class)] + [f"gen. {i + 1}" for i in range(per_class)]
    title = f"Real (left) against generated pure-class images (right), {per_class} per class"
    fig = mosaic_figure(tiles, labels, cols, title, gap_after=per_class - 1)
    return save_figure(fig, path)


def soft_label_png(synthetic: Path, path: Path) -> Path:
    """Soft label of class a against λ, one line per pair (title names the annotation)."""
    from csm.evaluation.plots import save_figure, soft_label_figure
    from csm.synthetic import load_synthetic_tensors, read_manifest

    t = load_synthetic_tensors(synthetic)
    soft_a = t.soft_labels.gather(1, t.class_a[:, None])[:, 0]
    k = len(t.class_names)
    ann = read_manifest(synthetic).get("annotation") or {}
    squash = f", squash s = {ann['squash']}" if ann.get("squash") is not None else ""
    title = f"Reannotation ({ann.get('mode', 'λ labels')}{squash}): {len(t.lam)} images"
    fig = soft_label_figure(t.lam, soft_a, t.class_a * k + t.class_b, title)
    return save_figure(fig, path)


TRAINING_PANELS = [
    ("train/loss", "train loss"),
    ("val/cls/NLL", "val NLL"),
    ("val/cal/ECE", "val ECE"),
    ("val/cls/Acc", "val accuracy"),
]


def training_curves_png(bench_dir: Path, path: Path) -> Path | None:
    """Train loss and val NLL / ECE / accuracy per epoch of every run (its ``metrics.csv``)."""
    import csv

    from csm.evaluation.plots import curves_figure, save_figure

    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for csv_path in sorted(bench_dir.glob("runs/*/*/metrics.csv")):
        with open(csv_path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if not r.get("partial")]
        label = f"{csv_path.parent.parent.name}/{csv_path.parent.name}"
        series = {}
        for key, _ in TRAINING_PANELS:
            pts = [(float(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if pts:
                series[key] = ([x for x, _ in pts], [y for _, y in pts])
        curves[label] = series
    if not any(curves.values()):
        return None
    title = "Training curves (one line per run; colour = method)"
    return save_figure(curves_figure(curves, TRAINING_PANELS, title), path)


def _split_shift(board: str) -> tuple[str, str]:
    """The leaderboard without, and the table of, accuracy and ECE under shift."""
    at = board.find("### Under shift")
    return (board, "") if at < 0 else (board[:at].rstrip() + "\n", board[at:].strip())


def _annotation_lines(annotation: dict[str, Any]) -> list[str]:
    if not annotation.get("lambda"):
        return []
    return [
        "| λ | " + " | ".join(f"{g:.2f}" for g in annotation["lambda"]) + " |",
        "|---|" + "---|" * len(annotation["lambda"]),
        "| mean soft label of class a | "
        + " | ".join(f"{v:.2f}" for v in annotation["share_a_mean"])
        + " |",
        "",
        f"Share of images whose dominant class differs from what λ says: "
        f"{100 * annotation.get('mismatch_share', float('nan')):.1f}%.",
        "",
    ]


def report_figures(cfg: DemoConfig, synthetic: Path, bench_dir: Path) -> dict[str, Path]:
    """Draw every figure of the report into ``OUT/figures`` (name -> path)."""
    figs = Path(cfg.out) / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    out = {
        "lambda_sweep": lambda_sweep_png(synthetic, figs / "lambda_sweep.png"),
        "examples": examples_png(synthetic, figs / "examples.png", cfg.seed),
        "real_vs_generated": real_vs_generated_png(
            cfg.dataset, synthetic, figs / "real_vs_generated.png"
        ),
        "confidence_vs_lambda": soft_label_png(synthetic, figs / "confidence_vs_lambda.png"),
    }
    curves = training_curves_png(bench_dir, figs / "training_curves.png")
    if curves is not None:
        out["training_curves"] = curves
    return out


def write_report(
    cfg: DemoConfig,
    synthetic: Path,
    annotation: dict[str, Any],
    bench_dir: Path,
    timings: dict[str, float],
) -> Path:
    """Write ``OUT/report.md`` with the pictures, the leaderboard and the shifted-test table."""
    out = Path(cfg.out)
    figs = {
        k: p.relative_to(out).as_posix()
        for k, p in report_figures(cfg, synthetic, bench_dir).items()
    }
    board_path = bench_dir / "leaderboard.md"
    board = board_path.read_text().replace("# Leaderboard\n", "", 1) if board_path.is_file() else ""
    board, shift = _split_shift(board)
    lines = [
        f"# csm demo on `{cfg.dataset}`",
        "",
        f"Methods {', '.join(cfg.methods)}; {cfg.seeds} seeds each; {cfg.epochs} epochs; "
        f"{cfg.groups} groups x {cfg.group_size} synthetic images; squash s = {cfg.squash}.",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + ".",
        "",
        "## Semantic mixing: every class pair, one noise per row, λ from 0 (b) to 1 (a)",
        "",
        f"![lambda sweep]({figs['lambda_sweep']})",
        "",
        "## What the mixed images look like and which label each got",
        "",
        f"![examples]({figs['examples']})",
        "",
        "## Real against generated images, per class",
        "",
        f"![real vs generated]({figs['real_vs_generated']})",
        "",
        "## Calibrated reannotation: soft label against λ",
        "",
        f"![confidence vs lambda]({figs['confidence_vs_lambda']})",
        "",
        *_annotation_lines(annotation),
    ]
    if "training_curves" in figs:
        lines += [
            "## Training curves (train loss, val metrics)",
            "",
            f"![training curves]({figs['training_curves']})",
            "",
        ]
    lines += ["## Leaderboard (test split; temperature scaling fitted on val)", "", board, ""]
    if shift:
        lines += ["## Under distribution shift (corrupted test)", "", shift, ""]
    rel = sorted((bench_dir / "reliability").glob("*.png"))
    if rel:
        lines += [
            "## Reliability diagrams (bar opacity = bin mass, sample count on each bar)",
            "",
            *[f"![{p.stem}]({os.path.relpath(p, out)})" for p in rel],
            "",
        ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


NOT_IDENTITY = ("out", "cache_dir")
"""Demo options that do not change its outputs; a rerun may change only these."""


def check_plan(cfg: DemoConfig) -> None:
    """Validate every option of every stage before anything is written or computed.

    Raises:
        CSMError: A bad option, ``--out`` in the way, or ``--out`` holding a demo run with other
            settings (its outputs would otherwise be silently reused).
    """
    import math

    from csm.generation.fit import PRESETS
    from csm.training.config import validate_config
    from csm.workflows.benchmark import select_methods, train_config_for

    if cfg.seeds < 1 or cfg.groups < 1 or cfg.epochs < 1:
        raise CSMError("--seeds, --groups and --epochs: must be at least 1")
    if cfg.group_size < 2:
        raise CSMError(f"--group-size {cfg.group_size}: must be >= 2 (the lambda grid 0..1)")
    if cfg.sample_steps < 1:
        raise CSMError(f"--sample-steps {cfg.sample_steps}: must be >= 1")
    if not (math.isfinite(cfg.squash) and cfg.squash > 0):
        raise CSMError(f"--squash {cfg.squash}: must be a positive number, e.g. 4")
    if cfg.preset not in PRESETS:
        raise CSMError(f"--preset {cfg.preset!r}: unknown; choose one of {sorted(PRESETS)}")
    if cfg.diffusion_steps is not None and cfg.diffusion_steps < 1:
        raise CSMError(f"--diffusion-steps {cfg.diffusion_steps}: must be >= 1")
    bcfg = _benchmark_config(cfg, Path(cfg.out) / "synthetic")
    for method in select_methods(bcfg):
        validate_config(train_config_for(bcfg, method, 0))
    out = Path(cfg.out)
    if check_output(out, "demo") and (out / "config.yaml").is_file():
        from csm.config import config_to_dict, load_yaml

        old, new = load_yaml(out / "config.yaml"), config_to_dict(cfg)
        diffs = [k for k in new if k not in NOT_IDENTITY and old.get(k) != new[k]]
        if diffs:
            raise CSMError(
                f"--out {out}: holds a demo run with other settings ({', '.join(diffs)}); rerun "
                "with the original options or use a new --out"
            )


def demo(cfg: DemoConfig) -> str:
    """Run the whole pipeline (see the module docstring); returns the leaderboard and paths."""
    from csm.workflows.benchmark import benchmark

    out = Path(cfg.out)
    check_plan(cfg)
    claim_output(out, "demo")  # the whole plan is valid: only now write
    save_config(cfg, out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = _stage("diffusion", timings, diffusion_model, cfg)
    synthetic = _stage("generate", timings, synthetic_dataset, cfg, model)
    encoder = _stage("encoder", timings, encoder_run, cfg, synthetic)
    annotation = _stage("annotate", timings, annotate_synthetic, cfg, synthetic, encoder)
    bcfg = _benchmark_config(cfg, synthetic)
    board = _stage("benchmark", timings, benchmark, bcfg)
    report = write_report(cfg, synthetic, annotation, Path(bcfg.out), timings)
    timings["total"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "demo.json", json.dumps({"timings_s": timings}, indent=2) + "\n")
    return f"{board}\n\nreport: {report}\ntimings (s): {timings}"
