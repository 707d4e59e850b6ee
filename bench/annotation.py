"""Benchmark: cost of ``csm annotate`` against the encoder's plain batched forward.

Goal (issues 4 and 17): annotating N = 10,000 synthetic images costs <= 1.1x the encoder's plain
batched forward over the same images (the reference implementation re-encodes each group 8 times
and scans file names quadratically). Both sides run in this one process on the same device:

- ``plain``: the images, already decoded into one uint8 tensor in memory, go through
  ``encoder.encode`` in exactly the batches the annotation forms (``--batch-size`` images, starting
  afresh at each shard), with the same torch threads (``--threads``), nothing else.
- ``annotate``: :func:`csm.annotation.annotate.annotate_dataset` end to end on the synthetic dataset
  folder: verify the shards' sha256, read the Arrow shards and decode the PNGs (in
  ``--num-workers`` DataLoader worker processes, default: one per spare core), encode, project,
  squash, write the label-only annotation and, as it is the active one, the main shards
  atomically, rewrite the card and metadata (report PNG off; timed separately). Prototypes are
  cached beforehand (they are computed once per encoder and dataset; their cost is reported).

Each side is timed ``--repeats`` times, alternating (plain, then annotate with each
``--num-workers`` count; default: csm's default, then 0 to compare with decoding in the main
process), and the minimum is kept, as wall time, as this process's CPU time
(``time.process_time``, all its threads) and as the CPU time of this process plus its decoding
workers (``RUSAGE_CHILDREN``, counted once they have exited): on a machine shared with other jobs
the CPU time is the steadier measure of the main process's cost, the wall time the user-visible
one (it can only hide the decoding when a core is free for the workers). The median over the
rounds of each annotation's ratio to the plain forward timed just before it is recorded too
(``paired_ratio_*``). The PNG decoding's own cost (read + decode in this process, µs per image)
and the load average before and after are recorded, to account for the difference.
Encoders:
``clip-tiny`` (a random 2-layer CLIP vision tower built here, 64 px input, so the 16 px images
are upsampled as with a real CLIP) and ``classifier`` (a random ``csm train``-format CNN run on
16 px images, the offline choice); ``clip-b32`` (the ViT-B/32 architecture of the paper's
encoder, random weights; ~0.14 s of CPU per image, so run it on a GPU or with fewer images).
Results go to ``bench/results/annotation.json``. Like every ``csm`` command
(:func:`csm.cli.cpu_allocator_defaults`), the bench turns on PyTorch's transparent-huge-page CPU
allocations before torch is imported (``THP_MEM_ALLOC_ENABLE=0`` in the environment times
without them).

Usage::

    python bench/annotation.py --num-images 10000 --encoders clip-tiny classifier
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csm.cli import cpu_allocator_defaults  # noqa: E402

THP = cpu_allocator_defaults()  # before torch is imported, as the csm command does

import torch  # noqa: E402

from csm.annotation.annotate import (  # noqa: E402
    annotate_dataset,
    class_prototypes,
    default_num_workers,
)
from csm.annotation.encoders import load_encoder  # noqa: E402
from csm.data.real import load_real  # noqa: E402
from csm.synthetic import SyntheticWriter, load_synthetic_tensors  # noqa: E402
from csm.synthetic.storage import check_dataset, decode_images, read_table  # noqa: E402


def make_dataset(out: Path, real, num_images: int, group_size: int = 8) -> None:
    """Synthetic dataset of digit pairs blended in pixel space (the content does not matter)."""
    groups = num_images // group_size
    names = real.class_names
    w = SyntheticWriter(out, names, {"group_size": group_size, "dataset": real.spec}, 64, groups)
    imgs, labels = real.train.images, real.train.labels
    by_class = [imgs[labels == k] for k in range(len(names))]
    lam = torch.linspace(0, 1, group_size, dtype=torch.float64)
    from csm.generation.mixing import group_plan

    for i in w.pending_shards():
        plans = [group_plan(g, len(names), 0, group_size) for g in w.shard_groups(i)]
        pix, a, b, gid, seeds = [], [], [], [], []
        for p in plans:
            xa = by_class[p.class_a][p.group_id % len(by_class[p.class_a])].double()
            xb = by_class[p.class_b][p.group_id % len(by_class[p.class_b])].double()
            pix.append((lam.view(-1, 1, 1, 1) * xa + (1 - lam.view(-1, 1, 1, 1)) * xb).round())
            a += [p.class_a] * group_size
            b += [p.class_b] * group_size
            gid += [p.group_id] * group_size
            seeds += [p.seed] * group_size
        w.write_shard(
            i, torch.cat(pix).to(torch.uint8), a, b, lam.tolist() * len(plans), gid, seeds
        )
    w.finalize()


def build_clip(path: Path) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        projection_dim=64,
    )
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    return f"clip:{path}"


def build_clip_b32(path: Path) -> str:
    """The CLIP ViT-B/32 image tower's architecture (the paper's encoder), random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).save_pretrained(path)
    return f"clip:{path}"


def build_classifier(path: Path, names: list[str]) -> str:
    from csm.training.config import TrainConfig
    from csm.training.models import build_model_from_spec, model_spec
    from csm.training.runs import save_run

    torch.manual_seed(0)
    spec = model_spec("cnn", len(names), 1, 16, [0.5], [0.25])
    cfg = TrainConfig(dataset="digits", out=str(path))
    save_run(path, cfg, names, spec, model=build_model_from_spec(spec))
    return f"classifier:{path}"


def shard_batches(data: Path, batch_size: int) -> list[slice]:
    """The annotation's batches as rows of the concatenated shards: ``batch_size`` images at a
    time, starting afresh at each shard."""
    _, records = check_dataset(data)
    batches, offset = [], 0
    for record in records:
        rows = record["rows"]
        batches += [
            slice(offset + s, offset + min(s + batch_size, rows))
            for s in range(0, rows, batch_size)
        ]
        offset += rows
    return batches


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def plain_forward(encoder, images: torch.Tensor, batches: list[slice]) -> tuple[float, ...]:
    """(wall seconds, process CPU seconds, process + children CPU seconds) of the plain batched
    forward."""
    wall, cpu = time.perf_counter(), time.process_time()
    for rows in batches:
        encoder.encode(images[rows])
    cpu = time.process_time() - cpu
    return time.perf_counter() - wall, cpu, cpu


def timed_annotate(data, encoder, real, batch_size, cache, report, workers) -> tuple[float, ...]:
    """(wall seconds, process CPU seconds, process + decoding workers' CPU seconds) of one full
    annotation."""
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    annotate_dataset(
        data,
        encoder,
        real=real,
        squash_s=4.0,
        batch_size=batch_size,
        cache_dir=cache,
        report=report,
        num_workers=workers,
    )
    cpu = time.process_time() - cpu
    return time.perf_counter() - wall, cpu, cpu + _children_cpu() - children


def decode_cost(data: Path) -> float:
    """Process CPU µs per image of reading and decoding every shard in this process."""
    _, records = check_dataset(data)
    cpu, n = time.process_time(), 0
    for record in records:
        path = data / record["file"]
        n += len(decode_images(read_table(path), str(path)))
    return (time.process_time() - cpu) / max(1, n) * 1e6


def _summary(runs: list[tuple[float, ...]], plain: list[tuple[float, ...]], n: int) -> dict:
    """Minima over the repeats of one annotation setting and their ratios to the plain forward's
    minima; and the median over the rounds of the ratio to the plain forward timed just before
    (paired: on a loaded machine adjacent runs share the conditions best)."""
    aw, ac, at = (min(x[i] for x in runs) for i in range(3))
    pw, pc = min(x[0] for x in plain), min(x[1] for x in plain)
    return {
        "annotate_wall_s": round(aw, 3),
        "annotate_cpu_s": round(ac, 3),
        "annotate_cpu_with_workers_s": round(at, 3),
        "annotate_images_per_s": round(n / aw, 1),
        "ratio_wall": round(aw / pw, 3),
        "ratio_cpu": round(ac / pc, 3),
        "ratio_cpu_with_workers": round(at / pc, 3),
        "main_overhead_cpu_us_per_image": round((ac - pc) / n * 1e6, 1),
        "paired_ratio_wall_median": round(median(a[0] / p[0] for a, p in zip(runs, plain)), 3),
        "paired_ratio_cpu_median": round(median(a[1] / p[1] for a, p in zip(runs, plain)), 3),
        "all_annotate_wall_cpu_cpu_with_workers_s": [[round(v, 3) for v in x] for x in runs],
    }


def bench_encoder(enc, data, real, images, args, workers: list[int], cache: str) -> dict:
    """Plain forward and annotation (each worker count), alternating, ``args.repeats`` times."""
    batches = shard_batches(data, args.batch_size)
    t0 = time.perf_counter()
    class_prototypes(enc, real, batch_size=args.batch_size, cache_dir=cache)
    proto_s = time.perf_counter() - t0
    enc.encode(images[: args.batch_size])  # warm-up
    plain: list[tuple[float, ...]] = []
    annot: dict[int, list[tuple[float, ...]]] = {w: [] for w in workers}
    for _ in range(args.repeats):
        plain.append(plain_forward(enc, images, batches))
        for w in workers:
            annot[w].append(timed_annotate(data, enc, real, args.batch_size, cache, False, w))
    with_report = timed_annotate(data, enc, real, args.batch_size, cache, True, workers[0])
    pw, pc = min(x[0] for x in plain), min(x[1] for x in plain)
    n = len(images)
    by_workers = {w: _summary(annot[w], plain, n) for w in workers}
    main = by_workers[workers[0]]
    return {
        "device": str(enc.device),
        "images": n,
        "num_workers": workers[0],
        "plain_forward_wall_s": round(pw, 3),
        "plain_forward_cpu_s": round(pc, 3),
        "plain_images_per_s": round(n / pw, 1),
        **main,
        "annotate_with_report_wall_s": round(with_report[0], 3),
        "prototypes_wall_s": round(proto_s, 3),
        "goal": 1.1,
        "pass_wall": bool(main["ratio_wall"] <= 1.1),
        "pass_cpu": bool(main["ratio_cpu"] <= 1.1),
        "all_plain_wall_cpu_s": [[round(a, 3), round(b, 3)] for a, b, _ in plain],
        "by_num_workers": {str(w): by_workers[w] for w in workers},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--encoders", nargs="+", default=["clip-tiny", "classifier"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-wait)")
    parser.add_argument(
        "--num-workers",
        type=int,
        nargs="+",
        default=None,
        help="decoding processes, the first one reported (default: csm's default, then 0)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "annotation.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    workers = args.num_workers or list(dict.fromkeys([default_num_workers(), 0]))
    real = load_real("digits", image_size=16)
    results = {
        "benchmark": "annotation",
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_workers": workers,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "cpu_huge_pages": THP,
        "cpu_count": os.cpu_count(),
        "encoders": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "syn"
        make_dataset(data, real, args.num_images)
        images = load_synthetic_tensors(data).images
        results["decode_cpu_us_per_image"] = round(min(decode_cost(data) for _ in range(3)), 1)
        builders = {
            "clip-tiny": lambda: build_clip(tmp / "clip"),
            "clip-b32": lambda: build_clip_b32(tmp / "clip-b32"),
            "classifier": lambda: build_classifier(tmp / "run", real.class_names),
        }
        for name in args.encoders:
            enc = load_encoder(builders[name](), args.device)
            r = bench_encoder(enc, data, real, images, args, workers, str(tmp / f"cache-{name}"))
            results["encoders"][name] = r
            print(
                f"{name}: plain {r['plain_forward_wall_s']:.2f}s wall / "
                f"{r['plain_forward_cpu_s']:.2f}s cpu; prototypes {r['prototypes_wall_s']:.2f}s; "
                f"annotate with report {r['annotate_with_report_wall_s']:.2f}s wall"
            )
            for w, a in r["by_num_workers"].items():
                print(
                    f"  annotate, {w} decoding workers: {a['annotate_wall_s']:.2f}s wall / "
                    f"{a['annotate_cpu_s']:.2f}s cpu / {a['annotate_cpu_with_workers_s']:.2f}s cpu "
                    f"with workers; ratio wall {a['ratio_wall']:.3f}, cpu {a['ratio_cpu']:.3f}, "
                    f"cpu with workers {a['ratio_cpu_with_workers']:.3f} (goal <= 1.1); paired "
                    f"median ratio wall {a['paired_ratio_wall_median']:.3f}, cpu "
                    f"{a['paired_ratio_cpu_median']:.3f}"
                )
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(
        f"decode {results['decode_cpu_us_per_image']} us/image in-process; load average "
        f"{results['load_average_before']} -> {results['load_average_after']}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
