"""CSM batches: which synthetic member is a real image's endpoint (reannotated vs λ order)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from csm.errors import CSMError
from csm.training.config import TrainConfig, validate_config
from csm.training.methods import Stage
from csm.training.sampler import SyntheticSampler, member_rank
from csm.training.trainer import stage_config


def _one_group():
    """One group of 4 images of pair (a=1, b=0) whose reannotation disagrees with λ."""
    lam = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    # the λ = 2/3 member looks most like class 1, the λ = 1/3 member most like class 0
    soft = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.05, 0.95], [0.3, 0.7]])
    ones = torch.ones(4, dtype=torch.long)
    return torch.zeros(4, dtype=torch.long), lam, ones, 0 * ones, soft


def test_reannotated_order_picks_the_member_that_looks_most_like_the_class():
    gid, lam, a, b, soft = _one_group()
    rank = member_rank(soft, a, b)
    assert torch.allclose(rank, torch.tensor([-0.2, -0.8, 0.9, 0.4]))
    g = torch.Generator().manual_seed(0)
    by_soft = SyntheticSampler(gid, lam, a, b, 2, endpoint=True, interior=0, rank=rank)
    by_lam = SyntheticSampler(gid, lam, a, b, 2, endpoint=True, interior=0)
    labels = torch.tensor([1, 0])  # one real image of class a = 1, one of class b = 0
    assert by_soft.sample(labels, g).tolist() == [2, 1]  # largest / smallest soft[a] - soft[b]
    assert by_lam.sample(labels, g).tolist() == [3, 0]  # largest / smallest λ


def test_member_order_option_is_validated_and_stage_settings_reach_the_optimiser():
    validate_config(TrainConfig(syn_member_order="generation"))
    with pytest.raises(CSMError, match="--syn-member-order 'x'|--syn-member-order x"):
        validate_config(TrainConfig(syn_member_order="x"))
    cfg = TrainConfig(lr=0.05, weight_decay=5e-4)
    plain = Stage(epochs=3, parameters=lambda m: [], loss=lambda m, b, s: (None, {}))
    head = dataclasses.replace(plain, lr=5.0, weight_decay=0.0)  # RefCal's stage 2
    got = stage_config(cfg, head)
    assert (got.lr, got.weight_decay) == (5.0, 0.0) and (cfg.lr, cfg.weight_decay) == (0.05, 5e-4)
    assert stage_config(cfg, plain) is cfg
