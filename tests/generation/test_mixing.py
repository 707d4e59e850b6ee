"""Tests for the semantic-mixing schedule (csm.generation.mixing)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from csm.errors import CSMError
from csm.generation.mixing import (
    dirichlet_weights,
    group_plan,
    lambdas,
    mixing_weights,
    num_pairs,
    pair_for_group,
    seed_for_group,
)


def test_lambdas_grid_hand_computed():
    assert lambdas(2) == [0.0, 1.0]
    assert lambdas(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    g8 = lambdas(8)
    assert len(g8) == 8 and g8[0] == 0.0 and g8[-1] == 1.0
    np.testing.assert_allclose(np.diff(g8), 1 / 7)


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_lambdas_rejects_small_groups(bad):
    with pytest.raises(CSMError, match=f"group_size={bad}"):
        lambdas(bad)


@pytest.mark.parametrize("k_classes", [2, 3, 10, 17])
def test_every_pair_once_per_cycle_in_lexicographic_order(k_classes):
    expected = list(itertools.combinations(range(k_classes), 2))
    p = num_pairs(k_classes)
    assert p == len(expected)
    for cycle in range(3):
        got = [pair_for_group(cycle * p + i, k_classes) for i in range(p)]
        assert got == expected


def test_pair_walk_large_k_closed_form_matches_enumeration():
    k_classes = 1000
    pairs = list(itertools.combinations(range(k_classes), 2))
    for idx in [0, 1, 998, 999, 1000, 250_000, len(pairs) - 1]:
        assert pair_for_group(idx, k_classes) == pairs[idx]
    assert pair_for_group(len(pairs), k_classes) == (0, 1)


def test_pair_walk_errors_name_input():
    with pytest.raises(CSMError, match="num_classes=1"):
        pair_for_group(0, 1)
    with pytest.raises(CSMError, match="group index -1"):
        pair_for_group(-1, 10)


def test_seed_is_pure_function_of_group_and_base():
    s = [seed_for_group(k, 0) for k in range(200)]
    assert s == [seed_for_group(k, 0) for k in range(200)]  # no hidden state
    assert s[57] == seed_for_group(57, 0)  # a group on its own equals the group in a run
    assert len(set(s)) == 200
    assert seed_for_group(3, 1) != seed_for_group(3, 0)
    assert all(0 <= x < 2**63 for x in s)
    with pytest.raises(CSMError, match="seed=-1"):
        seed_for_group(0, -1)


def test_group_plan_ranges_are_independent():
    whole = [group_plan(k, 10, 7, 8) for k in range(100)]
    part = [group_plan(k, 10, 7, 8) for k in range(40, 60)]
    assert whole[40:60] == part
    g = whole[10]
    assert (g.class_a, g.class_b) == (1, 3)  # 9 pairs start with 0, then (1,2), (1,3)
    assert g.lams == tuple(lambdas(8))


def test_mixing_weights_convex_combination():
    w = mixing_weights([0, 2], [1, 0], [0.25, 1.0], num_classes=3)
    np.testing.assert_array_equal(w, [[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(CSMError, match="lam=1.5"):
        mixing_weights([0], [1], [1.5], 3)
    with pytest.raises(CSMError, match="class_b=3"):
        mixing_weights([0], [3], [0.5], 3)
    with pytest.raises(CSMError, match="lengths"):
        mixing_weights([0, 1], [1], [0.5], 3)


def test_dirichlet_weights_reproducible_and_normalised():
    c1, w1 = dirichlet_weights(5, 10, 0, num_mix=3)
    c2, w2 = dirichlet_weights(5, 10, 0, num_mix=3)
    assert c1 == c2 and len(set(c1)) == 3 and c1 == sorted(c1)
    np.testing.assert_array_equal(w1, w2)
    assert w1.sum() == pytest.approx(1.0)
    with pytest.raises(CSMError, match="num_mix=11"):
        dirichlet_weights(0, 10, 0, num_mix=11)
