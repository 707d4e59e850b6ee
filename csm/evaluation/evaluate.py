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
predictions
   (never batch averages) for each run x calibrator x condition.

Outputs in ``--out``: ``results.csv`` (one row per run x calibrator x condition; metric values are
fractions, NLL in nats), ``leaderboard.md`` (mean ± sample std over seeds, best per column in
bold, units and binning in the header), ``reliability/<method>.png`` (one reliability diagram per
method with a panel per calibrator and the confidence histogram underneath; seeds pooled),
``risk_coverage.png`` and the resolved ``config.yaml``. Every file is written atomically.

OOD set (``--ood``): another dataset spec (its test split, resized to the run's image size, channels
converted), or ``heldout``: the test images of the dataset's classes that the run was *not*
trained on (for runs trained on a subset of classes). The OOD AUROC (max-softmax score, after the
calibrator) is reported in the ``clean`` rows.

Conditions are named ``clean``, ``<corruption>@<severity>`` (e.g. ``blur@2``).

A calibrator with an ``uncertainty(logits, features)`` method (``alien``) keeps the softmax
probabilities, so its selective-classification metrics (``sc/*``) rank samples by ``-u`` instead
of the max probability (:func:`csm.calibration.metrics.selective_metrics`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from csm import __version__
from csm.calibration.metrics import METRIC_INFO, MetricInfo
from csm.config import save_config
from csm.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, sample_generators
from csm.errors import CSMError
from csm.utils import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

ALL = "all"
CLEAN = "clean"
CACHE_DIR = "eval_cache"
CACHE_VERSION = "1"


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
    batch_size: int = field(default=256, metadata={"help": "inference batch size"})
    seed: int = field(default=0, metadata={"help": "seed of the random corruptions (noise)"})
    device: str = field(default="cpu", metadata={"help": "torch device for inference"})
    cache: bool = field(
        default=True, metadata={"help": "reuse cached outputs and scores in RUN/eval_cache"}
    )
    plots: bool = field(default=True, metadata={"help": "write reliability and risk plots"})


# ---------------------------------------------------------------------------------------------
# metric presentation


ID_COLUMNS = [
    "run",
    "method",
    "model",
    "dataset",
    "seed",
    "calibrator",
    "condition",
    "corruption",
    "severity",
    "n",
]


def _num(v: Any) -> float:
    """A metric cell as float (``""``/``None`` -> NaN), for rows read back from CSV."""
    if v is None or v == "":
        return math.nan
    return float(v)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan, len(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var), len(vals)


def _fmt(mean: float, std: float, percent: bool) -> str:
    if math.isnan(mean):
        return "–"
    scale, digits = (100.0, 2) if percent else (1.0, 3)
    text = f"{mean * scale:.{digits}f}"
    if not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def group_labeler(rows: Sequence[dict[str, Any]]) -> Callable[[dict[str, Any]], str]:
    """Leaderboard row label of a result row: the method, plus the model and/or dataset when
    the rows hold more than one of them (so runs on different data are never pooled as seeds)."""
    extra = [k for k in ("model", "dataset") if len({str(r[k]) for r in rows}) > 1]

    def label(row: dict[str, Any]) -> str:
        if not extra:
            return str(row["method"])
        return f"{row['method']} ({', '.join(str(row[k]) for k in extra)})"

    return label


def _table(
    title: str,
    row_labels: list[str],
    columns: list[tuple[str, MetricInfo]],
    cells: dict[tuple[str, str], list[float]],
) -> str:
    """A markdown table; ``cells[(row, column)]`` holds one value per seed. Best mean in bold."""
    stats = {k: _mean_std(v) for k, v in cells.items()}
    best: dict[str, str] = {}
    for col, info in columns:
        shown = []
        for r in row_labels:
            m = stats.get((r, col), (math.nan, math.nan, 0))[0]
            if not math.isnan(m):
                shown.append(round(m * (100.0 if info.percent else 1.0), 2 if info.percent else 3))
        if len(shown) > 1:
            best[col] = max(shown) if info.higher_is_better else min(shown)
    head = ["method"] + [
        f"{info.label}{' %' if info.percent else ''} {'↑' if info.higher_is_better else '↓'}"
        for _, info in columns
    ]
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
    ]
    for r in row_labels:
        out = [r]
        for col, info in columns:
            m, s, _ = stats.get((r, col), (math.nan, math.nan, 0))
            text = _fmt(m, s, info.percent)
            rounded = round(m * (100.0 if info.percent else 1.0), 2 if info.percent else 3)
            if col in best and not math.isnan(m) and rounded == best[col]:
                text = f"**{text}**"
            out.append(text)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def format_leaderboard(rows: Sequence[dict[str, Any]], *, n_bins: int = 15) -> str:
    """Render ``results.csv`` rows as the markdown leaderboard.

    Tables: (1) clean test, no post-hoc calibration, every metric; (2) ECE, (3) NLL and (4) AURC
    on clean test for every post-hoc calibrator; (5) accuracy and ECE under shift, averaged over the
    corruptions at each severity (uncalibrated and ``ts``). Each cell is the mean ± sample
    standard deviation (ddof = 1) over the runs of a method (one run per seed); the best mean of
    each column is in bold (ties at the shown precision all bold).

    Args:
        rows: Result rows (dicts with :data:`ID_COLUMNS` and metric names; values may be
            strings as read from CSV).
        n_bins: Number of bins used, stated in the header.

    Returns:
        The markdown text.
    """
    if not rows:
        raise CSMError("leaderboard: no result rows; evaluate at least one run")
    _group_label = group_labeler(rows)
    datasets = sorted({str(r["dataset"]) for r in rows})
    groups: list[str] = []
    runs_per_group: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        g = _group_label(r)
        if g not in groups:
            groups.append(g)
        runs_per_group[g].add(str(r["run"]))
    calibrators: list[str] = []
    for r in rows:
        if r["calibrator"] not in calibrators:
            calibrators.append(str(r["calibrator"]))
    present = [m for m in METRIC_INFO if any(not math.isnan(_num(r.get(m))) for r in rows)]
    seeds = sorted({len(v) for v in runs_per_group.values()})
    seed_text = "/".join(str(s) for s in seeds)
    parts = [
        "# Leaderboard",
        "",
        f"Dataset: {', '.join(datasets)}. Runs: {sum(len(v) for v in runs_per_group.values())} "
        f"({len(groups)} method(s), {seed_text} seed(s) each). Test split only; every post-hoc "
        "calibrator was fitted on the validation split.",
        "",
        f"Cells are mean ± sample std (ddof=1) over seeds; **bold** = best in its column; ↑/↓ = "
        "higher/lower is better. Columns marked % are fractions x 100; NLL is in nats; Brier is "
        "the squared error summed over classes (0..2), as fractions. "
        f"ECE, MCE, OE, UE: {n_bins} equal-width bins on the top-label confidence, "
        "[lo, hi) with the last bin closed so confidence 1.0 lands in it; "
        f"AdaECE: {n_bins} equal-mass bins; classwise ECE: {n_bins} equal-width bins per "
        "class; smECE and KS use no bins. "
        "mis-AUROC: misclassification detection by max-softmax (alien: by -uncertainty; correct "
        "= positive); AURC and "
        "E-AURC from the risk-coverage curve; Risk@80: error at 80% coverage; OOD-AUROC: "
        "in-distribution vs OOD by max-softmax.",
    ]

    def by_run(cal: str, cond: str, metric: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r["calibrator"] == cal and r["condition"] == cond:
                out[_group_label(r)].append(_num(r.get(metric)))
        return out

    # (1) clean, uncalibrated, every metric
    base_cal = "none" if "none" in calibrators else calibrators[0]
    cols = [(m, METRIC_INFO[m]) for m in present]
    cells: dict[tuple[str, str], list[float]] = {}
    for m, _ in cols:
        for g, vals in by_run(base_cal, CLEAN, m).items():
            cells[(g, m)] = vals
    parts += ["", _table(f"Clean test, calibrator: {base_cal}", groups, cols, cells)]

    # (2), (3) post-hoc calibrators on clean test
    for metric in ("cal/ECE", "cls/NLL", "sc/AURC"):
        if metric not in present or len(calibrators) < 2:
            continue
        info = METRIC_INFO[metric]
        cols = [(c, MetricInfo(c, info.higher_is_better, info.percent)) for c in calibrators]
        cells = {}
        for c in calibrators:
            for g, vals in by_run(c, CLEAN, metric).items():
                cells[(g, c)] = vals
        parts += [
            "",
            _table(
                f"{info.label} on clean test after each post-hoc calibrator", groups, cols, cells
            ),
        ]

    # (4) shift: per run, average over corruptions at each severity
    shifted = [r for r in rows if r["condition"] != CLEAN]
    if shifted:
        sevs = sorted({int(_num(r["severity"])) for r in shifted})
        shift_cals = [c for c in ("none", "ts") if c in calibrators] or [base_cal]
        row_labels = [g if c == base_cal else f"{g} + {c}" for c in shift_cals for g in groups]
        cols = []
        for metric in ("cls/Acc", "cal/ECE"):
            info = METRIC_INFO[metric]
            for s in [0, *sevs]:
                name = f"{metric}@{s}"
                lab = f"{info.label} {'clean' if s == 0 else f's{s}'}"
                cols.append((name, MetricInfo(lab, info.higher_is_better, info.percent)))
        acc: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        for r in rows:
            if r["calibrator"] not in shift_cals:
                continue
            g = _group_label(r)
            label = g if r["calibrator"] == base_cal else f"{g} + {r['calibrator']}"
            s = 0 if r["condition"] == CLEAN else int(_num(r["severity"]))
            for metric in ("cls/Acc", "cal/ECE"):
                acc[(label, str(r["run"]), f"{metric}@{s}")].append(_num(r.get(metric)))
        cells = defaultdict(list)
        for (label, _run, col), vals in acc.items():
            cells[(label, col)].append(_mean_std(vals)[0])
        corr = sorted({str(r["corruption"]) for r in shifted})
        parts += [
            "",
            _table(
                f"Under shift: mean over corruptions ({', '.join(corr)}) per severity",
                row_labels,
                cols,
                dict(cells),
            ),
        ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# runs, data and cached inference


@dataclass
class RunInfo:
    """A loaded run and what the leaderboard needs to know about it."""

    path: Path
    name: str
    method: str
    model_name: str
    dataset: str
    seed: int
    class_names: list[str]
    digest: str
    model: torch.nn.Module
    config: Any


@dataclass
class Outputs:
    """Model outputs on one split/condition."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file (the cache key that invalidates stale outputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_run_info(run_dir: str | os.PathLike) -> RunInfo:
    """Load a run directory through :func:`csm.training.runs.load_run` and read its metadata.

    Raises:
        CSMError: The directory does not exist or has no ``model.safetensors``.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise CSMError(f"run {run_dir}: not a directory; give a folder written by csm train")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CSMError(
            f"run {run_dir}: no model.safetensors (training unfinished or wrong folder); "
            "finish it with csm train --resume or give a complete run directory"
        )
    from csm.training.runs import load_run

    loaded = load_run(path)
    meta = dict(loaded.info)
    if meta.get("status") != "complete":
        logger.warning(
            "run %s is not complete (no finished run.json); evaluating its best weights so far",
            path,
        )
    cfg = loaded.config
    return RunInfo(
        path=path,
        name=path.name,
        method=str(meta.get("method", getattr(cfg, "method", "?"))),
        model_name=str(meta.get("model", getattr(cfg, "model", "?"))),
        dataset=str(meta.get("dataset", getattr(cfg, "dataset", "?"))),
        seed=int(meta.get("seed", getattr(cfg, "seed", 0))),
        class_names=list(loaded.class_names),
        digest=weights_digest(weights),
        model=loaded.model,
        config=cfg,
    )


def _adapt_channels(images: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return images.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    raise CSMError(
        f"{what}: images have {c} channels, the model takes {channels}; "
        "use a dataset with matching channels"
    )


def _check_finite(logits: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        n = int(bad.sum())
        i, k = (int(v) for v in bad.nonzero()[0])
        raise CSMError(
            f"{where}: {n} non-finite logit(s) (NaN/inf) in {int(bad.any(1).sum())} of "
            f"{logits.shape[0]} samples, first at sample {i}, class {k}; the model diverged — "
            "retrain (e.g. lower --lr) or check the weights"
        )


def _infer(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: str,
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate features of uint8 images, in batches (``transform(x, idx)``)."""
    logits, feats = [], []
    model = model.to(device).eval()
    starts = range(0, images.shape[0], batch_size)
    with torch.inference_mode():
        for s in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 20):
            idx = torch.arange(s, min(s + batch_size, images.shape[0]))
            x = images[s : s + batch_size].float() / 255.0
            if transform is not None:
                x = transform(x, idx)
            f = model.forward_features(x.to(device))
            logits.append(model.head(f).float().cpu())
            feats.append(f.float().cpu())
    return torch.cat(logits), torch.cat(feats)


class _Cache:
    """Safetensors cache of one run's outputs, keyed by the weights' digest and the data."""

    def __init__(self, run: RunInfo, enabled: bool) -> None:
        self.root = run.path / CACHE_DIR
        self.dir = self.root / run.digest[:16]
        self.enabled = enabled
        if enabled and self.root.is_dir():
            for old in self.root.iterdir():  # weights changed: drop stale outputs
                if old.is_dir() and old.name != self.dir.name:
                    shutil.rmtree(old, ignore_errors=True)

    def _path(self, key: dict[str, Any]) -> Path:
        text = json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True)
        return self.dir / f"{key['condition']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.st"

    def get(self, key: dict[str, Any], compute: Callable[[], Outputs]) -> Outputs:
        path = self._path(key)
        if self.enabled and path.is_file():
            try:
                t = load_file(path)
                return Outputs(t["logits"], t["features"], t["labels"])
            except Exception as exc:  # unreadable entry (disk trouble): recompute it
                logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
        out = compute()
        if self.enabled:
            try:
                self._write(path, key, out)
            except OSError as exc:  # e.g. a read-only run directory: evaluate without caching
                logger.warning(
                    "cannot cache outputs in %s (%s); continuing uncached", self.dir, exc
                )
        return out

    def get_scores(self, key: dict[str, Any]) -> tuple[list[dict], dict] | None:
        """Cached metric rows and clean-test probabilities (``None`` when absent)."""
        rows_path, probs_path = self._path(key).with_suffix(".json"), self._path(key)
        if not (self.enabled and rows_path.is_file() and probs_path.is_file()):
            return None
        try:
            rows = json.loads(rows_path.read_text())
            t = load_file(probs_path)
        except Exception as exc:  # unreadable entry: recompute
            logger.warning("ignoring unreadable cache entry %s (%s)", rows_path, exc)
            return None
        probs = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("probs/")}
        return rows, {"probs": probs, "labels": t["labels"]}

    def put_scores(self, key: dict[str, Any], rows: list[dict], probs: dict, labels) -> None:
        """Store metric rows (JSON) and clean-test probabilities (safetensors), atomically."""
        if not self.enabled:
            return
        path = self._path(key)
        try:
            self._write_tensors(
                path, key, {**{f"probs/{k}": v for k, v in probs.items()}, "labels": labels}
            )
            atomic_write_text(path.with_suffix(".json"), json.dumps(rows))
        except OSError as exc:
            logger.warning("cannot cache scores in %s (%s); continuing", self.dir, exc)

    def _write(self, path: Path, key: dict[str, Any], out: Outputs) -> None:
        self._write_tensors(
            path, key, {"logits": out.logits, "features": out.features, "labels": out.labels}
        )

    def _write_tensors(self, path: Path, key: dict[str, Any], tensors: dict) -> None:
        with atomic_path(path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata={k: str(v) for k, v in key.items()},
            )


def _class_map(data_names: list[str], run_names: list[str], run: RunInfo) -> torch.Tensor:
    """Map dataset label -> run label (-1 for classes the run was not trained on)."""
    pos = {n: i for i, n in enumerate(run_names)}
    missing = [n for n in run_names if n not in data_names]
    if missing:
        raise CSMError(
            f"run {run.path}: classes {missing[:5]} are not in dataset {run.dataset!r}; "
            "evaluate the run on the dataset it was trained on"
        )
    return torch.tensor([pos.get(n, -1) for n in data_names], dtype=torch.int64)


@dataclass
class RunOutputs:
    """Everything computed for one run: val (for fitting), clean test, shifted tests, OOD."""

    val: Outputs
    conditions: dict[str, Outputs]
    condition_info: dict[str, tuple[str, int]]
    ood: Outputs | None
    cache: _Cache
    key: dict[str, Any]


def _run_outputs(
    run: RunInfo, cfg: EvaluateConfig, corruptions: list[str], data_cache: dict
) -> RunOutputs:
    from csm.data.real import load_real
    from csm.training.runs import real_data_for

    c = run.config
    split_seed = c.seed if c.data_seed is None else c.data_seed
    dkey = json.dumps([c.dataset, c.image_size, split_seed, c.val_fraction, c.test_fraction])
    if dkey not in data_cache:
        data_cache[dkey] = real_data_for(c)  # the run's own train/val/test split
    data = data_cache[dkey]
    cmap = _class_map(list(data.class_names), run.class_names, run)
    in_channels = data.image_shape[0]
    cache = _Cache(run, cfg.cache)
    base = {"dataset": run.dataset, "data": dkey}

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = getattr(data, name)
        y = cmap[s.labels]
        keep = y >= 0
        if int(keep.sum()) == 0:
            what = "is empty" if len(s) == 0 else "has no images of the run's classes"
            raise CSMError(
                f"run {run.path}: the {name} split of dataset {run.dataset!r} {what}; retrain "
                f"with a larger --{name.replace('_', '-')}-fraction or use a bigger dataset"
            )
        return s.images[keep], y[keep]

    def compute(images, labels, transform=None, desc=""):
        def f() -> Outputs:
            lg, ft = _infer(
                run.model,
                images,
                batch_size=cfg.batch_size,
                device=cfg.device,
                transform=transform,
                desc=desc,
            )
            return Outputs(lg, ft, labels)

        return f

    vx, vy = split("val")
    val = cache.get({**base, "condition": "val"}, compute(vx, vy, desc=f"{run.name} val"))
    tx, ty = split("test")
    conditions = {
        CLEAN: cache.get({**base, "condition": CLEAN}, compute(tx, ty, desc=f"{run.name} test"))
    }
    info: dict[str, tuple[str, int]] = {CLEAN: ("", 0)}
    for ci, cname in enumerate(corruptions):
        for sev in cfg.severities:
            cond = f"{cname}@{sev}"
            nseed = cfg.seed * 1000 + ci * 10 + sev

            def transform(x, idx, _c=cname, _s=sev, _n=nseed):
                return corrupt(x, _c, _s, sample_generators(_n, idx))

            key = {**base, "condition": cond, "noise_seed": nseed}
            conditions[cond] = cache.get(key, compute(tx, ty, transform, f"{run.name} {cond}"))
            info[cond] = (cname, sev)
    ood = None
    if cfg.ood:
        if cfg.ood == "heldout":
            s = data.test
            held = cmap[s.labels] < 0
            if int(held.sum()) == 0:
                raise CSMError(
                    f"--ood heldout: run {run.path} was trained on every class of "
                    f"{run.dataset!r}, so none is held out; train on a subset of classes or "
                    "give another dataset as --ood"
                )
            oimg = s.images[held]
        else:
            okey = (cfg.ood, data.image_shape[1])
            if okey not in data_cache:
                data_cache[okey] = load_real(cfg.ood, image_size=data.image_shape[1])
            oimg = _adapt_channels(data_cache[okey].test.images, in_channels, f"--ood {cfg.ood}")
        olab = torch.full((oimg.shape[0],), -1, dtype=torch.int64)
        ood = cache.get(
            {**base, "condition": "ood", "ood": cfg.ood},
            compute(oimg, olab, desc=f"{run.name} ood"),
        )
    for cond, out in [("val", val), *conditions.items(), *([("ood", ood)] if ood else [])]:
        _check_finite(out.logits, f"run {run.path}, {cond} split")
    key = {**base, "conditions": sorted(conditions), "noise_seed": cfg.seed, "ood": cfg.ood}
    return RunOutputs(val, conditions, info, ood, cache, key)


# ---------------------------------------------------------------------------------------------
# calibrators and metrics


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


def _fit_calibrators(run: RunInfo, val: Outputs, names: list[str]) -> dict[str, Any]:
    from csm.calibration.calibrators import CALIBRATORS

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


def _apply(cal: Any, out: Outputs) -> torch.Tensor:
    """Calibrated probabilities (the plain softmax for ``none``)."""
    if cal is None:
        return out.logits.softmax(-1)
    with torch.no_grad():
        return cal(out.logits, features=out.features)


def evaluate_runs(cfg: EvaluateConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Compute every metric for every run x calibrator x condition (no files written).

    Args:
        cfg: The evaluation options.

    Returns:
        ``(rows, pooled)``: result rows (dicts, metric values as fractions) and, per method, the
        clean-test probabilities of each calibrator (pooled over seeds) for the plots.

    Raises:
        CSMError: No runs, a run without weights, runs with different class sets, non-finite
            logits, an empty split, unknown calibrators or corruptions.
    """
    from csm.calibration.calibrators import CALIBRATORS

    if not cfg.runs:
        raise CSMError("csm evaluate: no run directories given; pass RUN_DIR ...")
    if cfg.n_bins < 1:
        raise CSMError(f"--n-bins {cfg.n_bins}: must be a positive number of bins, e.g. 15")
    bad = [s for s in cfg.severities if s not in SEVERITIES]
    if bad:
        raise CSMError(f"--severities {bad}: unknown; choose from {list(SEVERITIES)}")
    cal_names = _selected(cfg.calibrators, [c for c in CALIBRATORS if c != "none"], "calibrators")
    corruptions = _selected(cfg.corruptions, CORRUPTIONS, "corruptions")
    runs = [load_run_info(r) for r in dict.fromkeys(cfg.runs)]
    first = runs[0]
    for r in runs[1:]:
        if r.class_names != first.class_names:
            raise CSMError(
                f"run {r.path}: classes {r.class_names[:6]} differ from {first.path}'s "
                f"{first.class_names[:6]}; put only runs on the same classes in one leaderboard"
            )
    _group_label = group_labeler(
        [{"method": r.method, "model": r.model_name, "dataset": r.dataset} for r in runs]
    )
    rows: list[dict[str, Any]] = []
    pooled: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    data_cache: dict = {}
    for run in tqdm(runs, desc="runs", disable=len(runs) < 2):
        outs = _run_outputs(run, cfg, corruptions, data_cache)
        group = _group_label(
            {"method": run.method, "model": run.model_name, "dataset": run.dataset}
        )
        skey = {
            **outs.key,
            "condition": "scores",
            "calibrators": cal_names,
            "n_bins": cfg.n_bins,
            "csm": __version__,
        }
        cached = outs.cache.get_scores(skey)
        if cached is None:
            run_rows, clean_probs = _score_run(run, outs, cal_names, cfg.n_bins)
            labels = outs.conditions[CLEAN].labels
            outs.cache.put_scores(skey, run_rows, clean_probs, labels)
        else:
            run_rows, clean_probs, labels = cached[0], cached[1]["probs"], cached[1]["labels"]
        ident = {
            "run": str(run.path),
            "method": run.method,
            "model": run.model_name,
            "dataset": run.dataset,
            "seed": run.seed,
        }
        rows += [{**r, **ident} for r in run_rows]
        for cal_name in ["none", *cal_names]:  # panel order = calibrator order
            pooled[group][cal_name].append((clean_probs[cal_name], labels))
        logger.info("evaluated %s (%s, seed %d)", run.path, run.method, run.seed)
    return rows, pooled


def _score_run(
    run: RunInfo, outs: RunOutputs, cal_names: list[str], n_bins: int
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Fit the calibrators on val and compute every metric for every condition of one run.

    Returns:
        The result rows (without the run's identity columns) and the clean-test probabilities
        of each calibrator (for the plots).
    """
    from csm.calibration.metrics import compute_all, compute_all_probs, selective_metrics

    fitted = _fit_calibrators(run, outs.val, cal_names)
    rows: list[dict[str, Any]] = []
    clean_probs: dict[str, torch.Tensor] = {}
    for cal_name, cal in fitted.items():
        ood_probs = _apply(cal, outs.ood) if outs.ood is not None else None
        for cond, out in outs.conditions.items():
            probs = _apply(cal, out)
            ood_here = cond == CLEAN and outs.ood is not None
            try:
                if cal is None:  # exact NLL from logits
                    metrics = compute_all(
                        out.logits,
                        out.labels,
                        n_bins=n_bins,
                        ood_logits=outs.ood.logits if ood_here else None,
                    )
                else:
                    metrics = compute_all_probs(
                        probs,
                        out.labels,
                        n_bins=n_bins,
                        ood_probs=ood_probs if ood_here else None,
                    )
                if hasattr(cal, "uncertainty"):  # an uncertainty head ranks by -u
                    correct = probs.argmax(-1) == out.labels
                    u = cal.uncertainty(out.logits, out.features)
                    metrics.update(selective_metrics(-u, correct))
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
                    **{k: float(v) for k, v in metrics.items()},
                }
            )
            if cond == CLEAN:
                clean_probs[cal_name] = probs.float().contiguous()
    return rows, clean_probs


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    metric_cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in ID_COLUMNS and k not in metric_cols:
                metric_cols.append(k)
    ordered = [m for m in METRIC_INFO if m in metric_cols]
    ordered += [m for m in metric_cols if m not in ordered]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ID_COLUMNS + ordered, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``results.csv`` back (metric cells stay strings; empty = missing)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _plots(pooled: dict, out: Path, n_bins: int, seeds: dict[str, int]) -> list[Path]:
    from csm.calibration.metrics import reliability_bins
    from csm.evaluation.plots import (
        ReliabilityPanel,
        plot_reliability,
        plot_risk_coverage,
        risk_coverage_curve,
    )

    written = []
    curves = {}
    for group, by_cal in pooled.items():
        panels = []
        for cal_name, parts in by_cal.items():
            probs = torch.cat([p for p, _ in parts])
            labels = torch.cat([y for _, y in parts])
            b = reliability_bins(probs, labels, n_bins)
            panels.append(
                ReliabilityPanel(
                    label=cal_name,
                    edges=torch.tensor(b.edges),
                    accuracy=torch.tensor(b.accuracy),
                    confidence=torch.tensor(b.confidence),
                    count=torch.tensor(b.counts),
                    ece=b.ece,
                )
            )
            if cal_name == "none":
                conf, pred = probs.max(-1)
                curves[group] = risk_coverage_curve(conf, pred == labels)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in group)
        written.append(
            plot_reliability(
                panels,
                out / "reliability" / f"{safe}.png",
                title=f"{group}: clean test, {seeds[group]} seed(s) pooled, "
                f"{n_bins} equal-width bins",
            )
        )
    if curves:
        written.append(
            plot_risk_coverage(
                curves,
                out / "risk_coverage.png",
                title="Risk-coverage on clean test (no calibrator)",
            )
        )
    return written


def evaluate(cfg: EvaluateConfig, *, save_cfg: bool = True) -> str:
    """Run ``csm evaluate``: score every run and write results, leaderboard and plots.

    Args:
        cfg: The evaluation options (``cfg.runs`` are run directories).
        save_cfg: Write ``cfg`` as ``config.yaml`` in the output folder (``csm benchmark``
            writes its own config there instead).

    Returns:
        The leaderboard markdown followed by the list of files written.
    """
    rows, pooled = evaluate_runs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "results.csv")
    board = format_leaderboard(rows, n_bins=cfg.n_bins)
    atomic_write_text(out / "leaderboard.md", board)
    written = [out / "results.csv", out / "leaderboard.md"]
    if cfg.plots:
        seeds: dict[str, set[str]] = defaultdict(set)
        _group_label = group_labeler(rows)
        for r in rows:
            seeds[_group_label(r)].add(r["run"])
        written += _plots(pooled, out, cfg.n_bins, {k: len(v) for k, v in seeds.items()})
    if save_cfg:
        written.append(save_config(cfg, out))
    return board + "\nwrote: " + ", ".join(str(p) for p in written)
