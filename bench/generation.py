"""Benchmark: cost of semantic mixing, and quality of a trained digits generator.

Speed (always): images/s of class-mixed sampling (``mix_mode="embedding"``, the method) against
plain class-conditional sampling with integer labels, same model, steps, batch and scheduler, in
one process. The two are interleaved ``--repeats`` times and the medians compared, so load from
other processes hits both alike. Goal: ratio >= 0.95 (mixing embedding rows should be free).
The two-forward ``mix_mode="eps"`` variant is timed too, for reference.

Quality (``--quality``, needs ``--model`` trained on ``--dataset``): a logistic-regression
classifier fitted on the real train split (pixels in [0, 1]) judges pure-class samples
(λ = 1 endpoints); the share it recognises is reported next to its accuracy on real test images.
A λ-sweep PNG (one row per class pair, λ from 0 to 1, shared noise per row) is written with the
classifier's mean probability of class ``a`` at each λ.

Usage::

    python bench/generation.py --model .cache/diffusion-digits-small --quality \
        --sweep-png eval/results/lambda_sweep_digits.png

Writes ``bench/results/generation.json`` (and ``generation_quality_g{guidance}.json`` with
``--quality``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm.generation.fit import PRESETS, image_grid, save_png  # noqa: E402
from csm.generation.mixing import lambdas  # noqa: E402
from csm.generation.pipeline import SCHEDULERS, CSMMixingPipeline, build_unet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _random_small_pipe(num_classes: int = 10, image_size: int = 16) -> CSMMixingPipeline:
    from diffusers import DDIMScheduler

    p = PRESETS["small"]
    torch.manual_seed(0)
    unet = build_unet(
        num_classes,
        image_size,
        1,
        p.block_out_channels,
        p.layers_per_block,
        p.attention,
        p.norm_num_groups,
    )
    return CSMMixingPipeline(unet=unet.eval(), scheduler=DDIMScheduler(), class_names=None)


def _time(fn, n_images: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t0)


def bench_speed(pipe, batch: int, steps: int, repeats: int, guidance: float) -> dict:
    k = pipe.num_classes
    a = [i % k for i in range(batch)]
    b = [(i + 1) % k for i in range(batch)]
    lam = [lambdas(8)[i % 8] for i in range(batch)]

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(batch)]

    kw = dict(num_inference_steps=steps, guidance_scale=guidance)
    runs = {
        "plain": lambda: pipe(a, generator=gens(), **kw),
        "mixed": lambda: pipe(a, b, lam, generator=gens(), **kw),
        "mixed_eps": lambda: pipe(a, b, lam, generator=gens(), mix_mode="eps", **kw),
    }
    runs["plain"]()  # warm-up
    rates = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            rates[name].append(_time(fn, batch))
    med = {name: statistics.median(v) for name, v in rates.items()}
    return {
        "images_per_s": {n: round(v, 3) for n, v in med.items()},
        "all_runs_images_per_s": {n: [round(x, 3) for x in v] for n, v in rates.items()},
        "ratio_mixed_over_plain": round(med["mixed"] / med["plain"], 4),
        "ratio_eps_over_plain": round(med["mixed_eps"] / med["plain"], 4),
        "goal_ratio": 0.95,
    }


def bench_quality(
    pipe,
    dataset: str,
    per_class: int,
    steps: int,
    guidance: float,
    sweep_png: str | None,
    seed: int,
) -> dict:
    from sklearn.linear_model import LogisticRegression

    from csm.data.real import load_real

    h = pipe.unet.config.sample_size
    data = load_real(dataset, image_size=h)
    pipe.check_classes(data.class_names)
    k = pipe.num_classes

    def feats(x: torch.Tensor) -> np.ndarray:
        return x.reshape(len(x), -1).float().numpy()

    xtr = feats(data.train.images.float() / 255)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(xtr, data.train.labels.numpy())
    real_acc = float(clf.score(feats(data.test.images.float() / 255), data.test.labels.numpy()))

    labels = [c for c in range(k) for _ in range(per_class)]
    gens = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(len(labels))]
    t0 = time.perf_counter()
    imgs = []
    for s in range(0, len(labels), 50):
        imgs.append(
            pipe(
                labels[s : s + 50],
                generator=gens[s : s + 50],
                num_inference_steps=steps,
                guidance_scale=guidance,
            ).images
        )
    sample_s = time.perf_counter() - t0
    pred = clf.predict(feats(torch.cat(imgs)))
    y = np.array(labels)
    per_class_acc = [float((pred[y == c] == c).mean()) for c in range(k)]
    out = {
        "dataset": dataset,
        "classifier": "sklearn LogisticRegression(C=1, max_iter=2000) on real train pixels",
        "classifier_real_test_accuracy": round(real_acc, 4),
        "samples_per_class": per_class,
        "steps": steps,
        "guidance_scale": guidance,
        "scheduler": type(pipe.scheduler).__name__,
        "pure_class_recognised": round(float((pred == y).mean()), 4),
        "per_class_recognised": [round(v, 3) for v in per_class_acc],
        "goal": 0.85,
        "sampling_seconds": round(sample_s, 1),
    }
    if sweep_png:
        pairs = [(1, 7), (3, 8), (0, 6), (4, 9), (2, 5)] if k == 10 else [(0, 1)]
        g = 8
        lam = lambdas(g)
        rows, probs = [], []
        for i, (a, b) in enumerate(pairs):
            # one shared initial noise per row (a group), as in generation
            gs = [torch.Generator().manual_seed(seed + 17 * i) for _ in range(g)]
            x = pipe(
                [a] * g,
                [b] * g,
                lam,
                generator=gs,
                num_inference_steps=steps,
                guidance_scale=guidance,
            ).images
            rows.append(x)
            probs.append([round(float(v), 3) for v in clf.predict_proba(feats(x))[:, a]])
        save_png(image_grid(torch.cat(rows), nrow=g), sweep_png, scale=max(1, 64 // h))
        out["sweep_png"] = str(sweep_png)
        out["sweep_pairs_a_b"] = pairs
        out["sweep_lambdas"] = [round(v, 4) for v in lam]
        out["sweep_prob_class_a"] = probs
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="pipeline folder (default: random small-preset UNet)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on busy CPU)")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--quality-steps", type=int, default=25)
    ap.add_argument("--quality-guidance", type=float, default=2.0)
    ap.add_argument("--sweep-png", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = CSMMixingPipeline.from_pretrained(args.model) if args.model else _random_small_pipe()
    pipe.set_progress_bar_config(disable=True)
    pipe.set_scheduler(args.scheduler)
    env = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "command": "python bench/generation.py " + " ".join(argv or sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.skip_speed:
        res = {
            "model": args.model or "random small-preset UNet (10 classes, 16 px)",
            "batch": args.batch,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "scheduler": args.scheduler,
            **bench_speed(pipe, args.batch, args.steps, args.repeats, args.guidance),
            "env": env,
        }
        (RESULTS / "generation.json").write_text(json.dumps(res, indent=1))
        print(
            json.dumps(
                {
                    k: res[k]
                    for k in ("images_per_s", "ratio_mixed_over_plain", "ratio_eps_over_plain")
                }
            )
        )
    if args.quality:
        if not args.model:
            ap.error("--quality needs --model")
        pipe.set_scheduler("ddim")
        q = bench_quality(
            pipe,
            args.dataset,
            args.per_class,
            args.quality_steps,
            args.quality_guidance,
            args.sweep_png,
            args.seed,
        )
        q["env"] = env
        name = f"generation_quality_g{args.quality_guidance:g}.json"
        (RESULTS / name).write_text(json.dumps(q, indent=1))
        print(json.dumps({k: v for k, v in q.items() if k != "env"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
