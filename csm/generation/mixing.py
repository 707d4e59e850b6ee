"""Semantic-mixing schedule: which classes, which λ and which seed every generated group uses.

A *group* is ``G`` images that share one initial noise and walk from pure class ``b`` (λ = 0)
to pure class ``a`` (λ = 1) at ``λ = 0, 1/(G-1), ..., 1`` (Luo et al., ICML 2025, section 3.1;
the paper uses ``G = 8``). Group ``k`` uses the unordered pair ``(a, b)``, ``a < b``, at position
``k mod P`` of the lexicographic list of the ``P = K(K-1)/2`` pairs, and the seed
:func:`seed_for_group` ``(k, base)``. Both are pure functions of ``k`` and the base seed, so any
range of groups can be generated on its own: resuming a job or splitting it across processes
yields exactly the images of one uninterrupted run.

The ratios of a group may instead come from a targeted schedule fitted on a pilot dataset
(:mod:`csm.generation.schedule`): still ``G`` values from 0 to 1, one tuple per pair.

λ is always the weight of ``class_a``: λ = 1 is pure class ``a``, λ = 0 pure class ``b``.

:func:`lambdas` and :func:`mixing_weights` are defined in :mod:`csm.generation.pipeline` (the
self-contained file saved next to every model, so diffusers users get the same math) and
re-exported here.

References:
    Luo, Tao, Dong, Xu. "Beyond One-Hot Labels: Semantic Mixing for Model Calibration." ICML 2025,
    arXiv:2504.13548.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from csm.errors import CSMError

# the mixing math lives in the self-contained pipeline file (it is saved next to every model)
from csm.generation.pipeline import lambdas, mixing_weights

if TYPE_CHECKING:
    from csm.generation.schedule import LambdaSchedule

__all__ = [
    "MixGroup",
    "dirichlet_weights",
    "group_plan",
    "lambdas",
    "mixing_weights",
    "num_pairs",
    "pair_for_group",
    "seed_for_group",
]


def num_pairs(num_classes: int) -> int:
    """Number of unordered class pairs ``K(K-1)/2``.

    Raises:
        CSMError: If ``num_classes < 2``.
    """
    if num_classes < 2:
        raise CSMError(
            f"num_classes={num_classes}: mixing needs at least 2 classes; "
            "use a dataset with 2 or more classes"
        )
    return num_classes * (num_classes - 1) // 2


def pair_for_group(k: int, num_classes: int) -> tuple[int, int]:
    """Class pair ``(a, b)`` with ``a < b`` used by group ``k``.

    Pairs are walked in lexicographic order ``(0,1), (0,2), ..., (0,K-1), (1,2), ...`` and the walk
    cycles, so every pair appears exactly once in each block of ``K(K-1)/2`` consecutive groups.

    Args:
        k: Group index (``>= 0``).
        num_classes: Number of classes ``K`` (``>= 2``).

    Returns:
        The pair ``(a, b)``; computed in closed form (no list of pairs is built).

    Raises:
        CSMError: If ``k < 0`` or ``num_classes < 2``.
    """
    if k < 0:
        raise CSMError(f"group index {k}: must be >= 0; groups are numbered from 0")
    p = num_pairs(num_classes)
    idx = int(k) % p
    n = num_classes
    # number of pairs whose first element is < a:  S(a) = a*n - a*(a+1)/2.  Find the largest a with
    # S(a) <= idx by solving the quadratic, then correct for floating-point rounding.
    a = int(((2 * n - 1) - math.sqrt((2 * n - 1) ** 2 - 8 * idx)) // 2)
    a = max(0, min(a, n - 2))

    def start(x: int) -> int:
        return x * n - x * (x + 1) // 2

    while a > 0 and start(a) > idx:
        a -= 1
    while a < n - 2 and start(a + 1) <= idx:
        a += 1
    b = a + 1 + (idx - start(a))
    return a, b


def seed_for_group(k: int, base_seed: int) -> int:
    """Seed of group ``k``: a pure function of ``(k, base_seed)``.

    Uses :class:`numpy.random.SeedSequence` entropy mixing of ``[base_seed, k]``, so nearby groups
    and nearby base seeds get statistically independent seeds, and the value never depends on how
    many groups were generated before.

    Args:
        k: Group index (``>= 0``).
        base_seed: Seed recorded for the whole generation job (``>= 0``).

    Returns:
        An integer in ``[0, 2**63)`` usable with ``torch.Generator().manual_seed``.
    """
    if k < 0:
        raise CSMError(f"group index {k}: must be >= 0; groups are numbered from 0")
    if base_seed < 0:
        raise CSMError(f"seed={base_seed}: must be >= 0; pass a non-negative --seed")
    state = np.random.SeedSequence([int(base_seed), int(k)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class MixGroup:
    """Everything needed to generate (and later describe) one group.

    Attributes:
        group_id: Index ``k`` of the group.
        seed: Seed shared by all images of the group (one initial noise).
        class_a: Class with weight λ.
        class_b: Class with weight 1 - λ.
        lams: The ``G`` ratios, from 0 (pure ``class_b``) to 1 (pure ``class_a``).
    """

    group_id: int
    seed: int
    class_a: int
    class_b: int
    lams: tuple[float, ...]


def group_plan(
    k: int,
    num_classes: int,
    base_seed: int,
    group_size: int = 8,
    schedule: LambdaSchedule | None = None,
) -> MixGroup:
    """The pair, seed and ratios of group ``k`` (see module docstring).

    Args:
        k: Group index.
        num_classes: ``K``.
        base_seed: Job seed.
        group_size: ``G``.
        schedule: A targeted λ schedule (:mod:`csm.generation.schedule`): the group takes its
            pair's ratios from it; ``None``: the uniform grid :func:`lambdas`.
    """
    a, b = pair_for_group(k, num_classes)
    lams = tuple(lambdas(group_size)) if schedule is None else schedule.lams(a, b)
    if len(lams) != group_size:
        raise CSMError(
            f"λ schedule: {len(lams)} ratios for pair ({a}, {b}), group_size={group_size}; "
            "fit the schedule for this --group-size"
        )
    return MixGroup(
        group_id=int(k),
        seed=seed_for_group(k, base_seed),
        class_a=a,
        class_b=b,
        lams=lams,
    )


def dirichlet_weights(
    k: int, num_classes: int, base_seed: int, num_mix: int = 3, alpha: float = 1.0
) -> tuple[list[int], np.ndarray]:
    """Optional multi-class mixing: ``num_mix`` classes with Dirichlet(``alpha``) weights.

    The classes and weights of group ``k`` are drawn from a generator seeded by
    :func:`seed_for_group`, so they are as reproducible as the pairwise schedule.

    Args:
        k: Group index.
        num_classes: ``K``.
        base_seed: Job seed.
        num_mix: How many distinct classes to mix (``2 <= num_mix <= K``).
        alpha: Dirichlet concentration (``> 0``).

    Returns:
        ``(classes, weights)``: sorted class indices and their weights (sum 1).
    """
    if not 2 <= num_mix <= num_classes:
        raise CSMError(
            f"num_mix={num_mix}: must be between 2 and the number of classes ({num_classes})"
        )
    if not alpha > 0:
        raise CSMError(f"alpha={alpha}: Dirichlet concentration must be > 0")
    rng = np.random.default_rng(seed_for_group(k, base_seed))
    classes = sorted(rng.choice(num_classes, size=num_mix, replace=False).tolist())
    return classes, rng.dirichlet([alpha] * num_mix)
