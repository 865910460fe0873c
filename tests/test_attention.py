"""Attention aggregation of key layers against hand-computed cases (DESIGN §5.5)."""

from __future__ import annotations

import math

import pytest
import torch

from worldlm.federation.key_layers import (
    KeyLayerPolicy,
    aggregate_key_layers,
    personalized_key_layers,
)
from worldlm.model.partition import Partition
from worldlm.strategies.attention import attend, attention_weights, layer_distance


def test_equal_children_get_equal_weights() -> None:
    w = attention_weights(torch.tensor([2.0, 2.0, 2.0]), torch.tensor([5.0, 5.0, 5.0]), tau=1.0)
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_a_far_outlier_gets_less_weight() -> None:
    w = attention_weights(torch.tensor([1.0, 1.0, 10.0]), torch.ones(3), tau=1.0)
    assert w[2] < w[0] == w[1]
    # hand computation: scores -d / median(d) = [-1, -1, -10]
    e = [math.exp(-1), math.exp(-1), math.exp(-10)]
    assert w.tolist() == pytest.approx([x / sum(e) for x in e])


def test_infinite_temperature_gives_size_weighted_averaging() -> None:
    sizes = torch.tensor([1.0, 3.0, 6.0])
    w = attention_weights(torch.tensor([0.5, 7.0, 2.0]), sizes, tau=1e12)
    torch.testing.assert_close(w, sizes.double() / 10)
    children = [torch.full((2,), v) for v in (1.0, 2.0, 3.0)]
    out = attend(torch.zeros(2), children, w, eps=1.0)
    torch.testing.assert_close(out, torch.full((2,), (1 + 6 + 18) / 10))


def test_step_moves_part_way() -> None:
    out = attend(torch.tensor([0.0]), [torch.tensor([4.0])], torch.tensor([1.0]), eps=0.25)
    assert out.item() == 1.0


def test_layer_distance_spans_all_tensors_of_a_layer() -> None:
    d = layer_distance(
        [torch.zeros(2), torch.zeros(1)], [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    )
    assert d == 5.0


def test_aggregate_key_layers_weighs_each_layer_separately() -> None:
    partition = Partition({"a": ("a.w",), "b": ("b.w",)})
    policy = KeyLayerPolicy(partition, tau=1.0, eps=1.0, private=True)
    current = {"a.w": torch.zeros(1), "b.w": torch.zeros(1)}
    near_on_a = {"a.w": torch.tensor([1.0]), "b.w": torch.tensor([9.0])}
    near_on_b = {"a.w": torch.tensor([9.0]), "b.w": torch.tensor([1.0])}
    out = aggregate_key_layers(current, [near_on_a, near_on_b], [1.0, 1.0], policy)
    assert out["a.w"].item() < 5.0 and out["b.w"].item() < 5.0  # nearer child wins per layer
    assert out["a.w"].item() == pytest.approx(out["b.w"].item())


def test_per_child_attention_seen_from_each_child() -> None:
    policy = KeyLayerPolicy(Partition({"a": ("a.w",)}), tau=1.0, eps=1.0, private=True)
    values = [0.0, 0.2, 10.0]
    kids = [{"a.w": torch.tensor([v], dtype=torch.float64)} for v in values]
    out = [k["a.w"].item() for k in personalized_key_layers(kids, [1.0, 1.0, 1.0], policy)]
    # child 0: distances 0, 0.2, 10; the scale is the (lower) median of its siblings' distances,
    # 0.2, so the scores are 0, -1, -50
    w = torch.softmax(torch.tensor([0.0, -1.0, -50.0], dtype=torch.float64), 0)
    assert out[0] == pytest.approx(float(w[1] * 0.2 + w[2] * 10.0))
    # the outlier: distances 10, 9.8, 0; scale 9.8; it keeps the largest single weight
    w = torch.softmax(torch.tensor([-10 / 9.8, -1.0, 0.0], dtype=torch.float64), 0)
    assert out[2] == pytest.approx(float(w[1] * 0.2 + w[2] * 10.0))
    assert out[0] < 0.2 < 5.0 < out[2] < 10.0
    # equal children all get their (size-weighted) mean, i.e. themselves
    same = [{"a.w": torch.tensor([3.0])} for _ in range(3)]
    assert all(k["a.w"].item() == 3.0 for k in personalized_key_layers(same, [1, 2, 3], policy))
