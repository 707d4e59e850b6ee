"""Tests for the synthetic dataset format: writer, resume checks, readers, card, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import yaml

from csm.errors import CSMError
from csm.synthetic import (
    SyntheticWriter,
    load_synthetic,
    load_synthetic_tensors,
    read_table,
    soft_targets,
)
from csm.synthetic.storage import write_table_atomic

NAMES = ["cat", "dog", "frog", "ship"]
G = 4
LAMS = [0.0, 1 / 3, 2 / 3, 1.0]


def _fill(w: SyntheticWriter, shards=None, seed=0) -> dict[int, np.ndarray]:
    """Write shards with deterministic random pixels; returns the pixels per shard."""
    written = {}
    for i in shards if shards is not None else w.pending_shards():
        groups = w.shard_groups(i)
        n = len(groups) * G
        rng = np.random.default_rng([seed, i])
        pixels = rng.integers(0, 256, (n, 3, 5, 5), dtype=np.uint8)
        gid = np.repeat(list(groups), G)
        a = gid % 3
        w.write_shard(i, pixels, a, a + 1, LAMS * len(groups), gid, gid * 10 + 1)
        written[i] = pixels
    return written


def _new(path: Path, **kw) -> SyntheticWriter:
    args = dict(groups_per_shard=2, total_groups=5)
    args.update(kw)
    return SyntheticWriter(path, NAMES, {"group_size": G, "dataset": "toy", "steps": 3}, **args)


@pytest.fixture()
def finished(tmp_path) -> tuple[Path, np.ndarray]:
    w = _new(tmp_path / "syn")
    pixels = _fill(w)
    w.finalize()
    return tmp_path / "syn", np.concatenate([pixels[i] for i in sorted(pixels)])


def test_soft_targets_hand_computed():
    soft, label, conf = soft_targets(
        np.array([0.25, 0.5, 0.9]), np.array([0, 2, 1]), np.array([1, 3, 0]), 4
    )
    np.testing.assert_allclose(
        soft, [[0.25, 0.75, 0, 0], [0, 0, 0.5, 0.5], [0.1, 0.9, 0, 0]], atol=1e-7
    )
    assert label.tolist() == [1, 2, 1]
    np.testing.assert_allclose(conf, [0.75, 0.5, 0.9], atol=1e-7)


def test_shards_are_fixed_group_ranges(tmp_path):
    w = _new(tmp_path / "syn")
    assert w.num_shards == 3
    assert [w.shard_groups(i) for i in range(3)] == [range(0, 2), range(2, 4), range(4, 5)]
    assert w.pending_shards() == [0, 1, 2]
    with pytest.raises(CSMError, match="shard 3: out of range"):
        w.shard_groups(3)
    with pytest.raises(CSMError, match="shard 1: rows must be groups 2..3"):
        w.write_shard(1, np.zeros((4, 3, 5, 5), np.uint8), [0] * 4, [1] * 4, LAMS, [2] * 4, [0] * 4)


def test_finished_dataset_opens_everywhere(finished, tmp_path):
    out, pixels = finished
    ds = load_synthetic(out)
    assert len(ds) == 20
    assert ds.features["label"].names == NAMES and ds.features["class_b"].names == NAMES
    assert ds.features["soft_label"].length == len(NAMES)
    row = ds[5]  # group 1, lambda 1/3, pair (1, 2)
    assert (row["class_a"], row["class_b"], row["group_id"], row["seed"]) == (1, 2, 1, 11)
    assert row["label"] == 2 and np.isnan(row["lam_hat"])
    np.testing.assert_allclose(row["soft_label"], [0, 1 / 3, 2 / 3, 0], atol=1e-6)
    np.testing.assert_allclose(row["confidence"], 2 / 3, atol=1e-6)
    assert np.array_equal(np.transpose(np.asarray(row["image"]), (2, 0, 1)), pixels[5])
    # plain datasets, no csm: load_from_disk and load_dataset(dir) through the card's configs
    disk = datasets.load_from_disk(str(out))["train"]
    hub = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert hub.features == disk.features == ds.features
    for col in ("label", "class_a", "lam", "soft_label", "group_id", "seed"):
        assert hub[col] == disk[col]
    assert np.array_equal(np.asarray(hub[19]["image"]), np.asarray(disk[19]["image"]))
    t = load_synthetic_tensors(out)
    assert t.images.dtype.is_floating_point is False and np.array_equal(t.images.numpy(), pixels)
    assert t.soft_labels.shape == (20, 4) and t.class_names == NAMES
    assert t.group_id.tolist() == ds["group_id"] and t.lam.tolist() == pytest.approx(ds["lam"])


def test_card_yaml_and_content(finished):
    out, _ = finished
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    for key in (
        "license",
        "task_categories",
        "size_categories",
        "pretty_name",
        "tags",
        "configs",
    ):
        assert key in header
    # "toy" is a local name, not a Hub id: named in the csm block, not as a source dataset
    assert header["size_categories"] == ["n<1K"] and "source_datasets" not in header
    assert header["csm"]["generation"]["dataset"] == "toy"
    # the exact shard files (the load_dataset pointer of the annotation switch-over), not a glob
    files = [f"train/data-0000{i}-of-00003.arrow" for i in range(3)]
    assert header["configs"][0]["data_files"][0]["path"] == files
    assert "| steps | `3` |" in text and "Not annotated yet" in text and "2504.13548" in text
    info = json.loads((out / "train" / "dataset_info.json").read_text())
    assert '"steps": 3' in info["description"]


def test_resume_checks_parameters_and_existing_dirs(tmp_path):
    out = tmp_path / "syn"
    w = _new(out)
    _fill(w, shards=[1])
    with pytest.raises(CSMError, match="already exists; pass --resume"):
        _new(out)
    with pytest.raises(CSMError, match="different parameters \\(groups_per_shard"):
        _new(out, resume=True, groups_per_shard=3)
    w2 = _new(out, resume=True)
    assert w2.pending_shards() == [0, 2]
    with pytest.raises(CSMError, match="2 of 3 shards are not written"):
        w2.finalize()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CSMError, match="not written by csm"):
        _new(other)
    with pytest.raises(CSMError, match="not written by csm"):
        _new(other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    fresh = _new(out, overwrite=True)
    assert fresh.pending_shards() == [0, 1, 2]


def _digest(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_truncated_shard_is_one_clear_error(finished):
    out, _ = finished
    shard = out / "train" / "data-00001-of-00003.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    before = _digest(out)
    with pytest.raises(CSMError, match="data-00001-of-00003.arrow: the shard is truncated"):
        load_synthetic(out)
    with pytest.raises(CSMError, match="data-00001-of-00003.arrow: the shard is truncated"):
        _new(out, resume=True)
    with pytest.raises(CSMError, match="truncated or corrupt"):
        read_table(shard)
    assert _digest(out) == before


def test_undecodable_image_names_the_row(finished):
    out, _ = finished
    shard = out / "train" / "data-00002-of-00003.arrow"
    table = read_table(shard)
    images = table.column("image").to_pylist()
    images[2] = {"bytes": b"\x89PNG not really", "path": None}
    bad = table.set_column(
        0, table.schema.field("image"), pa.array(images, type=table.schema.field("image").type)
    )
    write_table_atomic(bad, shard)
    record_path = out / ".csm" / "shards" / "00002.json"
    record = json.loads(record_path.read_text())
    record["bytes"] = shard.stat().st_size
    record["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    record_path.write_text(json.dumps(record))
    with pytest.raises(CSMError, match="row 2 \\(group 4\\): the image does not decode"):
        load_synthetic_tensors(out)


def test_not_a_dataset(tmp_path):
    with pytest.raises(CSMError, match="not a csm synthetic dataset"):
        load_synthetic(tmp_path)
