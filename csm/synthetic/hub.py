"""``csm push``: publish a synthetic dataset and its card on the Hugging Face Hub.

The dataset goes up with ``datasets.Dataset.push_to_hub`` (Parquet shards of at most
``--max-shard-size``, under ``data/train-*``), then the csm dataset card replaces the card that
``push_to_hub`` writes, with its YAML ``configs`` pointing at the Parquet shards and the
``dataset_info`` that ``push_to_hub`` computed. The endpoint is ``HF_ENDPOINT`` (default
https://huggingface.co); the token comes from ``--token``, ``HF_TOKEN`` or ``hf auth login``.
Without a token, in offline mode, or without network, the command stops with one clear line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from csm.errors import CSMError
from csm.synthetic.card import render_card
from csm.synthetic.reader import load_synthetic
from csm.synthetic.storage import check_dataset

logger = logging.getLogger(__name__)

HUB_DATA_FILES = "data/train-*"


@dataclass
class PushConfig:
    """Options of ``csm push``."""

    dataset: str = field(default="", metadata={"help": "synthetic dataset directory"})
    repo_id: str = field(default="", metadata={"help": "Hub dataset repo, e.g. user/csm-digits"})
    private: bool = field(default=False, metadata={"help": "create the repo as private"})
    max_shard_size: str = field(default="500MB", metadata={"help": "largest Parquet shard"})
    token: str | None = field(
        default=None, metadata={"help": "Hub token (default: HF_TOKEN or the saved login)"}
    )
    commit_message: str = field(
        default="Upload csm synthetic dataset", metadata={"help": "commit message"}
    )


_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_error(exc: Exception, endpoint: str, repo_id: str) -> CSMError:
    try:  # the HTTP client huggingface_hub uses
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - older huggingface_hub
        import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return CSMError(
            f"--repo-id {repo_id}: the Hugging Face Hub is in offline mode "
            "(HF_HUB_OFFLINE=1); unset it to push"
        )
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return CSMError(
            f"--repo-id {repo_id}: cannot reach {endpoint} ({type(exc).__name__}); "
            "check the network or HF_ENDPOINT and retry"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        hint = (
            "check that the token may write to this namespace"
            if status in (401, 403)
            else "check the repo id and retry"
        )
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return CSMError(
            f"--repo-id {repo_id}: the Hub refused the push (HTTP {status}: {first}); {hint}"
        )
    return CSMError(f"--repo-id {repo_id}: push failed ({type(exc).__name__}: {exc}); retry")


def hub_card(dataset_dir: str, pushed_card: str | None = None) -> str:
    """The csm card with ``configs`` on the Hub's Parquet shards (and push_to_hub's info)."""
    manifest, records = check_dataset(dataset_dir)
    card = render_card(manifest, sum(r["rows"] for r in records), data_files=HUB_DATA_FILES)
    if pushed_card:
        # keep the dataset_info block push_to_hub computed (sizes of the Parquet files)
        match = re.search(r"^dataset_info:\n(?:[ -].*\n)+", pushed_card, flags=re.M)
        if match:
            head, sep, body = card.partition("\n---\n")
            card = f"{head}\n{match.group(0).rstrip()}{sep}{body}"
    return card


def push(cfg: PushConfig) -> str:
    """Run ``csm push`` (see module docstring); returns the repo URL line."""
    from huggingface_hub import HfApi, constants, get_token

    if not cfg.dataset:
        raise CSMError("dataset: missing; pass DATASET (a directory from `csm generate`)")
    if not cfg.repo_id or not _REPO_RE.match(cfg.repo_id):
        raise CSMError(
            f"--repo-id {cfg.repo_id!r}: expected <namespace>/<name>, "
            "e.g. --repo-id alice/csm-digits"
        )
    ds = load_synthetic(cfg.dataset)  # validates the dataset before touching the network
    endpoint = constants.ENDPOINT
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
    try:
        info = ds.push_to_hub(
            cfg.repo_id,
            private=cfg.private,
            token=token,
            max_shard_size=cfg.max_shard_size,
            commit_message=cfg.commit_message,
            split="train",
        )
        api = HfApi(endpoint=endpoint, token=token)
        pushed = None
        try:
            readme = api.hf_hub_download(cfg.repo_id, "README.md", repo_type="dataset")
            with open(readme, encoding="utf-8") as f:
                pushed = f.read()
        except Exception as exc:  # the card is rewritten below anyway
            logger.warning("could not read the card push_to_hub wrote (%s)", exc)
        api.upload_file(
            path_or_fileobj=hub_card(cfg.dataset, pushed).encode("utf-8"),
            path_in_repo="README.md",
            repo_id=cfg.repo_id,
            repo_type="dataset",
            commit_message="csm dataset card",
        )
    except CSMError:
        raise
    except Exception as exc:
        raise _hub_error(exc, endpoint, cfg.repo_id) from exc
    url = getattr(info, "repo_url", None) or f"{endpoint}/datasets/{cfg.repo_id}"
    return f"pushed {len(ds)} rows of {cfg.dataset} to {url}"
