"""Small shared utilities: atomic file writes, devices and the process group of a run.

Every stage writes through :func:`atomic_path` (a temporary name, then an atomic rename), picks its
device with :func:`resolve_device` and learns its rank and world size from
:func:`distributed_state`, which wraps accelerate's ``PartialState``.

Output folders are owned: every command that writes a folder (a training run, a generator, a
synthetic dataset, an evaluation, a benchmark, a demo) first calls :func:`claim_output`, which
writes the marker :data:`OWNER_FILE` naming the command. A command writes only into a new or empty
folder or one its own kind owns; ``--overwrite`` deletes only a folder csm owns (and callers claim
only after every input has been validated); :func:`check_output` is the same check without any
write, for validating a whole plan up front.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from csm.errors import CSMError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: folders are not locked
    fcntl = None

__all__ = [
    "KILL_ENV",
    "OUTPUT_KINDS",
    "OWNER_FILE",
    "atomic_path",
    "atomic_write_text",
    "check_output",
    "claim_output",
    "clean_temp_files",
    "kill_point",
    "lock_output",
    "output_locks",
    "output_owner",
    "distributed_state",
    "process_rows",
    "resolve_device",
    "share_output",
    "unlock_output",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path`` atomically.

    The temporary name keeps ``path``'s suffix (so writers that infer the format from it, such as
    matplotlib or PIL, still work). On any error the temporary file is removed and ``path`` is left
    as it was, so readers never see a half-written file.

    Example:
        >>> with atomic_path(out / "model.safetensors") as tmp:  # doctest: +SKIP
        ...     save_file(state, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        kill_point(f"write:{path.name}")  # the data is in the temporary file, not yet renamed
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


KILL_ENV = "CSM_KILL_AT"
"""Environment variable naming a kill point (tests and ``eval/kill_resume.py`` only)."""

_kill_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Die like ``kill -9`` here if ``$CSM_KILL_AT`` names this moment (crash-safety tests).

    ``CSM_KILL_AT`` is ``PATTERN`` or ``PATTERN#N``: the process ends with ``os._exit(137)`` (no
    cleanup, no ``finally`` blocks, exactly what ``kill -9`` leaves behind) at the ``N``-th point
    (default 1) whose name matches the shell-style ``PATTERN``. Points are ``write:<file name>``
    (an atomic write whose data is complete but not yet renamed into place) and the named steps
    of the annotation switch-over (``activate:staged``, ``activate:committed``). Unset (always,
    outside tests) this is a dictionary lookup.
    """
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("#")
    if fnmatch.fnmatchcase(name, pattern):
        _kill_hits[spec] = _kill_hits.get(spec, 0) + 1
        if _kill_hits[spec] == int(nth or 1):
            os._exit(137)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise CSMError(f"device={device!r}: not a torch device; use auto, cpu or cuda") from exc


def distributed_state() -> Any:
    """accelerate's ``PartialState`` for this process (works with or without a launcher).

    ``cpu=True`` is passed on machines without CUDA (or with ``ACCELERATE_USE_CPU``), so that a
    launcher's ``WORLD_SIZE > 1`` starts a gloo process group (``MULTI_CPU``) instead of leaving
    every process at rank 0. On CUDA machines accelerate picks NCCL and one GPU per process.

    Returns:
        The shared ``accelerate.PartialState`` (``process_index``, ``num_processes``,
        ``device``, ``wait_for_everyone()``, ...).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def process_rows(n: int, rank: int, world: int) -> slice:
    """The contiguous share of ``n`` rows that process ``rank`` of ``world`` owns.

    Shares differ in size by at most one and cover ``range(n)`` in order, so concatenating the
    shares of ranks ``0 .. world - 1`` gives back the whole.
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


OWNER_FILE = ".csm-owner.json"
"""The marker file naming the command that owns an output folder."""

_HELD_LOCKS: dict[Path, int] = {}  # folder -> descriptor (of the folder) holding its lock
_SHARED_LOCKS: set[Path] = set()  # the folders of _HELD_LOCKS held shared (benchmark workers)
_LOCKING = [False]  # True inside output_locks()

OUTPUT_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "demo": ("csm demo", ("demo.json",)),
    "benchmark": ("csm benchmark", ("benchmark.json",)),
    "evaluation": ("csm evaluate", ("evaluation.json",)),
    "inspect": ("csm inspect", ("inspect.json",)),
    "run": ("csm train", ("model.json", "run.json")),
    "generator": ("csm fit-diffusion", ("training_config.json", "model_index.json")),
    "synthetic": ("csm generate", ("csm_synthetic.json",)),
}
"""kind -> (the command that writes it, files that identify a folder written before markers).

Checked in this order: a benchmark folder also holds its evaluation's ``evaluation.json``, so
the whole-pipeline kinds come before the stages they contain."""

# atomic_path's temporary names: ".<name>.<8 random chars>.tmp<suffix>" (tempfile.mkstemp)
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^/]*)?$")


def output_owner(out: str | os.PathLike) -> str | None:
    """The kind of output that owns folder ``out`` (its marker, else a legacy csm layout)."""
    out = Path(out)
    marker = out / OWNER_FILE
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind in OUTPUT_KINDS:
            return kind
    for kind, (_, signs) in OUTPUT_KINDS.items():
        if any((out / name).is_file() for name in signs):
            return kind
    return None


def _has_content(out: Path) -> bool:
    """Whether ``out`` holds anything besides the marker and temporary files of atomic writes."""
    return any(p.name != OWNER_FILE and not _TEMP_RE.match(p.name) for p in out.iterdir())


@contextlib.contextmanager
def output_locks() -> Iterator[None]:
    """Lock every folder a command writes while it runs (:func:`lock_output`); ``csm`` uses it.

    Inside the block, :func:`claim_output` and the dataset writers take an exclusive lock on the
    folder they write, so a second csm process that would write the same folder (a resubmitted
    job, a second terminal) stops with one line instead of deleting the first one's temporary
    or staged files. The locks are released when the block ends (or the process dies,
    ``kill -9`` included). Wrap an API call in it to get the same protection from a notebook::

        with output_locks():
            generate(cfg)
    """
    outer = _LOCKING[0]
    _LOCKING[0] = True
    try:
        yield
    finally:
        _LOCKING[0] = outer
        if not outer:
            for fd in _HELD_LOCKS.values():
                os.close(fd)
            _HELD_LOCKS.clear()
            _SHARED_LOCKS.clear()


def lock_output(
    out: str | os.PathLike, command: str, flag: str = "--out", *, shared: bool = False
) -> bool:
    """Hold a lock on folder ``out`` until :func:`output_locks` ends.

    The lock is an ``flock`` on the folder itself (nothing is written): the kernel drops it when
    the holder dies, so a killed run never leaves a stale lock. Re-entrant within a process;
    outside :func:`output_locks` a no-op. Processes of one ``accelerate launch`` other than rank 0
    do not lock: rank 0 holds the lock for the job. No-op where ``fcntl`` does not exist.

    Args:
        out: The folder (it exists).
        command: The command that writes it, named in the error of a second writer.
        flag: The option ``out`` came from, named in that error.
        shared: Several processes may hold the lock together (the workers of one ``csm
            benchmark --out``); it is taken exclusively when no other process holds it, so the
            caller may clean the folder, then made shared by :func:`share_output`.

    Returns:
        Whether no other process holds the folder (always True for an exclusive lock, and
        where nothing is locked).

    Raises:
        CSMError: Another process holds the lock (exclusively, for ``shared``).
    """
    path = Path(out).resolve()
    secondary_rank = int(os.environ.get("RANK", "0") or 0) != 0
    if fcntl is None or not _LOCKING[0] or path in _HELD_LOCKS or secondary_rank:
        return path not in _SHARED_LOCKS
    fd = os.open(path, os.O_RDONLY)
    alone = _try_flock(fd, fcntl.LOCK_EX)
    # a shared holder waits out another worker's brief exclusive claim (while it cleans)
    if not alone and not (shared and _try_flock(fd, fcntl.LOCK_SH, wait_s=30.0)):
        os.close(fd)
        raise CSMError(
            f"{flag} {out}: another csm process is writing this folder ({command} cannot write it "
            "now); wait for that process to end, or stop it, then run the command again"
        )
    _HELD_LOCKS[path] = fd
    if not alone:
        _SHARED_LOCKS.add(path)
    return alone


def share_output(out: str | os.PathLike) -> None:
    """Turn this process's exclusive lock on ``out`` into a shared one (:func:`lock_output`)."""
    path = Path(out).resolve()
    fd = _HELD_LOCKS.get(path)
    if fd is not None and path not in _SHARED_LOCKS:
        fcntl.flock(fd, fcntl.LOCK_SH)
        _SHARED_LOCKS.add(path)


def _try_flock(fd: int, mode: int, wait_s: float = 0.0) -> bool:
    """``flock(fd, mode)``, retried for up to ``wait_s`` seconds; whether it was granted."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _locked_elsewhere(folder: Path) -> bool:
    """Whether another process holds the lock of ``folder`` (:func:`lock_output`) right now."""
    if fcntl is None or folder.resolve() in _HELD_LOCKS:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False


def unlock_output(out: str | os.PathLike) -> None:
    """Release this process's lock on ``out`` (:func:`lock_output`), e.g. before removing it."""
    fd = _HELD_LOCKS.pop(Path(out).resolve(), None)
    _SHARED_LOCKS.discard(Path(out).resolve())
    if fd is not None:
        os.close(fd)


def check_output(
    out: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    flag: str = "--out",
) -> bool:
    """Check that command ``kind`` may write folder ``out``; writes nothing.

    Args:
        out: The output folder.
        kind: One of :data:`OUTPUT_KINDS`.
        overwrite: ``--overwrite`` was given.
        resume: ``--resume`` was given.
        flag: The option ``out`` came from, named in the errors.

    Returns:
        Whether ``out`` already holds output of ``kind`` (False: new or empty).

    Raises:
        CSMError: ``--resume`` with ``--overwrite``, ``out`` is a file, or ``out`` holds files csm
            does not own or the output of another command.
    """
    if resume and overwrite:
        raise CSMError("--resume and --overwrite: contradictory; pass only one of them")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CSMError(f"{flag} {path}: is a file, not a folder; pass a folder path")
    if not path.is_dir() or not _has_content(path):
        return False
    owner = output_owner(path)
    command = OUTPUT_KINDS[kind][0]
    if owner is None:
        raise CSMError(
            f"{flag} {path}: the folder holds files not written by csm; choose a new or empty "
            f"folder ({command} never writes into or deletes a folder it does not own)"
        )
    if owner != kind:
        raise CSMError(
            f"{flag} {path}: holds the output of {OUTPUT_KINDS[owner][0]} ({owner}); choose "
            f"another folder ({command} never replaces another command's output)"
        )
    return True


def claim_output(
    out: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    flag: str = "--out",
) -> Path:
    """Make ``out`` a folder owned by ``kind``: :func:`check_output`, then write the marker.

    With ``overwrite`` the folder's contents are deleted first (it is owned by ``kind``, or
    empty); call this only after every input has been validated. The folder is locked for this
    process first (:func:`lock_output`): a second writer stops before it deletes anything. A
    benchmark's folder is locked shared: several ``csm benchmark`` workers may train disjoint
    methods into it (each run folder is locked by the worker training it). Temporary files of
    interrupted atomic writes inside the folder are removed (:func:`clean_temp_files`), unless
    another benchmark worker holds the folder (they may be its writes in progress).

    Returns:
        The folder.
    """
    path = Path(out)
    owned = check_output(path, kind, overwrite=overwrite, resume=resume, flag=flag)
    path.mkdir(parents=True, exist_ok=True)
    # before anything is deleted; benchmark workers share one --out (each locks the runs it trains)
    alone = lock_output(path, OUTPUT_KINDS[kind][0], flag=flag, shared=kind == "benchmark")
    if owned and overwrite:
        for child in sorted(path.iterdir()):
            if child.name == OWNER_FILE:
                continue  # removed last-but-rewritten: a kill here leaves an owned folder
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    if output_owner(path) != kind or not (path / OWNER_FILE).is_file():
        marker = {"kind": kind, "command": OUTPUT_KINDS[kind][0]}
        atomic_write_text(path / OWNER_FILE, json.dumps(marker) + "\n")
    if alone:  # with another benchmark worker here, a temporary file may be one it is writing
        clean_temp_files(path)
    if kind == "benchmark":
        share_output(path)
    return path


def clean_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted :func:`atomic_path` writes left in ``folder``.

    Only names of the form ``.<name>.<8 chars>.tmp<suffix>`` (what :func:`atomic_path` creates)
    are removed, in ``folder`` and its sub-folders, except in sub-folders another process holds
    the lock of (:func:`lock_output`: e.g. the run folders that a second ``csm benchmark`` worker
    trains into the same ``--out``). Call it only on a folder this process owns.

    Returns:
        The removed paths.
    """
    removed = []
    for root, dirs, files in os.walk(folder):
        if _locked_elsewhere(Path(root)):
            dirs[:] = []  # another process is writing this folder: its files are its own
            continue
        for name in files:
            if _TEMP_RE.match(name):
                p = Path(root) / name
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
