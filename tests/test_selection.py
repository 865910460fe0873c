from __future__ import annotations

from collections import Counter

from worldlm.config import SampleConfig
from worldlm.federation.selection import sample_count, select_children

KIDS = [f"w/c{i:02d}" for i in range(10)]


def test_count_respects_fraction_and_minimum() -> None:
    assert sample_count(10, SampleConfig(fraction=0.3, min=1)) == 3
    assert sample_count(10, SampleConfig(fraction=0.05, min=2)) == 2
    assert sample_count(3, SampleConfig(fraction=1.0, min=1)) == 3


def test_selection_is_deterministic_and_varies_by_round() -> None:
    cfg = SampleConfig(fraction=0.3, min=1)
    sizes = [1.0] * 10
    a = select_children(KIDS, sizes, cfg, seed=1, path="w", round_index=0)
    b = select_children(list(reversed(KIDS)), sizes, cfg, seed=1, path="w", round_index=0)
    assert a == b and len(a) == 3 and a == sorted(a)
    picks = {
        tuple(select_children(KIDS, sizes, cfg, seed=1, path="w", round_index=r)) for r in range(20)
    }
    assert len(picks) > 5


def test_data_size_weighting_prefers_large_children() -> None:
    cfg = SampleConfig(fraction=0.1, min=1, weighting="data_size")
    # 10x the others' size: the most a claim counts for (SIZE_CAP_OVER_MEDIAN), so w/c03 is
    # drawn with probability 10/19 against 1/10 uniformly.
    sizes = [10.0 if k == "w/c03" else 1.0 for k in KIDS]
    counts = Counter(
        select_children(KIDS, sizes, cfg, seed=0, path="w", round_index=r)[0] for r in range(200)
    )
    assert counts["w/c03"] > 80
    uniform = Counter(
        select_children(KIDS, sizes, SampleConfig(fraction=0.1), seed=0, path="w", round_index=r)[0]
        for r in range(200)
    )
    assert uniform["w/c03"] < 50
