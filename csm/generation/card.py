"""A generator folder that diffusers users can load without csm: pipeline file and model card.

:func:`export_pipeline_files` writes, into a ``csm fit-diffusion`` folder (a diffusers pipeline
folder), the self-contained :mod:`csm.generation.pipeline` source as ``pipeline_csm.py`` and a
model card (``README.md``, built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``,
``library_name: diffusers``). Then, with torch and diffusers only::

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_csm",
                                             trust_remote_code=True)

works for the local folder and for its Hub copy (``csm push``). :func:`generator_sha256` is the
generator's identity recorded in dataset cards (weights and configs, not paths or timestamps).

Run ``python -m csm.generation.card DIR`` to add the files to a folder written before they existed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from csm.errors import CSMError
from csm.synthetic.card import KNOWN_SOURCES, is_hub_id, public_ref
from csm.utils import atomic_write_text

logger = logging.getLogger(__name__)

#: Name of the pipeline file saved next to the model (``custom_pipeline="pipeline_csm"``).
PIPELINE_FILE = "pipeline_csm.py"
#: Files that make up the generator's identity (weights and configs of every component).
_IDENTITY_SUFFIXES = {".safetensors", ".bin", ".json", ".txt", ".model"}
_NOT_IDENTITY = {"training_config.json", "README.md", PIPELINE_FILE}


def generator_sha256(folder: str | Path) -> str:
    """sha256 over ``model_index.json`` and every component's weights and configs.

    The same model gives the same hash wherever its folder lies; logs, cards, the sample grid and
    the pipeline file do not count.

    Raises:
        CSMError: ``folder`` is not a diffusers pipeline folder.
    """
    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise CSMError(f"{folder}: no model_index.json; pass a folder from `csm fit-diffusion`")
    digest = hashlib.sha256()
    index = json.loads((path / "model_index.json").read_text())
    components = sorted(k for k, v in index.items() if isinstance(v, list) and len(v) == 2)
    files = [path / "model_index.json"]
    for name in components:
        sub = path / name
        if sub.is_dir():
            files += sorted(
                f for f in sub.rglob("*") if f.is_file() and f.suffix in _IDENTITY_SUFFIXES
            )
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _training_rows(train: dict[str, Any]) -> str:
    keys = (
        "preset",
        "steps",
        "batch_size",
        "lr",
        "warmup_steps",
        "weight_decay",
        "ema_decay",
        "label_dropout",
        "grad_clip",
        "beta_schedule",
        "num_train_timesteps",
        "hflip",
        "image_shape",
        "block_out_channels",
        "layers_per_block",
        "attention",
        "seed",
        "split_seed",
        "mixed_precision",
    )
    rows = [f"| {k} | `{json.dumps(train[k])}` |" for k in keys if k in train]
    return "\n".join(rows) or "| (no training_config.json) | |"


def model_card(folder: str | Path, repo_id: str | None = None) -> str:
    """The model card text of a generator folder (see module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(folder)
    index = json.loads((path / "model_index.json").read_text())
    tc = path / "training_config.json"
    train = json.loads(tc.read_text()) if tc.is_file() else {}
    names = list(index.get("class_names") or train.get("class_names") or [])
    k = len(names)
    source = train.get("dataset_spec") or train.get("dataset")
    known = KNOWN_SOURCES.get(str(source or ""))
    data = ModelCardData(
        library_name="diffusers",
        license=known.license if known else None,
        datasets=[source] if is_hub_id(source) else None,
        tags=["class-conditional", "image-generation", "semantic-mixing", "csm", "calibration"],
    )
    ref = repo_id or path.name
    a, b = (names[0], names[1]) if k >= 2 else ("0", "1")
    body = f"""
# {ref}: a class-conditional diffusion model for semantic mixing (csm)

A class-conditional `UNet2DModel` ({k} classes: {", ".join(f"`{n}`" for n in names)}) trained by
`csm fit-diffusion` on `{public_ref(source) or "?"}`, for CSM (Luo et al., "Beyond One-Hot Labels:
Semantic Mixing for Model Calibration", ICML 2025, arXiv 2504.13548): images that mix two classes
are sampled by conditioning on λ·E[a] + (1−λ)·E[b].

## The null-row convention

`unet.config.num_class_embeds = K + 1 = {k + 1}`: rows `0..{k - 1}` of the class-embedding table
are the classes in the order above (also `class_names` in `model_index.json`);
**row `K = {k}` is the classifier-free-guidance null class**, learnt by replacing the label
with `K` with probability `label_dropout` during training. Pass `class_labels=K` for the
unconditional branch.

## How it was trained

| option | value |
|---|---|
{_training_rows(train)}

EMA weights (diffusers' `EMAModel`) are saved; the scheduler is DDIM over the training noise
schedule. Full record: `training_config.json`.

## Sample without csm (torch + diffusers)

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    "{ref}", custom_pipeline="pipeline_csm", trust_remote_code=True
)
gens = [torch.Generator().manual_seed(0) for _ in range(8)]   # one shared noise per group
lam = [i / 7 for i in range(8)]                                # 0 = pure "{b}", 1 = pure "{a}"
mixed = pipe(class_a=["{a}"] * 8, class_b=["{b}"] * 8, lam=lam, generator=gens,
             num_inference_steps=25).images                    # (8, C, H, W) in [0, 1]
plain = pipe(class_a=["{a}", "{b}"], generator=gens[:2]).images  # plain class-conditional
```

`pipeline_csm.py` (this repo) is self-contained; `guidance_scale > 1` uses the null row.
With the bare UNet: `UNet2DModel.from_pretrained("{ref}", subfolder="unet")` and
`unet(x, t, class_labels=torch.tensor([c])).sample` predicts the noise of class `c`.

## Sample with csm

```python
from csm.generation.mixing import lambdas
from csm.generation.pipeline import CSMMixingPipeline

pipe = CSMMixingPipeline.from_pretrained("{ref}")
images = pipe(class_a=["{a}"] * 8, class_b=["{b}"] * 8, lam=lambdas(8), generator=gens).images
```

or a whole synthetic dataset: `csm generate --model {ref} --out data/syn --groups 256`.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def export_pipeline_files(folder: str | Path, repo_id: str | None = None) -> list[Path]:
    """Write ``pipeline_csm.py`` and the model card ``README.md`` into a generator folder.

    Args:
        folder: A diffusers pipeline folder (``model_index.json``) from ``csm fit-diffusion``.
        repo_id: The Hub id the card's examples use (default: the folder's name).

    Returns:
        The two written paths.

    Raises:
        CSMError: ``folder`` has no ``model_index.json``.
    """
    from csm.generation import pipeline

    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise CSMError(f"{folder}: no model_index.json; pass a folder from `csm fit-diffusion`")
    source = Path(pipeline.__file__).read_text(encoding="utf-8")
    atomic_write_text(path / PIPELINE_FILE, source)
    atomic_write_text(path / "README.md", model_card(path, repo_id))
    logger.info("wrote %s and README.md into %s", PIPELINE_FILE, path)
    return [path / PIPELINE_FILE, path / "README.md"]


if __name__ == "__main__":  # python -m csm.generation.card DIR [REPO_ID]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_pipeline_files(*sys.argv[1:3])
    except (CSMError, TypeError) as exc:
        sys.stderr.write(f"csm: error: {exc}\n")
        sys.exit(2)
