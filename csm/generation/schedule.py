"""λ schedules of ``csm generate`` and the spread of annotated confidences.

The uniform grid ``λ = 0, 1/(G-1), ..., 1`` (:func:`csm.generation.mixing.lambdas`) puts most
annotated confidences near 0 or 1, because the curve λ → soft[a] of a class-conditional
diffusion model is S-shaped: an image snaps to one class well before λ = 0.5. The *targeted*
schedule (``csm generate --lambda-schedule targeted --pilot DIR[:NAME]``) reads a pilot: an
annotated synthetic dataset of the same generator. For every class pair (a, b) it

1. fits the monotone curve ``f: λ -> soft[a]`` to the pilot's images of that pair by isotonic
   regression (pool-adjacent-violators, :func:`isotonic_fit`; ties in λ are pooled by their
   mean), linearly interpolated between the pilot's λ values (:class:`MonotoneCurve`);
2. places the group's ``G`` ratios at ``λ_j = f⁻¹(t_j)`` for ``G`` targets ``t_j`` evenly spaced
   over the achievable range ``[f(0), f(1)]`` (:func:`targeted_lambdas`). The ends stay
   ``λ = 0`` and ``λ = 1`` exactly, so the pure endpoints the CSM sampler uses stay pure;
   ``--lambda-ends targeted`` places all ``G`` at the midpoint targets instead, so that the whole
   set (a quarter of which are the ends at G = 8) spreads evenly. Where ``f`` is flat at a
   target, ``f⁻¹`` takes the middle of the flat stretch.

A pair the pilot cannot target (no images, one λ only, or ``f(1) - f(0) <`` :data:`MIN_RANGE`)
keeps the uniform grid with a warning that names it (``--pilot-strict``: an error). The fitted
table is a pure function of the pilot's labels: it is recorded whole, with the pilot's
fingerprint, in the dataset's manifest and card (:meth:`LambdaSchedule.record`), so a resume
with another pilot is refused and ``csm generate --from-card`` rebuilds the data without the
pilot.

:func:`confidence_spread` measures what a schedule achieves: the histogram of the annotated
``soft[a]`` and its Kolmogorov-Smirnov distance to U(0, 1), over all images and per λ-rank
(the position of an image in its group, by λ). ``csm inspect`` reports it for a dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csm.errors import CSMError
from csm.generation.mixing import lambdas, num_pairs, pair_for_group

logger = logging.getLogger(__name__)

__all__ = [
    "LAMBDA_ENDS",
    "MIN_RANGE",
    "SCHEDULES",
    "LambdaSchedule",
    "MonotoneCurve",
    "Pilot",
    "check_pilot",
    "confidence_spread",
    "fit_schedule",
    "isotonic_fit",
    "ks_uniform",
    "lambda_ranks",
    "read_pilot",
    "schedule_from_record",
    "targeted_lambdas",
]

#: Values of ``csm generate --lambda-schedule``.
SCHEDULES = ("uniform", "targeted")
#: Values of ``csm generate --lambda-ends`` (:func:`targeted_lambdas`).
LAMBDA_ENDS = ("fixed", "targeted")
#: A pair whose fitted curve rises by less than this from λ = 0 to λ = 1 is not targeted.
MIN_RANGE = 0.05
#: Decimals the targeted ratios are rounded to (recorded as plain JSON numbers).
DECIMALS = 6
METHOD = (
    "per pair: isotonic (PAV) fit of lambda -> soft[a] on the pilot, linear interpolation; "
    "lambda_j = f^-1(t_j), t_j evenly spaced over [f(0), f(1)], ends fixed at 0 and 1"
)
METHOD_ENDS_TARGETED = (
    "per pair: isotonic (PAV) fit of lambda -> soft[a] on the pilot, linear interpolation; "
    "lambda_j = f^-1(t_j), t_j = f(0) + (j + 1/2)/G (f(1) - f(0)) for j = 0..G-1 (ends targeted)"
)


# ------------------------------------------------------------------------------------ spread
def ks_uniform(x: Sequence[float] | np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of the sample ``x`` to U(0, 1).

    ``D = sup_t |F_n(t) - t|`` with ``F_n`` the empirical CDF; values outside [0, 1] are
    clipped (the uniform CDF is 0 below 0 and 1 above 1, so this changes nothing). Equals
    ``scipy.stats.kstest(x, "uniform").statistic``.

    Raises:
        CSMError: ``x`` is empty.
    """
    v = np.sort(np.clip(np.asarray(x, dtype=np.float64).ravel(), 0.0, 1.0))
    n = len(v)
    if n == 0:
        raise CSMError("confidences: empty; the KS distance needs at least one value")
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - v), np.max(v - (i - 1) / n)))


def lambda_ranks(group_id: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Rank of every image in its group by λ (0 = the smallest λ, pure class b)."""
    group_id = np.asarray(group_id)
    lam = np.asarray(lam, dtype=np.float64)
    order = np.lexsort((np.arange(len(lam)), lam, group_id))  # by group, then λ, then row
    ranks = np.empty(len(lam), dtype=np.int64)
    sorted_gid = group_id[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_gid)) + 1] if len(lam) else np.zeros(0, int)
    first = np.repeat(starts, np.diff(np.r_[starts, len(lam)]))
    ranks[order] = np.arange(len(lam)) - first
    return ranks


def _stats(x: np.ndarray) -> dict[str, Any]:
    return {
        "n": int(len(x)),
        "mean": float(np.mean(x)) if len(x) else None,
        "std": float(np.std(x)) if len(x) else None,
        "ks": ks_uniform(x) if len(x) else None,
    }


def confidence_spread(
    soft_a: np.ndarray,
    group_id: np.ndarray | None = None,
    lam: np.ndarray | None = None,
    bins: int = 10,
) -> dict[str, Any]:
    """Histogram and KS distance to U(0, 1) of the annotated confidences ``soft[a]``.

    Args:
        soft_a: (N,) annotated soft label of class a of every image.
        group_id: (N,) group of every image; with ``lam``, adds the per-rank statistics.
        lam: (N,) generation ratio of every image.
        bins: Equal-width bins over [0, 1] of the histogram.

    Returns:
        ``{"n", "mean", "std", "ks", "histogram": {"edges", "counts"}}`` over all images; with
        ``group_id`` and ``lam`` also ``"interior"`` (the same statistics without each group's
        two ends, whose λ is 0 or 1 in every schedule) and ``"per_rank"``: for each λ-rank
        ``{"rank", "n", "lam_mean", "mean", "std", "ks"}``.
    """
    x = np.asarray(soft_a, dtype=np.float64).ravel()
    if bins < 1:
        raise CSMError(f"bins={bins}: must be >= 1")
    counts, edges = np.histogram(np.clip(x, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    out = _stats(x) | {"histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}
    if group_id is None or lam is None:
        return out
    lam = np.asarray(lam, dtype=np.float64)
    ranks = lambda_ranks(np.asarray(group_id), lam)
    _, where, counts = np.unique(np.asarray(group_id), return_inverse=True, return_counts=True)
    interior = (ranks > 0) & (ranks < counts[where] - 1)
    out["interior"] = _stats(x[interior])
    out["per_rank"] = [
        {"rank": int(r), "lam_mean": float(np.mean(lam[ranks == r]))} | _stats(x[ranks == r])
        for r in np.unique(ranks)
    ]
    return out


# ------------------------------------------------------------------------------------ curve
def isotonic_fit(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    weight: Sequence[float] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of ``y`` on ``x``: scikit-learn's ``IsotonicRegression``
    (pool-adjacent-violators; observations with equal ``x`` pooled into their weighted mean),
    evaluated at the distinct ``x``.

    Args:
        x: (N,) abscissae.
        y: (N,) observations.
        weight: (N,) positive weights (default 1).

    Returns:
        ``(xs, fitted)``: the sorted distinct ``x`` and the fitted value at each.

    Raises:
        CSMError: Empty or mismatched inputs, non-finite values or non-positive weights.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    w = np.ones_like(y) if weight is None else np.asarray(weight, dtype=np.float64).ravel()
    if not (len(x) == len(y) == len(w)) or len(x) == 0:
        raise CSMError(f"isotonic fit: x, y, weight lengths {len(x)}, {len(y)}, {len(w)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (w > 0).all()):
        raise CSMError("isotonic fit: non-finite x or y, or a weight <= 0; check the labels")
    from sklearn.isotonic import IsotonicRegression

    xs = np.unique(x)
    iso = IsotonicRegression(increasing=True).fit(x, y, sample_weight=w)
    return xs, iso.predict(xs)


@dataclass(frozen=True)
class MonotoneCurve:
    """A non-decreasing piecewise-linear curve through ``(x[i], y[i])``, constant outside.

    Attributes:
        x: Strictly increasing knots.
        y: Non-decreasing values at the knots.
    """

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def fit(cls, lam: np.ndarray, soft_a: np.ndarray) -> MonotoneCurve:
        """The isotonic fit of ``soft_a`` on ``lam`` (:func:`isotonic_fit`)."""
        xs, ys = isotonic_fit(lam, soft_a)
        return cls(xs, ys)

    def __call__(self, lam: Sequence[float] | np.ndarray) -> np.ndarray:
        """The curve's value at ``lam`` (linear between knots)."""
        return np.interp(np.asarray(lam, dtype=np.float64), self.x, self.y)

    def inverse(self, t: Sequence[float] | np.ndarray) -> np.ndarray:
        """A λ with ``f(λ) = t`` for every ``t`` in ``[y[0], y[-1]]`` (clipped to it).

        With ``lo = inf{λ: f(λ) >= t}`` and ``hi = sup{λ: f(λ) <= t}`` this returns
        ``(lo + hi) / 2``: the one solution where ``f`` rises through ``t``, the middle of the
        stretch where ``f`` is flat at ``t``.
        """
        x, y = self.x, self.y
        t = np.clip(np.asarray(t, dtype=np.float64), y[0], y[-1])
        n = len(x)
        if n == 1:
            return np.full(t.shape, x[0])
        j = np.searchsorted(y, t, side="left")  # first knot with y >= t
        jl = np.clip(j, 1, n - 1)
        lo = np.where(j == 0, x[0], _lerp(x[jl - 1], x[jl], y[jl - 1], y[jl], t))
        k = np.searchsorted(y, t, side="right") - 1  # last knot with y <= t
        kh = np.clip(k, 0, n - 2)
        hi = np.where(k >= n - 1, x[-1], _lerp(x[kh], x[kh + 1], y[kh], y[kh + 1], t))
        return (lo + hi) / 2


def _lerp(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray, t: np.ndarray):
    dy = y1 - y0
    frac = np.divide(t - y0, dy, out=np.zeros_like(t), where=dy > 0)
    return x0 + np.clip(frac, 0.0, 1.0) * (x1 - x0)


def targeted_lambdas(
    curve: MonotoneCurve, group_size: int, min_range: float = MIN_RANGE, ends: str = "fixed"
) -> tuple[float, ...] | None:
    """The ``G`` ratios that put ``curve``'s values evenly over ``[f(0), f(1)]``.

    Args:
        curve: The pair's fitted curve ``f: λ -> soft[a]``.
        group_size: ``G``.
        min_range: Smallest ``f(1) - f(0)`` worth targeting.
        ends: ``fixed`` (default): the ends stay ``λ = 0`` and ``λ = 1``, pure images of each
            class, the endpoints the CSM sampler takes (``--syn-endpoint``), and the ``G - 2``
            interior targets are ``t_j = f(0) + j/(G-1) (f(1) - f(0))``. ``targeted``: all ``G``
            are placed, at the midpoints ``t_j = f(0) + (j + 1/2)/G (f(1) - f(0))``, the ``G``
            points of ``[f(0), f(1)]`` closest to uniform in KS distance (``1/(2G)``); no image is
            then pure (the sampler's endpoint becomes the most one-sided member), so the whole
            set, not only the interior, spreads evenly.

    Returns:
        The ratios rounded to :data:`DECIMALS` decimals, non-decreasing; ``None`` when
        ``f(1) - f(0) < min_range`` (a flat curve: the targets would not tell the images apart).
    """
    if ends not in LAMBDA_ENDS:
        raise CSMError(f"--lambda-ends {ends!r}: choose {' or '.join(LAMBDA_ENDS)}")
    f0, f1 = (float(v) for v in curve(np.array([0.0, 1.0])))
    if not f1 - f0 >= min_range:
        return None
    if ends == "targeted":
        targets = (np.arange(group_size) + 0.5) / group_size
    else:
        targets = np.asarray(lambdas(group_size))[1:-1]
    lam = curve.inverse(f0 + targets * (f1 - f0))
    lam = np.maximum.accumulate(np.clip(np.round(lam, DECIMALS), 0.0, 1.0))
    if ends == "targeted":
        return tuple(float(v) for v in lam)
    return (0.0, *(float(v) for v in lam), 1.0)


# ------------------------------------------------------------------------------------ pilot
@dataclass
class Pilot:
    """The labels of a pilot dataset (images are not decoded, one aside for the shape).

    Attributes:
        spec: The ``--pilot`` value.
        name: The pilot folder's name (no local path).
        annotation: The annotation the soft labels come from (``None``: an unnamed one).
        class_names: The pilot's classes, in label order.
        image_shape: ``(C, H, W)`` of its images.
        info: The pilot's generation info (manifest ``params.info``).
        annotation_info: The annotation's parameters (mode, encoder, squash, ...).
        fingerprint: sha256 over the pilot's shard and label files (their recorded sha256).
        class_a: (N,) int64.
        class_b: (N,) int64.
        lam: (N,) float64 generation ratio.
        soft_a: (N,) float64 annotated soft label of class a.
    """

    spec: str
    name: str
    annotation: str | None
    class_names: list[str]
    image_shape: tuple[int, ...]
    info: dict[str, Any]
    annotation_info: dict[str, Any]
    fingerprint: str
    class_a: np.ndarray
    class_b: np.ndarray
    lam: np.ndarray
    soft_a: np.ndarray


def _pilot_dataset(spec: str, option: str) -> tuple[Path, str | None, dict, list[dict]]:
    """The pilot's folder, requested annotation name, manifest and shard records (checked)."""
    from csm.synthetic import MANIFEST_NAME, check_dataset, parse_spec

    folder, name = parse_spec(spec)
    where = f"{option} {spec}"
    if not folder.is_dir():
        raise CSMError(
            f"{where}: no such folder; pass DIR[:NAME] of a synthetic dataset written by "
            "`csm generate` (uniform grid) and annotated by `csm annotate`"
        )
    if not (folder / MANIFEST_NAME).is_file():
        raise CSMError(
            f"{where}: not a csm synthetic dataset (no {MANIFEST_NAME}); pass DIR[:NAME] written "
            "by `csm generate` and annotated by `csm annotate`"
        )
    try:
        manifest, records = check_dataset(folder)
    except CSMError as exc:
        raise CSMError(f"{where}: {exc}") from None
    return folder, name, manifest, records


def read_pilot(spec: str, option: str = "--pilot") -> Pilot:
    """Read the annotated labels of the pilot ``DIR[:NAME]`` (``DIR``: its active annotation).

    Raises:
        CSMError: No such folder, not a finished csm synthetic dataset, an unknown annotation
            (the message lists them), or a pilot that is not annotated (its labels are λ).
    """
    from csm.synthetic import LAMBDA_NAME, annotation_names, read_table
    from csm.synthetic.card import public_ref
    from csm.synthetic.storage import decode_images
    from csm.synthetic.variants import active_name, read_labels

    folder, name, manifest, records = _pilot_dataset(spec, option)
    names = annotation_names(manifest)
    if name is not None and name not in names:
        raise CSMError(
            f"{option} {spec}: no annotation named {name!r}; available: {', '.join(names)}"
        )
    chosen = active_name(manifest) if name is None else name
    if chosen == LAMBDA_NAME:
        raise CSMError(
            f"{option} {spec}: not annotated (its soft labels are the generation ratio λ); run "
            f"`csm annotate {folder}` first, or pass {folder}:NAME with NAME one of "
            f"{', '.join(n for n in names if n != LAMBDA_NAME) or '(none yet)'}"
        )
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("a", "b", "lam", "soft")}
    shape: tuple[int, ...] = ()
    for record in records:
        path = folder / record["file"]
        table = read_table(path)
        if chosen is None:  # an unnamed annotation of an older csm: the main shards hold it
            soft = np.asarray(table.column("soft_label").to_pylist(), dtype=np.float64)
        else:
            soft = read_labels(folder, manifest, chosen, record["shard"], table)["soft_label"]
        a = table.column("class_a").to_numpy().astype(np.int64)
        parts["a"].append(a)
        parts["b"].append(table.column("class_b").to_numpy().astype(np.int64))
        parts["lam"].append(table.column("lam").to_numpy().astype(np.float64))
        parts["soft"].append(np.asarray(soft, dtype=np.float64)[np.arange(len(a)), a])
        if not shape and table.num_rows:
            shape = tuple(decode_images(table.slice(0, 1), str(path)).shape[1:])
    entry = (
        manifest.get("annotation")
        if chosen is None
        else (manifest.get("annotations") or {})[chosen]
    ) or {}
    label_files = [f["sha256"] for f in entry.get("shards", [])]
    digest = json.dumps({"shards": [r["sha256"] for r in records], "labels": label_files})
    keep = ("mode", "squash", "encoder", "encoder_fingerprint", "real_dataset")
    return Pilot(
        spec=str(spec),
        name=folder.resolve().name,
        annotation=chosen,
        class_names=list(manifest["params"]["class_names"]),
        image_shape=shape,
        info=dict(manifest["params"].get("info") or {}),
        annotation_info={
            k: public_ref(entry[k]) if k in ("encoder", "real_dataset") else entry[k]
            for k in keep
            if k in entry
        },
        fingerprint=hashlib.sha256(digest.encode()).hexdigest(),
        class_a=np.concatenate(parts["a"]),
        class_b=np.concatenate(parts["b"]),
        lam=np.concatenate(parts["lam"]),
        soft_a=np.concatenate(parts["soft"]),
    )


def check_pilot(
    pilot: Pilot,
    class_names: Sequence[str],
    image_shape: Sequence[int] | None,
    info: dict[str, Any],
) -> None:
    """Refuse a pilot from another generator; warn about sampling options that differ.

    Args:
        pilot: The pilot (:func:`read_pilot`).
        class_names: The generator's classes.
        image_shape: ``(C, H, W)`` of the generator's images (``None``: unknown before
            decoding, e.g. a latent model; the recorded ``backbone`` and ``sample_size`` are
            compared instead).
        info: This run's generation info (``model``, ``model_sha256``, ``steps``, ...).

    Raises:
        CSMError: Other class names, another image shape, or another generator (by sha256, or
            by Hub id when both are Hub models).
    """
    from csm.synthetic.card import is_hub_id

    where = f"--pilot {pilot.spec}"
    if list(class_names) != pilot.class_names:
        raise CSMError(
            f"{where}: class names {pilot.class_names[:10]} differ from the generator's "
            f"{list(class_names)[:10]}; pass a pilot generated by this --model"
        )
    if image_shape is not None and tuple(image_shape) != tuple(pilot.image_shape):
        raise CSMError(
            f"{where}: images of shape {tuple(pilot.image_shape)}, the generator makes "
            f"{tuple(image_shape)}; pass a pilot generated by this --model"
        )
    for key in ("backbone", "sample_size"):
        if key in pilot.info and pilot.info[key] != info.get(key):
            raise CSMError(
                f"{where}: generated by a {key} {pilot.info[key]!r} model, this --model has "
                f"{info.get(key)!r}; pass a pilot generated by this --model"
            )
    mine, theirs = info.get("model_sha256"), pilot.info.get("model_sha256")
    other = pilot.info.get("model")
    if mine and theirs and mine != theirs:
        raise CSMError(
            f"{where}: generated by {other!r} (sha256 {theirs[:12]}...), not by this --model "
            f"(sha256 {mine[:12]}...); pass a pilot generated by this --model"
        )
    if is_hub_id(info.get("model")) and is_hub_id(other) and other != info.get("model"):
        raise CSMError(
            f"{where}: generated by {other!r}, not by {info.get('model')!r}; pass a pilot "
            "generated by this --model"
        )
    if not (mine and theirs) and other != info.get("model"):
        logger.warning("%s: cannot check its generator %r against %r", where, other, info["model"])
    options = ("steps", "guidance", "scheduler", "mix_mode")
    differ = [k for k in options if k in pilot.info and pilot.info[k] != info.get(k)]
    if differ:
        logger.warning(
            "%s: generated with other %s (%s); its λ curves may not hold for this run",
            where,
            ", ".join(differ),
            ", ".join(f"{k}={pilot.info.get(k)!r}" for k in differ),
        )


# ------------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class LambdaSchedule:
    """The per-pair ratios of a targeted run.

    Attributes:
        group_size: ``G``.
        pairs: ``"a-b"`` -> the ``G`` ratios of every group of pair (a, b).
        record: What the manifest and card record (:meth:`to_record`'s JSON).
    """

    group_size: int
    pairs: dict[str, tuple[float, ...]]
    record: dict[str, Any]

    def lams(self, class_a: int, class_b: int) -> tuple[float, ...]:
        """The ratios of pair (a, b) (the uniform grid for a pair the table lacks)."""
        got = self.pairs.get(f"{class_a}-{class_b}")
        return got if got is not None else tuple(lambdas(self.group_size))

    def to_record(self) -> dict[str, Any]:
        """The JSON record (a copy)."""
        return json.loads(json.dumps(self.record))


def _used_pairs(num_classes: int, groups: int) -> list[tuple[int, int]]:
    return [pair_for_group(k, num_classes) for k in range(min(groups, num_pairs(num_classes)))]


def _pair_name(names: Sequence[str], a: int, b: int) -> str:
    return f"{names[a]}|{names[b]} ({a}-{b})"


def fit_schedule(
    pilot: Pilot,
    groups: int,
    group_size: int,
    strict: bool = False,
    min_range: float = MIN_RANGE,
    ends: str = "fixed",
) -> LambdaSchedule:
    """Fit the targeted schedule of the pairs the first ``groups`` groups use.

    Args:
        pilot: The annotated pilot (:func:`read_pilot`, checked by :func:`check_pilot`).
        groups: Number of groups of the run (the pairs walk in order, cycling).
        group_size: ``G``.
        strict: Raise instead of falling back to the uniform grid for a pair.
        min_range: Smallest ``f(1) - f(0)`` a pair needs to be targeted.
        ends: ``fixed`` or ``targeted`` (:func:`targeted_lambdas`; recorded as ``ends``).

    Raises:
        CSMError: With ``strict``, a pair the pilot cannot target (named with the reason).
    """
    names = pilot.class_names
    uniform = tuple(lambdas(group_size))
    table, ranges, fallback = {}, {}, {}
    pred_u, pred_t = [], []
    for a, b in _used_pairs(len(names), groups):
        key = f"{a}-{b}"
        m = (pilot.class_a == a) & (pilot.class_b == b)
        lam_t, reason = None, None
        if len(np.unique(pilot.lam[m])) < 2:
            reason = f"{int(m.sum())} pilot images with {len(np.unique(pilot.lam[m]))} λ values"
        else:
            curve = MonotoneCurve.fit(pilot.lam[m], pilot.soft_a[m])
            f0, f1 = (float(v) for v in curve(np.array([0.0, 1.0])))
            ranges[key] = [round(f0, DECIMALS), round(f1, DECIMALS)]
            lam_t = targeted_lambdas(curve, group_size, min_range, ends)
            if lam_t is None:
                reason = f"flat curve: soft[a] rises {f1 - f0:.3f} < {min_range} from λ=0 to 1"
            else:
                pred_u.append(curve(np.array(uniform)))
                pred_t.append(curve(np.array(lam_t)))
        if reason is not None:
            if strict:
                raise CSMError(
                    f"--pilot {pilot.spec}: pair {_pair_name(names, a, b)} cannot be targeted "
                    f"({reason}); use a pilot with every pair (--groups >= {num_pairs(len(names))})"
                    " or drop --pilot-strict to keep the uniform grid for it"
                )
            fallback[key] = reason
        table[key] = lam_t if lam_t is not None else uniform
    _warn_fallback(pilot.spec, names, fallback)
    predicted = None
    if pred_t:
        predicted = {
            "uniform": round(ks_uniform(np.concatenate(pred_u)), 4),
            "targeted": round(ks_uniform(np.concatenate(pred_t)), 4),
        }
        logger.info(
            "λ schedule: targeted %d of %d pairs; the pilot's curves predict the KS distance of "
            "soft[a] to U(0,1) %.3f (uniform grid) -> %.3f (targeted)",
            len(pred_t),
            len(table),
            predicted["uniform"],
            predicted["targeted"],
        )
    record = {
        "mode": "targeted",
        "method": METHOD if ends == "fixed" else METHOD_ENDS_TARGETED,
        "min_range": min_range,
        "group_size": group_size,
        "pilot": {
            "name": pilot.name,
            "annotation": pilot.annotation,
            "sha256": pilot.fingerprint,
            "num_images": int(len(pilot.lam)),
            "model": pilot.info.get("model"),
            "model_sha256": pilot.info.get("model_sha256"),
            **{f"annotation_{k}": v for k, v in pilot.annotation_info.items()},
        },
        "pairs": {k: list(v) for k, v in table.items()},
        "range": ranges,
        "fallback": fallback,
        "predicted_ks": predicted,
    }
    if ends != "fixed":  # recorded only when set, so fixed-end records stay what they were
        record["ends"] = ends
    return LambdaSchedule(group_size, table, json.loads(json.dumps(record)))


def _warn_fallback(spec: str, names: Sequence[str], fallback: dict[str, str]) -> None:
    for key, reason in list(fallback.items())[:10]:
        a, b = (int(v) for v in key.split("-"))
        name = _pair_name(names, a, b)
        logger.warning("--pilot %s: pair %s keeps the uniform λ grid (%s)", spec, name, reason)
    if len(fallback) > 10:
        logger.warning("--pilot %s: %d more pairs keep the uniform grid", spec, len(fallback) - 10)


def schedule_from_record(
    record: dict[str, Any], num_classes: int, group_size: int, where: str
) -> LambdaSchedule:
    """The schedule a manifest or card recorded (checked: pairs, ``G`` ratios from 0 to 1).

    Raises:
        CSMError: A record that is not a valid targeted schedule for ``G`` and ``K`` classes.
    """
    bad = None
    pairs: dict[str, tuple[float, ...]] = {}
    if not isinstance(record, dict) or record.get("mode") != "targeted":
        bad = "mode is not 'targeted'"
    else:
        for key, values in (record.get("pairs") or {}).items():
            try:
                a, b = (int(v) for v in str(key).split("-"))
                lam = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                bad = f"pair {key!r}"
                break
            ok = 0 <= a < b < num_classes and len(lam) == group_size
            ok = ok and lam[0] == 0.0 and lam[-1] == 1.0 and all(np.diff(lam) >= 0)
            if not ok:
                bad = f"pair {key!r}: {list(lam)}"
                break
            pairs[key] = lam
        if bad is None and not pairs:
            bad = "no pairs"
    if bad is not None:
        raise CSMError(
            f"{where}: the recorded λ schedule is invalid ({bad}); regenerate with "
            "--lambda-schedule targeted --pilot DIR"
        )
    return LambdaSchedule(group_size, pairs, json.loads(json.dumps(record)))
