"""``CSMMixingPipeline``: class-mixed sampling from a class-conditional diffusers model.

Semantic mixing (Luo et al., ICML 2025, section 3.1) conditions a class-conditional denoiser on the
convex combination of two class conditions, ``c(λ) = λ·onehot(a) + (1-λ)·onehot(b)``. With an
embedding-table class embedding this is exactly ``λ·E[a] + (1-λ)·E[b]``, used at every denoising
step. With classifier-free guidance (Ho & Salimans, 2022) the conditional branch uses the mixed
condition and the unconditional branch the null condition.

Three backbones are supported; which one a pipeline uses follows from its components:

* ``unet`` = :class:`~diffusers.UNet2DModel` with ``num_class_embeds = K + 1`` (last row = null):
  the mixture of embedding rows is injected into ``unet.class_embedding``. This is what
  ``csm fit-diffusion`` trains.
* ``transformer`` = :class:`~diffusers.DiTTransformer2DModel` + ``vae`` (Peebles & Xie, 2023): every
  transformer block owns a separate label-embedding table; the same mixture weights are applied to
  each block's own table. The null class is ``transformer.config.num_embeds_ada_norm`` (not the
  hard-coded 1000 of diffusers' ``DiTPipeline``).
* ``unet`` = :class:`~diffusers.UNet2DConditionModel` + ``text_encoder`` + ``tokenizer`` + ``vae``
  (Stable Diffusion style, Rombach et al., 2022): each class name goes through ``prompt_template``
  ("a photo of a {}") and the per-token CLIP prompt embeddings of the two classes are mixed; the
  null condition is the empty prompt.

``mix_mode="eps"`` instead mixes the two *conditional noise predictions*
``λ·ε(x, a) + (1-λ)·ε(x, b)`` (two forwards per step), for comparison.

Schedulers swap the diffusers way (``pipe.scheduler = EulerDiscreteScheduler.from_config(
pipe.scheduler.config)``) or by name with :meth:`CSMMixingPipeline.set_scheduler` (``SCHEDULERS``).

Example:
    >>> pipe = CSMMixingPipeline.from_pretrained("runs/diffusion-digits")
    >>> gens = [torch.Generator().manual_seed(0) for _ in range(8)]  # one shared noise
    >>> out = pipe(class_a=[3] * 8, class_b=[8] * 8, lam=lambdas(8), generator=gens)
    >>> out.images.shape  # (8, C, H, W) floats in [0, 1]

This file is self-contained: it imports only the standard library, numpy, torch and diffusers,
so the copy that :func:`csm.generation.card.export_pipeline_files` saves as ``pipeline_csm.py``
in a model folder loads without csm::

    DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipeline_csm", trust_remote_code=True
    )

It is also the one source of the mixing math (:func:`lambdas`, :func:`mixing_weights`), which
:mod:`csm.generation.mixing` re-exports. Inside csm its :class:`CSMError` is a subclass of
``csm.errors.CSMError`` (one line, exit code 2 on the command line); standalone it is a
``ValueError``.

References:
    Luo, Tao, Dong, Xu. "Beyond One-Hot Labels: Semantic Mixing for Model Calibration." ICML 2025.
    Ho, Salimans. "Classifier-Free Diffusion Guidance." 2022.
    Peebles, Xie. "Scalable Diffusion Models with Transformers." ICCV 2023.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    ImagePipelineOutput,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "MIX_MODES",
    "OUTPUT_TYPES",
    "SCHEDULERS",
    "CSMError",
    "CSMMixingPipeline",
    "build_unet",
    "lambdas",
    "mixing_weights",
]


def _user_error_base() -> type[Exception]:
    """``csm.errors.CSMError`` when csm is installed, else ``ValueError`` (standalone copy).

    Looked up by name (not an ``import`` statement) so that this file never requires csm.
    """
    try:
        return importlib.import_module("csm.errors").CSMError
    except ImportError:
        return ValueError


class CSMError(_user_error_base()):
    """A bad argument to the pipeline: one line naming the input and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def lambdas(group_size: int) -> list[float]:
    """Mixing ratios of one group: ``[0, 1/(G-1), ..., 1]``.

    Args:
        group_size: Images per group ``G`` (at least 2).

    Returns:
        ``G`` evenly spaced ratios; the first is exactly 0.0 and the last exactly 1.0.

    Raises:
        CSMError: If ``group_size`` is not an integer ``>= 2``.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer):
        raise CSMError(f"group_size={group_size!r}: must be an integer; pass e.g. --group-size 8")
    if group_size < 2:
        raise CSMError(
            f"group_size={group_size}: a group needs at least 2 images (both pure ends); "
            "pass --group-size 2 or more (the paper uses 8)"
        )
    g = int(group_size)
    return [i / (g - 1) for i in range(g)]


def mixing_weights(
    class_a: Sequence[int], class_b: Sequence[int], lam: Sequence[float], num_classes: int
) -> np.ndarray:
    """Dense per-sample class weights ``λ·onehot(a) + (1-λ)·onehot(b)``.

    Args:
        class_a: Per-sample first class.
        class_b: Per-sample second class.
        lam: Per-sample weight of ``class_a`` in ``[0, 1]``.
        num_classes: ``K``.

    Returns:
        ``float64`` array ``(N, K)``; row ``i`` sums to 1.

    Raises:
        CSMError: On a class index outside ``[0, K)``, λ outside ``[0, 1]`` or length mismatch.
    """
    if not (len(class_a) == len(class_b) == len(lam)):
        raise CSMError(
            f"class_a/class_b/lam: lengths {len(class_a)}/{len(class_b)}/{len(lam)} differ; "
            "pass one value per sample"
        )
    w = np.zeros((len(lam), num_classes), dtype=np.float64)
    for i, (a, b, t) in enumerate(zip(class_a, class_b, lam, strict=True)):
        for name, c in (("class_a", a), ("class_b", b)):
            if not 0 <= int(c) < num_classes:
                raise CSMError(
                    f"{name}={c}: class index out of range for {num_classes} classes; "
                    f"use 0..{num_classes - 1} or a class name"
                )
        t = float(t)
        if not 0.0 <= t <= 1.0 or math.isnan(t):
            raise CSMError(f"lam={t}: mixing ratio must lie in [0, 1]; clip or fix the value")
        w[i, int(a)] += t
        w[i, int(b)] += 1.0 - t
    return w


#: Sampler registry for ``--scheduler``: name -> diffusers scheduler class (built ``from_config``).
SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
}
MIX_MODES = ("embedding", "eps")
OUTPUT_TYPES = ("pt", "np", "pil")


@contextmanager
def _inject(modules: Sequence[torch.nn.Module], weights: torch.Tensor, table):
    """Make each embedding module return ``weights @ table(module)`` instead of a row lookup.

    Args:
        modules: Embedding modules whose output is replaced (forward hooks).
        weights: ``(N, R)`` mixture weights over the ``R`` rows of each module's table.
        table: ``module -> (R, D)`` weight matrix of that module.
    """

    def hook(module, args, output):
        emb = weights.to(device=output.device, dtype=table(module).dtype) @ table(module)
        if emb.shape != output.shape:
            raise RuntimeError(f"mixed embedding {tuple(emb.shape)} != {tuple(output.shape)}")
        return emb.to(output.dtype)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _short(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (one-line errors)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_cached(repo_id: str) -> None:
    """Offline, refuse a Hub id that is not in the local cache with one line (before diffusers
    logs its connection warnings and a long error that points at a stack trace it does not show).
    """
    import huggingface_hub
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return  # online: diffusers downloads it (or reports that it does not exist)
    try:
        huggingface_hub.snapshot_download(repo_id, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError (not an id), ...
        raise CSMError(
            f"{repo_id}: no such folder, and not in the Hugging Face cache (offline mode, "
            f"{type(exc).__name__}); pass a folder written by `csm fit-diffusion` or download "
            "the model once online"
        ) from exc


class CSMMixingPipeline(DiffusionPipeline):
    r"""Sample images whose class condition is a convex mixture of two classes.

    Args:
        scheduler: Any diffusers scheduler (DDIM by default for trained models).
        unet: :class:`~diffusers.UNet2DModel` with ``num_class_embeds = K + 1`` (pixel space) or
            :class:`~diffusers.UNet2DConditionModel` (text-conditioned, needs ``vae``,
            ``text_encoder``, ``tokenizer``).
        transformer: :class:`~diffusers.DiTTransformer2DModel` (needs ``vae``).
        vae: :class:`~diffusers.AutoencoderKL` for latent backbones.
        text_encoder: CLIP text encoder (text-conditioned backbone).
        tokenizer: Its tokenizer.
        class_names: The ``K`` class names, stored in ``model_index.json``.
        prompt_template: Prompt for the text backbone; ``{}`` is replaced by the class name.
    """

    model_cpu_offload_seq = "text_encoder->transformer->unet->vae"
    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        scheduler,
        unet=None,
        transformer=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        class_names: list[str] | None = None,
        prompt_template: str = "a photo of a {}",
    ) -> None:
        super().__init__()
        self.register_modules(
            scheduler=scheduler,
            unet=unet,
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        names = None if class_names is None else [str(c) for c in class_names]
        self.register_to_config(class_names=names, prompt_template=prompt_template)
        self._prompt_cache: tuple[tuple, torch.Tensor] | None = None
        self._validate()

    # ------------------------------------------------------------------ structure
    @property
    def backbone(self) -> str:
        """``"unet"``, ``"dit"`` or ``"text"``."""
        if self.transformer is not None:
            return "dit"
        if isinstance(self.unet, UNet2DConditionModel):
            return "text"
        return "unet"

    @property
    def num_classes(self) -> int:
        """Number of real classes ``K`` (the null row is not counted)."""
        if self.backbone == "unet":
            return int(self.unet.config.num_class_embeds) - 1
        if self.backbone == "dit":
            return int(self.transformer.config.num_embeds_ada_norm)
        return len(self.config.class_names or [])

    @property
    def class_names(self) -> list[str]:
        """Class names recorded with the model (index strings when none were recorded)."""
        names = self.config.class_names
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    def _validate(self) -> None:
        unet, dit = self.unet, self.transformer
        if unet is None and dit is None:
            raise CSMError(
                "model: has neither a unet nor a transformer; pass a class-conditional "
                "UNet2DModel, DiTTransformer2DModel or UNet2DConditionModel"
            )
        if isinstance(unet, UNet2DModel):
            if unet.config.class_embed_type is not None or not unet.config.num_class_embeds:
                raise CSMError(
                    "unet: UNet2DModel is not class-conditional (needs class_embed_type=None and "
                    "num_class_embeds=K+1); train one with `csm fit-diffusion`"
                )
            if unet.config.num_class_embeds < 3:
                raise CSMError(
                    f"unet: num_class_embeds={unet.config.num_class_embeds} leaves fewer than 2 "
                    "classes plus the null row; use num_class_embeds=K+1 with K >= 2"
                )
        elif isinstance(unet, UNet2DConditionModel):
            if self.text_encoder is None or self.tokenizer is None or self.vae is None:
                raise CSMError(
                    "unet: a UNet2DConditionModel needs text_encoder, tokenizer and vae "
                    "components; load a complete Stable-Diffusion-style folder"
                )
            if not self.config.class_names:
                raise CSMError(
                    "class_names: a text-conditioned model needs the class names; pass "
                    "class_names=[...] to from_pretrained"
                )
        elif unet is not None:
            raise CSMError(
                f"unet: {type(unet).__name__} is not supported; use UNet2DModel, "
                "UNet2DConditionModel or a DiT transformer"
            )
        if dit is not None:
            if not isinstance(dit, DiTTransformer2DModel):
                raise CSMError(
                    f"transformer: {type(dit).__name__} is not supported; use DiTTransformer2DModel"
                )
            if self.vae is None:
                raise CSMError("vae: a DiT transformer needs a vae component to decode latents")
        names = self.config.class_names
        if names and len(names) != self.num_classes:
            raise CSMError(
                f"class_names: {len(names)} names for a model with {self.num_classes} classes; "
                "record exactly one name per class"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> CSMMixingPipeline:
        """Load a pipeline folder (or hub id); local folders are checked first for a clear error."""
        path = Path(str(pretrained_model_name_or_path))
        if path.exists() and not (path / "model_index.json").is_file():
            raise CSMError(
                f"{path}: not a diffusers pipeline folder (no model_index.json); pass the folder "
                "written by `csm fit-diffusion` or pipe.save_pretrained"
            )
        if not path.exists():
            _require_cached(str(pretrained_model_name_or_path))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            if path.exists():
                msg = _short(exc)
                raise CSMError(
                    f"{path}: cannot load as a class-conditional diffusers model ({msg}); "
                    "pass a folder written by `csm fit-diffusion`"
                ) from exc
            msg = _short(exc)
            raise CSMError(
                f"{pretrained_model_name_or_path}: no such folder, and not loadable as a Hub id "
                f"({msg}); pass a folder written by `csm fit-diffusion` or a cached Hub id"
            ) from exc

    def training_config(self) -> dict | None:
        """The training config recorded by ``csm fit-diffusion`` (``None`` if absent)."""
        path = getattr(self, "_csm_folder", None)
        if path is None and getattr(self, "name_or_path", None):
            path = self.name_or_path
        if path is None:
            return None
        f = Path(path) / "training_config.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def check_classes(self, class_names: Sequence[str]) -> None:
        """Raise a :class:`CSMError` if ``class_names`` do not match the model's classes."""
        if len(class_names) != self.num_classes:
            raise CSMError(
                f"model: has {self.num_classes} classes but the dataset has {len(class_names)}; "
                "use a model trained on this dataset (csm fit-diffusion --dataset ...)"
            )

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler by name (see ``SCHEDULERS``), keeping the noise schedule config."""
        if name not in SCHEDULERS:
            raise CSMError(f"scheduler={name!r}: unknown; choose one of {sorted(SCHEDULERS)}")
        self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config)

    def class_index(self, c: int | str, name: str = "class") -> int:
        """Index of class ``c`` given as an index or a recorded class name."""
        k = self.num_classes
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            names = self.class_names
            if c not in names:
                raise CSMError(
                    f"{name}={c!r}: unknown class name; choose one of {names[:20]}"
                    + (" ..." if len(names) > 20 else "")
                )
            return names.index(c)
        if isinstance(c, bool) or not isinstance(c, int | str | np.integer):
            if isinstance(c, torch.Tensor) and c.numel() == 1:
                c = int(c.item())
            else:
                raise CSMError(f"{name}={c!r}: pass a class index or class name")
        idx = int(c)
        if not 0 <= idx < k:
            raise CSMError(f"{name}={idx}: class index out of range; use 0..{k - 1}")
        return idx

    # ------------------------------------------------------------------ conditions
    def _prompt_embeddings(self) -> torch.Tensor:
        """``(K + 1, L, D)`` CLIP embeddings of every class prompt; last row = empty prompt."""
        names = self.class_names
        key = (tuple(names), self.config.prompt_template)
        if self._prompt_cache is not None and self._prompt_cache[0] == key:
            return self._prompt_cache[1]
        template = self.config.prompt_template
        prompts = [template.format(n.replace("_", " ")) for n in names] + [""]
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            emb = self.text_encoder(tok.input_ids.to(self.text_encoder.device))[0]
        self._prompt_cache = (key, emb)
        return emb

    def _denoise(self, x: torch.Tensor, t, weights: torch.Tensor | None, labels: torch.Tensor):
        """One model call. ``weights`` (N, K+1) mixes condition rows; ``None`` = native labels."""
        n = x.shape[0]
        if self.backbone == "unet":
            model = self.unet
            if weights is None:
                return model(x, t, class_labels=labels).sample
            with _inject([model.class_embedding], weights, lambda m: m.weight):
                return model(x, t, class_labels=labels).sample
        if self.backbone == "dit":
            model = self.transformer
            tt = t if torch.is_tensor(t) else torch.tensor(t)
            tt = tt.to(x.device).reshape(-1).expand(n) if tt.ndim == 0 else tt
            if weights is None:
                out = model(x, timestep=tt, class_labels=labels).sample
            else:
                embedders = [b.norm1.emb.class_embedder for b in model.transformer_blocks]
                with _inject(embedders, weights, lambda m: m.embedding_table.weight):
                    out = model(x, timestep=tt, class_labels=labels).sample
            c = model.config.in_channels
            return out[:, :c] if out.shape[1] == 2 * c else out
        emb = self._prompt_embeddings()
        if weights is None:
            cond = emb[labels]
        else:
            cond = torch.einsum("nk,kld->nld", weights.to(emb.dtype), emb)
        return self.unet(x, t, encoder_hidden_states=cond.to(self.unet.dtype)).sample

    def _num_rows(self) -> int:
        """Rows of the condition table, including the null row."""
        if self.backbone == "dit":
            block = self.transformer.transformer_blocks[0]
            return block.norm1.emb.class_embedder.embedding_table.num_embeddings
        return self.num_classes + 1

    def _check_weights(self, weights, mix_mode: str) -> np.ndarray:
        w = np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, float)
        k = self.num_classes
        if w.ndim != 2 or w.shape[1] != k or len(w) == 0:
            raise CSMError(f"class_weights: shape {w.shape}; pass an (N, {k}) array")
        if (w < 0).any() or not np.allclose(w.sum(1), 1.0, atol=1e-5):
            raise CSMError("class_weights: rows must be non-negative and sum to 1")
        if mix_mode != "embedding":
            raise CSMError("class_weights: only supported with mix_mode='embedding'")
        return w

    # ------------------------------------------------------------------ sampling
    def _latent_shape(self) -> tuple[int, int, int]:
        model = self.transformer if self.backbone == "dit" else self.unet
        size = model.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return int(model.config.in_channels), int(size), int(size)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone != "unet":
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        class_a: int | str | Sequence[int | str] | None = None,
        class_b: int | str | Sequence[int | str] | None = None,
        lam: float | Sequence[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        output_type: str = "pt",
        mix_mode: str = "embedding",
        return_dict: bool = True,
        class_weights: np.ndarray | torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per entry of ``class_a``.

        Args:
            class_a: Per-sample class (index or name) with weight ``lam``; a scalar means one image.
            class_b: Per-sample second class (weight ``1 - lam``). ``None`` (with ``lam=None``) is
                plain class-conditional sampling of ``class_a`` through the model's own label path.
            lam: Per-sample weight of ``class_a`` in ``[0, 1]`` (scalar broadcasts).
            generator: One ``torch.Generator`` per sample (or one for all) for the initial noise;
                samples that share a seed share their noise regardless of batch position.
            latents: Initial noise ``(N, C, H, W)`` instead of ``generator``.
            num_inference_steps: Denoising steps.
            guidance_scale: Classifier-free guidance weight; ``<= 1`` disables the unconditional
                branch (the paper samples without guidance).
            output_type: ``"pt"`` (float tensor in [0, 1], ``(N, C, H, W)``), ``"np"``
                (``(N, H, W, C)``) or ``"pil"``.
            mix_mode: ``"embedding"`` mixes the conditions (the method); ``"eps"`` mixes the two
                conditional noise predictions.
            return_dict: Return :class:`~diffusers.ImagePipelineOutput` (else a tuple).
            class_weights: Instead of ``class_a``/``class_b``/``lam``: dense ``(N, K)`` mixture
                weights (non-negative, rows summing to 1), e.g. Dirichlet mixing of three or more
                classes (:func:`csm.generation.mixing.dirichlet_weights`); embedding mode only.

        Returns:
            ``ImagePipelineOutput`` with ``.images``.
        """
        self._check_call(output_type, mix_mode, num_inference_steps)
        a_idx, b_idx, lams, w, plain = self._conditions(
            class_a, class_b, lam, class_weights, mix_mode
        )
        n, device = len(a_idx), self._execution_device
        do_cfg = guidance_scale > 1.0
        w_ext, w_null = self._condition_rows(w, do_cfg)
        x = self._initial_latents(n, generator, latents, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator
        branches = self._branches(a_idx, b_idx, w_ext, w_null, plain, mix_mode, do_cfg, device)
        lam_t = torch.tensor(lams, device=device, dtype=torch.float32).view(n, 1, 1, 1)
        labels = torch.cat([lab for lab, _ in branches])
        weights = None if plain else torch.cat([wts for _, wts in branches])

        for t in self.progress_bar(self.scheduler.timesteps):
            nb = len(branches)
            x_in = torch.cat([x] * nb) if nb > 1 else x
            x_in = self.scheduler.scale_model_input(x_in, t)
            eps = self._denoise(x_in, t, weights, labels).chunk(nb)
            noise_pred = _combine(eps, do_cfg, lam_t, guidance_scale)
            x = self.scheduler.step(noise_pred, t, x, **step_kwargs).prev_sample

        images = self._decode(x)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------ steps of __call__
    @staticmethod
    def _check_call(output_type: str, mix_mode: str, num_inference_steps: int) -> None:
        if output_type not in OUTPUT_TYPES:
            raise CSMError(f"output_type={output_type!r}: choose one of {list(OUTPUT_TYPES)}")
        if mix_mode not in MIX_MODES:
            raise CSMError(f"mix_mode={mix_mode!r}: choose one of {list(MIX_MODES)}")
        if num_inference_steps < 1:
            raise CSMError(f"num_inference_steps={num_inference_steps}: must be >= 1")

    def _conditions(self, class_a, class_b, lam, class_weights, mix_mode: str):
        """Resolve the per-sample condition.

        Returns:
            ``(a_idx, b_idx, lams, w, plain)``: class indices, λ values, the ``(N, K)`` mixture
            weights and whether this is plain class-conditional sampling (no mixing).
        """
        dense = None
        if class_weights is not None:
            dense = self._check_weights(class_weights, mix_mode)
            class_a, class_b, lam = dense.argmax(1).tolist(), None, None
        if class_a is None:
            raise CSMError("class_a: missing; pass the class of every sample (or class_weights)")
        a_list = [class_a] if isinstance(class_a, int | str) else list(class_a)
        n = len(a_list)
        if n == 0:
            raise CSMError("class_a: empty; pass at least one class")
        a_idx = [self.class_index(c, "class_a") for c in a_list]
        plain = class_b is None and lam is None and dense is None
        if dense is not None or plain:
            b_idx, lams = a_idx, [1.0] * n
        else:
            if class_b is None or lam is None:
                raise CSMError("class_b/lam: pass both (mixing) or neither (plain sampling)")
            b_list = [class_b] * n if isinstance(class_b, int | str) else list(class_b)
            b_idx = [self.class_index(c, "class_b") for c in b_list]
            lams = [float(lam)] * n if isinstance(lam, int | float) else [float(v) for v in lam]
        w = mixing_weights(a_idx, b_idx, lams, self.num_classes)  # validates lengths, ranges, λ
        return a_idx, b_idx, lams, (w if dense is None else dense), plain

    def _condition_rows(self, w: np.ndarray, do_cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, R)`` weights over the condition table's rows: the mixture, and the null row."""
        k, rows = self.num_classes, self._num_rows()
        if do_cfg and rows < k + 1:
            raise CSMError(
                "guidance_scale: the model has no null class row (trained without label dropout); "
                "use guidance_scale=1"
            )
        n = len(w)
        w_ext = torch.zeros(n, rows, dtype=torch.float32)
        w_ext[:, :k] = torch.from_numpy(w).float()
        w_null = torch.zeros(n, rows)
        w_null[:, min(k, rows - 1)] = 1.0  # the null row follows the K class rows
        return w_ext, w_null

    def _initial_latents(self, n: int, generator, latents, device) -> torch.Tensor:
        """Initial noise: per-sample generators make each image's noise independent of the batch."""
        shape = (n, *self._latent_shape())
        model = self.transformer if self.backbone == "dit" else self.unet
        if latents is None:
            if isinstance(generator, list) and len(generator) != n:
                raise CSMError(
                    f"generator: {len(generator)} generators for {n} samples; pass one per sample"
                )
            return randn_tensor(shape, generator=generator, device=device, dtype=model.dtype)
        if tuple(latents.shape) != shape:
            raise CSMError(f"latents: shape {tuple(latents.shape)} != expected {shape}")
        return latents.to(device=device, dtype=model.dtype)

    def _branches(self, a_idx, b_idx, w_ext, w_null, plain, mix_mode, do_cfg, device) -> list:
        """The forward chunks of one denoising step, as ``(labels, weights)`` pairs.

        Unconditional (null) branch first when guiding, then the conditional branch: one with the
        mixed condition (``embedding``), or one per class (``eps``).
        """
        n, rows = len(a_idx), w_ext.shape[1]
        labels_a = torch.tensor(a_idx, device=device)
        labels_b = torch.tensor(b_idx, device=device)
        labels_null = torch.full((n,), self.num_classes, device=device)
        if plain:
            branches = [(labels_a, None)]
        elif mix_mode == "embedding":
            branches = [(labels_a, w_ext)]
        else:
            onehot_a = torch.zeros(n, rows).scatter_(1, labels_a.cpu().view(-1, 1), 1.0)
            onehot_b = torch.zeros(n, rows).scatter_(1, labels_b.cpu().view(-1, 1), 1.0)
            branches = [(labels_a, onehot_a), (labels_b, onehot_b)]
        if do_cfg:
            branches = [(labels_null, None if plain else w_null), *branches]
        return branches


def _combine(eps: tuple[torch.Tensor, ...], do_cfg: bool, lam_t: torch.Tensor, guidance: float):
    """The noise prediction of one step from its chunks (null first when guiding).

    Two conditional chunks (``mix_mode="eps"``) are mixed as ``λ·ε_a + (1-λ)·ε_b``; guidance is
    ``ε_u + s·(ε_c - ε_u)``.
    """
    eps_u, eps_c = (eps[0], eps[1:]) if do_cfg else (None, eps)
    if len(eps_c) == 2:
        lt = lam_t.to(eps_c[0].dtype)
        cond = lt * eps_c[0] + (1 - lt) * eps_c[1]
    else:
        cond = eps_c[0]
    return cond if eps_u is None else eps_u + guidance * (cond - eps_u)


def build_unet(
    num_classes: int,
    image_size: int,
    in_channels: int,
    block_out_channels: Sequence[int],
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 8,
) -> UNet2DModel:
    """A class-conditional :class:`~diffusers.UNet2DModel` with a ``K + 1``-row class table.

    The last row (index ``K``) is the null class used for label dropout and classifier-free
    guidance.
    """
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention and n >= 2:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=norm_num_groups,
        num_class_embeds=num_classes + 1,
        attention_head_dim=8,
    )
