"""``csm push``: publish a synthetic dataset, a generator or a classifier run on the Hub.

The folder's kind is detected from its files:

* a synthetic dataset (``csm_synthetic.json``) goes to a *dataset* repo as Parquet shards of at
  most ``--max-shard-size`` under ``data/train-*`` plus the csm dataset card
  (:func:`csm.synthetic.card.build_card`) with the ``dataset_info`` block (features, sizes) that
  ``datasets`` computes (``DatasetInfosDict.to_dataset_card_data``);
* a generator (``model_index.json``, from ``csm fit-diffusion``) goes to a *model* repo as it is:
  the diffusers folder with its self-contained ``pipeline_csm.py`` and model card;
* a classifier run (``model.json`` + ``model.safetensors``, from ``csm train``) goes to a *model*
  repo: weights, architecture, config, class names, metrics and a model card
  (:func:`run_card`).

Every push is ONE commit (``HfApi.create_commit`` with all operations), which also deletes the
files of an earlier push that the new one no longer has, so pushing again leaves exactly what one
push leaves. The endpoint is ``HF_ENDPOINT`` (default https://huggingface.co); the token comes from
``--token``, ``HF_TOKEN`` or ``hf auth login`` and is never logged. Without a token, in offline
mode, or without network, the command stops with one clear line.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csm.errors import CSMError
from csm.synthetic.card import build_card, card_license
from csm.synthetic.reader import load_synthetic
from csm.synthetic.schema import MANIFEST_NAME, SPLIT
from csm.synthetic.storage import check_dataset

logger = logging.getLogger(__name__)

HUB_DATA_FILES = "data/train-*"
#: Files of a classifier run that a push uploads (the card is added); ``checkpoints/`` and
#: ``eval_cache/`` stay local.
RUN_FILES = (
    "model.safetensors",
    "model.json",
    "config.yaml",
    "class_names.json",
    "run.json",
    "metrics.csv",
)
#: Files a generator folder must hold to be pushed (``csm fit-diffusion`` writes them).
GENERATOR_FILES = ("model_index.json", "pipeline_csm.py", "README.md")
_SKIP_DIRS = {"checkpoints", "eval_cache", ".tmp-pipeline", ".csm", "__pycache__"}


@dataclass
class PushConfig:
    """Options of ``csm push``."""

    dataset: str = field(
        default="",
        metadata={"help": "folder to push: synthetic dataset, fit-diffusion model or train run"},
    )
    repo_id: str = field(default="", metadata={"help": "Hub repo, e.g. user/csm-digits"})
    private: bool = field(default=False, metadata={"help": "create the repo as private"})
    max_shard_size: str = field(default="500MB", metadata={"help": "largest Parquet shard"})
    token: str | None = field(
        default=None, metadata={"help": "Hub token (default: HF_TOKEN or the saved login)"}
    )
    license: str | None = field(
        default=None,
        metadata={"help": "licence id when the source dataset's is unknown (e.g. cc-by-4.0)"},
    )
    commit_message: str | None = field(
        default=None, metadata={"help": "commit message (default: names what is pushed)"}
    )


_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_error(exc: Exception, endpoint: str, repo_id: str) -> CSMError:
    """One line for a failed push; needs only huggingface_hub and the standard library."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return CSMError(
            f"--repo-id {repo_id}: the Hugging Face Hub is in offline mode "
            "(HF_HUB_OFFLINE=1); unset it to push"
        )
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None) or "?"
        hint = (
            "check that the token may write to this namespace"
            if status in (401, 403)
            else "check the repo id and retry"
        )
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return CSMError(
            f"--repo-id {repo_id}: the Hub refused the push (HTTP {status}: {first}); {hint}"
        )
    # the HTTP client's transport errors (httpx, requests, urllib3: whichever huggingface_hub
    # uses) all name themselves so; matching by name needs none of them importable
    names = {cls.__name__ for cls in type(exc).__mro__}
    transport = {"TransportError", "ConnectError", "ConnectionError", "Timeout", "TimeoutError"}
    if names & transport or isinstance(exc, OSError | TimeoutError):
        return CSMError(
            f"--repo-id {repo_id}: cannot reach {endpoint} ({type(exc).__name__}); "
            "check the network or HF_ENDPOINT and retry"
        )
    return CSMError(f"--repo-id {repo_id}: push failed ({type(exc).__name__}: {exc}); retry")


def folder_kind(folder: str | Path) -> str:
    """``"dataset"``, ``"generator"`` or ``"classifier"``: what ``csm push`` publishes.

    Raises:
        CSMError: The folder is none of the three.
    """
    path = Path(folder)
    if (path / MANIFEST_NAME).is_file():
        return "dataset"
    if (path / "model_index.json").is_file():
        return "generator"
    if (path / "model.json").is_file() and (path / "model.safetensors").is_file():
        return "classifier"
    raise CSMError(
        f"{folder}: not a csm synthetic dataset, generator or classifier run (no "
        f"{MANIFEST_NAME}, model_index.json or model.json + model.safetensors); pass a folder "
        "from `csm generate`, `csm fit-diffusion` or `csm train`"
    )


# ----------------------------------------------------------------------------- what goes up
def dataset_operations(
    dataset_dir: str | Path, max_shard_size: str, license_id: str | None = None
) -> tuple[list[Any], str, int]:
    """Commit operations of a dataset push: Parquet shards and the card.

    Returns:
        ``(operations, card_text, rows)``.
    """
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.py_utils import convert_file_size_to_int
    from huggingface_hub import CommitOperationAdd

    manifest, records = check_dataset(dataset_dir)
    if license_id:
        manifest["params"]["info"]["license"] = license_id
    if card_license(manifest["params"]["info"]) == "unknown":
        raise CSMError(
            f"{dataset_dir}: the licence of the source dataset is unknown; pass --license with "
            "its Hub licence id (e.g. --license cc-by-4.0)"
        )
    ds = load_synthetic(dataset_dir)
    try:
        limit = convert_file_size_to_int(max_shard_size)
    except ValueError as exc:
        raise CSMError(f"--max-shard-size {max_shard_size!r}: not a size; use e.g. 500MB") from exc
    n = max(1, math.ceil(ds.data.nbytes / max(1, limit)))
    ops, download = [], 0
    for i in range(n):
        buf = io.BytesIO()
        ds.shard(num_shards=n, index=i, contiguous=True).to_parquet(buf)
        data = buf.getvalue()
        download += len(data)
        ops.append(CommitOperationAdd(f"data/{SPLIT}-{i:05d}-of-{n:05d}.parquet", data))
    splits = SplitDict()
    splits.add(SplitInfo(name=SPLIT, num_bytes=ds.data.nbytes, num_examples=len(ds)))
    info = DatasetInfo(
        features=ds.features,
        splits=splits,
        download_size=download,
        dataset_size=ds.data.nbytes,
    )
    card = build_card(manifest, len(ds), data_files=HUB_DATA_FILES)
    DatasetInfosDict({"default": info}).to_dataset_card_data(card.data)
    text = str(card)
    ops.append(CommitOperationAdd("README.md", text.encode("utf-8")))
    return ops, text, len(ds)


def generator_operations(folder: str | Path) -> list[Any]:
    """Commit operations of a generator push: the diffusers folder, card and pipeline file."""
    from huggingface_hub import CommitOperationAdd

    path = Path(folder)
    missing = [f for f in GENERATOR_FILES if not (path / f).is_file()]
    if missing:
        raise CSMError(
            f"{folder}: a generator folder needs {', '.join(missing)}; write them with "
            f"`python -m csm.generation.card {folder}` (csm fit-diffusion does it)"
        )
    files = [
        f
        for f in sorted(path.rglob("*"))
        if f.is_file() and not _SKIP_DIRS & set(f.relative_to(path).parts[:-1])
    ]
    return [CommitOperationAdd(f.relative_to(path).as_posix(), str(f)) for f in files]


def run_card(folder: str | Path, repo_id: str | None = None) -> str:
    """The model card of a classifier run: architecture, training, results, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(folder)
    spec = json.loads((path / "model.json").read_text())
    names = json.loads((path / "class_names.json").read_text())
    run = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    cfg_text = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else ""
    dataset = re.search(r"^dataset:\s*(\S+)", cfg_text, flags=re.M)
    dataset = dataset.group(1).strip("'\"") if dataset else None
    from csm.synthetic.card import KNOWN_SOURCES, is_hub_id, public_ref

    known = KNOWN_SOURCES.get(dataset or "")
    data = ModelCardData(
        library_name="pytorch",
        license=known.license if known else None,
        tags=["image-classification", "calibration", "csm", f"method-{run.get('method', 'ce')}"],
        datasets=[dataset] if is_hub_id(dataset) else None,
        pipeline_tag="image-classification",
    )
    val = {k: v for k, v in run.items() if isinstance(v, int | float) and "/" in str(k)}
    metrics = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in sorted(val.items())) or "| - | - |"
    ref = repo_id or path.name
    body = f"""
# {ref}: a csm image classifier

`{spec["arch"]}` for {len(names)} classes ({", ".join(f"`{n}`" for n in names)}), input
{spec["in_channels"]}x{spec["image_size"]}x{spec["image_size"]} in [0, 1] (normalisation with mean
`{spec["mean"]}` and std `{spec["std"]}` is inside the model), trained with
[csm](https://arxiv.org/abs/2504.13548) `csm train` (method `{run.get("method", "?")}`) on
`{public_ref(dataset) or "?"}`. The full configuration is `config.yaml`; `run.json` and
`metrics.csv` hold the training record; `model.safetensors` the best epoch on validation.

| metric (validation) | value |
|---|---|
{metrics}

## Use

```python
from huggingface_hub import snapshot_download
from csm.training.runs import load_run

run = load_run(snapshot_download("{ref}"))
probs = run.model(images).softmax(-1)   # images: (N, C, H, W) floats in [0, 1]
```

Without csm: `model.json` names the architecture and `model.safetensors` holds its state dict
(`safetensors.torch.load_file`).
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def classifier_operations(folder: str | Path, repo_id: str) -> list[Any]:
    """Commit operations of a classifier-run push: weights, config, record and card."""
    from huggingface_hub import CommitOperationAdd

    path = Path(folder)
    ops = [
        CommitOperationAdd(name, str(path / name)) for name in RUN_FILES if (path / name).is_file()
    ]
    card = run_card(folder, repo_id)
    ops.append(CommitOperationAdd("README.md", card.encode("utf-8")))
    return ops


# ----------------------------------------------------------------------------- the push
def _check(cfg: PushConfig) -> tuple[str, str]:
    """Validate the options and the folder before any network call; ``(kind, token)``."""
    from huggingface_hub import constants, get_token

    if not cfg.dataset:
        raise CSMError(
            "folder: missing; pass a folder from `csm generate`, `csm fit-diffusion` or `csm train`"
        )
    if not cfg.repo_id or not _REPO_RE.match(cfg.repo_id):
        raise CSMError(
            f"--repo-id {cfg.repo_id!r}: expected <namespace>/<name>, "
            "e.g. --repo-id alice/csm-digits"
        )
    kind = folder_kind(cfg.dataset) if Path(cfg.dataset).is_dir() else "dataset"
    if kind == "dataset":
        load_synthetic(cfg.dataset)  # validates the dataset (clear error on a bad folder)
    if constants.HF_HUB_OFFLINE:
        raise CSMError(
            f"--repo-id {cfg.repo_id}: the Hugging Face Hub is in offline mode "
            "(HF_HUB_OFFLINE=1); unset it to push"
        )
    token = cfg.token or get_token()
    if not token:
        raise CSMError(
            f"--repo-id {cfg.repo_id}: no Hugging Face token; run `hf auth login`, "
            "set HF_TOKEN or pass --token"
        )
    return kind, token


def push(cfg: PushConfig) -> str:
    """Run ``csm push`` (see module docstring): one commit; returns the repo URL line."""
    from huggingface_hub import CommitOperationDelete, HfApi, constants

    kind, token = _check(cfg)
    repo_type = "dataset" if kind == "dataset" else "model"
    rows = None
    if kind == "dataset":
        ops, _, rows = dataset_operations(cfg.dataset, cfg.max_shard_size, cfg.license)
    elif kind == "generator":
        ops = generator_operations(cfg.dataset)
    else:
        ops = classifier_operations(cfg.dataset, cfg.repo_id)
    endpoint = constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(cfg.repo_id, repo_type=repo_type, private=cfg.private, exist_ok=True)
        new = {op.path_in_repo for op in ops}
        old = api.list_repo_files(cfg.repo_id, repo_type=repo_type)
        ops += [CommitOperationDelete(p) for p in old if p not in new and p != ".gitattributes"]
        api.create_commit(
            cfg.repo_id,
            operations=ops,
            commit_message=cfg.commit_message or f"Upload csm {kind} {Path(cfg.dataset).name}",
            repo_type=repo_type,
        )
    except CSMError:
        raise
    except Exception as exc:
        raise _hub_error(exc, endpoint, cfg.repo_id) from exc
    what = f"{rows} rows of" if rows is not None else f"the {kind}"
    return f"pushed {what} {cfg.dataset} to {getattr(url, 'url', None) or url}"
