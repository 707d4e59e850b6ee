"""The dataset card (README.md) and the ``datasets`` metadata files of a synthetic dataset.

:func:`write_dataset_metadata` (re)writes ``dataset_dict.json``, ``train/state.json`` and
``train/dataset_info.json`` (what ``datasets.load_from_disk`` reads) and the card, whose YAML
``configs`` point ``datasets.load_dataset(DIR)`` at the shards. The card documents generation, the
active annotation, every named annotation (:mod:`csm.synthetic.variants`), fields and limits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import DatasetInfo
from datasets.utils.py_utils import asdict

from csm.synthetic.schema import CITATION, LAMBDA_NAME, SPLIT, synthetic_features
from csm.synthetic.storage import (
    read_manifest,
    shard_records,
    write_json_atomic,
    write_text_atomic,
)


def size_category(n: int) -> str:
    """Hugging Face ``size_categories`` bucket for ``n`` rows."""
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if n < limit:
            return name
    return "n>10M"


def dataset_info(manifest: dict[str, Any], num_rows: int, num_bytes: int) -> DatasetInfo:
    """The ``datasets.DatasetInfo`` of a synthetic dataset (parameters in the description)."""
    from datasets import SplitDict, SplitInfo

    params = manifest["params"]
    description = (
        "csm synthetic class-mixed images with calibrated soft labels. Parameters (JSON): "
        + json.dumps(
            {"generation": params["info"], "annotation": manifest.get("annotation")}, sort_keys=True
        )
    )
    splits = SplitDict()
    splits.add(SplitInfo(name=SPLIT, num_bytes=num_bytes, num_examples=num_rows))
    return DatasetInfo(
        description=description,
        citation=CITATION,
        homepage="https://arxiv.org/abs/2504.13548",
        license=str(params["info"].get("license", "other")),
        features=synthetic_features(params["class_names"]),
        splits=splits,
        dataset_size=num_bytes,
    )


def write_dataset_metadata(out_dir: str | Path) -> None:
    """(Re)write ``dataset_dict.json``, ``train/state.json``, ``train/dataset_info.json``, card."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    records = shard_records(out_dir, manifest)
    num_rows = sum(r["rows"] for r in records)
    num_bytes = sum(r["bytes"] for r in records)
    fingerprint = hashlib.sha256("".join(r["sha256"] for r in records).encode()).hexdigest()[:16]
    state = {
        "_data_files": [{"filename": Path(r["file"]).name} for r in records],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": SPLIT,
    }
    info = dataset_info(manifest, num_rows, num_bytes)
    write_json_atomic(state, out_dir / SPLIT / "state.json")
    write_text_atomic(json.dumps(asdict(info), indent=2), out_dir / SPLIT / "dataset_info.json")
    write_json_atomic({"splits": [SPLIT]}, out_dir / "dataset_dict.json")
    write_text_atomic(render_card(manifest, num_rows), out_dir / "README.md")


def annotation_text(manifest: dict[str, Any]) -> str:
    """The card's annotation section: the active annotation and the table of all named ones."""
    ann = manifest.get("annotation")
    if ann is None:
        text = (
            "Not annotated yet: `soft_label` follows the generation ratio (`soft[a] = lam`, "
            "`soft[b] = 1 - lam`) and `lam_hat` is NaN. Run `csm annotate` to reannotate."
        )
    else:
        ann_rows = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(ann.items()))
        text = (
            "Calibrated reannotation (Luo et al. 2025, section 2): class prototypes are the mean "
            "encoder feature of the real training images of each class; `lam_hat` is the scalar "
            "projection of an image's feature on the segment from prototype b to prototype a; "
            "`soft[a] = sigmoid(s * (lam_hat - 0.5))` (mode `projection`) or the judge "
            "classifier's probabilities restricted to {a, b} and renormalised (mode `judge`).\n\n"
            "| parameter | value |\n|---|---|\n" + ann_rows
        )
    active = ann.get("name") if ann else LAMBDA_NAME
    rows = [
        f"| `{LAMBDA_NAME}` | λ labels (built in) | | |{' yes' if active == LAMBDA_NAME else ''} |"
    ]
    for name, var in sorted((manifest.get("annotations") or {}).items()):
        squash = "" if var.get("squash") is None else f"`{var['squash']}`"
        mark = " yes" if name == active else ""
        rows.append(f"| `{name}` | {var['mode']} | `{var['encoder']}` | {squash} |{mark} |")
    return (
        text + "\n\n### Available annotations\n\nLabel-only data over the same images, under "
        "`annotations/<name>/`; the active one is also in the main shards (what "
        "`datasets.load_dataset` returns). Train on any of them with "
        "`csm train --synthetic <dir>:<name>`; switch the active one with "
        "`csm annotate <dir> --name <name> --activate`.\n\n"
        "| name | mode | encoder | squash | active |\n|---|---|---|---|---|\n" + "\n".join(rows)
    )


def _yaml_list(items: Sequence[str]) -> str:
    return "\n".join(f"- {json.dumps(str(x))}" for x in items)


def render_card(manifest: dict[str, Any], num_rows: int, data_files: str | None = None) -> str:
    """The dataset card (README.md): YAML header, generation, annotation, fields, limits, citation.

    Args:
        manifest: the dataset manifest.
        num_rows: number of rows.
        data_files: glob of the data files for the YAML ``configs`` (default: local Arrow shards;
            the Hub push uses its Parquet files).
    """
    params = manifest["params"]
    gen = params["info"]
    names = params["class_names"]
    data_files = data_files or f"{SPLIT}/data-*.arrow"
    source = gen.get("dataset") or gen.get("source_dataset")
    pretty = gen.get("pretty_name") or f"CSM semantic-mixing synthetic data ({source or 'custom'})"
    yaml_lines = [
        "---",
        f"license: {json.dumps(str(gen.get('license', 'other')))}",
        "task_categories:\n- image-classification",
        f"size_categories:\n- {json.dumps(size_category(num_rows))}",
        f"pretty_name: {json.dumps(pretty)}",
        "tags:\n"
        + _yaml_list(["synthetic", "calibration", "semantic-mixing", "soft-labels", "csm"]),
        "source_datasets:\n" + _yaml_list([source] if source else ["original"]),
        "configs:\n- config_name: default\n  data_files:\n  - split: train\n"
        f"    path: {json.dumps(data_files)}",
        "---",
    ]
    gen_rows = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(gen.items()))
    ann_text = annotation_text(manifest)
    body = f"""
# {pretty}

{num_rows} images that mix two classes each, made by semantic mixing with a class-conditional
diffusion model, for training classifiers whose confidence can be trusted (CSM, Luo et al.,
ICML 2025). Classes ({len(names)}): {", ".join(f"`{n}`" for n in names)} — identical, in
order, to the real dataset's.

## How it was generated

Groups of `group_size` images share one initial noise (one seed) at λ = 0, 1/(G−1), …, 1; the
class condition is λ·E[a] + (1−λ)·E[b]. Class pairs walk all unordered pairs a < b in order,
cycling; the pair and seed of group k are a pure function of (k, base seed).

| parameter | value |
|---|---|
{gen_rows}

## How it was annotated

{ann_text}

## Fields

| field | type | meaning |
|---|---|---|
| `image` | Image | the generated image (PNG, lossless) |
| `label` | ClassLabel | dominant class: `class_a` if `soft_label[class_a] >= 0.5` else `class_b` |
| `class_a`, `class_b` | ClassLabel | the mixed pair; `lam` weighs `class_a` |
| `lam` | float32 | generation ratio: 1 = pure `class_a`, 0 = pure `class_b` |
| `lam_hat` | float32 | raw, unclipped projection on the prototype segment (NaN before annotation) |
| `confidence` | float32 | soft label of `label`, i.e. `max(soft[a], soft[b])` |
| `soft_label` | List(float32, K) | training target, non-zero on `class_a` and `class_b` only |
| `group_id` | int64 | the group (shared initial noise) |
| `seed` | int64 | seed of the group's initial noise |

## Intended use and limits

Use as extra training data with soft targets (e.g. CE on real + Brier on synthetic) to improve
calibration of classifiers on the source dataset's classes. Not real data: do not evaluate on
it, and do not use it outside the source dataset's label space. Images inherit the biases and
failure modes of the diffusion model and the annotation encoder; the soft labels are as good as
the encoder's prototypes. The squash `s` acts as label smoothing on pure endpoints.

Load with `datasets.load_dataset("<this folder or repo>")` or, with csm,
`csm.synthetic.load_synthetic(dir)`; train on any annotation listed above with
`csm train --synthetic <dir>:<name>`.

## Citation

```bibtex
{CITATION}
```
"""
    return "\n".join(yaml_lines) + "\n" + body
