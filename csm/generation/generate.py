"""``csm generate``: sample class-mixed groups into a synthetic dataset (resumable, multi-process).

Semantic mixing (Luo et al., "Beyond One-Hot Labels: Semantic Mixing for Model Calibration",
ICML 2025, arXiv 2504.13548): group ``k`` shares one initial noise (seed
:func:`csm.generation.mixing.seed_for_group` ``(k, seed)``) across ``G`` images at
``λ = 0, 1/(G-1), ..., 1`` for the pair :func:`csm.generation.mixing.pair_for_group` ``(k, K)``.
Groups are written in shards of ``--groups-per-shard`` groups by
:class:`csm.synthetic.SyntheticWriter`. Within a shard the images are produced in batches of
``--batch-size`` counted from the shard's first row, so a shard's pixels depend only on (shard,
parameters): resuming after a kill (``--resume``) or splitting the shards across processes
(``accelerate launch -m csm generate``, shard ``i`` goes to process ``i mod P``) gives exactly the
dataset of one uninterrupted run.

``--lambda-schedule targeted --pilot DIR[:NAME]`` replaces the uniform grid by per-pair ratios
fitted on an annotated pilot dataset of the same generator (:mod:`csm.generation.schedule`), so
that the annotated confidences spread evenly over [0, 1]. The fitted table and the pilot's
fingerprint are part of the generation info (manifest, card, run identity): ``--resume`` with
another pilot is refused, and ``--from-card`` rebuilds a targeted dataset from its card alone.
The default ``uniform`` writes exactly what csm wrote before the option existed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from csm.errors import CSMError
from csm.synthetic import SyntheticWriter, to_uint8
from csm.utils import check_output

if TYPE_CHECKING:
    from csm.generation.schedule import LambdaSchedule, Pilot

logger = logging.getLogger(__name__)

PAIR_WALK = (
    "all unordered pairs a<b in lexicographic order, cycling (csm.generation.mixing.pair_for_group)"
)
SEED_RULE = "numpy SeedSequence([seed, group_id]) (csm.generation.mixing.seed_for_group)"


@dataclass
class GenerateConfig:
    """Options of ``csm generate``."""

    model: str = field(default="", metadata={"help": "diffusers pipeline folder (fit-diffusion)"})
    out: str = field(default="", metadata={"help": "output synthetic dataset directory"})
    groups: int = field(default=0, metadata={"help": "number of groups (images = groups x G)"})
    group_size: int = field(default=8, metadata={"help": "images per group G (lambda grid)"})
    steps: int = field(default=25, metadata={"help": "denoising steps"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance (1 = off)"})
    seed: int = field(default=0, metadata={"help": "base seed; group k uses seed_for_group(k)"})
    batch_size: int = field(default=64, metadata={"help": "images per pipeline call"})
    scheduler: str = field(default="ddim", metadata={"help": "ddim, dpm++, euler or heun"})
    mix_mode: str = field(default="embedding", metadata={"help": "embedding (CSM) or eps"})
    lambda_schedule: str = field(
        default="uniform",
        metadata={
            "help": "uniform (lambda = 0, 1/(G-1), ..., 1) or targeted (per-pair lambdas fitted on "
            "--pilot so that annotated confidences spread evenly over [0, 1])"
        },
    )
    pilot: str = field(
        default="",
        metadata={
            "help": "targeted: DIR[:NAME], a synthetic dataset of the same --model annotated by "
            "csm annotate (NAME: which annotation; default the active one)"
        },
    )
    lambda_ends: str = field(
        default="fixed",
        metadata={
            "help": "targeted: fixed (each group keeps its pure ends, lambda = 0 and 1, the CSM "
            "sampler's endpoints) or targeted (every member placed, the ends too)"
        },
    )
    pilot_strict: bool = field(
        default=False,
        metadata={
            "help": "targeted: refuse a pair the pilot cannot target (missing or flat curve) "
            "instead of keeping the uniform grid for it"
        },
    )
    groups_per_shard: int = field(default=32, metadata={"help": "groups per shard file"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing dataset"})
    device: str = field(
        default="auto",
        metadata={"help": "auto, cpu or cuda (accelerate chooses under accelerate launch)"},
    )
    license: str | None = field(
        default=None, metadata={"help": "licence id; default: the source dataset's"}
    )
    from_card: str | None = field(
        default=None,
        metadata={
            "help": "dataset folder or Hub id whose card gives every generation option and seed "
            "(regenerates it bit-for-bit; --model defaults to the card's Hub generator)"
        },
    )


def _versions() -> dict[str, str]:
    import diffusers

    from csm import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "csm": __version__}


def _license(source: Any, explicit: str | None) -> str:
    """The dataset's licence (``resolve_license``); ``unknown`` until ``csm push --license``."""
    from csm.synthetic.card import resolve_license

    try:
        return resolve_license(source, explicit)
    except CSMError:
        logger.warning("licence of the source dataset %r unknown; pass --license", source)
        return "unknown"


def generation_info(cfg: GenerateConfig, pipe: Any, model_ref: str) -> dict[str, Any]:
    """Everything that determines the images (recorded in the manifest, card and info).

    Provenance holds no local path: ``model`` is the Hub id, or the folder's name plus
    ``model_sha256`` (:func:`csm.generation.card.generator_sha256`), so that
    ``csm generate --from-card`` can check it is given the same generator. A targeted run adds
    ``lambda_schedule`` (:meth:`csm.generation.schedule.LambdaSchedule.to_record`) to it; the
    uniform grid adds nothing, so its info is what csm recorded before targeted schedules.
    """
    from csm.generation.card import generator_sha256
    from csm.synthetic.card import is_hub_id

    train_cfg = pipe.training_config() or {}
    model = pipe.transformer if pipe.backbone == "dit" else pipe.unet
    size = model.config.sample_size
    local = not is_hub_id(cfg.model)
    return {
        "model": Path(model_ref).name if local else cfg.model,
        "model_sha256": generator_sha256(model_ref) if local else None,
        "model_class": type(pipe).__name__,
        "backbone": pipe.backbone,
        "dataset": train_cfg.get("dataset"),
        "scheduler": cfg.scheduler,
        "scheduler_class": type(pipe.scheduler).__name__,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "group_size": cfg.group_size,
        "mix_mode": cfg.mix_mode,
        "seed": cfg.seed,
        "groups": cfg.groups,
        "batch_size": cfg.batch_size,
        "pair_walk": PAIR_WALK,
        "seed_rule": SEED_RULE,
        "sample_size": size if isinstance(size, int) else list(size),
        "license": _license(train_cfg.get("dataset"), cfg.license),
        "device": pipe.device.type,
        **_train_split(train_cfg),
        **_versions(),
    }


def _train_split(train_cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"train_split": record}``: the images the generator was trained on
    (:func:`csm.data.real.split_record`; rebuilt from the split seed for generators fitted
    before csm recorded it), or ``{}`` for a generator without a training config (e.g. from the
    Hub), which no run can check."""
    from csm.data.real import split_record

    if train_cfg.get("train_split"):
        return {"train_split": train_cfg["train_split"]}
    if train_cfg.get("dataset_spec") is None:
        return {}
    return {"train_split": split_record(train_cfg["dataset_spec"], train_cfg.get("split_seed", 0))}


def apply_card(cfg: GenerateConfig) -> GenerateConfig:
    """``cfg`` with every generation option of the ``--from-card`` dataset card.

    The card's options and seeds (:func:`csm.synthetic.card.generation_options_from_card`)
    replace the command line's; ``--model`` defaults to the card's generator when that is a Hub
    id, and a local ``--model`` must have the sha256 the card records. A card of a targeted run
    sets ``--lambda-schedule targeted``; its recorded table is used (no pilot needed).

    Raises:
        CSMError: No generator to use, ``--model`` is not the card's generator, or ``--pilot``
            is given (the card records the fitted schedule).
    """
    from dataclasses import replace

    from csm.generation.card import generator_sha256
    from csm.synthetic.card import (
        GENERATION_OPTIONS,
        generation_options_from_card,
        is_hub_id,
        lambda_schedule_from_card,
    )

    if not cfg.from_card:
        return cfg
    if cfg.pilot:
        raise CSMError(
            f"--pilot {cfg.pilot}: not used with --from-card (the card records the fitted λ "
            "schedule); drop --pilot"
        )
    opts = generation_options_from_card(cfg.from_card)
    model = cfg.model or (opts["model"] if is_hub_id(opts["model"]) else "")
    if not model:
        raise CSMError(
            f"--model: missing; the card of {cfg.from_card} names the generator folder "
            f"{opts['model']!r} (sha256 {opts['model_sha256']}); pass --model DIR of that folder"
        )
    path = Path(model).expanduser()
    if opts.get("model_sha256") and (path / "model_index.json").is_file():
        if (sha := generator_sha256(path)) != opts["model_sha256"]:
            raise CSMError(
                f"--model {model}: sha256 {sha[:12]}... differs from the card's generator "
                f"{opts['model']!r} ({opts['model_sha256'][:12]}...); pass --model with that folder"
            )
    values = {k: opts[k] for k in GENERATION_OPTIONS}
    targeted = lambda_schedule_from_card(cfg.from_card) is not None
    values["lambda_schedule"] = "targeted" if targeted else "uniform"
    if opts.get("groups_per_shard"):
        values["groups_per_shard"] = opts["groups_per_shard"]
    lic = cfg.license or (opts.get("license") if opts.get("license") != "unknown" else None)
    logger.info("generate: options from the card of %s: %s", cfg.from_card, values)
    return replace(cfg, model=model, license=lic, **values)


def _check(cfg: GenerateConfig) -> None:
    from csm.generation.mixing import lambdas
    from csm.generation.pipeline import MIX_MODES, SCHEDULERS

    if not cfg.model:
        raise CSMError("model: missing; pass --model DIR (a folder from `csm fit-diffusion`)")
    if not cfg.out:
        raise CSMError("out: missing; pass --out DIR for the synthetic dataset")
    if cfg.groups < 1:
        raise CSMError(f"groups={cfg.groups}: must be >= 1; pass --groups N")
    lambdas(cfg.group_size)  # G >= 2
    for name in ("steps", "batch_size", "groups_per_shard"):
        if getattr(cfg, name) < 1:
            raise CSMError(f"{name}={getattr(cfg, name)}: must be >= 1")
    if cfg.scheduler not in SCHEDULERS:
        raise CSMError(f"scheduler={cfg.scheduler!r}: unknown; choose one of {sorted(SCHEDULERS)}")
    if cfg.mix_mode not in MIX_MODES:
        raise CSMError(f"mix_mode={cfg.mix_mode!r}: choose one of {list(MIX_MODES)}")
    if cfg.seed < 0:
        raise CSMError(f"seed={cfg.seed}: must be >= 0")
    _check_schedule(cfg)
    if not math.isfinite(cfg.guidance) or cfg.guidance < 0:
        raise CSMError(
            f"--guidance {cfg.guidance}: must be a finite number >= 0 (1 = no guidance), e.g. 2"
        )
    model = Path(cfg.model).expanduser()
    if model.exists() and not (model / "model_index.json").is_file():
        raise CSMError(
            f"--model {cfg.model}: not a diffusers pipeline folder (no model_index.json); pass the "
            "--out folder of a finished `csm fit-diffusion`"
        )
    if not model.exists() and (cfg.model.startswith(("/", ".", "~")) or cfg.model.count("/") != 1):
        raise CSMError(
            f"--model {cfg.model}: no such folder; pass the --out folder of `csm fit-diffusion`"
        )
    check_output(cfg.out, "synthetic", overwrite=cfg.overwrite, resume=cfg.resume)


def _check_schedule(cfg: GenerateConfig) -> None:
    from csm.generation.schedule import LAMBDA_ENDS, SCHEDULES

    if cfg.lambda_schedule not in SCHEDULES:
        raise CSMError(
            f"--lambda-schedule {cfg.lambda_schedule!r}: choose one of {', '.join(SCHEDULES)}"
        )
    if cfg.lambda_ends not in LAMBDA_ENDS:
        raise CSMError(f"--lambda-ends {cfg.lambda_ends!r}: choose {' or '.join(LAMBDA_ENDS)}")
    if cfg.lambda_ends != "fixed" and (cfg.lambda_schedule != "targeted" or cfg.from_card):
        raise CSMError(
            f"--lambda-ends {cfg.lambda_ends}: only used when fitting --lambda-schedule targeted "
            "from --pilot (a --from-card run takes the card's table); drop it or add both"
        )
    if cfg.lambda_schedule == "targeted" and not cfg.pilot and not cfg.from_card:
        raise CSMError(
            "--pilot: missing; --lambda-schedule targeted needs --pilot DIR[:NAME], a synthetic "
            "dataset of the same --model annotated by `csm annotate`"
        )
    if cfg.lambda_schedule == "uniform" and cfg.pilot:
        raise CSMError(
            f"--pilot {cfg.pilot}: only used by --lambda-schedule targeted; add "
            "--lambda-schedule targeted or drop --pilot"
        )


def image_shape(pipe: Any) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of the images a pixel-space pipeline makes (``None``: a latent model)."""
    if pipe.backbone != "unet":
        return None
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(pipe.unet.config.in_channels), int(h), int(w)


def resolve_schedule(
    cfg: GenerateConfig, pipe: Any, info: dict[str, Any], pilot: Pilot | None
) -> LambdaSchedule | None:
    """The run's targeted λ schedule (``None``: the uniform grid).

    From the ``--from-card`` card's record, or fitted on ``pilot`` after checking that it comes
    from this generator (:func:`csm.generation.schedule.check_pilot`).

    Raises:
        CSMError: A pilot of another generator, a pair it cannot target under
            ``--pilot-strict``, or an invalid recorded schedule.
    """
    from csm.generation.schedule import check_pilot, fit_schedule, schedule_from_record
    from csm.synthetic.card import lambda_schedule_from_card

    if cfg.lambda_schedule != "targeted":
        return None
    names = list(pipe.class_names)
    if pilot is None:
        record = lambda_schedule_from_card(cfg.from_card)
        where = f"--from-card {cfg.from_card}"
        return schedule_from_record(record, len(names), cfg.group_size, where)
    check_pilot(pilot, names, image_shape(pipe), info)
    return fit_schedule(
        pilot, cfg.groups, cfg.group_size, strict=cfg.pilot_strict, ends=cfg.lambda_ends
    )


def _check_resume_schedule(cfg: GenerateConfig, info: dict[str, Any]) -> None:
    """Name the λ schedule when ``--resume`` would continue a run made with another one."""
    from csm.synthetic import MANIFEST_NAME, read_manifest

    if not cfg.resume or not (Path(cfg.out) / MANIFEST_NAME).is_file():
        return
    old = (read_manifest(cfg.out)["params"].get("info") or {}).get("lambda_schedule")
    new = info.get("lambda_schedule")
    if old == new:
        return
    if old is None or new is None:
        was = "the uniform grid" if old is None else "--lambda-schedule targeted"
        raise CSMError(
            f"--lambda-schedule {cfg.lambda_schedule}: the run being resumed in {cfg.out} used "
            f"{was}; rerun with its schedule or write to a new --out directory"
        )
    pilot = old.get("pilot") or {}
    if pilot.get("sha256") != (new.get("pilot") or {}).get("sha256"):
        raise CSMError(
            f"--pilot {cfg.pilot}: differs from the pilot of the run being resumed in {cfg.out} "
            f"({pilot.get('name')}:{pilot.get('annotation')}, sha256 "
            f"{str(pilot.get('sha256'))[:12]}...); pass that pilot or write to a new --out"
        )
    raise CSMError(
        f"--pilot {cfg.pilot}: gives another λ schedule than the run being resumed in {cfg.out} "
        "(other --groups, --group-size or --pilot-strict); rerun with its options"
    )


def generate_shard(
    pipe: Any,
    writer: SyntheticWriter,
    index: int,
    cfg: GenerateConfig,
    bar: tqdm | None = None,
    schedule: LambdaSchedule | None = None,
) -> None:
    """Generate and write shard ``index`` (its groups, in order, ``batch_size`` rows per call).

    ``schedule``: the run's targeted λ schedule (``None``: the uniform grid).
    """
    from csm.generation.mixing import group_plan

    k = len(writer.class_names)
    g_size = cfg.group_size
    plans = [group_plan(g, k, cfg.seed, g_size, schedule) for g in writer.shard_groups(index)]
    a = np.array([p.class_a for p in plans for _ in p.lams], dtype=np.int64)
    b = np.array([p.class_b for p in plans for _ in p.lams], dtype=np.int64)
    lam = np.array([x for p in plans for x in p.lams], dtype=np.float64)
    gid = np.array([p.group_id for p in plans for _ in p.lams], dtype=np.int64)
    seeds = np.array([p.seed for p in plans for _ in p.lams], dtype=np.int64)
    chunks = []
    for start in range(0, len(a), cfg.batch_size):
        sl = slice(start, start + cfg.batch_size)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[sl]]
        out = pipe(
            class_a=a[sl].tolist(),
            class_b=b[sl].tolist(),
            lam=lam[sl].tolist(),
            generator=gens,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            output_type="pt",
            mix_mode=cfg.mix_mode,
        )
        chunks.append(to_uint8(out.images))
        if bar is not None:
            bar.update(len(gens))
    writer.write_shard(index, np.concatenate(chunks), a, b, lam, gid, seeds)


def _open_writer(cfg: GenerateConfig, state: Any, shard_args: tuple) -> SyntheticWriter:
    """The main process creates (or re-opens) the dataset; the others re-open it after it.

    A refusal in the main process (dataset in the way, different parameters) is broadcast, so
    every process raises the same :class:`CSMError` instead of hanging or writing into it.
    """
    from csm.config import save_config

    error: str | None = None
    writer = None
    if state.is_main_process:
        try:
            _check_resume_schedule(cfg, shard_args[2])
            writer = SyntheticWriter(*shard_args, resume=cfg.resume, overwrite=cfg.overwrite)
            save_config(cfg, Path(cfg.out) / ".csm", name="generate_config.yaml")
        except CSMError as exc:
            if state.num_processes == 1:
                raise
            error = str(exc)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise CSMError(error)
    return writer if writer is not None else SyntheticWriter(*shard_args, resume=True)


def generate(cfg: GenerateConfig) -> str:
    """Run ``csm generate`` (see module docstring); returns a one-line summary.

    Under ``accelerate launch`` (``csm.utils.distributed_state``: gloo on CPU machines, one GPU
    per process otherwise) shard ``i`` of the pending shards is written by process ``i mod P``;
    the main process finalises the dataset once every process is done.
    """
    from csm.generation.pipeline import CSMMixingPipeline
    from csm.generation.schedule import read_pilot
    from csm.utils import distributed_state, resolve_device

    cfg = apply_card(cfg)
    _check(cfg)
    use_pilot = cfg.lambda_schedule == "targeted" and cfg.pilot
    pilot = read_pilot(cfg.pilot) if use_pilot else None  # its errors come before loading --model
    state = distributed_state()
    rank, world = state.process_index, state.num_processes
    path = Path(cfg.model)
    model_ref = str(path.resolve()) if path.exists() else cfg.model
    try:
        pipe = CSMMixingPipeline.from_pretrained(cfg.model)
    except CSMError:
        raise
    except (OSError, ValueError) as exc:  # a Hub id that is not cached or does not exist
        raise CSMError(
            f"--model {cfg.model}: cannot be loaded ({type(exc).__name__}); pass the --out folder "
            "of `csm fit-diffusion` or a Hub pipeline id available offline"
        ) from None
    pipe.set_scheduler(cfg.scheduler)
    pipe.to(state.device if world > 1 else resolve_device(cfg.device))
    pipe.set_progress_bar_config(disable=True)
    info = generation_info(cfg, pipe, model_ref)
    schedule = resolve_schedule(cfg, pipe, info, pilot)
    if schedule is not None:
        info["lambda_schedule"] = schedule.to_record()
    shard_args = (cfg.out, pipe.class_names, info, cfg.groups_per_shard, cfg.groups)
    writer = _open_writer(cfg, state, shard_args)
    mine = [i for i in writer.pending_shards() if i % world == rank]
    state.wait_for_everyone()  # every process has listed the pending shards before any writes
    logger.info("process %d of %d: shards %s of %d to write", rank, world, mine, writer.num_shards)
    total_rows = sum(len(writer.shard_groups(i)) for i in mine) * cfg.group_size
    with tqdm(
        total=total_rows,
        desc=f"generate[{rank}]",
        unit="img",
        disable=not state.is_local_main_process,
    ) as bar:
        for index in mine:
            generate_shard(pipe, writer, index, cfg, bar, schedule)
    state.wait_for_everyone()
    if state.is_main_process:
        writer.finalize()
    n = cfg.groups * cfg.group_size
    how = "" if schedule is None else ", targeted λ schedule"
    return f"wrote {n} images ({cfg.groups} groups x {cfg.group_size}{how}) to {cfg.out}"
