"""Peak memory of ``csm train --method csm`` against the size of the synthetic dataset.

Builds two synthetic datasets with the real csm writer (:class:`csm.synthetic.SyntheticWriter`,
digit pairs blended in pixel space at the real images' size, G = 8, 32 groups per shard as
``csm generate`` writes them) that differ only in their number of images (default 4,096 and
40,960), in a temporary folder (``--tmp`` keeps and reuses them), and runs a short ``csm train``
on each (``csm train ... --max-steps S`` through ``csm.cli.main`` in one fresh subprocess per
run; digits at ``--image-size``, CNN ``--width``, GroupNorm, ``--batch-size`` real + twice as
many synthetic images per step, one thread), with each synthetic reader:

- ``--syn-reader lazy`` (the default): only the per-image metadata (groups, λ, pairs, soft
  labels) is in memory; each batch's synthetic rows are read from the memory-mapped Arrow shards
  and PNG-decoded on demand;
- ``--syn-reader eager``: every synthetic image is decoded into one uint8 tensor first.

Figures per run:

- ``ru_maxrss_kib``: the child's peak resident set (``os.wait4`` rusage; with ``--processes 2``
  the largest training process, since the launcher waits for them);
- ``peak_rss_kib`` / ``peak_anon_kib`` / ``peak_file_kib``: peaks of ``VmRSS``, ``RssAnon``
  (private, anonymous memory) and ``RssFile`` (file-backed pages, e.g. the mapped shards, which
  the kernel can drop at any time) read from ``/proc/PID/status`` every ``--interval`` seconds
  (the largest training process);
- ``steps_per_cpu_s`` / ``steps_per_s``: training steps per second of process CPU time / of
  wall time spent in the trainer's epoch loop (set-up, data loading and validation excluded: the
  child is ``csm.cli.main`` with the loop timed, see :func:`child`); ``wall_s`` / ``cpu_s``: the
  whole child (eager pays its up-front decoding there).

Runs alternate over (reader, size) ``--repeats`` times; the medians are reported. The goal of
issue 17 is ``peak RSS(10x images) / peak RSS(1x) < 1.10`` for the default (lazy) reader.

Usage::

    python bench/memory.py                                   # 4,096 and 40,960 images, 64 px
    python bench/memory.py --steps 10 --repeats 5 --tmp /tmp/membench
    # accelerate launch, 2 processes:
    python bench/memory.py --steps 10 --repeats 2 --processes 2 --out /tmp/memory-2proc.json

Results go to ``bench/results/memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csm.data.real import load_real  # noqa: E402
from csm.synthetic import SyntheticWriter  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GROUP_SIZE = 8
GROUPS_PER_SHARD = 32  # csm generate's default


def make_dataset(out: Path, real: Any, num_images: int) -> int:
    """Write ``num_images`` blended digit pairs with the csm writer; returns the bytes on disk.

    Group ``g`` blends the ``g``-th images of its pair's two classes (pairs cycle through all
    45), so every dataset size has the same kind of images and every class is paired.
    """
    names, k = real.class_names, real.num_classes
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    by_class = [real.train.images[real.train.labels == c].double() for c in range(k)]
    groups = num_images // GROUP_SIZE
    info = {"group_size": GROUP_SIZE, "dataset": real.spec, "bench": "memory"}
    writer = SyntheticWriter(out, names, info, GROUPS_PER_SHARD, groups)
    lam = torch.linspace(0, 1, GROUP_SIZE, dtype=torch.float64).view(-1, 1, 1, 1)
    for shard in writer.pending_shards():
        pix, ca, cb, gid = [], [], [], []
        for g in writer.shard_groups(shard):
            a, b = pairs[g % len(pairs)]
            xa = by_class[a][(g // len(pairs)) % len(by_class[a])]
            xb = by_class[b][(g // len(pairs) + 1) % len(by_class[b])]
            pix.append((lam * xa + (1 - lam) * xb).round())
            ca += [a] * GROUP_SIZE
            cb += [b] * GROUP_SIZE
            gid += [g] * GROUP_SIZE
        lams = lam.flatten().tolist() * (len(gid) // GROUP_SIZE)
        writer.write_shard(shard, torch.cat(pix).to(torch.uint8), ca, cb, lams, gid, gid)
    writer.finalize()
    return sum(p.stat().st_size for p in (out / "train").glob("*.arrow"))


def _status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of a process, in KiB (empty once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


class PeakSampler(threading.Thread):
    """Poll ``/proc/PID/status`` of a process and its descendants; keep each pid's peaks."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.peaks: dict[int, dict[str, int]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                pids = [self.root.pid] + [c.pid for c in self.root.children(recursive=True)]
            except psutil.Error:
                pids = [self.root.pid]
            for pid in pids:
                peak = self.peaks.setdefault(pid, {})
                for key, value in _status(pid).items():
                    peak[key] = max(peak.get(key, 0), value)
            time.sleep(self.interval)

    def largest(self) -> dict[str, int]:
        """The peaks of the process with the largest peak RSS (a training process)."""
        best = max(self.peaks.values(), key=lambda p: p.get("VmRSS", 0), default={})
        return {"peak_rss_kib": best.get("VmRSS", 0), "peak_anon_kib": best.get("RssAnon", 0),
                "peak_file_kib": best.get("RssFile", 0)}  # fmt: skip


def child(argv: list[str]) -> int:
    """``csm train ARGV`` (``csm.cli.main``) timing its training loop, in this process.

    Wraps the trainer's epoch loop to add up its wall and process CPU time (set-up, data
    loading and validation excluded) and writes them to ``OUT/bench-loop-RANK.json``.
    """
    from csm.cli import main as csm_main
    from csm.training import trainer

    epoch, spent = trainer._train_epoch, {"wall_s": 0.0, "cpu_s": 0.0}

    def timed_epoch(*args: Any, **kwargs: Any) -> Any:
        w, c = time.perf_counter(), time.process_time()
        try:
            return epoch(*args, **kwargs)
        finally:
            spent["wall_s"] += time.perf_counter() - w
            spent["cpu_s"] += time.process_time() - c

    trainer._train_epoch = timed_epoch
    code = csm_main(argv)
    out = Path(argv[argv.index("--out") + 1])
    (out / f"bench-loop-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(spent))
    return code


def _free_port() -> int:
    """A free local TCP port for the launcher's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train_command(args: argparse.Namespace, synthetic: Path, reader: str, out: Path) -> list[str]:
    """The ``csm train`` command line of one run (``accelerate launch`` for 2+ processes)."""
    flags = [
        "train", "--dataset", "digits", "--image-size", str(args.image_size),
        "--model", "cnn", "--model-options", f"width={args.width}", "norm=group",
        "--method", "csm", "--synthetic", str(synthetic), "--syn-reader", reader,
        "--epochs", "100", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--eval-batch-size", str(args.batch_size), "--optimizer", "adamw", "--lr", "0.01",
        "--out", str(out),
    ]  # fmt: skip
    me = [str(Path(__file__).resolve()), "--child"]
    if args.processes > 1:
        launch = ["-m", "accelerate.commands.launch", "--multi_gpu"]
        launch += ["--num_processes", str(args.processes), "--num_machines", "1"]
        launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        launch += ["--main_process_port", str(_free_port())]
        return [sys.executable, *launch, *me, *flags]
    return [sys.executable, *me, *flags]


def run_once(args: argparse.Namespace, synthetic: Path, reader: str, out: Path) -> dict[str, Any]:
    """One ``csm train`` in a fresh subprocess: its peak memory and its training speed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    env.update(TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    cmd = train_command(args, synthetic, reader, out)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler = PeakSampler(proc.pid, args.interval)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"csm train failed ({proc.returncode}):\n{' '.join(cmd)}\n{output}")
    with open(out / "metrics.csv", newline="") as fh:
        steps = int(list(csv.DictReader(fh))[-1]["step"])
    loop = json.loads((out / "bench-loop-0.json").read_text())
    result = {
        "ru_maxrss_kib": int(usage.ru_maxrss),
        **sampler.largest(),
        "steps": steps,
        "steps_per_cpu_s": round(steps / loop["cpu_s"], 3),
        "steps_per_s": round(steps / loop["wall_s"], 3),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }
    shutil.rmtree(out)
    return result


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k != "steps"]
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"steps": runs[0]["steps"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[4096, 40960], help="images, 1x and 10x")
    p.add_argument("--image-size", type=int, default=64, help="side of real and synthetic images")
    p.add_argument("--steps", type=int, default=10, help="training steps per run (--max-steps)")
    p.add_argument("--batch-size", type=int, default=64, help="real images per step (and eval)")
    p.add_argument("--width", type=int, default=8, help="CNN width (--model-options width=W)")
    p.add_argument("--readers", nargs="+", default=["lazy", "eager"], choices=["lazy", "eager"])
    p.add_argument("--repeats", type=int, default=3, help="runs per (reader, size), alternating")
    p.add_argument("--processes", type=int, default=1, help="training processes per run")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between /proc samples")
    p.add_argument("--tmp", default=None, help="folder for the datasets (default: a temp dir)")
    p.add_argument("--out", default=str(RESULTS / "memory.json"))
    return p.parse_args()


def summarise(args: argparse.Namespace, runs: dict, sizes: dict) -> dict[str, Any]:
    """Medians per (reader, size) and the 10x / 1x ratios of every memory figure."""
    small, large = (str(n) for n in args.sizes)
    medians = {r: {n: _median(runs[r][n]) for n in runs[r]} for r in runs}
    ratios = {
        r: {
            k: round(medians[r][large][k] / max(1, medians[r][small][k]), 4)
            for k in ("ru_maxrss_kib", "peak_rss_kib", "peak_anon_kib", "peak_file_kib")
        }
        for r in medians
    }
    return {
        "benchmark": "memory",
        "command": "python bench/memory.py " + " ".join(sys.argv[1:]),
        "sizes": args.sizes,
        "image_shape": [1, args.image_size, args.image_size],
        "arrow_bytes": sizes,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "model": f"cnn width={args.width} norm=group",
        "synthetic_per_step": 2 * args.batch_size,
        "processes": args.processes,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "median": medians,
        "ratio_10x_over_1x": ratios,
        "goal_lazy_peak_rss_ratio_below": 1.10,
        "all_runs": runs,
    }


def main() -> None:
    args = parse_args()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="csm-bench-memory-"))
    real = load_real("digits", image_size=args.image_size)
    sizes = {}
    for n in args.sizes:
        data = tmp / f"syn-{n}"
        if not (data / "csm_synthetic.json").is_file():
            t0 = time.perf_counter()
            sizes[str(n)] = make_dataset(data, real, n)
            print(f"wrote {n} images to {data} in {time.perf_counter() - t0:.1f} s", flush=True)
        else:
            sizes[str(n)] = sum(p.stat().st_size for p in (data / "train").glob("*.arrow"))
    runs: dict[str, dict[str, list]] = {r: {str(n): [] for n in args.sizes} for r in args.readers}
    for rep in range(args.repeats):
        for reader in args.readers:
            for n in args.sizes:
                res = run_once(args, tmp / f"syn-{n}", reader, tmp / f"run-{reader}-{n}")
                runs[reader][str(n)].append(res)
                print(f"[{rep + 1}/{args.repeats}] {reader:5s} {n:6d} images: {res}", flush=True)
    result = summarise(args, runs, sizes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for reader, med in result["median"].items():
        for n, m in med.items():
            print(
                f"{reader:5s} {int(n):6d} images: ru_maxrss {m['ru_maxrss_kib'] / 1024:.1f} MiB, "
                f"peak RSS {m['peak_rss_kib'] / 1024:.1f} MiB (anon "
                f"{m['peak_anon_kib'] / 1024:.1f}, file {m['peak_file_kib'] / 1024:.1f}), "
                f"{m['steps_per_cpu_s']:.3f} steps per CPU s, {m['steps_per_s']:.3f} steps/s"
            )
        print(f"{reader:5s} 10x / 1x: {result['ratio_10x_over_1x'][reader]}")
    print(f"wrote {args.out}")
    if args.tmp is None:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        raise SystemExit(child(sys.argv[2:]))
    main()
