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
6. **report** — ``OUT/report.md``: the λ-sweep grid, confidence against λ, reliability diagrams
   and the leaderboard.

Everything random comes from ``--seed`` (diffusion training, noise of each group, classifier
seeds ``0..seeds-1``), and every stage writes its resolved config next to its output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from csm.config import save_config
from csm.errors import CSMError
from csm.utils import atomic_path, atomic_write_text

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
        synthetic=str(synthetic),
        epochs=cfg.epochs,
        train_options=list(DEMO_TRAIN_OPTIONS),
        calibrators=["ts"],
        corruptions=[],
    )


def encoder_run(cfg: DemoConfig, synthetic: Path) -> Path:
    """Train (or reuse) the CE run of seed 0, which is also the annotation encoder."""
    from csm.training.trainer import train
    from csm.workflows.benchmark import run_state, train_config_for

    tcfg = train_config_for(_benchmark_config(cfg, synthetic), "ce", 0)
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


def lambda_sweep_png(synthetic: Path, path: Path, rows: int = 6) -> Path:
    """A grid of the first ``rows`` groups: one row per group, λ from 0 (class b) to 1 (a)."""
    from PIL import Image

    from csm.synthetic import load_synthetic_tensors

    t = load_synthetic_tensors(synthetic)
    order = np.lexsort((t.lam.numpy(), t.group_id.numpy()))
    gids = list(dict.fromkeys(t.group_id[order].tolist()))[:rows]
    tiles = []
    for g in gids:
        idx = [i for i in order if int(t.group_id[i]) == g]
        row = np.concatenate([t.images[i].permute(1, 2, 0).numpy() for i in idx], axis=1)
        tiles.append(row)
    grid = np.concatenate(tiles, axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    img = Image.fromarray(grid)
    img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp)
    return path


def write_report(
    cfg: DemoConfig,
    synthetic: Path,
    annotation: dict[str, Any],
    bench_dir: Path,
    timings: dict[str, float],
) -> Path:
    """Write ``OUT/report.md`` with the pictures and the leaderboard."""
    out = Path(cfg.out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    sweep = lambda_sweep_png(synthetic, figs / "lambda_sweep.png")
    conf_png = synthetic / "annotation_report.png"
    if conf_png.is_file():
        shutil.copyfile(conf_png, figs / "confidence_vs_lambda.png")
    board_path = bench_dir / "leaderboard.md"
    board = board_path.read_text().replace("# Leaderboard\n", "", 1) if board_path.is_file() else ""
    lines = [
        f"# csm demo on `{cfg.dataset}`",
        "",
        f"Methods {', '.join(cfg.methods)}; {cfg.seeds} seeds each; {cfg.epochs} epochs; "
        f"{cfg.groups} groups x {cfg.group_size} synthetic images; squash s = {cfg.squash}.",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + ".",
        "",
        "## Semantic mixing: one noise per row, λ from 0 (class b) to 1 (class a)",
        "",
        f"![lambda sweep]({sweep.relative_to(out)})",
        "",
        "## Calibrated reannotation: soft label against λ",
        "",
    ]
    if (figs / "confidence_vs_lambda.png").is_file():
        lines += ["![confidence vs lambda](figures/confidence_vs_lambda.png)", ""]
    if annotation.get("lambda"):
        lines += [
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
    lines += ["## Leaderboard (test split; temperature scaling fitted on val)", "", board, ""]
    rel = sorted((bench_dir / "reliability").glob("*.png"))
    if rel:
        lines += ["## Reliability diagrams", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, out)})" for p in rel]
        lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def demo(cfg: DemoConfig) -> str:
    """Run the whole pipeline (see the module docstring); returns the leaderboard and paths."""
    from csm.workflows.benchmark import benchmark

    if cfg.seeds < 1 or cfg.groups < 1 or cfg.epochs < 1:
        raise CSMError("--seeds, --groups and --epochs: must be at least 1")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
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
