"""csm: calibration-aware semantic mixing.

Train image classifiers whose confidence can be trusted, on real images plus diffusion-generated
images that genuinely mix two classes and carry calibrated soft labels (Luo et al., "Beyond One-Hot
Labels: Semantic Mixing for Model Calibration", ICML 2025, arXiv 2504.13548).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
