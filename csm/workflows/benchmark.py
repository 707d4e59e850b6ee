"""``csm benchmark``: train every method on one dataset for several seeds, then evaluate them all.

One resumable command for "score all methods"::

    csm benchmark --dataset digits --methods all --seeds 3 --out bench_digits

Layout of ``--out``::

    config.yaml          this benchmark's resolved options
    benchmark.json       manifest: one entry per (method, seed) with its run directory and status
    runs/<method>/seed<k>/   a training run per method and seed (csm train's run directory)
    results.csv, leaderboard.md, reliability/*.png, risk_coverage.png   (csm evaluate's outputs)

Every run of seed ``k`` uses training seed ``k`` and the *same* train/val/test split
(``--data-seed``, default 0), so the spread over seeds measures initialisation and data-order
noise, and every method is scored on the same test images.

Resuming: rerunning the same command after an interruption skips every run whose ``run.json``
says ``complete`` (after checking its settings match), continues a half-trained run from its last
checkpoint (``csm train --resume``), and restarts a run that had not finished its first epoch.
Evaluation reuses each run's cached logits (:mod:`csm.evaluation.cache`), so a restart after
training costs little (``--evaluate false`` stops after training: each run's ``run.json`` still
holds its validation metrics, and a later call with evaluation reuses every run). A finished run
whose settings differ from this benchmark's is an error, never silently mixed in.

``--methods all`` means every method of :data:`csm.training.methods.METHODS`; methods that need a
synthetic dataset (``csm``) are skipped with a warning unless ``--synthetic DIR`` is given.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from csm.config import load_config, resolve_config, save_config
from csm.data.corruptions import SEVERITIES
from csm.errors import CSMError
from csm.utils import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class BenchmarkConfig:
    """Options of ``csm benchmark``."""

    dataset: str = field(default="digits", metadata={"help": "real dataset spec"})
    methods: list[str] = field(
        default_factory=lambda: ["all"], metadata={"help": "methods to train (all, or names)"}
    )
    seeds: int = field(default=3, metadata={"help": "number of seeds per method (0..N-1)"})
    out: str = field(default="benchmark", metadata={"help": "output directory"})
    synthetic: str | None = field(
        default=None,
        metadata={
            "help": "synthetic dataset DIR[:NAME] (needed by csm); with per-seed splits, one per "
            "data seed: a template such as syn-{data_seed}:s4"
        },
    )
    model: str | None = field(
        default=None,
        metadata={"help": "architecture for every run (default: --train-config's model, else cnn)"},
    )
    epochs: int | None = field(default=None, metadata={"help": "epochs (default: csm train's)"})
    data_seed: int | None = field(
        default=None,
        metadata={
            "help": "seed of one train/val/test split shared by every run (default: each seed "
            "draws its own split, data_seed = seed)"
        },
    )
    train_config: str | None = field(
        default=None, metadata={"help": "YAML of csm train options applied to every run"}
    )
    train_options: list[str] = field(
        default_factory=list,
        metadata={"help": "extra csm train options as key=value (e.g. lr=0.05 batch_size=64)"},
    )
    calibrators: list[str] = field(
        default_factory=lambda: ["all"], metadata={"help": "post-hoc calibrators to evaluate"}
    )
    corruptions: list[str] = field(
        default_factory=lambda: ["all"], metadata={"help": "test corruptions (all or none)"}
    )
    severities: list[int] = field(
        default_factory=lambda: list(SEVERITIES), metadata={"help": "corruption severities"}
    )
    ood: str | None = field(default=None, metadata={"help": "OOD dataset spec or 'heldout'"})
    n_bins: int = field(default=15, metadata={"help": "bins of ECE-type metrics"})
    device: str = field(default="cpu", metadata={"help": "device for evaluation inference"})
    plots: bool = field(default=True, metadata={"help": "write reliability and risk plots"})
    evaluate: bool = field(
        default=True,
        metadata={
            "help": "evaluate the runs after training (false: train only, e.g. to choose a "
            "configuration on the runs' validation metrics without touching test)"
        },
    )


def select_methods(cfg: BenchmarkConfig) -> list[str]:
    from csm.evaluation.evaluate import split_names
    from csm.training.methods import METHODS

    names = split_names(cfg.methods)
    if names == ["all"]:
        chosen = list(METHODS)
        explicit = False
    else:
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            raise CSMError(
                f"--methods {' '.join(unknown)}: unknown; choose all or from {', '.join(METHODS)}"
            )
        chosen = list(dict.fromkeys(names))
        explicit = True
    needs = [m for m in chosen if getattr(METHODS[m], "needs_synthetic", False)]
    if needs and cfg.synthetic is None:
        if explicit:
            raise CSMError(
                f"--methods {' '.join(needs)}: needs a synthetic dataset; pass --synthetic DIR "
                "(made by csm generate and csm annotate) or drop it from --methods"
            )
        logger.warning("skipping %s: no --synthetic dataset given", ", ".join(needs))
        chosen = [m for m in chosen if m not in needs]
    return chosen


def _parse_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CSMError(f"--train-options {item!r}: expected key=value, e.g. lr=0.05")
        out[key.strip()] = value.strip()
    return out


def train_config_for(cfg: BenchmarkConfig, method: str, seed: int) -> Any:
    """The :class:`~csm.training.config.TrainConfig` of one benchmark run (layered like the CLI)."""
    from csm.training.config import TrainConfig, only_method_options
    from csm.training.methods import METHODS

    overrides: dict[str, Any] = {**_parse_options(cfg.train_options)}
    for fixed in ("dataset", "method", "seed", "out", "data_seed", "resume", "overwrite"):
        if fixed in overrides:
            raise CSMError(
                f"--train-options {fixed}: set by the benchmark itself; use --{fixed}"
                if fixed in ("dataset", "out", "data_seed")
                else f"--train-options {fixed}: set by the benchmark itself; remove it"
            )
    data_seed = seed if cfg.data_seed is None else cfg.data_seed
    needs = getattr(METHODS[method], "needs_synthetic", False)
    overrides.update(
        dataset=cfg.dataset,
        method=method,
        seed=seed,
        data_seed=data_seed,
        out=str(run_dir_for(cfg, method, seed)),
        # only methods that train on synthetic data record it (the others never read it)
        synthetic=synthetic_for(cfg, data_seed) if needs else None,
    )
    if cfg.model is not None:
        overrides["model"] = cfg.model
    if cfg.epochs is not None:
        overrides["epochs"] = cfg.epochs
    # one set of options for many methods: each run keeps only the options its method accepts
    return only_method_options(resolve_config(TrainConfig, cfg.train_config, overrides))


def synthetic_for(cfg: BenchmarkConfig, data_seed: int) -> str | None:
    """The ``--synthetic`` spec of the runs on split ``data_seed`` (``{data_seed}`` filled in)."""
    if cfg.synthetic is None:
        return None
    return cfg.synthetic.replace("{data_seed}", str(data_seed))


def run_dir_for(cfg: BenchmarkConfig, method: str, seed: int) -> Path:
    """Run directory of ``method`` and ``seed`` inside the benchmark's output folder."""
    return Path(cfg.out) / "runs" / method / f"seed{seed}"


def run_state(tcfg: Any) -> str:
    """State of a run directory: complete, partial (checkpoint), broken (no checkpoint) or new.

    Raises:
        CSMError: A complete run whose recorded settings differ from ``tcfg``, or a non-empty
            folder that holds no training run (never deleted automatically).
    """
    from csm.training.config import TrainConfig
    from csm.training.runs import has_checkpoint, identity_diffs
    from csm.utils import check_output

    d = Path(tcfg.out)
    if not check_output(d, "run", flag="run folder"):
        return "new"
    info_path = d / "run.json"
    if info_path.is_file() and (d / "config.yaml").is_file():
        info = json.loads(info_path.read_text())
        if info.get("status") == "complete":
            diffs = identity_diffs(load_config(TrainConfig, d / "config.yaml"), tcfg)
            if diffs:
                raise CSMError(
                    f"{d}: holds a finished run with different settings ({', '.join(diffs)}); "
                    "rerun the benchmark with its original options or use a new --out"
                )
            if (d / "model.safetensors").is_file():
                return "complete"
    if not (d / "config.yaml").is_file():
        return "new"  # an interrupted first write: train starts it afresh
    if has_checkpoint(d):
        return "partial"
    return "broken"


def _write_manifest(cfg: BenchmarkConfig, entries: list[dict[str, Any]]) -> None:
    data = {"dataset": cfg.dataset, "model": cfg.model, "seeds": cfg.seeds, "runs": entries}
    atomic_write_text(Path(cfg.out) / "benchmark.json", json.dumps(data, indent=2) + "\n")


def evaluate_config_for(cfg: BenchmarkConfig, runs: list[str]) -> Any:
    """The :class:`~csm.evaluation.evaluate.EvaluateConfig` the benchmark evaluates ``runs``
    with (its calibrators, corruptions, bins and device)."""
    from csm.evaluation.evaluate import EvaluateConfig

    return EvaluateConfig(
        runs=runs,
        out=str(cfg.out),
        calibrators=cfg.calibrators,
        corruptions=cfg.corruptions,
        severities=cfg.severities,
        ood=cfg.ood,
        n_bins=cfg.n_bins,
        device=cfg.device,
        plots=cfg.plots,
    )


def _check_synthetic(cfg: BenchmarkConfig, methods: list[str]) -> None:
    """Every ``--synthetic`` dataset the methods train on must be a finished csm dataset, and
    must not come from a generator that saw another split's test images.

    A generator is trained on one split's training images; with per-seed splits (no
    ``--data-seed``) one shared synthetic dataset would give the runs of every other seed images
    derived from their own test images, so a template with ``{data_seed}`` is required.
    """
    from csm.synthetic import check_dataset, parse_spec
    from csm.training.methods import METHODS

    if cfg.synthetic is None or not any(
        getattr(METHODS[m], "needs_synthetic", False) for m in methods
    ):
        return
    per_seed = cfg.data_seed is None
    if per_seed and cfg.seeds > 1 and "{data_seed}" not in cfg.synthetic:
        raise CSMError(
            f"--synthetic {cfg.synthetic}: one dataset for every seed, but each seed draws its "
            "own train/val/test split, so its generator saw other seeds' test images; pass one "
            "dataset per split as a template (e.g. --synthetic 'syn-{data_seed}:s4') or share "
            "one split with --data-seed 0"
        )
    data_seeds = range(cfg.seeds) if per_seed else [cfg.data_seed]
    for d in data_seeds:
        spec = synthetic_for(cfg, d)
        folder, _ = parse_spec(spec)
        try:
            check_dataset(folder)
        except CSMError as exc:
            raise CSMError(f"--synthetic {spec}: {exc}") from None


def benchmark(cfg: BenchmarkConfig) -> str:
    """Train every (method, seed) that is not finished yet, then evaluate all runs.

    Args:
        cfg: The benchmark options.

    Returns:
        A summary line and the leaderboard markdown.

    Raises:
        CSMError: Unknown methods, ``--seeds`` < 1, a method needing synthetic data without
            ``--synthetic``, or a finished run in ``--out`` with different settings.
    """
    from csm.evaluation.evaluate import check_evaluate_options, evaluate
    from csm.training.config import validate_config
    from csm.training.trainer import train
    from csm.utils import check_output, claim_output

    if cfg.seeds < 1:
        raise CSMError(f"--seeds {cfg.seeds}: must be at least 1")
    methods = select_methods(cfg)
    out = Path(cfg.out)
    check_output(out, "benchmark")
    jobs = [(m, s) for s in range(cfg.seeds) for m in methods]  # seed-major: early full seeds
    tcfgs = {job: train_config_for(cfg, *job) for job in jobs}  # validate every option first
    for tcfg in tcfgs.values():
        validate_config(tcfg)
    ecfg = evaluate_config_for(cfg, [str(t.out) for t in tcfgs.values()])
    check_evaluate_options(ecfg)
    _check_synthetic(cfg, methods)
    from csm.training.runs import real_data_for

    real_data_for(next(iter(tcfgs.values())))  # the dataset loads (cached for the runs)
    states = {job: run_state(tcfgs[job]) for job in jobs}
    claim_output(out, "benchmark")  # the whole plan is valid: only now write
    save_config(cfg, out)
    entries = [
        {"method": m, "seed": s, "run": str(tcfgs[(m, s)].out), "status": states[(m, s)]}
        for m, s in jobs
    ]
    _write_manifest(cfg, entries)
    trained = skipped = 0
    for i, job in enumerate(tqdm(jobs, desc="benchmark runs")):
        tcfg = tcfgs[job]
        if states[job] == "complete":
            skipped += 1
            continue
        tcfg.resume = states[job] == "partial"
        tcfg.overwrite = states[job] == "broken"
        logger.info("training %s seed %d (%s) -> %s", job[0], job[1], states[job], tcfg.out)
        train(tcfg)
        trained += 1
        entries[i]["status"] = "complete"
        _write_manifest(cfg, entries)
    summary = (
        f"benchmark {cfg.dataset}: {len(methods)} method(s) x {cfg.seeds} seed(s); "
        f"trained {trained}, reused {skipped} finished run(s)"
    )
    if not cfg.evaluate:
        logger.info(summary)
        return summary + "; not evaluated (--evaluate false)"
    report = evaluate(ecfg, save_cfg=False)
    logger.info(summary)
    return summary + "\n\n" + report
