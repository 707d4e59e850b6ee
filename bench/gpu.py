"""GPU benchmark (issue 17 item 5): the four throughput figures of the paper-scale pipeline.

One command, on a CUDA machine, sized to finish in under 8 minutes on one H100/H200-class GPU:

1. class-mixed generation img/s: the ``base`` preset UNet (random weights) at 32 px, 3 channels,
   10 classes, 25 DDIM steps, bf16 autocast, guidance 2.0, semantic mixing (``CSMMixingPipeline``);
2. CIFAR ResNet-50 training img/s, bf16 and channels_last, ``ce`` and ``csm`` (the step of
   ``bench/training.py``: batch 128 real images, csm adds 256 synthetic ones);
3. annotation img/s of a CLIP ViT-B/32-sized image tower (random weights) through csm's encoder
   (``load_encoder("clip:...")``, the forward annotation runs per image);
4. ``compute_all`` on N x K logits that live on the GPU (csm's metrics run on the CPU, so the
   figure includes the device-to-host copy) against torchmetrics' ECE on the GPU.

Usage::

    python bench/gpu.py                # on the GPU machine; bench/results/gpu.json
    python bench/gpu.py --smoke        # tiny sizes, any device (proves the code runs)

Dependencies: torch, diffusers, transformers, torchmetrics (all in ``.[dev]``); install with
``pip install -e ".[dev]"`` on a fresh machine. Results are written atomically as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from csm.utils import atomic_write_text  # noqa: E402

logger = logging.getLogger("bench.gpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_generation(device: torch.device, preset: str, batch: int, steps: int, reps: int) -> dict:
    """Images per second of class-mixed DDIM sampling with the preset's UNet (random weights)."""
    from diffusers import DDIMScheduler

    from csm.generation.fit import PRESETS
    from csm.generation.mixing import lambdas
    from csm.generation.pipeline import CSMMixingPipeline, build_unet

    p = PRESETS[preset]
    torch.manual_seed(0)
    unet = build_unet(
        10, 32, 3, p.block_out_channels, p.layers_per_block, p.attention, p.norm_num_groups
    )
    pipe = CSMMixingPipeline(unet=unet.eval(), scheduler=DDIMScheduler(), class_names=None)
    pipe.to(device)
    group = 8
    a = [i % 10 for i in range(batch)]
    b = [(i + 1) % 10 for i in range(batch)]
    lam = lambdas(group) * (batch // group) + lambdas(group)[: batch % group]

    def run() -> None:
        gens = [torch.Generator(device="cpu").manual_seed(i // group) for i in range(batch)]
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.no_grad():
            pipe(
                class_a=a,
                class_b=b,
                lam=lam,
                generator=gens,
                num_inference_steps=steps,
                guidance_scale=2.0,
            )
        _sync(device)

    run()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {
        "preset": preset,
        "image_size": 32,
        "steps": steps,
        "batch": batch,
        "bf16": True,
        "images_per_s": batch / min(times),
        "seconds": times,
    }


def bench_training(device: torch.device, model: str, steps: int, batch: int) -> dict:
    """Real images per second of one training step, ce and csm, bf16 + channels_last."""
    from training import _Runner  # bench/training.py

    ns = argparse.Namespace(
        model=model,
        image_size=32,
        channels=3,
        num_classes=10,
        batch_size=batch,
        bf16=True,
        channels_last=True,
        threads=1,
        warmup=1,
        steps=steps,
    )
    rows = {}
    for method in ("ce", "csm"):
        r = _Runner(method, 1, ns, device)
        r.step()
        secs, n = r.time(steps)
        rows[method] = {
            "real_images_per_s": batch * steps / secs,
            "forwarded_images_per_s": n / secs,
            "step_ms": 1000 * secs / steps,
        }
    rows["csm_vs_ce_per_image"] = (
        rows["csm"]["forwarded_images_per_s"] / rows["ce"]["forwarded_images_per_s"]
    )
    return {
        "model": model,
        "batch": batch,
        "steps": steps,
        "bf16": True,
        "channels_last": True,
        "results": rows,
    }


def bench_annotation(device: torch.device, num_images: int, batch: int, size: str) -> dict:
    """Encoder images per second of a CLIP image tower (random weights) inside csm's encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from csm.annotation.encoders import load_encoder

    cfg = CLIPVisionConfig(projection_dim=512)  # ViT-B/32 defaults: 224 px, 12 layers, 768
    if size == "tiny":
        cfg = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        )
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(cfg).save_pretrained(tmp)
        enc = load_encoder(f"clip:{tmp}", device=str(device))
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8, generator=g)
        enc.encode(images[:batch])
        _sync(device)
        t = time.perf_counter()
        for i in range(0, num_images, batch):
            enc.encode(images[i : i + batch])
        _sync(device)
        secs = time.perf_counter() - t
    return {
        "encoder": f"CLIP vision tower ({size})",
        "num_images": num_images,
        "batch": batch,
        "images_per_s": num_images / secs,
    }


def bench_metrics(device: torch.device, n: int, k: int, exclude: list[str]) -> dict:
    """``compute_all`` on GPU-resident logits (includes the copy to the host) vs torchmetrics'
    ECE on the same device."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    from csm.calibration.metrics import compute_all

    g = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, k, (n,), generator=g, device=device)
    logits = torch.randn(n, k, generator=g, device=device).mul_(3.0)
    logits[torch.arange(n, device=device), labels] += 4.0
    multiclass_calibration_error(logits[:1000], labels[:1000], k, n_bins=15)
    _sync(device)
    t = time.perf_counter()
    ref = float(multiclass_calibration_error(logits, labels, k, n_bins=15, norm="l1"))
    _sync(device)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    out = compute_all(logits, labels, exclude=exclude)
    t_all = time.perf_counter() - t
    return {
        "n": n,
        "k": k,
        "exclude": exclude,
        "torchmetrics_ece_s": t_ref,
        "compute_all_s": t_all,
        "ratio": t_all / t_ref,
        "ece_torchmetrics": ref,
        "ece_csm": out["cal/ECE"],
        "metrics": out,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every part and write the JSON record; returns it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device")
    ap.add_argument("--metrics-n", type=int, default=10_000_000)
    ap.add_argument("--metrics-k", type=int, default=1000)
    ap.add_argument("--metrics-exclude", nargs="*", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench/gpu.py: no CUDA device here; run it on a GPU machine or --smoke")
    torch.backends.cudnn.benchmark = True
    smoke = args.smoke
    parts = {
        "generation": lambda: bench_generation(
            device,
            "tiny" if smoke else "base",
            8 if smoke else 256,
            2 if smoke else 25,
            1 if smoke else 3,
        ),
        "training_resnet50": lambda: bench_training(
            device, "cnn" if smoke else "resnet50", 2 if smoke else 50, 8 if smoke else 128
        ),
        "annotation_clip_b32": lambda: bench_annotation(
            device, 32 if smoke else 20_000, 16 if smoke else 500, "tiny" if smoke else "ViT-B/32"
        ),
        "metrics": lambda: bench_metrics(
            device,
            2000 if smoke else args.metrics_n,
            10 if smoke else args.metrics_k,
            args.metrics_exclude,
        ),
    }
    result = {
        "benchmark": "gpu",
        "smoke": smoke,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": " ".join(["python bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, fn in parts.items():
        t = time.perf_counter()
        result[name] = fn()
        result[name]["wall_s"] = time.perf_counter() - t
        logger.info("%s: %s", name, {k: v for k, v in result[name].items() if k != "metrics"})
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")  # partial results survive
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
