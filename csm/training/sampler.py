"""The synthetic half of CSM batches: which synthetic images go with which real ones."""

from __future__ import annotations

import logging
from typing import Any

import torch

from csm.errors import CSMError
from csm.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticSampler",
    "check_synthetic_matches",
    "check_synthetic_split",
    "load_synthetic_for",
    "member_rank",
    "synthetic_splits",
    "take_images",
]


def member_rank(
    soft_labels: torch.Tensor, class_a: torch.Tensor, class_b: torch.Tensor
) -> torch.Tensor:
    """``soft[a] - soft[b]`` of every synthetic image: how much more it looks like ``a``."""
    rows = torch.arange(soft_labels.shape[0])
    soft = soft_labels.float()
    return soft[rows, class_a.long()] - soft[rows, class_b.long()]


class SyntheticSampler:
    """Draw the synthetic part of CSM batches (Luo et al., ICML 2025, section 3).

    For every real image of class ``y``: ``groups`` synthetic groups whose pair ``(a, b)``
    contains ``y`` are drawn uniformly (with replacement); from each, the endpoint dominated by
    ``y`` when ``endpoint`` is set, plus ``interior`` distinct random interior members
    (0 < rank < G-1). The paper uses one group, the endpoint and one interior member.

    Member order: with ``rank`` given (what :func:`load_synthetic_for` passes by default: the
    *reannotated* ``soft[a] - soft[b]`` of every image), a group's members are sorted by it, so
    the endpoint of ``y == a`` is the member the reannotation says looks most like ``a`` (the
    largest ``soft[a] - soft[b]``) and that of ``y == b`` the one most like ``b``, as the CSM
    reference code does (issue 13's reading of E-Galois/CSM; see ``docs/fidelity.md``). Without
    ``rank`` the members are sorted by the generation ratio λ (largest λ = pure ``a``). Ties keep
    λ order.

    Args:
        group_id: ``(N,)`` group of every synthetic image.
        lam: ``(N,)`` generation ratio (weight of ``class_a``).
        class_a: ``(N,)`` first class of the pair.
        class_b: ``(N,)`` second class of the pair.
        num_classes: K.
        groups: Groups drawn per real image.
        endpoint: Take the endpoint dominated by the real image's class.
        interior: Interior members taken per drawn group.
        rank: ``(N,)`` score of ``class_a`` over ``class_b`` that orders a group's members
            (None: order by ``lam``).

    Raises:
        CSMError: A class appears in no group, or groups have too few interior members.
    """

    def __init__(
        self,
        group_id: torch.Tensor,
        lam: torch.Tensor,
        class_a: torch.Tensor,
        class_b: torch.Tensor,
        num_classes: int,
        groups: int = 1,
        endpoint: bool = True,
        interior: int = 1,
        rank: torch.Tensor | None = None,
    ) -> None:
        self.groups, self.endpoint, self.interior = groups, endpoint, interior
        # sort rows by (group, rank, lam): lam first, then stable sorts by rank and by group
        order = torch.argsort(lam, stable=True)
        if rank is not None:
            if rank.shape != lam.shape:
                raise ValueError(
                    f"rank: expected shape {tuple(lam.shape)}, got {tuple(rank.shape)}"
                )
            order = order[torch.argsort(rank[order], stable=True)]
        order = order[torch.argsort(group_id[order], stable=True)]
        uniq, inverse, counts = torch.unique_consecutive(
            group_id[order], return_inverse=True, return_counts=True
        )
        n_groups = uniq.numel()
        max_size = int(counts.max()) if n_groups else 0
        starts = torch.cumsum(counts, 0) - counts
        members = torch.full((n_groups, max_size), -1, dtype=torch.long)
        members[inverse, torch.arange(order.numel()) - starts[inverse]] = order
        first = members[:, 0]
        self.class_a = class_a[first]
        self.class_b = class_b[first]
        sizes = counts.long()
        self.end_b = first  # lowest rank: most like class b
        self.end_a = members[torch.arange(n_groups), sizes - 1]  # highest rank: most like a
        self.n_interior = (sizes - 2).clamp(min=0)
        self.interior_members = (
            members[:, 1 : max(1, max_size - 1)]
            if max_size > 2
            else torch.empty((n_groups, 0), dtype=torch.long)
        )
        if interior > 0 and n_groups and int(self.n_interior.min()) < interior:
            raise CSMError(
                f"--syn-interior {interior}: some synthetic groups have only "
                f"{int(self.n_interior.min())} interior members; lower --syn-interior or "
                "generate with a larger group size"
            )
        class_groups = [
            torch.nonzero((self.class_a == k) | (self.class_b == k)).flatten()
            for k in range(num_classes)
        ]
        missing = [k for k, g in enumerate(class_groups) if g.numel() == 0]
        if missing:
            raise CSMError(
                f"synthetic dataset: classes {missing[:5]} appear in no synthetic group; "
                f"generate at least {num_classes - 1} groups so every class is paired"
            )
        width = max(g.numel() for g in class_groups)
        self.class_groups = torch.stack(
            [torch.cat([g, g.new_zeros(width - g.numel())]) for g in class_groups]
        )
        self.class_counts = torch.tensor([g.numel() for g in class_groups])

    @property
    def per_image(self) -> int:
        """Synthetic images drawn per real image."""
        return self.groups * (int(self.endpoint) + self.interior)

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Indices of synthetic images for real ``labels`` (B,); shape ``(B * per_image,)``.

        Ordered per group draw: ``[endpoints of all B, interior members of all B, ...]``.
        """
        labels = labels.cpu()
        out = []
        for _ in range(self.groups):
            r = torch.rand(labels.shape[0], generator=generator)
            pos = (r * self.class_counts[labels]).long().clamp(max=self.class_counts[labels] - 1)
            g = self.class_groups[labels, pos]
            if self.endpoint:
                out.append(torch.where(self.class_a[g] == labels, self.end_a[g], self.end_b[g]))
            if self.interior:
                keys = torch.rand(g.shape[0], self.interior_members.shape[1], generator=generator)
                cols = torch.arange(self.interior_members.shape[1])
                keys[cols[None, :] >= self.n_interior[g][:, None]] = 2.0  # never pick padding
                pick = torch.argsort(keys, dim=1)[:, : self.interior]
                chosen = self.interior_members[g[:, None], pick]
                out.append(chosen.T.reshape(-1))
        return torch.cat(out)


def take_images(images: Any, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The uint8 synthetic images ``indices`` (in that order), on ``device``.

    Args:
        images: A decoded uint8 ``(N, C, H, W)`` tensor (indexed where it lives) or a
            :class:`csm.synthetic.SyntheticImages` (only these rows are read and decoded).
        indices: ``(n,)`` rows of the synthetic dataset (any device).
        device: Where the batch goes.
    """
    if isinstance(images, torch.Tensor):
        return images[indices.to(images.device)].to(device)
    return images[indices.cpu()].to(device)


def load_synthetic_for(
    cfg: TrainConfig, real: Any, *, lazy: bool = True
) -> tuple[Any, SyntheticSampler]:
    """Read ``cfg.synthetic`` for training on ``real`` and build its :class:`SyntheticSampler`.

    Args:
        cfg: The run's configuration (``synthetic`` and the ``syn_*`` options).
        real: The real dataset (class names, image shape, number of classes).
        lazy: Keep the images in the memory-mapped shards and decode only the rows a batch
            takes (:class:`csm.synthetic.SyntheticImages`); False decodes them all up front.
            The metadata the sampler needs (groups, λ, pairs, soft labels) is in memory either
            way, and the batches are the same bytes.

    Returns:
        The :class:`csm.synthetic.SyntheticTensors` and the sampler over it.

    Raises:
        CSMError: A bad ``DIR`` or unknown ``NAME`` (naming --synthetic and listing the names),
            classes or image shape that differ from the real dataset's, or groups the sampler
            cannot draw from.
    """
    from csm.synthetic import load_synthetic_tensors

    # DIR (the active annotation) or DIR:NAME (a named annotation over the same images)
    syn = load_synthetic_tensors(cfg.synthetic, option="--synthetic", lazy=lazy)
    check_synthetic_matches(syn, real.class_names, real.image_shape, cfg.synthetic)
    check_synthetic_split(cfg.synthetic, real.split_record(), cfg.allow_split_mismatch)
    # cfg.syn_member_order is one of config.MEMBER_ORDERS (validate_config checked it)
    reannotated = cfg.syn_member_order == "reannotated"
    rank = member_rank(syn.soft_labels, syn.class_a, syn.class_b) if reannotated else None
    sampler = SyntheticSampler(
        syn.group_id,
        syn.lam,
        syn.class_a,
        syn.class_b,
        real.num_classes,
        cfg.syn_groups,
        cfg.syn_endpoint,
        cfg.syn_interior,
        rank=rank,
    )
    return syn, sampler


def synthetic_splits(spec: str) -> dict[str, dict[str, Any] | None]:
    """The training splits of the models behind the synthetic dataset ``spec`` (``DIR[:NAME]``):
    ``{"generator": record, "annotation encoder": record}``; ``None`` where the dataset does not
    record one (made before csm recorded splits, a Hub generator, a CLIP encoder, λ labels)."""
    from csm.synthetic import parse_spec, read_manifest
    from csm.synthetic.variants import LAMBDA_NAME, active_name

    folder, name = parse_spec(spec)
    manifest = read_manifest(folder)
    info = (manifest.get("params") or {}).get("info") or {}
    if name is None or name == active_name(manifest):
        ann = manifest.get("annotation") or {}
    else:
        ann = (manifest.get("annotations") or {}).get(name) or {}
    encoder = None if name == LAMBDA_NAME else ann.get("encoder_split")
    return {"generator": info.get("train_split"), "annotation encoder": encoder}


def check_synthetic_split(spec: str, run_split: dict[str, Any], allow: bool = False) -> None:
    """Refuse synthetic data made by a model that saw images outside this run's training split.

    A generator or annotation encoder fitted on another split seed, val fraction or a larger
    ``--train-per-class`` subset has seen val or test images of this run (its calibrators are
    fitted on val, its scores read on test), or more real data than the methods it is compared
    with; :func:`csm.data.real.split_difference` says which. A dataset that records no split is
    let through with a warning.

    Raises:
        CSMError: A recorded split differs and ``allow`` (``--allow-split-mismatch``) is off.
    """
    from csm.data.real import split_difference

    for what, used in synthetic_splits(spec).items():
        if used is None:
            logger.info("--synthetic %s: its %s records no training split", spec, what)
            continue
        why = split_difference(run_split, used)
        if why is None:
            continue
        msg = (
            f"--synthetic {spec}: its {what} was trained on another split of {used['dataset']}: "
            f"{why}; it saw images outside this run's training images. Fit it with this run's "
            "split (csm fit-diffusion / csm train --split-seed/--data-seed, --val-fraction, "
            "--train-per-class), or pass --allow-split-mismatch"
        )
        if not allow:
            raise CSMError(msg)
        logger.warning("%s (allowed)", msg)


def check_synthetic_matches(
    syn: Any, class_names: list[str], image_shape: tuple[int, int, int], where: str
) -> None:
    """Raise a CSMError if a synthetic dataset's classes or image shape differ from the real."""
    if list(syn.class_names) != list(class_names):
        raise CSMError(
            f"--synthetic {where}: classes {list(syn.class_names)[:5]} differ from the real "
            f"dataset's {list(class_names)[:5]}; generate it from a model trained on this dataset"
        )
    if tuple(syn.images.shape[1:]) != tuple(image_shape):
        raise CSMError(
            f"--synthetic {where}: images are {tuple(syn.images.shape[1:])} but real images are "
            f"{tuple(image_shape)}; pass --image-size to match or regenerate"
        )
