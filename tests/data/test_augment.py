"""Torch augmentations: crops are crops of the zero-padded image, flips mirror, seeds replay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csm.config import resolve_config
from csm.data.augment import Augment, random_crop, random_hflip
from csm.errors import CSMError
from csm.training.config import TrainConfig
from csm.training.trainer import build_augment


def test_random_crop_matches_a_hand_made_crop_at_the_drawn_offsets():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    out = random_crop(x, 2, torch.Generator().manual_seed(7))
    offsets = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(7))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        oy, ox = int(offsets[0, i]), int(offsets[1, i])
        assert torch.equal(out[i], padded[i, :, oy : oy + 5, ox : ox + 6])
    assert out.shape == x.shape and out.dtype == x.dtype


def test_random_crop_covers_every_offset_and_keeps_uint8():
    x = torch.zeros(400, 1, 4, 4, dtype=torch.uint8)
    x[:, :, 0, 0] = 255  # where the top-left pixel lands tells the offset
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8
    positions = {tuple(torch.nonzero(o[0]).flatten().tolist()) for o in out}
    # offset (dy, dx) in {0,1,2}^2 moves the pixel to (1-dy, 1-dx); dy=2 or dx=2 crops it away
    assert positions == {(1, 1), (1, 0), (0, 1), (0, 0), ()}


def test_padding_zero_is_identity_and_negative_is_an_error():
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)
    with pytest.raises(CSMError, match="crop padding -1"):
        random_crop(x, -1, torch.Generator())


def test_hflip_mirrors_a_subset_and_p_bounds():
    x = torch.rand(64, 2, 3, 5)
    out = random_hflip(x, torch.Generator().manual_seed(3))
    flipped = [bool(torch.equal(o, xi.flip(-1))) for o, xi in zip(out, x)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54
    assert torch.equal(random_hflip(x, torch.Generator(), p=0.0), x)
    assert torch.equal(random_hflip(x, torch.Generator(), p=1.0), x.flip(-1))
    with pytest.raises(CSMError, match="flip probability 1.5"):
        random_hflip(x, torch.Generator(), p=1.5)


def test_same_seed_same_augmentation():
    x = torch.rand(8, 3, 8, 8)
    aug = Augment(padding=4, hflip=True)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_never_flips_where_the_dataset_forbids_it():
    cfg = resolve_config(TrainConfig, overrides={"hflip": True})
    assert build_augment(cfg, allow_hflip=False).hflip is False  # digits, MNIST
    assert build_augment(cfg, allow_hflip=True).hflip is True
    off = resolve_config(TrainConfig, overrides={"augment": False})
    assert build_augment(off, allow_hflip=True) == Augment(padding=0, hflip=False)
