"""Pure partitions of one dataset among simulated leaves (worldlm.data.partition)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from worldlm.data import partition as pt

LABELS = [i % 10 for i in range(2000)]  # 10 labels, 200 examples each


def _assigned_once(parts: pt.Parts, n: int) -> None:
    every = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(every, np.arange(n))
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats


def _label_concentration(labels: list[int], parts: pt.Parts) -> float:
    """Mean over labels of the share of its examples that its largest holder has."""
    hists = pt.histograms(labels, parts)
    per_label = [max(h[k] for h in hists) / labels.count(k) for k in set(labels)]
    return float(np.mean(per_label))


def _distance_from_global(labels: list[int], parts: pt.Parts) -> float:
    """Mean over leaves of the total variation distance of its label shares from the whole's
    (uniform here: 1/10 each)."""
    hists = pt.histograms(labels, parts)
    return float(
        np.mean(
            [
                0.5 * sum(abs(h[k] / len(p) - 0.1) for k in range(10))
                for h, p in zip(hists, parts, strict=True)
            ]
        )
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: pt.iid_partition(2000, 7, seed),
        lambda seed: pt.dirichlet_partition(LABELS, 7, 0.5, seed),
        lambda seed: pt.size_skew_partition(2000, 7, 1.0, seed),
    ],
    ids=["iid", "dirichlet", "size_skew"],
)
def test_each_kind_is_deterministic_and_assigns_every_example_once(
    make: Callable[[int], pt.Parts],
) -> None:
    first, again, other = make(3), make(3), make(4)
    assert len(first) == 7
    _assigned_once(first, 2000)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_parts_are_equal_in_size() -> None:
    sizes = [len(p) for p in pt.iid_partition(103, 4, seed=0)]
    assert sorted(sizes) == [25, 26, 26, 26]


def test_dirichlet_tiny_alpha_skews_labels_and_huge_alpha_is_near_uniform() -> None:
    skewed = pt.dirichlet_partition(LABELS, 5, 0.01, seed=0, min_size=1)
    even = pt.dirichlet_partition(LABELS, 5, 1000.0, seed=0)
    _assigned_once(skewed, len(LABELS))
    # alpha 0.01: each label sits almost wholly in one leaf, so a leaf holds a few labels;
    # 1000: every leaf holds every label in about the whole's shares (a fifth of each label).
    assert _label_concentration(LABELS, skewed) > 0.9
    assert _distance_from_global(LABELS, skewed) > 0.6
    assert _label_concentration(LABELS, even) < 0.25
    assert _distance_from_global(LABELS, even) < 0.05
    assert all(len(h) == 10 for h in pt.histograms(LABELS, even))
    assert max(len(p) for p in even) < 1.1 * min(len(p) for p in even)


def test_dirichlet_redraws_until_every_leaf_has_min_size() -> None:
    parts = pt.dirichlet_partition(LABELS, 10, 0.05, seed=1, min_size=50)
    assert min(len(p) for p in parts) >= 50
    with pytest.raises(ValueError, match="min_size"):
        pt.dirichlet_partition(LABELS, 10, 0.05, seed=1, min_size=201)  # 2000 < 10 * 201
    with pytest.raises(ValueError, match="raise alpha"):
        pt.dirichlet_partition(LABELS, 10, 0.001, seed=1, min_size=190)


def test_column_gives_one_leaf_per_value_and_leaves_missing_values_out() -> None:
    values = ["fr", "en", None, "fr", "de", "en", "fr"]
    keys, parts = pt.column_partition(values)
    assert keys == ["de", "en", "fr"]
    assert [p.tolist() for p in parts] == [[4], [1, 5], [0, 3, 6]]
    with pytest.raises(ValueError, match="no values"):
        pt.column_partition([None, None])


def test_size_skew_sigma_zero_gives_equal_sizes() -> None:
    sizes = [len(p) for p in pt.size_skew_partition(1000, 8, 0.0, seed=5)]
    assert sizes == [125] * 8


@pytest.mark.parametrize("sigma", [0.5, 1.5])
def test_size_skew_log_sizes_spread_by_sigma(sigma: float) -> None:
    sizes = pt.skewed_sizes(10**9, 4000, sigma, pt.rng(0, "size_skew"))
    assert sizes.sum() == 10**9
    assert np.std(np.log(sizes)) == pytest.approx(sigma, rel=0.05)


def test_size_skew_keeps_min_size_and_a_larger_sigma_spreads_more() -> None:
    spread = []
    for sigma in (0.25, 1.0, 2.0):
        sizes = [len(p) for p in pt.size_skew_partition(5000, 50, sigma, seed=2, min_size=10)]
        assert min(sizes) >= 10 and sum(sizes) == 5000
        spread.append(np.std(sizes) / np.mean(sizes))
    assert spread == sorted(spread)


def test_groups_round_robin_and_majority() -> None:
    assert pt.round_robin_groups(5, 2) == [0, 1, 0, 1, 0]
    values = ["a", "b", "b", None, "a"]
    assert pt.majority(values, np.array([0, 1, 2, 3])) == "b"
    assert pt.majority(values, np.array([0, 1])) == "a"  # a tie: the smallest repr


def test_node_names_are_safe_and_unique() -> None:
    assert pt.node_names(["en", "pt-BR", "zh Hans", "zh/Hans", 3, ""]) == [
        "en",
        "pt-BR",
        "zh_Hans",
        "zh_Hans-2",
        "3",
        "_",
    ]
    assert pt.numbered("leaf", 12)[:3] == ["leaf00", "leaf01", "leaf02"]
    assert pt.numbered("g", 1) == ["g0"]
