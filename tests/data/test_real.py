from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from csm.data.real import load_real, stratified_split
from csm.errors import CSMError


def test_digits_splits_and_shape():
    d = load_real("digits")
    assert d.num_classes == 10 and d.class_names == [str(i) for i in range(10)]
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert d.image_shape == (1, 16, 16) and d.train.images.dtype == torch.uint8
    assert d.train.labels.dtype == torch.int64 and not d.allow_hflip
    # stratified: every class in every split, test ~20%, val ~10% of the rest
    for s in (d.train, d.val, d.test):
        assert (torch.bincount(s.labels, minlength=10) > 0).all()
    assert abs(len(d.test) / 1797 - 0.2) < 0.01
    assert abs(len(d.val) / (1797 - len(d.test)) - 0.1) < 0.01
    # deterministic from the seed, different for another seed
    again = load_real("digits")
    assert torch.equal(again.test.images, d.test.images)
    other = load_real("digits", seed=1)
    assert not torch.equal(other.test.labels, d.test.labels)
    assert load_real("digits", image_size=8).image_shape == (1, 8, 8)


def test_digits_pixels_match_sklearn_at_native_size():
    from sklearn.datasets import load_digits

    d = load_real("digits", image_size=8)
    raw = load_digits()
    all_imgs = torch.cat([d.train.images, d.val.images, d.test.images]).float()
    # the brightest pixel is 16 in sklearn -> 255 here
    assert all_imgs.max() == 255 and all_imgs.min() == 0
    assert all_imgs.sum() == pytest.approx(np.rint(raw.images * 255 / 16).sum())


def test_mnist5k():
    d = load_real("mnist5k")
    assert len(d.train) + len(d.val) + len(d.test) == 5000
    assert d.image_shape == (1, 28, 28)


def test_stratified_split_keeps_one_per_class():
    labels = np.array([0, 0, 0, 0, 0, 1, 2, 2])
    keep, held = stratified_split(labels, 0.5, seed=0)
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(8))
    assert set(labels[keep]) == {0, 1, 2}  # class 1 has one image: it stays in train
    assert len(set(keep) & set(held)) == 0


def _write_imagefolder(root, classes, per_class=6, size=(10, 10), mode="RGB", sizes=None):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            s = sizes[i % len(sizes)] if sizes else size
            arr = rng.integers(0, 255, (s[1], s[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / c / f"{i}.png")
    return root


def test_imagefolder_keeps_class_names(tmp_path):
    root = _write_imagefolder(tmp_path / "pets", ["cat", "dog", "eel"])
    d = load_real(str(root))
    assert d.class_names == ["cat", "dog", "eel"]
    assert d.image_shape == (3, 10, 10)
    assert len(d.train) + len(d.val) + len(d.test) == 18
    assert d.allow_hflip


def test_save_to_disk_with_test_split_and_explicit_columns(tmp_path):
    import datasets

    feats = datasets.Features(
        {
            "pic": datasets.Image(),
            "kind": datasets.ClassLabel(names=["a", "b"]),
            "x": datasets.Value("int32"),
        }
    )
    rng = np.random.default_rng(0)

    def make(n):
        return datasets.Dataset.from_dict(
            {
                "pic": [
                    Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)) for _ in range(n)
                ],
                "kind": [i % 2 for i in range(n)],
                "x": list(range(n)),
            },
            features=feats,
        )

    datasets.DatasetDict({"train": make(20), "test": make(8)}).save_to_disk(tmp_path / "ds")
    d = load_real(str(tmp_path / "ds"))
    assert d.class_names == ["a", "b"] and len(d.test) == 8  # the dataset's own test split
    assert len(d.train) + len(d.val) == 20 and d.image_shape == (1, 6, 6)
    with pytest.raises(CSMError, match="column 'x' is not images"):
        load_real(str(tmp_path / "ds"), image_column="x")


def _save(tmp_path, name, columns, features):
    import datasets

    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(
        tmp_path / name
    )
    return str(tmp_path / name)


def _imgs(n, sizes=((6, 6),)):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, sizes[i % len(sizes)], dtype=np.uint8))
        for i in range(n)
    ]


def test_bad_inputs_have_clear_errors(tmp_path):
    import datasets

    with pytest.raises(CSMError, match="dataset 'no-such-dataset-xyz': cannot be loaded"):
        load_real("no-such-dataset-xyz")
    nolabel = _save(tmp_path, "nolabel", {"image": _imgs(4)}, {"image": datasets.Image()})
    with pytest.raises(CSMError, match="no label column"):
        load_real(nolabel)
    one = _save(
        tmp_path,
        "one",
        {"image": _imgs(4), "label": [0] * 4},
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["only"])},
    )
    with pytest.raises(CSMError, match="at least two"):
        load_real(one)
    empty_class = _save(
        tmp_path,
        "empty",
        {"image": _imgs(4), "label": [0, 1, 0, 1]},
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])},
    )
    with pytest.raises(CSMError, match=r"\['c'\] have no training image"):
        load_real(empty_class)
    mixed = _save(
        tmp_path,
        "mixed",
        {"image": _imgs(6, sizes=((6, 6), (8, 7))), "label": [0, 1] * 3},
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])},
    )
    with pytest.raises(CSMError, match="mixed sizes.*--image-size"):
        load_real(mixed)
    assert load_real(mixed, image_size=5).image_shape == (1, 5, 5)


def test_stratified_subset_keeps_per_class_images_deterministically():
    from csm.data.real import Split, stratified_subset

    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    images = torch.arange(15, dtype=torch.uint8).view(15, 1, 1, 1)
    split = Split(images, labels)
    sub = stratified_subset(split, 4, seed=3)
    assert torch.bincount(sub.labels).tolist() == [4, 3, 4]  # class 1 has only 3
    idx = sub.images.flatten().long()
    assert torch.equal(labels[idx], sub.labels) and torch.equal(idx, idx.sort().values)
    again = stratified_subset(split, 4, seed=3)
    assert torch.equal(again.images, sub.images)
    other = stratified_subset(split, 4, seed=4)
    assert not torch.equal(other.images, sub.images)
    with pytest.raises(CSMError, match="--train-per-class 0"):
        stratified_subset(split, 0, seed=0)


def test_run_data_uses_the_subset_and_keeps_val_and_test():
    from csm.training.config import TrainConfig
    from csm.training.runs import real_data_for

    full = real_data_for(TrainConfig(dataset="digits", data_seed=0))
    sub = real_data_for(TrainConfig(dataset="digits", data_seed=0, train_per_class=20))
    assert len(sub.train) == 200 and sub.train.class_counts(10) == [20] * 10
    assert torch.equal(sub.val.images, full.val.images)
    assert torch.equal(sub.test.labels, full.test.labels)


def test_split_records_and_which_models_saw_only_a_runs_training_images():
    from csm.data.real import load_real, split_difference, split_record, stratified_subset

    full = load_real("digits", seed=3)
    sub = load_real("digits", seed=3, train_per_class=5)
    assert torch.equal(sub.train.images, stratified_subset(full.train, 5, 3).images)
    assert torch.equal(sub.val.labels, full.val.labels) and len(sub.train) == 50
    assert sub.split_record() == {
        "dataset": "digits",
        "seed": 3,
        "val_fraction": 0.1,
        "test_fraction": 0.2,
        "train_per_class": 5,
    }
    run = full.split_record()
    assert split_difference(run, run) is None
    assert split_difference(run, sub.split_record()) is None  # a subset of the run's images
    assert split_difference(sub.split_record(), run) == "train_per_class None (this run: 5)"
    assert split_difference(sub.split_record(), split_record("digits", 3, train_per_class=9)) == (
        "train_per_class 9 (this run: 5)"
    )
    assert split_difference(run, {"dataset": "digits", "seed": 3}) is None  # older record
    assert split_difference(run, split_record("digits", 4, 0.3)) == (
        "seed 4 (this run: 3), val_fraction 0.3 (this run: 0.1)"
    )
