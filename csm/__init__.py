"""csm: calibration-aware semantic mixing.

Train image classifiers whose confidence can be trusted, on real images plus diffusion-generated
images that genuinely mix two classes and carry calibrated soft labels (Luo et al., "Beyond One-Hot
Labels: Semantic Mixing for Model Calibration", ICML 2025, arXiv 2504.13548).

One sub-package per stage of the pipeline, each importing only from lower floors::

    workflows     benchmark, demo                       (whole pipelines)
    annotation    encoders, annotate                    evaluation   evaluate, leaderboard, plots
    training      models, losses, methods, trainer ...  generation   mixing, pipeline, fit, generate
    synthetic     the synthetic dataset, hub            config       stage configuration
    calibration   metrics, calibrators                  data         real data, augment, corruptions
    utils, errors

The public API below is importable from ``csm`` directly (``from csm import load_real``); each
name is imported on first use, so ``import csm`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (the one place each lives)
_API: dict[str, str] = {
    "CSMError": "csm.errors",
    "load_real": "csm.data.real",
    "compute_all": "csm.calibration.metrics",
    "compute_all_probs": "csm.calibration.metrics",
    "METRIC_INFO": "csm.calibration.metrics",
    "CALIBRATORS": "csm.calibration.calibrators",
    "lambdas": "csm.generation.mixing",
    "CSMMixingPipeline": "csm.generation.pipeline",
    "fit_diffusion": "csm.generation.fit",
    "generate": "csm.generation.generate",
    "load_synthetic": "csm.synthetic",
    "load_synthetic_tensors": "csm.synthetic",
    "annotate": "csm.annotation.annotate",
    "MODELS": "csm.training.models",
    "LOSSES": "csm.training.losses",
    "METHODS": "csm.training.methods",
    "TrainConfig": "csm.training.config",
    "train": "csm.training.trainer",
    "load_run": "csm.training.runs",
    "predict": "csm.training.inference",
    "evaluate": "csm.evaluation.evaluate",
    "benchmark": "csm.workflows.benchmark",
    "demo": "csm.workflows.demo",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'csm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
