"""Small shared utilities: atomic file writes, devices and the process group of a run.

Every stage writes through :func:`atomic_path` (a temporary name, then an atomic rename), picks its
device with :func:`resolve_device` and learns its rank and world size from
:func:`distributed_state`, which wraps accelerate's ``PartialState``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from csm.errors import CSMError

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "distributed_state",
    "process_rows",
    "resolve_device",
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
