"""The round's chunked arithmetic equals the plain expressions it replaces."""

from __future__ import annotations

import math

import pytest
import torch

from worldlm.core.chunked import (
    CHUNK,
    ChunkBuffers,
    add_converted,
    change_norm,
    mean_like,
    state_squares,
    sum_of_squares,
)


def _pair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    reference = torch.randn(n, generator=gen)
    return reference + 1e-3 * torch.randn(n, generator=gen), reference


def test_change_norm_matches_float64_across_chunks() -> None:
    value, reference = _pair(123 * 17_100)  # several chunks, the last partial
    assert value.numel() > 3 * CHUNK
    buffers = ChunkBuffers()
    exact = float(torch.linalg.vector_norm(value.double() - reference.double()))
    # float32 dot products per chunk: the documented 1e-6, with room
    assert math.isclose(change_norm(value, reference, 1.0, buffers), exact, rel_tol=1e-5)
    total = value.double() * 250.0  # a forwarded float64 sum and its scale: float64 chunks
    assert math.isclose(change_norm(total, reference, 250.0, buffers), exact, rel_tol=1e-9)
    shaped = change_norm(value.view(-1, 123), reference.view(-1, 123), 1.0, buffers)
    assert math.isclose(shaped, exact, rel_tol=1e-5)


def test_change_norm_of_a_huge_finite_change_is_not_finite() -> None:
    """Squares beyond float32's range: refused as unmeasurable, never measured as small."""
    value, reference = _pair(1000)
    value[7] = 1e30
    assert not math.isfinite(change_norm(value, reference, 1.0, ChunkBuffers()))


@pytest.mark.parametrize("contiguous", [True, False])
def test_add_converted_equals_the_plain_mixed_dtype_add(contiguous: bool) -> None:
    value, reference = _pair(3 * (CHUNK + 11))
    total = reference.double() * 3.0
    if not contiguous:  # a transposed accumulator: must not be summed into a copy
        value, total = value.view(-1, 3).t(), total.view(-1, 3).t()
    plain = total.clone().add_(value.double(), alpha=0.37)
    add_converted(total, value, 0.37, ChunkBuffers())
    assert torch.equal(total, plain)


def test_change_norm_is_not_finite_when_any_value_is_not() -> None:
    value, reference = _pair(CHUNK + 5)
    for bad in (math.nan, math.inf, -math.inf):
        poisoned = value.clone()
        poisoned[CHUNK + 2] = bad  # in the second chunk
        assert not math.isfinite(change_norm(poisoned, reference, 1.0, ChunkBuffers()))


def test_mean_like_rounds_exactly_as_the_plain_expression() -> None:
    value, reference = _pair(2 * CHUNK + 9)
    total = value.double() * 1234.5 + reference.double() * 17.0
    plain = (total / 1251.5).to(torch.float32)
    chunked = mean_like(total, 1251.5, reference, ChunkBuffers())
    assert chunked.dtype == torch.float32
    assert torch.equal(chunked, plain)
    same_dtype = mean_like(value * 3.0, 3.0, reference, ChunkBuffers())
    assert torch.equal(same_dtype, (value * 3.0) / 3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_sum_of_squares_matches_float64_in_every_dtype(dtype: torch.dtype) -> None:
    value, _ = _pair(3 * CHUNK + 77)
    value = value.to(dtype)
    exact = float(value.double().square().sum())
    buffers = ChunkBuffers()
    # float32 dot products per chunk (half precision widened first): 1e-6 seen, 1e-5 tested
    assert math.isclose(sum_of_squares(value, 1.0, buffers), exact, rel_tol=1e-5)
    assert math.isclose(sum_of_squares(value * 4, 4.0, buffers), exact, rel_tol=1e-5)
    counts = torch.arange(CHUNK + 3)  # an integer tensor goes through float64
    assert sum_of_squares(counts, 1.0, buffers) == float(counts.double().square().sum())


def test_sum_of_squares_is_not_finite_for_bad_values_or_overflowing_squares() -> None:
    value, _ = _pair(CHUNK + 5)
    for bad in (math.nan, math.inf, -math.inf, 1e30):
        poisoned = value.clone()
        poisoned[CHUNK + 2] = bad  # in the second chunk
        assert not math.isfinite(sum_of_squares(poisoned, 1.0, ChunkBuffers())), bad
    # float16's own squares would overflow at 256: widened, they do not
    assert math.isfinite(
        sum_of_squares(torch.full((10,), 1000.0, dtype=torch.float16), 1.0, ChunkBuffers())
    )


def test_state_squares_sums_small_and_large_tensors_of_any_dtype() -> None:
    """Small float tensors go through one foreach call, the rest chunk by chunk: the same sum."""
    gen = torch.Generator().manual_seed(1)
    values = [
        torch.randn(3 * CHUNK + 5, generator=gen),  # large: chunked dot products
        torch.randn(17, 9, generator=gen),  # small float32
        torch.randn(300, generator=gen).double(),  # small float64
        torch.randn(40, generator=gen).to(torch.bfloat16),  # small, widened
        torch.randn(0, generator=gen),  # empty
    ]
    exact = sum(float(v.double().square().sum()) for v in values)
    buffers = ChunkBuffers()
    assert math.isclose(state_squares(values, 1.0, buffers), exact, rel_tol=1e-5)
    scaled = [v * 8 for v in values]
    assert math.isclose(state_squares(scaled, 8.0, buffers), exact, rel_tol=1e-5)
    for bad in (math.nan, math.inf):
        poisoned = [v.clone() for v in values]
        poisoned[1][4, 2] = bad  # in a small tensor: the foreach path
        assert not math.isfinite(state_squares(poisoned, 1.0, buffers))
