"""The run folder of ``csm train``: the one place that writes and reads it.

Layout (``out``)::

    config.yaml         resolved TrainConfig
    class_names.json    class names, index = label
    model.json          architecture + build kwargs (csm.training.models.model_spec)
    model.safetensors   weights of the best epoch on val
    metrics.csv         one row per epoch: stage, step, lr, train loss, val metrics, time
    run.json            method, model, dataset, seed, status, best_epoch, best val metrics
    checkpoints/last/   resume state: accelerate's save_state folder (model.safetensors,
                        optimizer*.bin, random_states_<rank>.pkl) plus loop.json (epoch, step,
                        metric rows, best epoch) and method_<rank>.safetensors (method state)

:func:`save_run` writes a finished run's files, :func:`load_run` reloads one (model in eval mode on
the CPU), :func:`prepare_run_dir` checks an ``out`` folder against ``--resume``/``--overwrite``
(writing nothing), :func:`claim_run_dir` takes it once every input is valid (the ownership marker
of :func:`csm.utils.claim_output`), :func:`discard_failed_run` removes a run that failed before
its first checkpoint,
:func:`save_checkpoint` / :func:`load_checkpoint` write and restore the resume state (through
``Accelerator.save_state`` / ``load_state``; accelerate reads weights with safetensors and the
optimizer with ``torch.load(weights_only=True)``; nothing is registered with
``register_for_checkpointing``, whose loader unpickles with ``weights_only=False``).
:data:`NOT_IDENTITY` is the one list of options that do not change what a run trains.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from csm.config import config_to_dict, load_config, save_config
from csm.errors import CSMError
from csm.training.config import TrainConfig
from csm.training.models import ImageClassifier, build_model_from_spec
from csm.utils import (
    OWNER_FILE,
    atomic_path,
    atomic_write_text,
    check_output,
    claim_output,
    clean_temp_files,
    unlock_output,
)

__all__ = [
    "NOT_IDENTITY",
    "RUN_FILES",
    "LoadedRun",
    "claim_run_dir",
    "discard_failed_run",
    "has_checkpoint",
    "identity_diffs",
    "load_checkpoint",
    "load_run",
    "prepare_run_dir",
    "read_json",
    "real_data_for",
    "remove_run",
    "save_checkpoint",
    "save_run",
    "save_weights",
    "write_json",
    "write_metrics_csv",
]


RUN_FILES = (
    "config.yaml",
    "class_names.json",
    "model.json",
    "model.safetensors",
    "metrics.csv",
    "run.json",
)


@dataclass
class LoadedRun:
    """A finished training run.

    Attributes:
        model: The best-on-val model, in eval mode, on the CPU.
        config: The resolved :class:`TrainConfig` the run was trained with.
        class_names: Class names, index = label.
        run_dir: The run directory.
        info: Contents of ``run.json`` (method, best_epoch, val metrics, ...).
    """

    model: ImageClassifier
    config: TrainConfig
    class_names: list[str]
    run_dir: Path = Path(".")
    info: dict[str, Any] = field(default_factory=dict)


def save_run(
    out: str | os.PathLike,
    cfg: TrainConfig,
    class_names: list[str],
    spec: dict[str, Any],
    model: nn.Module | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the files of a run folder (each atomically); the one writer of the format.

    Args:
        out: The run folder (created if missing).
        cfg: The resolved configuration, written as ``config.yaml``.
        class_names: Class names, index = label (``class_names.json``).
        spec: The architecture, :func:`csm.training.models.model_spec` (``model.json``).
        model: If given, its weights are written as ``model.safetensors``.
        info: If given, written as ``run.json`` (method, status, best epoch, val metrics, ...).

    Returns:
        The run folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    write_json(out / "class_names.json", list(class_names))
    write_json(out / "model.json", spec)
    if model is not None:
        save_weights(model, out / "model.safetensors")
    if info is not None:
        write_json(out / "run.json", jsonable(info))
    return out


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Reload a run directory written by :func:`train`.

    Args:
        run_dir: The ``out`` folder of a training run.

    Returns:
        A :class:`LoadedRun` whose model is in eval mode on the CPU.

    Raises:
        CSMError: The folder, its weights or its model description are missing or unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CSMError(f"{run_dir}: run directory not found; pass the --out folder of csm train")
    for name in ("config.yaml", "class_names.json", "model.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise CSMError(
                f"{run_dir}: {name} missing; the run did not finish an epoch - "
                "finish it with `csm train --resume` or retrain"
            )
    config = load_config(TrainConfig, run_dir / "config.yaml")
    class_names = read_json(run_dir / "class_names.json")
    spec = read_json(run_dir / "model.json")
    model = build_model_from_spec(spec, load_pretrained=False)  # the run's own weights follow
    try:
        state = load_file(str(run_dir / "model.safetensors"))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise CSMError(f"{run_dir / 'model.safetensors'}: unreadable ({err}); retrain") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CSMError(
            f"{run_dir / 'model.safetensors'}: weights do not match model.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); retrain the run"
        )
    info = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    return LoadedRun(model.eval(), config, list(class_names), run_dir, info)


def split_record_for(cfg: TrainConfig) -> dict[str, Any]:
    """The training split of the run with config ``cfg`` (:func:`csm.data.real.split_record`):
    what :func:`real_data_for` loads, and what an encoder or a check compares against."""
    from csm.data.real import split_record

    return split_record(
        cfg.dataset,
        cfg.seed if cfg.data_seed is None else cfg.data_seed,
        cfg.val_fraction,
        cfg.test_fraction,
        getattr(cfg, "train_per_class", None),  # absent from configs of older runs
    )


def real_data_for(cfg: TrainConfig):
    """Load the real dataset exactly as the run with config ``cfg`` saw it (same splits)."""
    from csm.data.real import load_real

    split = split_record_for(cfg)
    return load_real(
        split["dataset"],
        image_size=cfg.image_size,
        seed=split["seed"],
        val_fraction=split["val_fraction"],
        test_fraction=split["test_fraction"],
        train_per_class=split["train_per_class"],
    )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CSMError(f"{path}: unreadable ({err}); retrain the run") from err


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


NOT_IDENTITY = (
    "out",
    "resume",
    "overwrite",
    "max_steps",
    "checkpoint_every",
    "eval_batch_size",
    "syn_reader",
)
"""TrainConfig options that do not change what a run trains (where it lives, whether it resumes,
when it stops or checkpoints, the evaluation batch, how synthetic images are read). Every other
option is the run's identity: ``--resume`` and ``csm benchmark`` refuse a run folder that differs
in any of them."""


def identity_diffs(old: Any, new: Any) -> list[str]:
    """Options (outside :data:`NOT_IDENTITY`) whose values differ between two configs.

    Args:
        old: A :class:`TrainConfig` or its dict (:func:`csm.config.config_to_dict`).
        new: The same for the other run.
    """
    a = old if isinstance(old, dict) else config_to_dict(old)
    b = new if isinstance(new, dict) else config_to_dict(new)
    return [k for k in dict.fromkeys([*a, *b]) if k not in NOT_IDENTITY and a.get(k) != b.get(k)]


CHECKPOINT = Path("checkpoints") / "last"
"""The resume state inside a run folder."""


def has_checkpoint(out: str | os.PathLike) -> bool:
    """Whether run folder ``out`` holds a complete resume state.

    A save killed between its two renames leaves the previous state as ``checkpoints/.last.old``
    and no ``last``; that state counts (:func:`claim_run_dir` moves it back).
    """
    ckpts = Path(out) / "checkpoints"
    return (ckpts / "last" / "loop.json").is_file() or (ckpts / ".last.old" / "loop.json").is_file()


def _recover_checkpoint(out: Path) -> None:
    """Move back the previous state a save killed between its renames left as ``.last.old``."""
    final, old = out / CHECKPOINT, out / "checkpoints" / ".last.old"
    if not final.exists() and (old / "loop.json").is_file():
        old.rename(final)


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """Check ``out`` against ``resume``/``overwrite`` without writing; returns (dir, resuming).

    ``out`` may be new or empty, or a folder :data:`csm.utils.OWNER_FILE` marks as a training
    run (or a run written before the markers). A run folder without ``config.yaml`` holds only an
    interrupted first write: it is started again with or without ``--resume``/``--overwrite``.

    Raises:
        CSMError: ``out`` is a file, holds other files or another command's output, holds a run
            and neither ``--resume`` (same settings) nor ``--overwrite`` was given.
    """
    out = Path(cfg.out)
    if not check_output(out, "run", overwrite=cfg.overwrite, resume=cfg.resume):
        return out, False
    if not (out / "config.yaml").is_file() or cfg.overwrite:
        return out, False  # an interrupted first write, or a run to replace
    old = load_config(TrainConfig, out / "config.yaml")
    diffs = identity_diffs(old, cfg)
    if cfg.resume:
        if diffs:
            raise CSMError(
                f"--out {out}: --resume with different settings ({', '.join(diffs)}); "
                "resume with the original options or pass --overwrite"
            )
        return out, has_checkpoint(out)
    what = "a different run" if diffs else "the same run"
    raise CSMError(
        f"--out {out}: already holds {what} ({old.method}/{old.model} on {old.dataset}); "
        "pass --resume to continue it or --overwrite to replace it"
    )


def claim_run_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """Take ``out`` for this run (main process, after every input was validated).

    Writes the ownership marker; ``--overwrite`` (or a fresh start over an interrupted first
    write or a run without a checkpoint) removes the old run's files first; temporary files of
    interrupted writes are removed.
    """
    out = Path(cfg.out)
    claim_output(out, "run", overwrite=cfg.overwrite, resume=cfg.resume)
    if resuming:
        _recover_checkpoint(out)
    else:
        remove_run(out)
    return out


def discard_failed_run(out: Path, created: bool) -> None:
    """After a run failed before its first checkpoint, remove what it wrote.

    Args:
        out: The run folder.
        created: The folder was new or empty before this run (then it is removed entirely, so
            a retry with other settings starts from a clean slate).
    """
    if has_checkpoint(out):
        return
    remove_run(out)
    if created:
        (out / OWNER_FILE).unlink(missing_ok=True)
        unlock_output(out)
        clean_temp_files(out)
        try:
            out.rmdir()
        except OSError:
            pass


def remove_run(out: Path) -> None:
    """Delete the files of a training run (only those; other files in ``out`` stay)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def save_checkpoint(
    accelerator: Any, out: Path, loop: dict[str, Any], method_state: dict[str, torch.Tensor]
) -> None:
    """Write the resume state of every process to ``out/checkpoints/last`` (call on all ranks).

    ``accelerator.save_state`` writes the prepared model and optimizers (and each process's RNG
    state) into a temporary folder; each process adds its method state (CRL keeps the history of
    its own rows), the main process the loop state; the folder then replaces the previous
    checkpoint with renames, so an interrupted save leaves the previous one intact.

    Args:
        accelerator: The run's ``accelerate.Accelerator`` (model and optimizers prepared).
        out: The run folder.
        loop: JSON-able loop state (epoch, global step, metric rows, best epoch and metrics).
        method_state: ``method.state_dict()`` of this process.
    """
    final, tmp, old = (
        out / CHECKPOINT,
        out / "checkpoints" / ".last.tmp",
        out / "checkpoints" / ".last.old",
    )
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    tmp.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(str(tmp))
    state = {k: v.detach().cpu().contiguous() for k, v in method_state.items()}
    with atomic_path(tmp / f"method_{accelerator.process_index}.safetensors") as path:
        save_file(state, str(path))
    if accelerator.is_main_process:
        write_json(tmp / "loop.json", loop)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Any, out: Path, method: Any) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state.

    Args:
        accelerator: The run's ``Accelerator`` with the same model and optimizers prepared.
        out: The run folder.
        method: The run's method (its state is restored in place).

    Raises:
        CSMError: The checkpoint is unreadable.
    """
    ckpt = out / CHECKPOINT
    try:
        accelerator.load_state(str(ckpt))
        mine = ckpt / f"method_{accelerator.process_index}.safetensors"
        method.load_state_dict(
            load_file(str(mine if mine.is_file() else ckpt / "method_0.safetensors"))
        )
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise CSMError(
            f"{ckpt}: unreadable checkpoint ({err}); pass --overwrite to retrain"
        ) from err
    return read_json(ckpt / "loop.json")


def jsonable(obj: Any) -> Any:
    """``obj`` with everything JSON cannot hold turned into strings."""
    return json.loads(json.dumps(obj, default=str))
