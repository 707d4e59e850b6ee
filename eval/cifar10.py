"""The CSM paper's CIFAR-10 protocol as one resumable command (``bash eval/cifar10.sh``).

Steps (docs/cifar10.md says what each does and what it costs on one GPU):

1. ``csm fit-diffusion``: a class-conditional UNet on the real train split (preset ``base``);
2. ``csm generate``: 19,980 semantic-mixing groups x 8 = 159,840 images (Heun, 20 steps);
3. ``csm annotate``: calibrated reannotation with CLIP ViT-B/32 and the squash s = 4 (``s4``);
4. ``csm benchmark``: the CIFAR ResNet-50 recipe (train/cifar10_resnet50.yaml), 200 epochs, for
   the methods the paper compares against and csm, 5 seeds, on one shared split
   (``--data-seed``), then the evaluation (every calibrator, clean and shifted test).

Every size is an environment variable whose default is the paper's value (``--help`` lists
them), so the test suite runs all four steps on a CPU at toy size. Everything is validated before
the first write. A step whose output is complete and was made with the same settings (as csm
recorded them in that output) is skipped and says so; an interrupted step resumes (``--resume``
for fit-diffusion and generate, finished runs reused by the benchmark). Every seed is recorded in
``WORK/cifar10_protocol.json`` and, with the annotation report and the generator's samples, in
``OUT/protocol/``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROG = "cifar10.sh"
#: The methods the CSM paper compares against, then CSM (csm.training.methods names).
PAPER_METHODS = "ce ls focal flsd53 mmce mbls mixup regmixup rankmixup csm"

# name, default, help. An empty default means "not set" (the help says what is used then).
VARIABLES: list[tuple[str, str, str]] = [
    ("DATASET", "uoft-cs/cifar10", "real dataset: a Hub id (load_dataset) or a local folder"),
    ("IMAGE_SIZE", "32", "image side in pixels (CIFAR-10: 32)"),
    ("DATA_SEED", "0", "the one train/val/test split of every step (benchmark --data-seed)"),
    ("GEN_PRESET", "base", "fit-diffusion preset: tiny, small or base"),
    ("GEN_STEPS", "", "fit-diffusion optimiser steps (default: the preset's; base: 150000)"),
    ("FIT_BATCH", "", "fit-diffusion global batch (default: the preset's; base: 128)"),
    ("GEN_SEED", "0", "fit-diffusion seed (init, batches, noise, label dropout)"),
    # not GROUPS: bash owns that name and silently ignores `GROUPS=10 bash ...`
    ("NUM_GROUPS", "19980", "semantic-mixing groups (paper: 19,980 = 45 pairs x 444)"),
    ("GROUP_SIZE", "8", "images per group G (paper: 8; 159,840 images in all)"),
    ("SCHEDULER", "heun", "sampler: ddim, dpm++, euler or heun (paper: EDM's Heun)"),
    ("SAMPLE_STEPS", "20", "denoising steps (paper's CIFAR-10 run: 20)"),
    ("GUIDANCE", "1", "classifier-free guidance (paper: none, 1)"),
    ("SAMPLE_SEED", "0", "generate base seed: group k's noise is SeedSequence([seed, k])"),
    ("GEN_BATCH", "256", "images per pipeline call (32 groups x 8 = one shard)"),
    ("ENCODER", "clip:openai/clip-vit-base-patch32", "annotation encoder (paper: CLIP ViT-B/32)"),
    ("SQUASH", "4", "squash s of sigmoid(s (lam_hat - 1/2)) (paper code, CIFAR-10: 4)"),
    ("ANNOTATE_BATCH", "256", "images per encoder forward"),
    ("ANNOTATE_WORKERS", "", "image-decoding processes of csm annotate (default: csm's)"),
    ("TRAIN_CONFIG", "train/cifar10_resnet50.yaml", "csm train options of every run"),
    ("MODEL", "resnet50", "classifier architecture (paper: CIFAR ResNet-50)"),
    ("EPOCHS", "200", "training epochs (paper: 200)"),
    ("SEEDS", "5", "training seeds 0..SEEDS-1 per method"),
    ("METHODS", PAPER_METHODS, "methods to train (csm.training.methods names)"),
    ("TRAIN_OPTIONS", "", "extra csm train key=value options, shell-quoted"),
    ("CALIBRATORS", "all", "post-hoc calibrators evaluated (all, or names)"),
    ("CORRUPTIONS", "all", "test corruptions (all or none)"),
    ("OOD", "", "OOD dataset spec for the evaluation (default: none)"),
    ("PLOTS", "true", "write reliability and risk-coverage plots"),
    ("DEVICE", "auto", "auto, cpu or cuda (cpu also hides the GPU from fit and training)"),
    ("WORK", ".cache/cifar10", "generator, synthetic dataset and prototype cache"),
    ("OUT", "eval/results/cifar10", "benchmark folder: runs, results.csv, leaderboard.md"),
]


class ProtocolError(Exception):
    """One line naming the bad input and the fix."""


def _env(name: str) -> str:
    default = next(d for n, d, _ in VARIABLES if n == name)
    return os.environ.get(name, default).strip()


def _int(name: str, low: int, example: str, default: int | None = None) -> int:
    text = _env(name)
    if not text and default is not None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ProtocolError(f"{name}={text!r}: not an integer; e.g. {name}={example}") from None
    if value < low:
        raise ProtocolError(f"{name}={value}: must be >= {low}; e.g. {name}={example}")
    return value


def _float(name: str, example: str, *, positive: bool) -> float:
    text = _env(name)
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError(f"{name}={text!r}: not a number; e.g. {name}={example}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ProtocolError(
            f"{name}={text}: must be a finite number {bound}; e.g. {name}={example}"
        )
    return value


def _bool(name: str) -> bool:
    text = _env(name).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ProtocolError(f"{name}={_env(name)!r}: not a boolean; use {name}=true or {name}=false")


def _list(name: str, example: str | None = None) -> list[str]:
    """Shell-split items (``example``: the list may not be empty)."""
    try:
        items = shlex.split(_env(name))
    except ValueError as exc:
        raise ProtocolError(f"{name}={_env(name)!r}: {exc}; fix the shell quoting") from None
    if example and not items:
        raise ProtocolError(f"{name}: empty; give at least one, e.g. {name}={example!r}")
    return items


def _path(text: str) -> Path:
    return Path(text).expanduser().resolve()


@dataclass
class Settings:
    """Every resolved variable (paths absolute)."""

    dataset: str
    image_size: int
    data_seed: int
    gen_preset: str
    gen_steps: int
    fit_batch: int
    gen_seed: int
    groups: int
    group_size: int
    scheduler: str
    sample_steps: int
    guidance: float
    sample_seed: int
    gen_batch: int
    encoder: str
    squash: float
    annotate_batch: int
    annotate_workers: int | None
    train_config: Path
    model: str
    epochs: int
    seeds: int
    methods: list[str]
    train_options: list[str]
    calibrators: list[str]
    corruptions: list[str]
    ood: str | None
    plots: bool
    device: str
    work: Path
    out: Path

    @property
    def model_dir(self) -> Path:
        return self.work / f"diffusion-{self.gen_preset}-{self.gen_steps}steps"

    @property
    def syn_dir(self) -> Path:
        tag = f"{self.groups}x{self.group_size}-{self.scheduler}{self.sample_steps}"
        return self.work / f"syn-{self.gen_preset}-{self.gen_steps}steps-{tag}"

    @property
    def annotation(self) -> str:
        from csm.synthetic.variants import default_name

        return default_name("projection", self.squash)


def read_settings() -> Settings:
    """Parse and range-check every variable (no csm checks yet, nothing written)."""
    from csm.generation.fit import PRESETS

    if "GROUPS" in os.environ:  # set from outside bash, where it would be ignored
        raise ProtocolError(
            f"GROUPS={os.environ['GROUPS']}: not read (bash ignores assignments to its own GROUPS "
            "variable); set NUM_GROUPS instead"
        )
    preset = _env("GEN_PRESET")
    if preset not in PRESETS:
        raise ProtocolError(f"GEN_PRESET={preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    dataset = _env("DATASET")
    if not dataset:
        raise ProtocolError("DATASET: empty; give a Hub id (uoft-cs/cifar10) or a dataset folder")
    if Path(dataset).expanduser().exists():
        dataset = str(_path(dataset))
    encoder = _env("ENCODER")
    kind, sep, target = encoder.partition(":")
    if sep and target and Path(target).expanduser().exists():  # a local model folder
        encoder = f"{kind}:{_path(target)}"
    ood = _env("OOD") or None
    if ood and Path(ood).expanduser().exists():
        ood = str(_path(ood))
    workers = _env("ANNOTATE_WORKERS")
    device = _env("DEVICE")
    if device not in ("auto", "cpu", "cuda"):
        raise ProtocolError(f"DEVICE={device!r}: unknown; use DEVICE=auto, cpu or cuda")
    config = Path(_env("TRAIN_CONFIG")).expanduser()
    config = config if config.is_absolute() or config.exists() else REPO / config
    if not config.is_file():
        raise ProtocolError(
            f"TRAIN_CONFIG={_env('TRAIN_CONFIG')}: no such file; give a csm train YAML, e.g. "
            "train/cifar10_resnet50.yaml"
        )
    return Settings(
        dataset=dataset,
        image_size=_int("IMAGE_SIZE", 1, "32"),
        data_seed=_int("DATA_SEED", 0, "0"),
        gen_preset=preset,
        gen_steps=_int("GEN_STEPS", 1, "150000", PRESETS[preset].steps),
        fit_batch=_int("FIT_BATCH", 1, "128", PRESETS[preset].batch_size),
        gen_seed=_int("GEN_SEED", 0, "0"),
        groups=_int("NUM_GROUPS", 1, "19980"),
        group_size=_int("GROUP_SIZE", 2, "8"),
        scheduler=_env("SCHEDULER"),
        sample_steps=_int("SAMPLE_STEPS", 1, "20"),
        guidance=_float("GUIDANCE", "1", positive=False),
        sample_seed=_int("SAMPLE_SEED", 0, "0"),
        gen_batch=_int("GEN_BATCH", 1, "256"),
        encoder=encoder,
        squash=_float("SQUASH", "4", positive=True),
        annotate_batch=_int("ANNOTATE_BATCH", 1, "256"),
        annotate_workers=_int("ANNOTATE_WORKERS", 0, "4") if workers else None,
        train_config=config.resolve(),
        model=_env("MODEL"),
        epochs=_int("EPOCHS", 1, "200"),
        seeds=_int("SEEDS", 1, "5"),
        methods=_list("METHODS", "ce csm"),
        train_options=_list("TRAIN_OPTIONS"),
        calibrators=_list("CALIBRATORS", "all"),
        corruptions=_list("CORRUPTIONS", "all"),
        ood=ood,
        plots=_bool("PLOTS"),
        device=device,
        work=_path(_env("WORK")),
        out=_path(_env("OUT")),
    )


# ------------------------------------------------------------------------------------------
# checks against csm, before anything is written


def benchmark_config(s: Settings) -> Any:
    """The :class:`~csm.workflows.benchmark.BenchmarkConfig` that step 4 runs.

    ``--synthetic`` is the annotated dataset of steps 1-3 when a chosen method trains on
    synthetic data (else none), and ``--data-seed`` shares one split between all seeds: a
    generator sees its split's training images, so one synthetic dataset serves one split only.
    """
    from csm.training.methods import METHODS
    from csm.workflows.benchmark import BenchmarkConfig, select_methods

    cfg = BenchmarkConfig(
        dataset=s.dataset,
        methods=list(s.methods),
        seeds=s.seeds,
        out=str(s.out),
        synthetic=f"{s.syn_dir}:{s.annotation}",
        model=s.model,
        epochs=s.epochs,
        data_seed=s.data_seed,
        train_config=str(s.train_config),
        train_options=list(s.train_options),
        calibrators=list(s.calibrators),
        corruptions=list(s.corruptions),
        ood=s.ood,
        device=s.device,
        plots=s.plots,
    )
    if not any(getattr(METHODS[m], "needs_synthetic", False) for m in select_methods(cfg)):
        cfg.synthetic = None
    return cfg


def benchmark_jobs(s: Settings) -> list[tuple[str, int]]:
    """The (method, seed) runs of step 4, in csm benchmark's order."""
    from csm.workflows.benchmark import select_methods

    methods = select_methods(benchmark_config(s))
    return [(m, k) for k in range(s.seeds) for m in methods]


@contextmanager
def named(variables: str) -> Iterator[None]:
    """Prefix a csm error with the variables it comes from (csm names its own flags)."""
    from csm.errors import CSMError

    try:
        yield
    except CSMError as exc:
        raise ProtocolError(f"{variables}: {exc}") from None


def check_settings(s: Settings) -> None:
    """The checks csm would make at each step, made now: a typo fails in seconds, not hours."""
    import torch

    from csm.annotation.encoders import ENCODERS
    from csm.evaluation.evaluate import check_evaluate_options
    from csm.generation.fit import PRESETS
    from csm.generation.pipeline import SCHEDULERS
    from csm.training.config import parse_model_options, validate_config
    from csm.training.models import build_model
    from csm.utils import check_output
    from csm.workflows.benchmark import evaluate_config_for, run_state, train_config_for

    if s.scheduler not in SCHEDULERS:
        raise ProtocolError(
            f"SCHEDULER={s.scheduler!r}: unknown; choose one of {', '.join(SCHEDULERS)}"
        )
    down = 2 ** (len(PRESETS[s.gen_preset].block_out_channels) - 1)
    if s.image_size % down:
        raise ProtocolError(
            f"IMAGE_SIZE={s.image_size}: preset {s.gen_preset} needs a multiple of {down}; "
            "e.g. IMAGE_SIZE=32"
        )
    kind, sep, target = s.encoder.partition(":")
    if not sep or kind not in ENCODERS or not target:
        raise ProtocolError(
            f"ENCODER={s.encoder!r}: not an encoder spec; use clip:<id|dir>, hf:<id|dir> or "
            "classifier:<run dir>, e.g. clip:openai/clip-vit-base-patch32"
        )
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ProtocolError("DEVICE=cuda: no CUDA device is visible; use DEVICE=auto or cpu")
    with named("METHODS"):
        cfg = benchmark_config(s)
        jobs = benchmark_jobs(s)
    with named("TRAIN_CONFIG / TRAIN_OPTIONS / EPOCHS"):
        tcfgs = [train_config_for(cfg, m, k) for m, k in jobs]
        for tcfg in tcfgs:
            validate_config(tcfg)
    with named("OUT"):
        for tcfg in tcfgs:
            run_state(tcfg)  # a finished run with other settings: refused now, not after hours
    with named("CALIBRATORS / CORRUPTIONS"):
        check_evaluate_options(evaluate_config_for(cfg, []))
    if not s.model.startswith("hf:"):  # an hf: config may need the Hub; csm train checks it
        with named(f"MODEL={s.model} / TRAIN_OPTIONS model_options"):
            options = parse_model_options(tcfgs[0].model_options)
            build_model(s.model, 10, 3, s.image_size, [0.5] * 3, [0.25] * 3, **options)
    if cfg.synthetic is not None:
        check_output(s.model_dir, "generator", resume=True, flag="WORK")
        check_output(s.syn_dir, "synthetic", resume=True, flag="WORK")
    check_output(s.out, "benchmark", flag="OUT")


# ------------------------------------------------------------------------------------------
# the steps: each is "done" (skipped), "resume" (csm continues it) or "new"


def _has_content(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _differences(record: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [f"{k}={record.get(k)!r} (not {v!r})" for k, v in want.items() if record.get(k) != v]


def fit_state(s: Settings) -> tuple[str, str]:
    d = s.model_dir
    if not (d / "model_index.json").is_file():
        return ("resume", f"continues {d}") if _has_content(d) else ("new", "")
    record = _read_json(d / "training_config.json") or {}
    want = {
        "dataset": s.dataset,
        "preset": s.gen_preset,
        "image_size": s.image_size,
        "steps": s.gen_steps,
        "batch_size": s.fit_batch,
        "seed": s.gen_seed,
        "split_seed": s.data_seed,
    }
    diffs = _differences(record, want)
    if diffs:
        raise ProtocolError(
            f"WORK: {d} holds a generator fitted with {', '.join(diffs)}; delete that folder or "
            "set WORK to a new one"
        )
    return "done", f"{d} holds the fitted generator"


def generate_state(s: Settings) -> tuple[str, str]:
    d = s.syn_dir
    manifest = _read_json(d / "csm_synthetic.json")
    if not (manifest and manifest.get("finalized")):
        return ("resume", f"continues {d}") if _has_content(d) else ("new", "")
    info = manifest["params"]["info"]
    want = {
        "groups": s.groups,
        "group_size": s.group_size,
        "steps": s.sample_steps,
        "scheduler": s.scheduler,
        "guidance": s.guidance,
        "seed": s.sample_seed,
        "mix_mode": "embedding",
        "lambda_schedule": None,
    }
    diffs = _differences(info, want)
    if not diffs and (s.model_dir / "model_index.json").is_file():
        from csm.generation.card import generator_sha256

        if info.get("model_sha256") != generator_sha256(s.model_dir):
            diffs = [f"another generator than {s.model_dir}"]
    if diffs:
        raise ProtocolError(
            f"WORK: {d} holds images generated with {', '.join(diffs)}; delete that folder or "
            "set WORK to a new one"
        )
    return "done", f"{d} holds {s.groups * s.group_size} finished images"


def annotate_state(s: Settings) -> tuple[str, str]:
    manifest = _read_json(s.syn_dir / "csm_synthetic.json") or {}
    entry = (manifest.get("annotations") or {}).get(s.annotation)
    if entry is None or manifest.get("activating"):
        return "new", ""
    want = {
        "mode": "projection",
        "encoder": s.encoder,
        "squash": s.squash,
        "real_dataset": s.dataset,
        "real_seed": s.data_seed,
        "label_mode": None,
    }
    diffs = _differences(entry, want)
    if diffs:  # csm annotate replaces an annotation of the same name
        return "new", f"replaces annotation {s.annotation!r} made with {', '.join(diffs)}"
    return "done", f"{s.syn_dir} holds annotation {s.annotation!r}"


def benchmark_state(s: Settings) -> tuple[str, str]:
    import yaml

    from csm.config import config_to_dict

    out = s.out
    names = ("config.yaml", "benchmark.json", "evaluation.json", "results.csv", "leaderboard.md")
    if not all((out / n).is_file() for n in names):
        return (
            ("resume", f"reuses the finished runs in {out}") if _has_content(out) else ("new", "")
        )
    saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    want = config_to_dict(benchmark_config(s))
    diffs = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if diffs:
        return "resume", f"{out} was made with other settings ({', '.join(diffs)})"
    manifest = _read_json(out / "benchmark.json") or {}
    runs = manifest.get("runs") or []
    evaluated = (_read_json(out / "evaluation.json") or {}).get("runs")
    complete = (
        [(r["method"], r["seed"]) for r in runs] == benchmark_jobs(s)
        and all(r["status"] == "complete" for r in runs)
        and evaluated == [r["run"] for r in runs]
        # evaluated after the last run finished (an interrupted evaluation leaves an older one)
        and (out / "evaluation.json").stat().st_mtime >= (out / "benchmark.json").stat().st_mtime
    )
    if not complete:
        return "resume", f"reuses the finished runs in {out}"
    return "done", f"{out} holds {len(runs)} evaluated runs"


@dataclass
class Step:
    """One csm command of the protocol."""

    number: int
    name: str
    argv: list[str]  # after ``csm``
    state: str  # done, resume or new
    reason: str
    needed: bool = True

    def command(self) -> str:
        return shlex.join(["csm", *self.argv])


def plan(s: Settings) -> list[Step]:
    """The four steps with their state; a step runs if unfinished and a later step needs it."""
    syn = benchmark_config(s).synthetic is not None
    steps = []
    for i, (name, state, argv) in enumerate(zip(NAMES, STATES, ARGVS), start=1):
        if i < 4 and not syn:
            steps.append(
                Step(i, name, [], "done", "not needed: no method trains on synthetic data")
            )
            continue
        st, reason = state(s)
        steps.append(Step(i, name, argv(s, st), st, reason))
    later = False
    for step in reversed(steps):  # a finished later step needs nothing earlier
        step.needed = step.state != "done" and (step.number == 4 or later)
        later = later or step.needed
        if step.state != "done" and not step.needed:
            step.reason = "not needed: the later steps are finished"
    return steps


def fit_argv(s: Settings, state: str) -> list[str]:
    return [
        "fit-diffusion",
        *("--dataset", s.dataset, "--preset", s.gen_preset, "--image-size", str(s.image_size)),
        *("--steps", str(s.gen_steps), "--batch-size", str(s.fit_batch)),
        *("--seed", str(s.gen_seed), "--split-seed", str(s.data_seed), "--out", str(s.model_dir)),
        *(["--resume"] if state == "resume" else []),
    ]


def generate_argv(s: Settings, state: str) -> list[str]:
    return [
        "generate",
        *("--model", str(s.model_dir), "--out", str(s.syn_dir), "--groups", str(s.groups)),
        *("--group-size", str(s.group_size), "--scheduler", s.scheduler),
        *("--steps", str(s.sample_steps), "--guidance", f"{s.guidance:g}"),
        *("--seed", str(s.sample_seed), "--batch-size", str(s.gen_batch), "--device", s.device),
        *(["--resume"] if state == "resume" else []),
    ]


def annotate_argv(s: Settings, state: str) -> list[str]:
    workers = [] if s.annotate_workers is None else ["--num-workers", str(s.annotate_workers)]
    return [
        "annotate",
        str(s.syn_dir),
        *("--real", s.dataset, "--real-seed", str(s.data_seed), "--encoder", s.encoder),
        *("--squash", f"{s.squash:g}", "--name", s.annotation),
        *("--batch-size", str(s.annotate_batch), *workers, "--device", s.device),
        *("--cache-dir", str(s.work / "cache")),
    ]


def benchmark_argv(s: Settings, state: str) -> list[str]:
    cfg = benchmark_config(s)
    return [
        "benchmark",
        *("--dataset", cfg.dataset, "--methods", *cfg.methods, "--seeds", str(cfg.seeds)),
        *("--data-seed", str(cfg.data_seed)),
        *(["--synthetic", cfg.synthetic] if cfg.synthetic else []),
        *("--train-config", cfg.train_config, "--model", cfg.model, "--epochs", str(cfg.epochs)),
        *(["--train-options", *cfg.train_options] if cfg.train_options else []),
        *("--calibrators", *cfg.calibrators, "--corruptions", *cfg.corruptions),
        *(["--ood", cfg.ood] if cfg.ood else []),
        *("--device", cfg.device, "--plots", str(cfg.plots).lower(), "--out", cfg.out),
    ]


# ------------------------------------------------------------------------------------------
# records


def protocol_record(s: Settings) -> dict[str, Any]:
    """Every setting, seed, path and command of this protocol (WORK/cifar10_protocol.json)."""
    from csm import __version__
    from csm.evaluation.evaluate import EvaluateConfig
    from csm.generation.generate import PAIR_WALK, SEED_RULE

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()}
    commands = {step.name: step.command() for step in plan_commands(s)}
    return {
        "protocol": "CSM (Luo et al., ICML 2025, arXiv 2504.13548) on CIFAR-10: eval/cifar10.sh",
        "csm": __version__,
        "settings": settings,
        "seeds": {
            "split (fit-diffusion --split-seed, annotate --real-seed, benchmark --data-seed)": (
                s.data_seed
            ),
            "fit-diffusion --seed (init, batches, noise, label dropout)": s.gen_seed,
            "generate --seed": s.sample_seed,
            "group noise": SEED_RULE,
            "class pair of group k": PAIR_WALK,
            "training seeds (csm benchmark: run seed k)": list(range(s.seeds)),
            "corruption noise (csm evaluate --seed)": EvaluateConfig().seed,
            "paired bootstrap": "OUT/evaluation.json: paired.bootstrap_seed",
        },
        "paths": {
            "generator": str(s.model_dir),
            "synthetic": f"{s.syn_dir}:{s.annotation}",
            "prototype cache": str(s.work / "cache"),
            "benchmark": str(s.out),
        },
        "commands": commands,
    }


def plan_commands(s: Settings) -> list[Step]:
    """The commands of a fresh run (no ``--resume``), for the record."""
    return [Step(i, n, a(s, "new"), "new", "") for i, (n, a) in enumerate(zip(NAMES, ARGVS), 1)]


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds it (a rerun writes nothing)."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def copy_records(s: Settings, record: bytes) -> list[Path]:
    """The protocol record, the annotation report, the dataset card and the generator's samples
    travel with the results (OUT/protocol/)."""
    dest = s.out / "protocol"
    ann = s.syn_dir / "annotations" / s.annotation
    sources = {
        "annotation_report.json": ann / "annotation_report.json",
        "annotation_report.png": ann / "annotation_report.png",
        "dataset_card.md": s.syn_dir / "README.md",
        "diffusion_samples.png": s.model_dir / "samples.png",
    }
    written = []
    if write_if_changed(dest / "cifar10_protocol.json", record):
        written.append(dest / "cifar10_protocol.json")
    for name, src in sources.items():
        if src.is_file() and write_if_changed(dest / name, src.read_bytes()):
            written.append(dest / name)
    return written


# ------------------------------------------------------------------------------------------
# main


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def usage() -> str:
    lines = [
        "usage: [VAR=value ...] bash eval/cifar10.sh [--dry-run]",
        "",
        "The CSM paper's CIFAR-10 protocol, resumable (docs/cifar10.md). Variables (default):",
    ]
    for name, default, help_ in VARIABLES:
        lines.append(f"  {name:<17} {help_} ({default or 'unset'})")
    lines.append("--dry-run: validate, print each step's state and command, write nothing.")
    return "\n".join(lines)


def run_step(step: Step, env: dict[str, str]) -> float:
    """Run one csm command in this interpreter (``python -m csm``); its exit code on failure."""
    say(f"[{step.number}/4] {step.name}: running ({step.reason or 'new'}): {step.command()}")
    start = time.monotonic()
    rc = subprocess.run([sys.executable, "-m", "csm", *step.argv], env=env).returncode
    if rc != 0:
        say(
            f"[{step.number}/4] {step.name} failed (exit {rc}); fix the error above and rerun: "
            "finished steps are skipped and this one resumes"
        )
        raise SystemExit(rc)
    seconds = time.monotonic() - start
    say(f"[{step.number}/4] {step.name}: done in {seconds:.1f} s")
    return seconds


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    unknown = [a for a in argv if a != "--dry-run"]
    if unknown:
        print(
            f"{PROG}: {unknown[0]}: unknown argument; sizes are variables (--help)", file=sys.stderr
        )
        return 2
    from csm.errors import CSMError

    try:
        s = read_settings()
        check_settings(s)
        steps = plan(s)
        record = (json.dumps(protocol_record(s), indent=2) + "\n").encode()
    except (ProtocolError, CSMError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if "--dry-run" in argv:
        for step in steps:
            what = "would run" if step.needed else "skip"
            say(f"[{step.number}/4] {step.name}: {what} ({step.reason or step.state})")
            if step.needed:
                say(f"    {step.command()}")
        return 0
    # every input is valid: only now write
    write_if_changed(s.work / "cifar10_protocol.json", record)
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # this checkout's csm
    if s.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # fit-diffusion and csm train pick the GPU by themselves
    ran = 0
    for step in steps:
        if not step.needed:
            say(f"[{step.number}/4] {step.name}: skipped ({step.reason})")
            continue
        run_step(step, env)
        ran += 1
    for path in copy_records(s, record):
        say(f"wrote {path}")
    say(
        f"finished: {ran} step(s) run, {4 - ran} skipped; results in {s.out}/results.csv and "
        f"{s.out}/leaderboard.md"
    )
    return 0


NAMES = ["fit-diffusion", "generate", "annotate", "benchmark"]
STATES = [fit_state, generate_state, annotate_state, benchmark_state]
ARGVS = [fit_argv, generate_argv, annotate_argv, benchmark_argv]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
