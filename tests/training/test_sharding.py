"""Per-process rows of a global batch: the random draws do not depend on the process count."""

from __future__ import annotations

import pytest
import torch

from csm.data.augment import Augment
from csm.training.sharding import augment_rows, loss_share, synthetic_rows
from csm.utils import process_rows


@pytest.mark.parametrize("augment", [Augment(4, True), Augment(2, False), Augment(0, True)])
def test_augment_rows_equals_augment_and_shards_add_up(augment: Augment) -> None:
    x = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    whole = augment(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(augment_rows(augment, x, 7, slice(0, 7), g), whole)  # bit for bit
    after = torch.rand(1, generator=g)  # the generator advanced exactly as Augment's
    g_ref = torch.Generator().manual_seed(3)
    augment(x, g_ref)
    assert torch.equal(after, torch.rand(1, generator=g_ref))
    for world in (2, 3):
        parts = []
        for rank in range(world):
            rows = process_rows(7, rank, world)
            gen = torch.Generator().manual_seed(3)
            parts.append(augment_rows(augment, x[rows], 7, rows, gen))
        assert torch.equal(torch.cat(parts), whole), world


def test_synthetic_rows_follow_the_sampler_block_layout() -> None:
    # 5 real images, 2 synthetic per image: blocks [0..4] and [5..9]
    assert synthetic_rows(10, 5, 0, 2).tolist() == [0, 1, 2, 5, 6, 7]
    assert synthetic_rows(10, 5, 1, 2).tolist() == [3, 4, 8, 9]
    assert synthetic_rows(10, 5, 0, 1).tolist() == list(range(10))
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    whole = Augment(1, True)(x, torch.Generator().manual_seed(0))
    for rank in (0, 1):
        rows = synthetic_rows(10, 5, rank, 2)
        gen = torch.Generator().manual_seed(0)
        assert torch.equal(augment_rows(Augment(1, True), x[rows], 10, rows, gen), whole[rows])


def test_loss_shares_turn_local_means_into_the_global_mean() -> None:
    assert loss_share(10, 0, 1) == 1.0
    losses = torch.arange(7, dtype=torch.float64)
    for world in (2, 3):
        parts = []
        for rank in range(world):
            sl = process_rows(7, rank, world)
            parts.append(losses[sl].mean() * loss_share(7, rank, world))
        assert float(sum(parts) / world) == pytest.approx(float(losses.mean()))
