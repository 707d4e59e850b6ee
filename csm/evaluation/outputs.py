"""A run's model outputs for evaluation: val, clean test, every corrupted test, OOD.

:func:`load_run_info` loads a run folder (:func:`csm.training.runs.load_run`);
:func:`run_outputs` runs its model once per split/condition through the one inference loop,
:func:`csm.training.inference.predict` (logits and penultimate features; corruptions as its
per-batch ``transform`` with per-image generators), behind the
:class:`~csm.evaluation.cache.OutputCache`. The data is the run's own split (dataset spec,
image size and split seed from its ``config.yaml``). Under ``accelerate launch`` the inference
is split across the processes (``shard=True``) and every process gets the whole, bit-identical
outputs; only the main process writes the cache.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from csm.data.corruptions import corrupt, sample_generators
from csm.errors import CSMError
from csm.evaluation.cache import OutputCache, Outputs, weights_digest
from csm.evaluation.leaderboard import CLEAN
from csm.training.inference import predict
from csm.utils import distributed_state, resolve_device

if TYPE_CHECKING:
    from csm.evaluation.evaluate import EvaluateConfig

__all__ = ["RunInfo", "RunOutputs", "load_run_info", "run_outputs"]

logger = logging.getLogger(__name__)


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
class RunOutputs:
    """Everything computed for one run: val (for fitting), clean test, shifted tests, OOD."""

    val: Outputs
    conditions: dict[str, Outputs]
    condition_info: dict[str, tuple[str, int]]
    ood: Outputs | None
    cache: OutputCache
    key: dict[str, Any]


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


class _Evaluation:
    """One run's data, cache and inference settings; :meth:`outputs` runs (or reads) one set."""

    def __init__(self, run: RunInfo, cfg: EvaluateConfig, data_cache: dict) -> None:
        from csm.training.runs import real_data_for

        c = run.config
        split_seed = c.seed if c.data_seed is None else c.data_seed
        dkey = json.dumps([c.dataset, c.image_size, split_seed, c.val_fraction, c.test_fraction])
        if dkey not in data_cache:
            data_cache[dkey] = real_data_for(c)  # the run's own train/val/test split
        self.data = data_cache[dkey]
        self.run, self.cfg, self.data_cache = run, cfg, data_cache
        self.cmap = _class_map(list(self.data.class_names), run.class_names, run)
        state = distributed_state()
        self.device = state.device if state.num_processes > 1 else resolve_device(cfg.device)
        self.model = run.model.to(self.device)
        self.cache = OutputCache(run.path, run.digest, cfg.cache, writer=state.is_main_process)
        self.base = {"dataset": run.dataset, "data": dkey}

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and run labels of the ``val`` or ``test`` split (the run's classes only)."""
        s = getattr(self.data, name)
        y = self.cmap[s.labels]
        keep = y >= 0
        if int(keep.sum()) == 0:
            what = "is empty" if len(s) == 0 else "has no images of the run's classes"
            raise CSMError(
                f"run {self.run.path}: the {name} split of dataset {self.run.dataset!r} {what}; "
                f"retrain with a larger --{name.replace('_', '-')}-fraction or use a bigger "
                "dataset"
            )
        return s.images[keep], y[keep]

    def outputs(
        self,
        key: dict[str, Any],
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> Outputs:
        """Logits and features of ``images`` (cached under ``key``), checked to be finite."""

        def compute() -> Outputs:
            logits, feats = predict(
                self.model,
                images,
                self.cfg.batch_size,
                self.device,
                features=True,
                transform=transform,
                shard=True,
                desc=f"{self.run.name} {key['condition']}",
            )
            return Outputs(logits, feats, labels)

        out = self.cache.get({**self.base, **key}, compute)
        _check_finite(out.logits, f"run {self.run.path}, {key['condition']} split")
        return out

    def ood_images(self) -> torch.Tensor:
        """The OOD images: held-out classes of the test split, or another dataset's test."""
        from csm.data.real import load_real

        cfg, data = self.cfg, self.data
        if cfg.ood == "heldout":
            held = self.cmap[data.test.labels] < 0
            if int(held.sum()) == 0:
                raise CSMError(
                    f"--ood heldout: run {self.run.path} was trained on every class of "
                    f"{self.run.dataset!r}, so none is held out; train on a subset of classes or "
                    "give another dataset as --ood"
                )
            return data.test.images[held]
        okey = (cfg.ood, data.image_shape[1])
        if okey not in self.data_cache:
            self.data_cache[okey] = load_real(cfg.ood, image_size=data.image_shape[1])
        images = self.data_cache[okey].test.images
        return _adapt_channels(images, data.image_shape[0], f"--ood {cfg.ood}")


def _corruption(name: str, severity: int, seed: int):
    """``transform(x, idx)`` corrupting a batch with per-image generators (seeded by row)."""

    def transform(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return corrupt(x, name, severity, sample_generators(seed, idx))

    return transform


def run_outputs(
    run: RunInfo, cfg: EvaluateConfig, corruptions: list[str], data_cache: dict
) -> RunOutputs:
    """Outputs of one run on val, clean test, each ``corruption@severity`` and the OOD set.

    Args:
        run: The loaded run.
        cfg: The evaluation options (batch size, device, severities, noise seed, OOD, cache).
        corruptions: Corruption names to apply to the test split.
        data_cache: Loaded datasets shared between runs (filled here).

    Raises:
        CSMError: An empty split, classes missing from the dataset, no held-out classes for
            ``--ood heldout``, or non-finite logits.
    """
    ev = _Evaluation(run, cfg, data_cache)
    val = ev.outputs({"condition": "val"}, *ev.split("val"))
    tx, ty = ev.split("test")
    conditions = {CLEAN: ev.outputs({"condition": CLEAN}, tx, ty)}
    info: dict[str, tuple[str, int]] = {CLEAN: ("", 0)}
    for ci, cname in enumerate(corruptions):
        for sev in cfg.severities:
            cond = f"{cname}@{sev}"
            nseed = cfg.seed * 1000 + ci * 10 + sev
            key = {"condition": cond, "noise_seed": nseed}
            conditions[cond] = ev.outputs(key, tx, ty, _corruption(cname, sev, nseed))
            info[cond] = (cname, sev)
    ood = None
    if cfg.ood:
        oimg = ev.ood_images()
        olab = torch.full((oimg.shape[0],), -1, dtype=torch.int64)
        ood = ev.outputs({"condition": "ood", "ood": cfg.ood}, oimg, olab)
    key = {**ev.base, "conditions": sorted(conditions), "noise_seed": cfg.seed, "ood": cfg.ood}
    return RunOutputs(val, conditions, info, ood, ev.cache, key)
