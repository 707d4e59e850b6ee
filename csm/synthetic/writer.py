"""The sharded, resumable, atomic writer of a synthetic dataset (``csm generate``).

Writer contract: shard ``i`` holds the fixed group range ``shard_groups(i)``; the content of a
group is a pure function of its id and the base seed, so shards can be written in any order, by
any process, and re-written after a crash. A shard is written to a temporary name and renamed;
its record is written (also atomically) only after the rename, so a recorded shard is complete.
``resume=True`` re-opens a directory, checks every recorded shard against its size and sha256,
and ``pending_shards()`` lists what is left. Only one shard is in memory at any time. The layout
of the directory is described in :mod:`csm.synthetic.storage`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csm.errors import CSMError
from csm.synthetic.card import write_dataset_metadata
from csm.synthetic.schema import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    RECORDS_DIR,
    SPLIT,
    build_table,
    synthetic_features,
)
from csm.synthetic.storage import (
    file_sha256,
    read_manifest,
    shard_name,
    verify_shard,
    write_json_atomic,
    write_table_atomic,
)
from csm.utils import check_output, claim_output

logger = logging.getLogger(__name__)

__all__ = ["SyntheticWriter"]


class SyntheticWriter:
    """Sharded, resumable, atomic writer of a synthetic dataset.

    Args:
        out_dir: dataset directory (created; must be new or empty unless ``resume``).
        class_names: the real dataset's class names, in label order.
        info: generation parameters (model, scheduler, steps, guidance, group_size, pair walk,
            seed, ...) recorded in the manifest, the card and the dataset info. Must contain
            ``group_size``.
        groups_per_shard: groups per shard (the unit of writing and resuming).
        total_groups: number of groups in the finished dataset.
        resume: re-open an existing directory written with the same parameters.
        overwrite: delete an existing csm synthetic dataset at ``out_dir`` first.

    Raises:
        CSMError: the directory holds other data, or resuming with different parameters.
    """

    def __init__(
        self,
        out_dir: str | Path,
        class_names: Sequence[str],
        info: dict[str, Any],
        groups_per_shard: int,
        total_groups: int,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.class_names = list(class_names)
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise CSMError(
                f"class_names {self.class_names}: need at least two distinct names; check the model"
            )
        if groups_per_shard < 1:
            raise CSMError(f"groups_per_shard={groups_per_shard}: must be >= 1")
        if total_groups < 1:
            raise CSMError(f"groups={total_groups}: must be >= 1; ask for at least one group")
        if int(info.get("group_size", 0)) < 2:
            raise CSMError(f"group_size={info.get('group_size')}: must be >= 2")
        self.info = json.loads(json.dumps(info))  # plain JSON types, as recorded
        self.group_size = int(info["group_size"])
        self.groups_per_shard = int(groups_per_shard)
        self.total_groups = int(total_groups)
        self.num_shards = math.ceil(self.total_groups / self.groups_per_shard)
        self.features = synthetic_features(self.class_names)
        params = self._params()
        manifest_path = self.out_dir / MANIFEST_NAME
        owned = check_output(self.out_dir, "synthetic", overwrite=overwrite, resume=resume)
        if owned and not manifest_path.exists():
            owned = False  # only the marker (a kill before the manifest): start afresh
        if owned and not (resume or overwrite):
            raise CSMError(
                f"{self.out_dir}: a synthetic dataset already exists; pass --resume to continue "
                "it or --overwrite to replace it"
            )
        claim_output(self.out_dir, "synthetic", overwrite=overwrite, resume=resume)
        if manifest_path.exists():
            manifest = read_manifest(self.out_dir)
            if manifest["params"] != params:
                diff = sorted(
                    k
                    for k in set(params) | set(manifest["params"])
                    if params.get(k) != manifest["params"].get(k)
                )
                raise CSMError(
                    f"{self.out_dir}: --resume with different parameters ({', '.join(diff)}); "
                    "rerun "
                    "with the original parameters or write to a new --out directory"
                )
            self._check_records(manifest)
        else:
            manifest = {
                "format": "csm-synthetic",
                "version": FORMAT_VERSION,
                "params": params,
                "annotation": None,
                "finalized": False,
            }
            write_json_atomic(manifest, manifest_path)
        self.manifest = manifest

    def _params(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "info": self.info,
            "groups_per_shard": self.groups_per_shard,
            "total_groups": self.total_groups,
            "num_shards": self.num_shards,
        }

    # ---- shard bookkeeping
    def shard_groups(self, index: int) -> range:
        """The fixed range of group ids that shard ``index`` holds."""
        if not 0 <= index < self.num_shards:
            raise CSMError(f"shard {index}: out of range; the dataset has {self.num_shards} shards")
        start = index * self.groups_per_shard
        return range(start, min(start + self.groups_per_shard, self.total_groups))

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.out_dir / SPLIT / shard_name(index, self.num_shards)

    def _record_path(self, index: int) -> Path:
        return self.out_dir / RECORDS_DIR / f"{index:05d}.json"

    def _check_records(self, manifest: dict[str, Any]) -> None:
        if manifest.get("shards") is not None:  # an activated annotation: the manifest lists them
            for record in manifest["shards"]:
                verify_shard(self.out_dir / record["file"], record, full=True)
            return
        for index in range(self.num_shards):
            record_path = self._record_path(index)
            if record_path.exists():
                verify_shard(self.shard_path(index), json.loads(record_path.read_text()), full=True)

    def pending_shards(self) -> list[int]:
        """Shards not yet written (every shard of a new dataset)."""
        return [i for i in range(self.num_shards) if not self._record_path(i).exists()]

    def write_shard(
        self,
        index: int,
        images: torch.Tensor | np.ndarray,
        class_a: Sequence[int],
        class_b: Sequence[int],
        lam: Sequence[float],
        group_id: Sequence[int],
        seed: Sequence[int],
    ) -> None:
        """Write shard ``index`` atomically, then its record.

        Rows must be exactly the groups of :meth:`shard_groups`, ``group_size`` rows each, in
        group order. ``images`` are uint8 or float in [0, 1], shape (N, C, H, W).
        """
        groups = self.shard_groups(index)
        expected = np.repeat(np.arange(groups.start, groups.stop), self.group_size)
        got = np.asarray(group_id, dtype=np.int64)
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise CSMError(
                f"shard {index}: rows must be groups {groups.start}..{groups.stop - 1} with "
                f"{self.group_size} images each, in order; got {len(got)} rows"
            )
        k = len(self.class_names)
        for name, values in (("class_a", class_a), ("class_b", class_b)):
            arr = np.asarray(values)
            if arr.size and (arr.min() < 0 or arr.max() >= k):
                raise CSMError(f"shard {index}: {name} outside 0..{k - 1}; check the generator")
        table = build_table(self.features, images, class_a, class_b, lam, group_id, seed)
        path = self.shard_path(index)
        write_table_atomic(table, path)
        record = {
            "shard": index,
            "file": f"{SPLIT}/{path.name}",
            "rows": table.num_rows,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
            "groups": [groups.start, groups.stop],
        }
        write_json_atomic(record, self._record_path(index))
        logger.debug("wrote shard %d (%d rows) to %s", index, table.num_rows, path)

    def finalize(self) -> Path:
        """Check every shard and write ``state.json``, ``dataset_info.json`` and the card."""
        pending = self.pending_shards()
        if pending:
            raise CSMError(
                f"{self.out_dir}: {len(pending)} of {self.num_shards} shards are not written "
                f"(first: {pending[0]}); run `csm generate --resume` to finish it"
            )
        self._check_records(self.manifest)
        write_dataset_metadata(self.out_dir)
        self.manifest["finalized"] = True  # last: a crash before this leaves it unfinished
        write_json_atomic(self.manifest, self.out_dir / MANIFEST_NAME)
        return self.out_dir
