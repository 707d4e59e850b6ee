"""The evaluator's output cache: a run's logits, features and scores as safetensors.

Entries live in ``RUN_DIR/eval_cache/<first 16 hex digits of sha256(model.safetensors)>/``, one
file per split/condition named ``<condition>-<hash of the key>.st`` (the key: dataset, split,
noise seed, ...). Retrained weights have a new digest, so stale outputs are never reused (and the
old folders are removed). The metric rows of one (calibrators, conditions, bins) choice are cached
next to them (``scores-*.json`` with the clean-test probabilities in ``scores-*.st``), so repeating
an evaluation runs no model and fits no calibrator. Every file is written atomically; an
unreadable entry is recomputed, an unwritable folder only disables caching.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from csm.utils import atomic_path, atomic_write_text

__all__ = ["CACHE_DIR", "CACHE_VERSION", "OutputCache", "Outputs", "weights_digest"]

logger = logging.getLogger(__name__)

CACHE_DIR = "eval_cache"
CACHE_VERSION = "2"  # 2: score rows carry val_n / val_errors


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


class OutputCache:
    """Safetensors cache of one run's outputs, keyed by the weights' digest and the data.

    Args:
        run_dir: The run folder (the cache is its ``eval_cache/``).
        digest: :func:`weights_digest` of the run's ``model.safetensors``.
        enabled: Read and write entries (``False``: always compute, never touch the disk).
        writer: This process may write and prune entries (only the main process of a
            multi-process evaluation writes; the others read).
    """

    def __init__(
        self, run_dir: str | os.PathLike, digest: str, enabled: bool, *, writer: bool = True
    ) -> None:
        self.root = Path(run_dir) / CACHE_DIR
        self.dir = self.root / digest[:16]
        self.enabled = enabled
        self.writer = writer
        if enabled and writer and self.root.is_dir():
            for old in self.root.iterdir():  # weights changed: drop stale outputs
                if old.is_dir() and old.name != self.dir.name:
                    shutil.rmtree(old, ignore_errors=True)

    def _path(self, key: dict[str, Any]) -> Path:
        text = json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True)
        return self.dir / f"{key['condition']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.st"

    def get(self, key: dict[str, Any], compute: Callable[[], Outputs]) -> Outputs:
        """The cached outputs of ``key``, or ``compute()`` (then stored)."""
        path = self._path(key)
        if self.enabled and path.is_file():
            try:
                t = load_file(path)
                return Outputs(t["logits"], t["features"], t["labels"])
            except Exception as exc:  # unreadable entry (disk trouble): recompute it
                logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
        out = compute()
        tensors = {"logits": out.logits, "features": out.features, "labels": out.labels}
        if self._store(path, key, tensors):
            logger.debug("cached %s", path)
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

    def put_scores(
        self,
        key: dict[str, Any],
        rows: list[dict],
        probs: dict[str, torch.Tensor],
        labels: torch.Tensor,
    ) -> None:
        """Store metric rows (JSON) and clean-test probabilities (safetensors), atomically."""
        path = self._path(key)
        tensors = {**{f"probs/{k}": v for k, v in probs.items()}, "labels": labels}
        if self._store(path, key, tensors):
            try:
                atomic_write_text(path.with_suffix(".json"), json.dumps(rows))
            except OSError as exc:
                logger.warning("cannot cache scores in %s (%s); continuing", self.dir, exc)

    def _store(self, path: Path, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
        """Write one safetensors entry (with the key as metadata); ``False`` when not written."""
        if not (self.enabled and self.writer):
            return False
        try:
            with atomic_path(path) as tmp:
                save_file(
                    {k: v.contiguous() for k, v in tensors.items()},
                    str(tmp),
                    # one entry: safetensors keeps metadata in a hash map whose order varies
                    # between processes, so several keys would make the bytes differ run to run
                    metadata={"key": json.dumps(key, sort_keys=True, default=str)},
                )
        except OSError as exc:  # e.g. a read-only run directory: evaluate without caching
            logger.warning("cannot cache outputs in %s (%s); continuing uncached", self.dir, exc)
            return False
        return True
