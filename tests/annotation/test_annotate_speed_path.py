"""The annotation's decoding path: DataLoader workers decode the shards off the main process.

Whatever the number of workers, the label files, main shards and manifest are byte-identical; an
undecodable image or a worker that dies aborts the annotation with one line and writes nothing.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from csm.annotation import annotate as annotate_module
from csm.annotation.annotate import annotate_dataset, default_num_workers
from csm.annotation.encoders import load_encoder
from csm.cli import main
from csm.data.real import RealData, Split
from csm.errors import CSMError
from csm.synthetic import SyntheticWriter, file_sha256, read_table
from csm.synthetic.schema import ANNOTATIONS_DIR
from csm.synthetic.storage import decode_images, write_table_atomic
from tests.helpers import launch_two, make_run

NAMES = ["a", "b", "c"]
GROUP = 4  # images per group
LAMS = [0.0, 1 / 3, 2 / 3, 1.0]


def _toy_real() -> RealData:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(10)
    base = torch.tensor([40.0, 120.0, 200.0])[labels].view(-1, 1, 1, 1)
    images = (base + torch.randint(-30, 30, (30, 1, 8, 8), generator=g)).clamp(0, 255)
    split = Split(images.round().to(torch.uint8), labels)
    return RealData(split, split, split, list(NAMES), "toy-real", 0)


def _dataset(out: Path, groups: int = 9, per_shard: int = 2) -> None:
    """``groups`` groups of random 8x8 images, ``per_shard`` groups per shard (5 shards)."""
    rng = np.random.default_rng(1)
    pairs = [(0, 1), (0, 2), (1, 2)]
    w = SyntheticWriter(out, NAMES, {"group_size": GROUP, "dataset": "toy-real"}, per_shard, groups)
    for i in w.pending_shards():
        gs = list(w.shard_groups(i))
        a = np.repeat([pairs[g % 3][0] for g in gs], GROUP)
        b = np.repeat([pairs[g % 3][1] for g in gs], GROUP)
        pixels = torch.from_numpy(rng.integers(0, 256, (len(a), 1, 8, 8), dtype=np.uint8))
        gid = np.repeat(gs, GROUP)
        w.write_shard(i, pixels, a, b, np.tile(LAMS, len(gs)), gid, gid)
    w.finalize()


def _label_bytes(out: Path) -> dict[str, bytes]:
    """The label data, reports, main shards and manifest of a dataset, as bytes (not the saved
    command-line options, which record ``--num-workers``)."""
    files = [*sorted((out / ANNOTATIONS_DIR).rglob("*")), *sorted((out / "train").glob("*"))]
    files = [p for p in files if p.is_file() and p.suffix != ".yaml"]
    return {str(p.relative_to(out)): p.read_bytes() for p in [*files, out / "csm_synthetic.json"]}


def _digest(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_labels_byte_identical_whatever_the_number_of_workers(tmp_path):
    run = make_run(tmp_path / "run", NAMES)
    encoder, real = load_encoder(f"classifier:{run}", "cpu"), _toy_real()
    outputs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"syn{workers}"
        _dataset(out)
        rep = annotate_dataset(
            out,
            encoder,
            real=real,
            batch_size=3,  # batches that do not divide the shards
            cache_dir=str(tmp_path / "cache"),
            num_workers=workers,
        )
        assert rep["num_images"] == 9 * GROUP
        outputs[workers] = _label_bytes(out)
    assert outputs[0] == outputs[1] == outputs[2]
    assert any(ANNOTATIONS_DIR in name for name in outputs[0])


def test_cli_num_workers_gives_the_same_judge_labels(tmp_path, capsys):
    run = make_run(tmp_path / "run", NAMES)
    outputs = []
    for workers in ("0", "2"):
        out = tmp_path / f"syn{workers}"
        _dataset(out)
        args = ["annotate", str(out), "--mode", "judge", "--encoder", f"classifier:{run}"]
        assert main([*args, "--device", "cpu", "--num-workers", workers]) == 0, (
            capsys.readouterr().err
        )
        outputs.append(_label_bytes(out))
    assert outputs[0] == outputs[1]
    out = tmp_path / "syn0"
    before = _digest(out)
    bad = ["annotate", str(out), "--mode", "judge", "--encoder", f"classifier:{run}"]
    assert main([*bad, "--device", "cpu", "--num-workers", "-1"]) == 2
    assert "num_workers=-1" in capsys.readouterr().err
    assert _digest(out) == before


@pytest.mark.skipif(sys.platform != "linux", reason="accelerate launch multi-process on linux")
def test_two_processes_with_workers_label_as_one_without(tmp_path):
    run = make_run(tmp_path / "run", NAMES)
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        _dataset(out)  # 5 shards: 3 and 2 per process, decoded by a worker each
    args = ["--mode", "judge", "--encoder", f"classifier:{run}", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same floats
    try:
        assert main(["annotate", str(one), *args, "--num-workers", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    launch_two("-m", "csm", "annotate", str(two), *args, "--num-workers", "1")
    files = [_label_bytes(out) for out in (one, two)]
    reports = [json.loads(f.pop("annotations/judge/annotation_report.json")) for f in files]
    assert [r.pop("world_size") for r in reports] == [1, 2] and reports[0] == reports[1]
    assert files[0] == files[1]


def _corrupt_row(out: Path, shard: int, row: int) -> None:
    path = next((out / "train").glob(f"data-{shard:05d}-of-*.arrow"))
    table = read_table(path)
    images = table.column("image").to_pylist()
    images[row] = {"bytes": b"garbage", "path": None}
    field = table.schema.field("image")
    write_table_atomic(table.set_column(0, field, pa.array(images, type=field.type)), path)
    rec = out / ".csm" / "shards" / f"{shard:05d}.json"
    record = json.loads(rec.read_text())
    record.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    rec.write_text(json.dumps(record))


def test_undecodable_image_in_a_worker_is_one_line_and_writes_nothing(tmp_path):
    run = make_run(tmp_path / "run", NAMES)
    encoder = load_encoder(f"classifier:{run}", "cpu")
    out = tmp_path / "syn"
    _dataset(out)
    _corrupt_row(out, 3, 5)  # shard 3 holds groups 6 and 7: row 5 is in group 7
    before = _digest(out)
    with pytest.raises(CSMError, match=r"row 5 \(group 7\): the image does not decode") as err:
        annotate_dataset(out, encoder, mode="judge", num_workers=2)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert _digest(out) == before


def _dying_load_shard(path: Path):
    if "data-00002" in path.name:
        os._exit(1)  # a decoding worker killed in the middle of the run
    return _original_load_shard(path)


_original_load_shard = annotate_module._load_shard


# torch's DataLoader iterator, collected after its worker was killed, reports the dead worker
# once more from its finaliser; that is the scenario of this test, not a fault of csm
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_worker_that_dies_aborts_without_changes(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", NAMES)
    encoder = load_encoder(f"classifier:{run}", "cpu")
    out = tmp_path / "syn"
    _dataset(out)
    before = _digest(out)
    monkeypatch.setattr(annotate_module, "_load_shard", _dying_load_shard)  # forked workers
    with pytest.raises(CSMError, match="a process decoding the images died"):
        annotate_dataset(out, encoder, mode="judge", num_workers=1)
    assert _digest(out) == before
    gc.collect()  # the dead worker's iterator is finalised here, inside this test
    monkeypatch.undo()  # a rerun finishes the job
    annotate_dataset(out, encoder, mode="judge", num_workers=1)
    assert (out / ANNOTATIONS_DIR / "judge").is_dir()


@pytest.mark.parametrize(
    ("cores", "processes", "expect"), [(1, 1, 0), (2, 1, 1), (4, 2, 1), (2, 2, 0), (64, 1, 8)]
)
def test_default_workers_use_the_spare_cores(monkeypatch, cores, processes, expect):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_workers(processes) == expect


def test_decode_images_writes_into_the_given_buffer(tmp_path):
    out = tmp_path / "syn"
    _dataset(out, groups=2, per_shard=2)
    path = next((out / "train").glob("*.arrow"))
    table = read_table(path)
    given: list[np.ndarray] = []

    def alloc(shape: tuple[int, ...]) -> np.ndarray:
        given.append(np.full(shape, 7, dtype=np.uint8))
        return given[0]

    decoded = decode_images(table, str(path), alloc)
    assert decoded is given[0] and decoded.shape == (2 * GROUP, 1, 8, 8)
    np.testing.assert_array_equal(decoded, decode_images(table, str(path)))
