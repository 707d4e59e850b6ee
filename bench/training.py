"""Training throughput of every method relative to cross-entropy (same model, same batch).

Times the trainer's own step (:func:`csm.training.trainer.training_step`) with the trainer's
augmentation (:class:`csm.data.augment.Augment`) and, for ``csm``, the trainer's CSM batch sampler
(:class:`csm.training.sampler.SyntheticSampler`), on random tensors, in ONE process, interleaving
methods round-robin so machine load hits them alike; the median over rounds is reported. On the CPU
the clock is this process's CPU time (robust to other processes on a shared machine); on CUDA it is
synchronised wall time.

Two figures per method:

- ``real_images_per_s``: real training images consumed per second (one step = ``batch`` real
  images, whatever the method adds);
- ``forwarded_images_per_s``: every image that goes through the network per second (counted by
  a hook on the model's normalisation layer, not assumed): CSM forwards ``batch`` real +
  ``2 * batch`` synthetic images, RegMixup/RankMixup clean + mixed, RefCal stage 1 two views.

The goal of issue 5 is ``csm >= 0.9 x ce`` per (forwarded) image: CSM must not be slower per
image than plain training; it necessarily sees 3x the images per real batch. ``ce_batch256`` /
``ce_batch384`` (``--ce-reference``) time plain CE with 2x / 3x the batch, which separates the
cost of CSM's extra code (sampler, synthetic augmentation, second forward) from the hardware's
per-image cost at a larger forward batch.

On the CPU the steps run inside :class:`csm.training.trainer.CPUHeapReuse`, as ``csm train`` runs
them: without it glibc gives every tensor of 32 MiB or more fresh ``mmap`` pages that the kernel
zero-fills on each step, so the per-image cost grows with the batch (page faults, counted in the
process CPU time). ``--no-heap-reuse`` times the steps without it. Like the ``csm`` command
(:func:`csm.cli.cpu_allocator_defaults`) the bench turns on PyTorch's transparent-huge-page CPU
allocations before torch is imported; ``THP_MEM_ALLOC_ENABLE=0`` in the environment times
without them. On the CPU each row also gives
the user and system CPU time and the minor page faults per forwarded image (``resource.getrusage``).

``--gpu-recipe`` (CUDA only) times the paper's CIFAR ResNet-50 step (batch 128, 32x32) for a
few hundred steps with and without bf16 autocast and channels_last.

Usage:
    python bench/training.py                       # all methods, small CNN, CPU
    python bench/training.py --model resnet18 --steps 10
    python bench/training.py --gpu-recipe --steps 300   # on a CUDA machine
Results go to ``bench/results/training-<device>.json`` (and ``training-gpu-recipe.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

from csm.cli import cpu_allocator_defaults

THP = cpu_allocator_defaults()  # before torch is imported, as the csm command does

import torch  # noqa: E402

from csm.config import resolve_config  # noqa: E402
from csm.data.augment import Augment  # noqa: E402
from csm.training.config import TrainConfig  # noqa: E402
from csm.training.methods import METHODS, Batch, StepState, build_method  # noqa: E402
from csm.training.models import build_model  # noqa: E402
from csm.training.optim import make_optimizer  # noqa: E402
from csm.training.sampler import SyntheticSampler  # noqa: E402
from csm.training.sharding import augment_rows  # noqa: E402
from csm.training.trainer import CPUHeapReuse, StepModule, training_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _synthetic(
    num_classes: int, group_size: int, image_shape: tuple[int, int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, SyntheticSampler]:
    pairs = [(a, b) for a in range(num_classes) for b in range(a + 1, num_classes)]
    gid = torch.arange(len(pairs)).repeat_interleave(group_size)
    lam = torch.linspace(0, 1, group_size).repeat(len(pairs))
    a = torch.tensor([p[0] for p in pairs]).repeat_interleave(group_size)
    b = torch.tensor([p[1] for p in pairs]).repeat_interleave(group_size)
    soft = torch.zeros(gid.numel(), num_classes)
    soft[torch.arange(gid.numel()), a] = lam
    soft[torch.arange(gid.numel()), b] += 1 - lam
    images = torch.randint(
        0, 256, (gid.numel(), *image_shape), dtype=torch.uint8, generator=generator
    )
    return images, soft, SyntheticSampler(gid, lam, a, b, num_classes)


class _Counter:
    """Counts images entering the model (pre-hook on its normalisation layer)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        model.normalize.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.n += int(args[0].shape[0])


class _Runner:
    """One method's model, optimiser and data, ready to time steps."""

    def __init__(
        self, name: str, stage: int, args: argparse.Namespace, device: torch.device
    ) -> None:
        self.name, self.stage, self.device, self.args = name, stage, device, args
        g = torch.Generator().manual_seed(0)
        shape = (args.channels, args.image_size, args.image_size)
        self.images = torch.randint(
            0, 256, (args.batch_size * 4, *shape), dtype=torch.uint8, generator=g
        ).to(device)
        self.labels = torch.randint(0, args.num_classes, (args.batch_size * 4,), generator=g).to(
            device
        )
        syn_images, soft, self.sampler = _synthetic(args.num_classes, 8, shape, g)
        self.syn_images, self.syn_soft = syn_images.to(device), soft.to(device)
        torch.manual_seed(0)
        self.model = build_model(
            args.model,
            args.num_classes,
            args.channels,
            args.image_size,
            [0.5] * args.channels,
            [0.25] * args.channels,
        ).to(device)
        self.channels_last = args.channels_last and device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.counter = _Counter(self.model)
        self.method = build_method(name, {})
        plan = self.method.stages(2)  # 2 epochs: refcal gets one per stage
        self.plan = plan[stage - 1]  # the trainer's stage: parameters, loss, augmentation
        self.params = self.plan.parameters(self.model)
        self.step_module = StepModule(self.model, self.method.all_modules(self.model))
        self.step_module.loss_fn = self.plan.loss
        cfg = resolve_config(TrainConfig, overrides={"lr": 0.01})
        self.optimizer = make_optimizer(cfg, self.params)
        self.augment = Augment(padding=4, hflip=True)
        self.g = torch.Generator().manual_seed(1)
        self.step_i = 0
        self.autocast = args.bf16 and device.type == "cuda"

    def step(self) -> None:
        b = self.args.batch_size
        start = (self.step_i * b) % self.images.shape[0]
        idx = torch.arange(start, start + b, device=self.device) % self.images.shape[0]
        raw = self.images[idx]
        y = self.labels[idx]
        pretrain = not self.plan.augment  # the stage draws its own views (refcal stage 1)
        x = (raw if pretrain else self.augment(raw, self.g)).float().div_(255)
        syn_x = syn_y = None
        if self.method.needs_synthetic:
            sidx = self.sampler.sample(y, self.g).to(self.device)
            syn_x = self.augment(self.syn_images[sidx], self.g).float().div_(255)
            syn_y = self.syn_soft[sidx]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            if syn_x is not None:
                syn_x = syn_x.contiguous(memory_format=torch.channels_last)
        batch = Batch(x, y, idx, syn_x, syn_y)
        aug = self._views if pretrain else None
        state = StepState(0, self.step_i, self.stage, self.g, aug)
        training_step(
            self.step_module,
            self.optimizer,
            self.params,
            batch,
            state,
            grad_clip=2.0,
            autocast=self.autocast,
        )
        self.step_i += 1

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        """The trainer's view augmentation for a stage that draws its own (refcal stage 1)."""
        n = x.shape[0]
        return augment_rows(self.augment, x, n, slice(0, n), self.g)

    def time(self, steps: int) -> tuple[float, int, tuple[float, float, int]]:
        """Seconds for ``steps`` steps, the number of forwarded images and the process's
        (user CPU s, system CPU s, minor page faults) over them (``resource.getrusage``).

        On CUDA: wall-clock seconds (synchronised). On the CPU: this process's CPU seconds
        (``time.process_time``, user + system), which other processes sharing the machine do not
        inflate; with ``--threads 1`` that is the compute cost of the step.
        """
        self.counter.n = 0
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        _sync(self.device)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), clock()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        t1, r1 = clock(), resource.getrusage(resource.RUSAGE_SELF)
        usage = (r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)
        return t1 - t0, self.counter.n, usage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _row(samples: list, batch: int, steps: int, device: torch.device) -> dict:
    """One method's figures from its rounds ``(seconds, forwarded images, usage)``: medians."""
    secs = statistics.median(t for t, _, _ in samples)
    forwarded = samples[0][1] / steps
    row = {
        "real_images_per_s": batch * steps / secs,
        "forwarded_images_per_s": forwarded * steps / secs,
        "forwarded_per_step": forwarded,
        "step_ms": 1000 * secs / steps,
    }
    if device.type == "cpu":  # where the CPU time of one forwarded image goes
        n = samples[0][1]
        row["user_us_per_image"] = 1e6 * statistics.median(u[0] for _, _, u in samples) / n
        row["system_us_per_image"] = 1e6 * statistics.median(u[1] for _, _, u in samples) / n
        row["minor_faults_per_image"] = statistics.median(u[2] for _, _, u in samples) / n
    return row


def bench_methods(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    names = list(METHODS) if args.methods == ["all"] else args.methods
    entries = [(n, 1) for n in names]
    if "refcal" in names:  # stage 1 (SupCon, two views) and stage 2 (head on frozen encoder)
        i = entries.index(("refcal", 1))
        entries[i + 1 : i + 1] = [("refcal", 2)]
    runners = {(n, s): _Runner(n, s, args, device) for n, s in entries}
    for mult in args.ce_reference:  # ce with a larger forward batch: per-image cost vs batch
        ref = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size * mult})
        runners[(f"ce_batch{ref.batch_size}", 1)] = _Runner("ce", 1, ref, device)
    heap = CPUHeapReuse(device.type == "cpu" and args.heap_reuse)  # as `csm train` on the CPU
    with heap:
        heap_reused = heap.active
        for r in runners.values():  # warm-up (allocations, autocast caches)
            for _ in range(args.warmup):
                r.step()
        times: dict[tuple[str, int], list] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for key, r in runners.items():
                times[key].append(r.time(args.steps))
    results = {}
    for (name, stage), samples in times.items():
        label = name if name != "refcal" else f"refcal_stage{stage}"
        batch = runners[(name, stage)].args.batch_size
        results[label] = _row(samples, batch, args.steps, device)
    ce = results["ce"]
    for row in results.values():
        row["real_vs_ce"] = row["real_images_per_s"] / ce["real_images_per_s"]
        row["forwarded_vs_ce"] = row["forwarded_images_per_s"] / ce["forwarded_images_per_s"]
    out = {
        "benchmark": "training throughput per method relative to ce",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": "wall (cuda synchronised)" if device.type == "cuda" else "process CPU time",
        "model": args.model,
        "image_shape": [args.channels, args.image_size, args.image_size],
        "num_classes": args.num_classes,
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "bf16": args.bf16 and device.type == "cuda",
        "channels_last": args.channels_last and device.type == "cuda",
        "cpu_heap_reuse": heap_reused,
        "cpu_huge_pages": THP,
        "results": results,
    }
    if "csm" in results:
        ratio = results["csm"]["forwarded_vs_ce"]
        out["goal"] = {"csm_forwarded_vs_ce": ratio, "target": 0.9, "met": ratio >= 0.9}
    return out


def bench_gpu_recipe(args: argparse.Namespace) -> dict:
    """CIFAR ResNet-50 recipe step with/without bf16 and channels_last (CUDA only)."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu-recipe: no CUDA device here; run it on a GPU machine")
    device = torch.device("cuda")
    rows = {}
    for bf16 in (False, True):
        for cl in (False, True):
            ns = argparse.Namespace(
                **{
                    **vars(args),
                    "model": "resnet50",
                    "image_size": 32,
                    "channels": 3,
                    "num_classes": 10,
                    "batch_size": 128,
                    "bf16": bf16,
                    "channels_last": cl,
                }
            )
            for method in ("ce", "csm"):
                r = _Runner(method, 1, ns, device)
                for _ in range(args.warmup):
                    r.step()
                secs, n, _ = r.time(args.steps)
                rows[f"{method} bf16={bf16} channels_last={cl}"] = {
                    "real_images_per_s": 128 * args.steps / secs,
                    "forwarded_images_per_s": n / secs,
                    "step_ms": 1000 * secs / args.steps,
                }
    return {
        "benchmark": "CIFAR ResNet-50 recipe step on random tensors",
        "device_name": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "steps": args.steps,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["all"], help="methods (default: all)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable on shared CPUs)")
    p.add_argument("--cpu", action="store_true", help="time on the CPU even if CUDA exists")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument(
        "--no-heap-reuse",
        dest="heap_reuse",
        action="store_false",
        help="CPU: time without csm.training.trainer.CPUHeapReuse (glibc mmaps >= 32 MiB blocks)",
    )
    p.add_argument("--gpu-recipe", action="store_true", help="CIFAR ResNet-50 bf16/CL sweep")
    p.add_argument(
        "--ce-reference",
        type=int,
        nargs="*",
        default=[2, 3],
        help="also time ce at these multiples of the batch (per-image cost vs batch)",
    )
    p.add_argument("--out", default=None, help="JSON path (default under bench/results/)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu_recipe:
        result = bench_gpu_recipe(args)
        path = Path(args.out or RESULTS / "training-gpu-recipe.json")
    else:
        result = bench_methods(args)
        path = Path(args.out or RESULTS / f"training-{result['device']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    for name, row in result["results"].items():
        extra = (
            f"  real {row['real_vs_ce']:.2f}x  per image {row['forwarded_vs_ce']:.2f}x ce"
            if "real_vs_ce" in row
            else ""
        )
        if "minor_faults_per_image" in row:
            extra += (
                f"  per image: user {row['user_us_per_image']:.0f} us, system "
                f"{row['system_us_per_image']:.0f} us, {row['minor_faults_per_image']:.0f} faults"
            )
        print(
            f"{name:16s} {row['real_images_per_s']:7.1f} real img/s "
            f"{row['forwarded_images_per_s']:7.1f} fwd img/s{extra}"
        )
    if "goal" in result:
        g = result["goal"]
        print(
            f"goal csm >= 0.9x ce per image: {g['csm_forwarded_vs_ce']:.2f}x "
            f"({'met' if g['met'] else 'NOT met'})"
        )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
