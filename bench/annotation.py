"""Benchmark: cost of ``csm annotate`` against the encoder's plain batched forward.

Goal (issue 4): annotating N = 10,000 synthetic images costs <= 1.1x the encoder's plain batched
forward over the same images (the reference implementation re-encodes each group 8 times and
scans file names quadratically). Both sides run in this one process on the same device:

- ``plain``: the images, already decoded into one uint8 tensor in memory, go through
  ``encoder.encode`` in batches (preprocessing + forward), nothing else.
- ``annotate``: :func:`csm.annotation.annotate.annotate_dataset` end to end on the synthetic dataset
folder:
  read the Arrow shards, decode the PNGs, encode, project, squash, write the label-only
  annotation and, as it is the active one, the main shards atomically, rewrite the card and
  metadata (report PNG off; timed separately). Prototypes are
  cached beforehand (they are computed once per encoder and dataset; their cost is reported).

Each side is timed ``--repeats`` times, alternating, and the minimum is kept, both as wall time
and as process CPU time (``time.process_time``, all threads of this process): on a machine shared
with other jobs the CPU time is the stable measure of cost, the wall time the user-visible one.
Encoders:
``clip-tiny`` (a random 2-layer CLIP vision tower built here, 64 px input, so the 16 px images
are upsampled as with a real CLIP) and ``classifier`` (a random ``csm train``-format CNN run on
16 px images, the offline choice); ``clip-b32`` (the ViT-B/32 architecture of the paper's
encoder, random weights; ~0.14 s of CPU per image, so run it on a GPU or with fewer images).
Results go to ``bench/results/annotation.json``.

Usage::

    python bench/annotation.py --num-images 10000 --encoders clip-tiny classifier
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csm.annotation.annotate import annotate_dataset, class_prototypes  # noqa: E402
from csm.annotation.encoders import load_encoder  # noqa: E402
from csm.data.real import load_real  # noqa: E402
from csm.synthetic import SyntheticWriter, load_synthetic_tensors  # noqa: E402


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


def plain_forward(encoder, images: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the plain batched forward."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch_size):
        encoder.encode(images[i : i + batch_size])
    return time.perf_counter() - wall, time.process_time() - cpu


def timed_annotate(data, encoder, real, batch_size, cache, report) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one full annotation."""
    wall, cpu = time.perf_counter(), time.process_time()
    annotate_dataset(
        data,
        encoder,
        real=real,
        squash_s=4.0,
        batch_size=batch_size,
        cache_dir=cache,
        report=report,
    )
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--encoders", nargs="+", default=["clip-tiny", "classifier"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-wait)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "annotation.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    real = load_real("digits", image_size=16)
    results = {
        "benchmark": "annotation",
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "encoders": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "syn"
        make_dataset(data, real, args.num_images)
        images = load_synthetic_tensors(data).images
        n = len(images)
        for name in args.encoders:
            builders = {
                "clip-tiny": lambda: build_clip(tmp / "clip"),
                "clip-b32": lambda: build_clip_b32(tmp / "clip-b32"),
                "classifier": lambda: build_classifier(tmp / "run", real.class_names),
            }
            spec = builders[name]()
            enc = load_encoder(spec, args.device)
            cache = str(tmp / "cache")
            t0 = time.perf_counter()
            class_prototypes(enc, real, batch_size=args.batch_size, cache_dir=cache)
            proto_s = time.perf_counter() - t0
            enc.encode(images[: args.batch_size])  # warm-up
            plain, annot = [], []
            for _ in range(args.repeats):
                plain.append(plain_forward(enc, images, args.batch_size))
                annot.append(timed_annotate(data, enc, real, args.batch_size, cache, False))
            with_report = timed_annotate(data, enc, real, args.batch_size, cache, True)
            pw, pc = min(x[0] for x in plain), min(x[1] for x in plain)
            aw, ac = min(x[0] for x in annot), min(x[1] for x in annot)
            ratio_wall, ratio_cpu = aw / pw, ac / pc
            results["encoders"][name] = {
                "device": str(enc.device),
                "images": n,
                "plain_forward_wall_s": round(pw, 3),
                "annotate_wall_s": round(aw, 3),
                "plain_forward_cpu_s": round(pc, 3),
                "annotate_cpu_s": round(ac, 3),
                "annotate_with_report_wall_s": round(with_report[0], 3),
                "prototypes_wall_s": round(proto_s, 3),
                "plain_images_per_s": round(n / pw, 1),
                "annotate_images_per_s": round(n / aw, 1),
                "ratio_wall": round(ratio_wall, 3),
                "ratio_cpu": round(ratio_cpu, 3),
                "goal": 1.1,
                "pass_wall": bool(ratio_wall <= 1.1),
                "pass_cpu": bool(ratio_cpu <= 1.1),
                "all_plain_wall_cpu_s": [[round(a, 3), round(b, 3)] for a, b in plain],
                "all_annotate_wall_cpu_s": [[round(a, 3), round(b, 3)] for a, b in annot],
            }
            print(
                f"{name}: plain {pw:.2f}s wall / {pc:.2f}s cpu, annotate {aw:.2f}s wall / "
                f"{ac:.2f}s cpu (with report {with_report[0]:.2f}s wall); ratio wall "
                f"{ratio_wall:.3f}, cpu {ratio_cpu:.3f} (goal <= 1.1); prototypes {proto_s:.2f}s"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
