"""The lazy synthetic reader: the same bytes as the eager one, verified once, decoded on demand."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from csm.errors import CSMError
from csm.synthetic import (
    SyntheticImages,
    SyntheticWriter,
    load_synthetic_tensors,
    read_table,
    storage,
)
from csm.synthetic import reader as reader_module
from csm.synthetic.storage import write_table_atomic

NAMES = ["cat", "dog", "frog", "ship"]
G = 4
LAMS = [0.0, 1 / 3, 2 / 3, 1.0]


def _write(out: Path, shapes: list[tuple[int, int, int]] | None = None) -> np.ndarray:
    """5 groups of 4 random images in 3 shards (2, 2, 1 groups); returns every pixel in order."""
    shapes = shapes or [(3, 5, 5)] * 3
    w = SyntheticWriter(out, NAMES, {"group_size": G}, groups_per_shard=2, total_groups=5)
    pixels = []
    for i in w.pending_shards():
        groups = w.shard_groups(i)
        gid = np.repeat(list(groups), G)
        rng = np.random.default_rng([7, i])
        x = rng.integers(0, 256, (len(gid), *shapes[i]), dtype=np.uint8)
        a = gid % 3
        lam = rng.permutation(LAMS * len(groups))  # rows not in λ order
        w.write_shard(i, x, a, a + 1, lam, gid, gid * 10 + 1)
        pixels.append(x)
    w.finalize()
    return np.concatenate(pixels) if len({p.shape[1:] for p in pixels}) == 1 else pixels


@pytest.fixture()
def dataset(tmp_path) -> tuple[Path, np.ndarray]:
    out = tmp_path / "syn"
    return out, _write(out)


@pytest.mark.parametrize("suffix", ["", ":lambda"])
def test_lazy_reader_gives_the_eager_bytes_and_metadata(dataset, suffix):
    out, pixels = dataset
    eager = load_synthetic_tensors(f"{out}{suffix}")
    lazy = load_synthetic_tensors(f"{out}{suffix}", lazy=True)
    assert isinstance(lazy.images, SyntheticImages) and isinstance(eager.images, torch.Tensor)
    assert lazy.images.shape == eager.images.shape == (20, 3, 5, 5)
    assert len(lazy.images) == 20 and lazy.images.dtype == torch.uint8
    for col in ("soft_labels", "class_a", "class_b", "group_id", "lam"):
        a, b = getattr(lazy, col), getattr(eager, col)
        assert a.dtype == b.dtype and torch.equal(a, b), col
    assert (lazy.class_names, lazy.annotation) == (eager.class_names, eager.annotation)
    assert np.array_equal(eager.images.numpy(), pixels)
    idx = torch.tensor([19, 0, 7, 7, 8, 3, 12, 16, -1])  # across shards, repeats, negative
    assert torch.equal(lazy.images[idx], eager.images[idx])
    assert torch.equal(lazy.images[idx.numpy()], eager.images[idx])
    assert torch.equal(lazy.images[idx.tolist()], eager.images[idx])
    assert torch.equal(lazy.images[3:17:4], eager.images[3:17:4])
    assert torch.equal(lazy.images[9], eager.images[9]) and lazy.images[9].shape == (3, 5, 5)
    assert torch.equal(lazy.images[torch.arange(20)], eager.images)
    assert lazy.images[torch.zeros(0, dtype=torch.long)].shape == (0, 3, 5, 5)
    loader = torch.utils.data.DataLoader(lazy.images, batch_size=8)  # a torch Dataset
    assert torch.equal(torch.cat(list(loader)), eager.images)
    with pytest.raises(IndexError, match="out of range for 20 images"):
        lazy.images[torch.tensor([20])]


def test_lazy_reader_decodes_only_the_rows_asked_for(dataset, monkeypatch):
    out, pixels = dataset
    lazy = load_synthetic_tensors(out, lazy=True)
    calls = []
    real = reader_module.png_to_array
    monkeypatch.setattr(reader_module, "png_to_array", lambda b: calls.append(1) or real(b))
    got = lazy.images[torch.tensor([4, 18, 4])]
    assert len(calls) == 3 and np.array_equal(got.numpy(), pixels[[4, 18, 4]])


def test_every_shard_is_hashed_once_and_a_changed_byte_is_refused(dataset, monkeypatch):
    out, _ = dataset
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(storage.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    load_synthetic_tensors(out, lazy=True)
    assert len(hashed) == 3  # one sha256 per shard, of the bytes the columns come from
    monkeypatch.undo()
    shard = next((out / "train").glob("data-00001-*.arrow"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1  # same size, one bit
    shard.write_bytes(bytes(data))
    with pytest.raises(CSMError, match=r"data-00001.*content differs from what was written"):
        load_synthetic_tensors(out, lazy=True)
    shard.unlink()
    with pytest.raises(CSMError, match="data-00001.*missing"):
        load_synthetic_tensors(out, lazy=True)


def test_an_undecodable_image_is_named_when_its_row_is_read(dataset):
    out, _ = dataset
    shard = next((out / "train").glob("data-00002-*.arrow"))
    table = read_table(shard)
    images = table.column("image").to_pylist()
    images[2] = {"bytes": b"\x89PNG not really", "path": None}
    field = table.schema.field("image")
    write_table_atomic(table.set_column(0, field, pa.array(images, type=field.type)), shard)
    record_path = out / ".csm" / "shards" / "00002.json"
    record = json.loads(record_path.read_text())
    record.update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    record_path.write_text(json.dumps(record))
    lazy = load_synthetic_tensors(out, lazy=True)  # row 0 of every shard decodes: opens
    lazy.images[torch.arange(18)]
    with pytest.raises(CSMError, match=r"data-00002.* row 2 \(group 4\): the image does not"):
        lazy.images[torch.tensor([18])]


def test_images_of_different_shapes_are_refused_when_opened(tmp_path):
    out = tmp_path / "syn"
    _write(out, [(3, 5, 5), (3, 5, 5), (3, 6, 6)])
    with pytest.raises(CSMError, match=r"images of different shapes \[\(3, 5, 5\), \(3, 6, 6\)\]"):
        load_synthetic_tensors(out, lazy=True)
    with pytest.raises(CSMError, match="images of different shapes"):
        load_synthetic_tensors(out)
