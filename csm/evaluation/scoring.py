"""Scoring one run: fit the post-hoc calibrators on val, compute every metric per condition.

Each calibrator of :data:`csm.calibration.calibrators.CALIBRATORS` is fitted on the run's ``val``
outputs only (``none`` = the raw softmax) and applied to every test condition; every metric of
:func:`csm.calibration.metrics.compute_all` is computed on the concatenated predictions (never
batch averages). A calibrator with an ``uncertainty(logits, features)`` method (``alien``) keeps
the softmax probabilities, so its selective-classification metrics (``sc/*``) rank samples by
``-u`` instead of the max probability (:func:`csm.calibration.metrics.selective_metrics`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from csm.calibration.calibrators import CALIBRATORS
from csm.calibration.metrics import (
    binned_errors,
    binned_sums,
    compute_all,
    compute_all_probs,
    selective_metrics,
)
from csm.errors import CSMError
from csm.evaluation.cache import Outputs
from csm.evaluation.leaderboard import BIN_COUNTS, BINNED_ECE_PREFIX, CLEAN, MIN_VAL_ERRORS
from csm.evaluation.outputs import RunInfo, RunOutputs

__all__ = ["apply_calibrator", "fit_calibrators", "score_run"]

logger = logging.getLogger(__name__)


def fit_calibrators(run: RunInfo, val: Outputs, names: list[str]) -> dict[str, Any]:
    """Fit each named calibrator on the run's val outputs.

    Returns:
        ``{"none": None, name: fitted calibrator, ...}`` in the order given.

    Raises:
        CSMError: A calibrator cannot be fitted (the message names the run and calibrator).
    """
    fitted: dict[str, Any] = {"none": None}
    if names and bool((val.logits.argmax(1) == val.labels).all()):
        logger.warning(
            "run %s: every one of the %d validation predictions is correct, so calibrators "
            "fitted on val are degenerate (e.g. ts drives T towards 0); use a larger "
            "--val-fraction when training",
            run.path,
            val.labels.numel(),
        )
    for name in names:
        cal = CALIBRATORS[name]()
        try:
            cal.fit(val.logits, val.labels, val_features=val.features, head=run.model.head)
        except CSMError as exc:
            raise CSMError(f"run {run.path}, calibrator {name}: {exc}") from None
        fitted[name] = cal
    return fitted


def apply_calibrator(cal: Any, out: Outputs) -> torch.Tensor:
    """Calibrated probabilities (the plain softmax for ``None``, i.e. ``none``)."""
    if cal is None:
        return out.logits.softmax(-1)
    with torch.no_grad():
        return cal(out.logits, features=out.features)


def _metrics(
    cal: Any,
    out: Outputs,
    probs: torch.Tensor,
    n_bins: int,
    ood: Outputs | None,
    ood_probs,
    with_bins: bool = False,
) -> dict[str, float]:
    """Every metric of one condition under one calibrator (OOD AUROC when ``ood`` is given;
    the binned ECE at each of :data:`BIN_COUNTS` when ``with_bins``)."""
    if cal is None:  # exact NLL from logits
        metrics = compute_all(
            out.logits,
            out.labels,
            n_bins=n_bins,
            ood_logits=ood.logits if ood is not None else None,
        )
    else:
        metrics = compute_all_probs(probs, out.labels, n_bins=n_bins, ood_probs=ood_probs)
    if with_bins:  # clean test: the binned ECE at every bin count, from one top-label pass
        conf, pred = probs.max(-1)
        correct = pred == out.labels
        for b in BIN_COUNTS:
            binned = binned_errors(*binned_sums(conf, correct, b))
            metrics[f"{BINNED_ECE_PREFIX}{b}"] = binned["cal/ECE"]
    if hasattr(cal, "uncertainty"):  # an uncertainty head ranks by -u
        correct = probs.argmax(-1) == out.labels
        u = cal.uncertainty(out.logits, out.features)
        metrics.update(selective_metrics(-u, correct))
    return {k: float(v) for k, v in metrics.items()}


def score_run(
    run: RunInfo, outs: RunOutputs, cal_names: list[str], n_bins: int
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Fit the calibrators on val and compute every metric for every condition of one run.

    Returns:
        The result rows (without the run's identity columns) and the clean-test probabilities
        of each calibrator (for the plots).

    Raises:
        CSMError: A calibrator fails, or a metric rejects its input (the message names the run,
            calibrator and condition).
    """
    fitted = fit_calibrators(run, outs.val, cal_names)
    val_n = int(outs.val.labels.numel())
    val_errors = int((outs.val.logits.argmax(1) != outs.val.labels).sum())
    if cal_names and val_errors < MIN_VAL_ERRORS:
        logger.warning(
            "run %s: the calibration (val) split holds %d errors in %d images (< %d): the "
            "post-hoc calibrators are fitted on too few errors to be trusted",
            run.path,
            val_errors,
            val_n,
            MIN_VAL_ERRORS,
        )
    rows: list[dict[str, Any]] = []
    clean_probs: dict[str, torch.Tensor] = {}
    for cal_name, cal in fitted.items():
        ood_probs = apply_calibrator(cal, outs.ood) if outs.ood is not None else None
        for cond, out in outs.conditions.items():
            probs = apply_calibrator(cal, out)
            here = cond == CLEAN and outs.ood is not None
            try:
                metrics = _metrics(
                    cal,
                    out,
                    probs,
                    n_bins,
                    outs.ood if here else None,
                    ood_probs if here else None,
                    with_bins=cond == CLEAN,
                )
            except CSMError as exc:
                raise CSMError(f"run {run.path}, {cal_name}, {cond}: {exc}") from None
            corruption, severity = outs.condition_info[cond]
            rows.append(
                {
                    "calibrator": cal_name,
                    "condition": cond,
                    "corruption": corruption,
                    "severity": severity if corruption else "",
                    "n": int(out.labels.numel()),
                    "val_n": val_n,
                    "val_errors": val_errors,
                    **metrics,
                }
            )
            if cond == CLEAN:
                clean_probs[cal_name] = probs.float().contiguous()
    return rows, clean_probs
