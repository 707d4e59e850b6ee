"""The ``csm`` command line: a thin shell over the Python API.

Each subcommand is one entry of :data:`COMMANDS`: a config dataclass (``module:Class``) and the API
function that runs it (``module:function``, called as ``function(config)``). Flags are built from
the dataclass fields (``--group-size 8`` or ``--group_size 8``), ``--config FILE.yaml`` supplies a
file layer, and :func:`csm.config.resolve_config` merges defaults, file and flags. Modules are
imported only when their command runs, so ``csm --help`` stays fast.

User-fixable problems (:class:`csm.errors.CSMError`) print one line, ``csm: error: ...``, and exit
with code 2; argparse usage errors exit 2 as well.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib
import logging
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from csm import __version__
from csm.errors import CSMError


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes:
        help: One-line description shown by ``csm --help``.
        config: ``"module:ConfigClass"`` of the stage's config dataclass.
        run: ``"module:function"`` called with the resolved config; a returned string is printed.
        positional: Config fields taken as positional arguments, in order.
    """

    help: str
    config: str
    run: str
    positional: tuple[str, ...] = ()


# Names with a space are nested: "data info" is ``csm data info``.
COMMANDS: dict[str, Command] = {
    "data info": Command(
        "describe a dataset: classes, split sizes, image shape and class balance",
        "csm.data.real:DataInfoConfig",
        "csm.data.real:data_info",
        positional=("spec",),
    ),
    "fit-diffusion": Command(
        "train a class-conditional diffusion model (UNet, CFG null class, EMA) on a dataset",
        "csm.generation.fit:FitDiffusionConfig",
        "csm.generation.fit:fit_diffusion",
    ),
    "generate": Command(
        "sample class-mixed groups into a resumable synthetic dataset (accelerate launch splits "
        "shards across processes)",
        "csm.generation.generate:GenerateConfig",
        "csm.generation.generate:generate",
    ),
    "annotate": Command(
        "calibrated reannotation of a synthetic dataset (prototype projection + squash, or judge)",
        "csm.annotation.annotate:AnnotateConfig",
        "csm.annotation.annotate:annotate",
        positional=("dataset",),
    ),
    "train": Command(
        "train a classifier with CSM or any competing calibration method (accelerate launch "
        "runs it on several processes or GPUs)",
        "csm.training.config:TrainConfig",
        "csm.training.trainer:train_command",
    ),
    "push": Command(
        "push a synthetic dataset, a fit-diffusion generator or a train run (with its card) to the "
        "Hugging Face Hub",
        "csm.synthetic.hub:PushConfig",
        "csm.synthetic.hub:push",
        positional=("dataset",),
    ),
    "evaluate": Command(
        "score runs with every calibration metric and post-hoc calibrator, clean, under "
        "corruption shift and OOD; write results.csv, leaderboard.md and plots",
        "csm.evaluation.evaluate:EvaluateConfig",
        "csm.evaluation.evaluate:evaluate",
        positional=("runs",),
    ),
    "benchmark": Command(
        "train every method for several seeds and evaluate them all (resumable)",
        "csm.workflows.benchmark:BenchmarkConfig",
        "csm.workflows.benchmark:benchmark",
    ),
    "inspect": Command(
        "a generator quality report (JSON + PNG): judge recognition of pure-class samples, "
        "lambda curves, monotone and flipped shares, diversity and labelled grids",
        "csm.workflows.inspect:InspectConfig",
        "csm.workflows.inspect:inspect",
        positional=("source",),
    ),
    "demo": Command(
        "the whole pipeline on an embedded dataset in minutes: fit, generate, annotate, train, "
        "evaluate, report (resumable)",
        "csm.workflows.demo:DemoConfig",
        "csm.workflows.demo:demo",
    ),
}

_GROUP_HELP = {"data": "inspect real datasets"}


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _add_field_arguments(parser: argparse.ArgumentParser, cmd: Command) -> None:
    from csm.config import field_help, unwrap_optional  # imports torch

    cls = _load(cmd.config)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        is_list = typing.get_origin(tp) in (list, tuple)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = field_help(f)
        if default not in (None, "", []):
            help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        if f.name in cmd.positional:
            parser.add_argument(
                f.name,
                nargs="+" if is_list else None,
                help=help_text,
                metavar=f.name.upper(),
            )
            continue
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif is_list:
            kwargs.update(nargs="+", metavar="V")
        else:
            kwargs.update(metavar=getattr(tp, "__name__", "V").upper())
        parser.add_argument(*flags, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the argument parser.

    Args:
        only: If given, import and fully describe only this command (the others get a stub
            parser with their one-line help), so a command's flags load lazily.
    """
    parser = argparse.ArgumentParser(
        prog="csm",
        description="Calibration-aware semantic mixing: generate class-mixed images, annotate "
        "them with calibrated soft labels, train and evaluate calibrated classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"csm {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages", default=False
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, cmd in COMMANDS.items():
        head, _, tail = name.partition(" ")
        target = sub
        if tail:
            if head not in groups:
                gp = sub.add_parser(head, help=_GROUP_HELP.get(head, head))
                groups[head] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            target = groups[head]
        p = target.add_parser(tail or head, help=cmd.help, description=cmd.help)
        p.set_defaults(_command=name)
        if only == name:
            p.add_argument(
                "--config",
                dest="_config",
                default=None,
                metavar="FILE.yaml",
                help="YAML file of options; flags given here override it",
            )
            _add_field_arguments(p, cmd)
        else:
            p.add_argument("_rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _which_command(argv: list[str]) -> str | None:
    words = [a for a in argv if not a.startswith("-")]
    for n in (2, 1):
        name = " ".join(words[:n])
        if name in COMMANDS:
            return name
    return None


def _configure_logging(verbose: bool) -> bool:
    """Log INFO (DEBUG with ``-v``) on the main process, warnings only on the others.

    Under ``accelerate launch`` every process runs this; the launcher's ``RANK`` tells them apart
    (read from the environment, so no process group is needed yet). ``CSM_LOG_ALL_RANKS=1`` keeps
    INFO on every process (each line tagged with its rank). Returns whether this is the main
    process, which alone prints the command's summary.
    """
    rank = int(os.environ.get("RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    level = logging.DEBUG if verbose else logging.INFO
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=level if rank == 0 or os.environ.get("CSM_LOG_ALL_RANKS") == "1" else logging.WARNING,
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # accelerate's own INFO lines ("Saving current state ...") are noise here
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    return rank == 0


_EXIT = {"registered": False, "ok": True}


def _leave_process_group_at_exit(ok: bool) -> None:
    """At interpreter exit, leave the process group of ``accelerate launch`` cleanly.

    Without it gloo processes can abort at exit ("terminate called without an active
    exception") after a command that finished normally. It runs at exit, not here, so several
    commands can run in one process (notebooks, tests) on the same group. After a failed command
    the ranks do not wait for each other.
    """
    _EXIT["ok"] = _EXIT["ok"] and ok
    dist = sys.modules.get("torch.distributed")
    if _EXIT["registered"] or dist is None or not dist.is_available():
        return
    if dist.is_initialized():
        atexit.register(_leave_process_group, dist)
        _EXIT["registered"] = True


def _leave_process_group(dist: Any) -> None:
    if dist.is_initialized():
        if _EXIT["ok"]:
            dist.barrier()
        dist.destroy_process_group()


#: PyTorch's CPU allocator (c10 ``alloc_cpu``) backs allocations of 2 MiB or more with transparent
#: huge pages when this variable is set before torch is imported (it is read once).
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def cpu_allocator_defaults() -> bool:
    """Turn on PyTorch's transparent-huge-page CPU allocations for this process (and the
    processes it launches) unless torch is already imported, the user set ``THP_ENV`` or opted
    out of csm's allocator tuning (``CSM_CPU_HEAP_REUSE=0``); returns whether it is on.

    Why: glibc hands every block of 32 MiB or more out as fresh ``mmap`` pages that the kernel
    zero-fills one 4 KiB fault at a time, on every training step. Huge pages cut the faults
    512-fold wherever the kernel allows them (``/sys/kernel/mm/transparent_hugepage/enabled``
    ``always`` or ``madvise``), whatever the heap's state; :class:`csm.training.trainer.
    CPUHeapReuse` removes them where glibc can reuse the block (``bench/RESULTS.md``).
    Numbers never change, only where memory comes from.
    """
    if "torch" in sys.modules or os.environ.get("CSM_CPU_HEAP_REUSE", "1") == "0":
        return os.environ.get(THP_ENV) == "1"
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``csm`` console script; returns the exit code."""
    cpu_allocator_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _which_command(argv)
    try:
        parser = build_parser(only=name)
    except CSMError as exc:
        print(f"csm: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    main_process = _configure_logging(args.verbose)
    if getattr(args, "_command", None) is None:
        # "csm" or "csm data" without a subcommand: show the relevant help.
        if getattr(args, "command", None):
            parser.parse_args([args.command, "--help"])
        parser.print_help()
        return 2
    cmd = COMMANDS[args._command]
    overrides = {
        k: v
        for k, v in vars(args).items()
        if not k.startswith("_") and k not in {"command", "subcommand", "verbose"}
    }
    try:
        from csm.config import resolve_config
        from csm.utils import output_locks

        cfg = resolve_config(_load(cmd.config), args._config, overrides)
        # log lines go through tqdm.write (bars stay intact); every folder written is locked
        with logging_redirect_tqdm(), output_locks():
            result = _load(cmd.run)(cfg)
        _leave_process_group_at_exit(ok=True)
    except CSMError as exc:
        _leave_process_group_at_exit(ok=False)
        print(f"csm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("csm: interrupted; rerun with --resume to continue where it stopped", file=sys.stderr)
        return 130
    if isinstance(result, str) and result and main_process:
        try:
            print(result)
        except BrokenPipeError:  # e.g. piped into `head`
            sys.stderr.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
