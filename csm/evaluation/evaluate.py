"""``csm evaluate``: score trained runs with every calibration metric, clean, shifted and OOD.

For each run directory (written by ``csm train``) the evaluator

1. runs the model once on the run's own ``val`` and ``test`` splits (the same split the trainer
   used: dataset spec, image size and split seed come from the run's ``config.yaml``), on every
   corrupted copy of ``test`` (:mod:`csm.data.corruptions`: 5 corruptions x 3 severities) and on an
   OOD set, keeping logits and penultimate features. These are cached as safetensors under
   ``RUN_DIR/eval_cache/<sha256 of model.safetensors>/``, so re-evaluating is instant and a
   retrained model (new weights, new hash) never reuses stale outputs (old caches are removed).
   The metric rows and clean-test probabilities of each (calibrators, conditions, bins) choice
   are cached there too, so repeating an evaluation refits nothing;
2. fits every post-hoc calibrator of :data:`csm.calibration.calibrators.CALIBRATORS` on ``val`` only
   (``none`` = the raw softmax) and applies it to every test condition;
3. computes every metric of :func:`csm.calibration.metrics.compute_all` on the concatenated
   predictions (never batch averages) for each run x calibrator x condition.

Outputs in ``--out``: ``results.csv`` (one row per run x calibrator x condition; metric values are
fractions, NLL in nats), ``leaderboard.md`` (mean ± sample std over seeds, best per column in
bold, units and binning in the header), ``reliability/<method>.png`` (one reliability diagram per
method with a panel per calibrator and the confidence histogram underneath; seeds pooled),
``risk_coverage.png``, ``evaluation.json`` (how it ran: ``world_size``, the ``ranks`` that took
part, the runs, the csm version)
and the resolved ``config.yaml``. Every file is written atomically.

Under ``accelerate launch --multi_gpu --num_processes N -m csm evaluate ...`` the inference is
split across the N processes (whole batches each, gathered back in order, so every number equals
a one-process run); only the main process writes the outputs and the cache, the others return
an empty string.

OOD set (``--ood``): another dataset spec (its test split, resized to the run's image size, channels
converted), or ``heldout``: the test images of the dataset's classes that the run was *not*
trained on (for runs trained on a subset of classes). The OOD AUROC (max-softmax score, after the
calibrator) is reported in the ``clean`` rows.

Conditions are named ``clean``, ``<corruption>@<severity>`` (e.g. ``blur@2``).

Modules: :mod:`~csm.evaluation.outputs` (runs, data, cached inference),
:mod:`~csm.evaluation.cache`, :mod:`~csm.evaluation.scoring` (calibrators and metrics),
:mod:`~csm.evaluation.leaderboard` (``results.csv`` and ``leaderboard.md``),
:mod:`~csm.evaluation.plots`.

A calibrator with an ``uncertainty(logits, features)`` method (``alien``) keeps the softmax
probabilities, so its selective-classification metrics (``sc/*``) rank samples by ``-u`` instead
of the max probability (:func:`csm.calibration.metrics.selective_metrics`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from csm import __version__
from csm.config import save_config
from csm.data.corruptions import CORRUPTIONS, SEVERITIES
from csm.errors import CSMError
from csm.evaluation.leaderboard import (
    CLEAN,
    format_leaderboard,
    group_labeler,
    write_paired,
    write_results,
)
from csm.evaluation.outputs import RunInfo, load_run_info, run_outputs
from csm.evaluation.paired import PairedSamples, paired_comparison
from csm.evaluation.scoring import score_run
from csm.utils import atomic_write_text, check_output, claim_output, distributed_state

__all__ = ["EvaluateConfig", "evaluate", "evaluate_runs", "split_names"]

logger = logging.getLogger(__name__)

ALL = "all"


@dataclass
class EvaluateConfig:
    """Options of ``csm evaluate``."""

    runs: list[str] = field(
        default_factory=list, metadata={"help": "run directories written by csm train"}
    )
    out: str = field(default="eval", metadata={"help": "output directory"})
    calibrators: list[str] = field(
        default_factory=lambda: [ALL],
        metadata={"help": "post-hoc calibrators to fit on val (all, or names: ts vs hist ...)"},
    )
    corruptions: list[str] = field(
        default_factory=lambda: [ALL],
        metadata={"help": "test-set corruptions (all, none, or names: gaussian_noise blur ...)"},
    )
    severities: list[int] = field(
        default_factory=lambda: list(SEVERITIES), metadata={"help": "corruption severities"}
    )
    ood: str | None = field(
        default=None,
        metadata={"help": "OOD set: a dataset spec, or 'heldout' for classes the run never saw"},
    )
    n_bins: int = field(default=15, metadata={"help": "bins of ECE-type metrics and diagrams"})
    reference: str = field(
        default="ce",
        metadata={"help": "method every other is compared with, paired by seed (paired.csv)"},
    )
    n_boot: int = field(
        default=1000, metadata={"help": "bootstrap replicates of the paired comparison (0: off)"}
    )
    batch_size: int = field(default=256, metadata={"help": "inference batch size"})
    seed: int = field(default=0, metadata={"help": "seed of the random corruptions (noise)"})
    device: str = field(default="cpu", metadata={"help": "torch device for inference"})
    cache: bool = field(
        default=True, metadata={"help": "reuse cached outputs and scores in RUN/eval_cache"}
    )
    plots: bool = field(default=True, metadata={"help": "write reliability and risk plots"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace the results of an earlier csm evaluate in --out"}
    )


def split_names(names: Iterable[str]) -> list[str]:
    """Flatten ``["a,b", "c"]`` into ``["a", "b", "c"]`` (lists may be given comma-separated)."""
    return [n.strip() for item in names for n in str(item).split(",") if n.strip()]


def _selected(names: list[str], registry: Iterable[str], what: str) -> list[str]:
    registry = list(registry)
    names = split_names(names)
    if names == [ALL]:
        return registry
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise CSMError(
            f"--{what} {' '.join(unknown)}: unknown; choose from all, {', '.join(registry)}"
        )
    return list(dict.fromkeys(names))


def _load_runs(cfg: EvaluateConfig) -> list[RunInfo]:
    """Validate the options and load every run (all on the same classes)."""
    if not cfg.runs:
        raise CSMError("csm evaluate: no run directories given; pass RUN_DIR ...")
    if cfg.n_bins < 1:
        raise CSMError(f"--n-bins {cfg.n_bins}: must be a positive number of bins, e.g. 15")
    bad = [s for s in cfg.severities if s not in SEVERITIES]
    if bad:
        raise CSMError(f"--severities {bad}: unknown; choose from {list(SEVERITIES)}")
    runs = [load_run_info(r) for r in dict.fromkeys(cfg.runs)]
    first = runs[0]
    for r in runs[1:]:
        if r.class_names != first.class_names:
            raise CSMError(
                f"run {r.path}: classes {r.class_names[:6]} differ from {first.path}'s "
                f"{first.class_names[:6]}; put only runs on the same classes in one leaderboard"
            )
    return runs


def _identity(run: RunInfo) -> dict[str, Any]:
    return {
        "run": str(run.path),
        "method": run.method,
        "model": run.model_name,
        "dataset": run.dataset,
        "seed": run.seed,
    }


@dataclass
class Evaluation:
    """What :func:`evaluate_runs` computed.

    Attributes:
        rows: Result rows (dicts, metric values as fractions).
        pooled: Per method label, per calibrator, the ``(probs, labels)`` of each run's clean
            test split (the plots pool them over seeds).
        per_seed: Per method label, per calibrator, per seed, the clean-test per-sample
            quantities of the paired comparison (:mod:`csm.evaluation.paired`).
    """

    rows: list[dict[str, Any]]
    pooled: dict[str, Any]
    per_seed: dict[str, dict[str, dict[int, PairedSamples]]]


def evaluate_runs(cfg: EvaluateConfig, check_out_dir: bool = False) -> Evaluation:
    """Compute every metric for every run x calibrator x condition (no files written but the
    cache).

    Under ``accelerate launch`` every process runs its share of the inference and gets the same
    rows.

    Args:
        cfg: The evaluation options.

    Returns:
        The result rows, the clean-test probabilities for the plots and the per-seed samples
        of the paired comparison (:class:`Evaluation`).

    Raises:
        CSMError: No runs, a run without weights, runs with different class sets, non-finite
            logits, an empty split, unknown calibrators or corruptions.
    """
    from csm.calibration.calibrators import CALIBRATORS

    runs = _load_runs(cfg)
    if check_out_dir:  # after the runs load, before any compute
        check_out(cfg)
    cal_names = _selected(cfg.calibrators, [c for c in CALIBRATORS if c != "none"], "calibrators")
    corruptions = _selected(cfg.corruptions, CORRUPTIONS, "corruptions")
    data_cache: dict = {}
    _open_ood(cfg, runs, data_cache)  # a bad --ood fails here, before RUN/eval_cache is written
    group_label = group_labeler([_identity(r) for r in runs])
    rows: list[dict[str, Any]] = []
    pooled: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    per_seed: dict[str, dict[str, dict[int, PairedSamples]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for run in tqdm(runs, desc="runs", disable=len(runs) < 2):
        outs = run_outputs(run, cfg, corruptions, data_cache)
        skey = {
            **outs.key,
            "condition": "scores",
            "calibrators": cal_names,
            "n_bins": cfg.n_bins,
            "csm": __version__,
        }
        cached = outs.cache.get_scores(skey)
        if cached is None:
            run_rows, clean_probs = score_run(run, outs, cal_names, cfg.n_bins)
            labels = outs.conditions[CLEAN].labels
            outs.cache.put_scores(skey, run_rows, clean_probs, labels)
        else:
            run_rows, clean_probs, labels = cached[0], cached[1]["probs"], cached[1]["labels"]
        rows += [{**r, **_identity(run)} for r in run_rows]
        group = group_label(_identity(run))
        for cal_name in ["none", *cal_names]:  # panel order = calibrator order
            pooled[group][cal_name].append((clean_probs[cal_name], labels))
            per_seed[group][cal_name][run.seed] = PairedSamples.from_probs(
                clean_probs[cal_name], labels
            )
        logger.info("evaluated %s (%s, seed %d)", run.path, run.method, run.seed)
    return Evaluation(rows, pooled, per_seed)


def _open_ood(cfg: EvaluateConfig, runs: list[RunInfo], data_cache: dict) -> None:
    """Open the ``--ood`` dataset (not ``heldout``) before any inference or cache write.

    It is loaded at the first run's image size into ``data_cache`` under the key the OOD
    outputs look up (``(spec, size)``), so a valid spec is loaded once and a bad one fails with
    one line before anything is computed or written.
    """
    if not cfg.ood or cfg.ood == "heldout":
        return
    from csm.data.real import load_real

    size = runs[0].config.image_size
    if (cfg.ood, size) not in data_cache:
        data_cache[(cfg.ood, size)] = load_real(cfg.ood, image_size=size)


def _claim_on_main(cfg: EvaluateConfig, state: Any) -> None:
    """Claim ``--out`` on the main process; a refusal there reaches (and stops) every process."""
    error = None
    if state.is_main_process:
        try:
            claim_output(cfg.out, "evaluation", overwrite=cfg.overwrite)
        except CSMError as exc:
            error = str(exc)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise CSMError(error)


def check_evaluate_options(cfg: EvaluateConfig) -> None:
    """Validate the options that do not need the runs (names, bins, severities); no I/O."""
    from csm.calibration.calibrators import CALIBRATORS

    if cfg.n_bins < 1:
        raise CSMError(f"--n-bins {cfg.n_bins}: must be a positive number of bins, e.g. 15")
    bad = [s for s in cfg.severities if s not in SEVERITIES]
    if bad:
        raise CSMError(f"--severities {bad}: unknown; choose from {list(SEVERITIES)}")
    _selected(cfg.calibrators, [c for c in CALIBRATORS if c != "none"], "calibrators")
    _selected(cfg.corruptions, CORRUPTIONS, "corruptions")
    if cfg.batch_size < 1:
        raise CSMError(f"--batch-size {cfg.batch_size}: must be >= 1")
    if cfg.n_boot < 0:
        raise CSMError(f"--n-boot {cfg.n_boot}: must be >= 0 (0 turns the paired comparison off)")


def check_out(cfg: EvaluateConfig) -> None:
    """Refuse an ``--out`` that is a file, holds another command's output (a run: evaluating
    into it would replace its ``config.yaml``) or earlier results without ``--overwrite``."""
    out = Path(cfg.out)
    for run in cfg.runs:
        if Path(run).resolve() == out.resolve():
            raise CSMError(
                f"--out {out}: is the run directory {run}; write the evaluation to another folder"
            )
    owned = check_output(out, "evaluation", overwrite=cfg.overwrite)
    if owned and not cfg.overwrite:
        raise CSMError(
            f"--out {out}: already holds evaluation results; pass --overwrite to replace them or "
            "choose another --out"
        )


def _paired(cfg: EvaluateConfig, ev: Evaluation) -> list[dict[str, Any]]:
    """Paired comparison rows against ``cfg.reference``, within each (model, dataset) subset
    of the runs (empty when off or when no reference run exists)."""
    if cfg.n_boot <= 0:
        return []
    label = group_labeler(ev.rows)
    subsets: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for r in ev.rows:
        subsets[(str(r["model"]), str(r["dataset"]))][label(r)] = str(r["method"])
    out: list[dict[str, Any]] = []
    for methods in subsets.values():
        refs = [g for g, m in methods.items() if m == cfg.reference]
        if not refs:
            continue
        samples = {g: ev.per_seed[g] for g in methods}
        out += paired_comparison(
            samples, refs[0], n_boot=cfg.n_boot, seed=cfg.seed, n_bins=cfg.n_bins
        )
    if not out:
        logger.info("no %s runs to pair with: no paired comparison", cfg.reference)
    return out


def evaluate(cfg: EvaluateConfig, *, save_cfg: bool = True) -> str:
    """Run ``csm evaluate``: score every run and write results, leaderboard and plots.

    Under ``accelerate launch`` the inference is split across the processes; only the main
    process writes files (the others wait for it and return ``""``).

    Args:
        cfg: The evaluation options (``cfg.runs`` are run directories).
        save_cfg: Write ``cfg`` as ``config.yaml`` in the output folder (``csm benchmark``
            writes its own config there instead).

    Returns:
        The leaderboard markdown followed by the list of files written (``""`` on the other
        processes).
    """
    from accelerate.utils import gather_object

    state = distributed_state()
    # csm benchmark (save_cfg=False) writes into its own folder and checks it itself
    ev = evaluate_runs(cfg, check_out_dir=save_cfg)
    rows, pooled = ev.rows, ev.pooled
    ranks = gather_object([state.process_index]) if state.num_processes > 1 else [0]
    if save_cfg:
        _claim_on_main(cfg, state)
    if not state.is_main_process:
        state.wait_for_everyone()
        return ""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out / "results.csv")
    written = [out / "results.csv"]
    paired = _paired(cfg, ev)
    if paired:
        write_paired(paired, out / "paired.csv")
        written.append(out / "paired.csv")
    board = format_leaderboard(rows, n_bins=cfg.n_bins, paired=paired, reference=cfg.reference)
    atomic_write_text(out / "leaderboard.md", board)
    written.append(out / "leaderboard.md")
    if cfg.plots:
        from csm.evaluation.plots import write_plots

        seeds: dict[str, set[str]] = defaultdict(set)
        group_label = group_labeler(rows)
        for r in rows:
            seeds[group_label(r)].add(r["run"])
        written += write_plots(pooled, out, cfg.n_bins, {k: len(v) for k, v in seeds.items()})
    record = {
        "world_size": state.num_processes,
        "ranks": ranks,
        "csm": __version__,
        "runs": list(dict.fromkeys(str(r) for r in cfg.runs)),
        "rows": len(rows),
        "paired": {"reference": cfg.reference, "n_boot": cfg.n_boot, "bootstrap_seed": cfg.seed},
    }
    atomic_write_text(out / "evaluation.json", json.dumps(record, indent=2) + "\n")
    written.append(out / "evaluation.json")
    if save_cfg:
        written.append(save_config(cfg, out))
    state.wait_for_everyone()
    return board + "\nwrote: " + ", ".join(str(p) for p in written)
