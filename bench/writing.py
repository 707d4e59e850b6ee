"""Benchmark: cost of the synthetic dataset writer and reader against plain ``datasets``.

The csm writer (:class:`csm.synthetic.SyntheticWriter`) adds, on top of what the standard
Hugging Face route (``Dataset.from_dict(..., features).save_to_disk(dir)``) does: fixed group-range
shards, an atomic rename per shard, a sha256 record per shard, the manifest, the dataset card and
``dataset_info.json``. This measures what that bookkeeping costs, in one process, on the same rows
(digit pairs blended in pixel space, 16 px, G = 8; the generator's cost is not included):

- ``write``: csm writer (PNG encoding, shards, records, finalize) vs ``Dataset.from_dict`` with
  the same ``Features`` (it PNG-encodes the same uint8 arrays) + ``save_to_disk``.
- ``verify``: the ``--resume`` check (size + sha256 of every recorded shard), against the write.
- ``read``: ``load_synthetic_tensors`` (every image decoded to one uint8 tensor) vs
  ``load_from_disk`` + decoding every image through ``datasets`` (``with_format("numpy")``).

Each side runs ``--repeats`` times, alternating; the minimum wall time is kept.
Results go to ``bench/results/writing.json``.

Usage::

    python bench/writing.py --num-images 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from annotation import make_dataset  # noqa: E402

from csm.data.real import load_real  # noqa: E402
from csm.synthetic import (  # noqa: E402
    SyntheticWriter,
    load_synthetic_tensors,
    soft_targets,
    synthetic_features,
)


def timed(fn, *args):
    """``(wall seconds, result)`` of ``fn(*args)``."""
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def baseline_write(out: Path, rows: dict[str, np.ndarray], names: list[str]) -> None:
    """The plain ``datasets`` route for the same rows."""
    from datasets import Dataset

    k = len(names)
    soft, label, conf = soft_targets(rows["lam"], rows["class_a"], rows["class_b"], k)
    columns = {
        "image": [img[0] for img in rows["images"]],  # (H, W) uint8, PNG-encoded by datasets
        "label": label,
        "class_a": rows["class_a"],
        "class_b": rows["class_b"],
        "lam": rows["lam"],
        "lam_hat": np.full(len(label), np.nan, dtype=np.float32),
        "confidence": conf,
        "soft_label": list(soft),
        "group_id": rows["group_id"],
        "seed": rows["seed"],
    }
    Dataset.from_dict(columns, features=synthetic_features(names)).save_to_disk(str(out))


def baseline_read(out: Path) -> np.ndarray:
    from datasets import load_from_disk

    ds = load_from_disk(str(out)).with_format("numpy")
    return np.stack(list(ds["image"]))


def csm_write(out: Path, rows: dict[str, np.ndarray], names: list[str], per_shard: int) -> None:
    g = 8
    groups = len(rows["lam"]) // g
    w = SyntheticWriter(out, names, {"group_size": g, "dataset": "digits"}, per_shard, groups)
    for i in w.pending_shards():
        rng = w.shard_groups(i)
        sl = slice(rng.start * g, rng.stop * g)
        w.write_shard(
            i,
            rows["images"][sl],
            rows["class_a"][sl],
            rows["class_b"][sl],
            rows["lam"][sl],
            rows["group_id"][sl],
            rows["seed"][sl],
        )
    w.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--groups-per-shard", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "writing.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    real = load_real("digits", image_size=16)
    names = list(real.class_names)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "src", real, args.num_images)  # the rows, made once
        t = load_synthetic_tensors(tmp / "src")
        rows = {
            "images": t.images.numpy(),
            "class_a": t.class_a.numpy(),
            "class_b": t.class_b.numpy(),
            "lam": t.lam.numpy(),
            "group_id": t.group_id.numpy(),
            "seed": np.arange(len(t.lam), dtype=np.int64),
        }
        n = len(rows["lam"])
        times: dict[str, list[float]] = {
            k: [] for k in ("csm_write", "hf_write", "verify", "csm_read", "hf_read")
        }
        for r in range(args.repeats):
            a, b = tmp / f"csm{r}", tmp / f"hf{r}"
            times["csm_write"].append(timed(csm_write, a, rows, names, args.groups_per_shard)[0])
            times["hf_write"].append(timed(baseline_write, b, rows, names)[0])
            times["verify"].append(
                timed(  # what `--resume` runs before writing anything
                    lambda a=a: SyntheticWriter(
                        a,
                        names,
                        {"group_size": 8, "dataset": "digits"},
                        args.groups_per_shard,
                        n // 8,
                        resume=True,
                    )
                )[0]
            )
            t_csm, csm_pixels = timed(lambda a=a: load_synthetic_tensors(a).images.numpy())
            t_hf, hf_pixels = timed(baseline_read, b)
            times["csm_read"].append(t_csm)
            times["hf_read"].append(t_hf)
            if not np.array_equal(csm_pixels[:, 0], hf_pixels):
                raise SystemExit("writing.py: csm and datasets read back different pixels")
            csm_bytes = sum(p.stat().st_size for p in (a / "train").glob("*.arrow"))
            hf_bytes = sum(p.stat().st_size for p in b.rglob("*.arrow"))
            shutil.rmtree(a)
            shutil.rmtree(b)
    best = {k: min(v) for k, v in times.items()}
    results = {
        "benchmark": "writing",
        "num_images": n,
        "groups_per_shard": args.groups_per_shard,
        "repeats": args.repeats,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "best_wall_s": {k: round(v, 3) for k, v in best.items()},
        "all_wall_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "csm_write_images_per_s": round(n / best["csm_write"], 1),
        "hf_write_images_per_s": round(n / best["hf_write"], 1),
        "ratio_write_csm_over_hf": round(best["csm_write"] / best["hf_write"], 3),
        "ratio_verify_over_write": round(best["verify"] / best["csm_write"], 3),
        "ratio_read_csm_over_hf": round(best["csm_read"] / best["hf_read"], 3),
        "arrow_bytes_csm": csm_bytes,
        "arrow_bytes_hf": hf_bytes,
    }
    print(
        f"write: csm {best['csm_write']:.2f}s ({results['csm_write_images_per_s']} img/s) vs "
        f"datasets {best['hf_write']:.2f}s -> ratio {results['ratio_write_csm_over_hf']}; "
        f"resume check {best['verify']:.2f}s ({results['ratio_verify_over_write']} of a write); "
        f"read: csm {best['csm_read']:.2f}s vs datasets {best['hf_read']:.2f}s -> ratio "
        f"{results['ratio_read_csm_over_hf']}; bytes {csm_bytes} vs {hf_bytes}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
