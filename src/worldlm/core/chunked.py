"""Whole-model arithmetic of a round, one chunk at a time through small reused buffers.

`(reply - sent).norm()` or `(sum / scale).to(float32)` written plainly allocates a temporary
as large as the tensor, and a fresh allocation of that size costs more than the arithmetic:
the kernel maps and zeroes its pages on first touch (about 30 ms per 100 MB here, against
6 ms for the subtraction and the dot product themselves). Working through a buffer of
`CHUNK` values that stays mapped keeps the aggregator at memory speed and adds no model-sized
temporaries to its peak memory.
"""

from __future__ import annotations

import torch

# Values per chunk: 1-2 MB, small enough that a chunk written is still in cache when it is
# read back, large enough that the per-chunk call overhead is small (measured on 25M-value
# models: 2^18 was the fastest of 2^14..2^20 for both the change norm and the float64 fold).
CHUNK = 1 << 18
# dtypes whose dot products are taken as they are (others are widened through a buffer first)
_DOT_DTYPES = (torch.float32, torch.float64)


class ChunkBuffers:
    """One reusable buffer per (dtype, device); not shared between threads."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, device: torch.device, n: int) -> torch.Tensor:
        key = (dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(CHUNK, dtype=dtype, device=device)
        return buffer[:n]


def change_norm(
    value: torch.Tensor, reference: torch.Tensor, scale: float, buffers: ChunkBuffers
) -> float:
    """||value / scale - reference||₂: each chunk's difference in the wider of the two dtypes
    (at least float32) and its dot product with itself (a vectorized BLAS call: twice as fast
    as a float64 norm), summed across chunks in float64. Relative error about 1e-6: the
    float32 rounding of each chunk's dot product. NaN or infinite if any value is (so it
    doubles as the finiteness check), and infinite if a chunk's squares overflow float32."""
    if not value.is_floating_point():
        return float(torch.linalg.vector_norm((value - reference).double()))
    # float64 for a forwarded sum (float64 / scale), float32 at least otherwise.
    dtype = torch.promote_types(value.dtype, torch.float32)
    flat_value, flat_reference = value.reshape(-1), reference.reshape(-1)
    total = 0.0
    for start in range(0, flat_value.numel(), CHUNK):
        part = flat_value[start : start + CHUNK]
        out = buffers.get(dtype, value.device, part.numel())
        if scale == 1.0:
            torch.sub(part, flat_reference[start : start + CHUNK], out=out)
        else:
            torch.div(part, scale, out=out)
            out.sub_(flat_reference[start : start + CHUNK])
        total += float(torch.dot(out, out))
    return total**0.5


def state_squares(values: list[torch.Tensor], scale: float, buffers: ChunkBuffers) -> float:
    """The sum of `sum_of_squares` over a state's tensors. Those of at most `CHUNK` float32 or
    float64 values, most of a model's tensors by count, go through one `_foreach_norm` call
    (its per-tensor error is within a chunk's dot product's bound): a model of many small
    tensors would otherwise pay Python's per-call overhead on each."""
    small: list[torch.Tensor] = []
    total = 0.0
    for value in values:
        if value.numel() <= CHUNK and value.dtype in _DOT_DTYPES:
            small.append(value)
        else:
            total += sum_of_squares(value, scale, buffers)
    if small:
        norms = torch.stack(torch._foreach_norm(small)).double()
        total += float(norms.square().sum()) / scale / scale
    return total


def sum_of_squares(value: torch.Tensor, scale: float, buffers: ChunkBuffers) -> float:
    """||value / scale||₂², reading `value` alone: each chunk's dot product with itself (in
    float32 at least: half-precision chunks are widened through a buffer), summed across
    chunks in float64. NaN or infinite if any value is, and infinite if a chunk's squares
    overflow float32. For the reply check's bound (reply_check), not an audit figure."""
    flat = value.reshape(-1)
    wide = flat.dtype in _DOT_DTYPES
    dtype = flat.dtype if wide else torch.float64 if not flat.is_floating_point() else torch.float32
    total = 0.0
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        if not wide:
            part = buffers.get(dtype, value.device, part.numel()).copy_(part)
        total += float(torch.dot(part, part))
    return total / scale / scale  # (scale² alone could overflow)


def add_converted(
    total: torch.Tensor, value: torch.Tensor, alpha: float, buffers: ChunkBuffers
) -> None:
    """`total.add_(value.to(total.dtype), alpha=alpha)`, the same values, one chunk of
    `value` converted at a time into a buffer that stays in cache."""
    if not total.is_contiguous():  # its reshape would be a copy, and the sum would be lost
        total.add_(value.to(total.dtype), alpha=alpha)
        return
    flat_total, flat_value = total.reshape(-1), value.reshape(-1)
    for start in range(0, flat_value.numel(), CHUNK):
        part = flat_value[start : start + CHUNK]
        converted = buffers.get(total.dtype, total.device, part.numel())
        converted.copy_(part)
        flat_total[start : start + CHUNK].add_(converted, alpha=alpha)


def mean_like(
    total: torch.Tensor, scale: float, reference: torch.Tensor, buffers: ChunkBuffers
) -> torch.Tensor:
    """`(total / scale).to(reference.dtype)`, rounded exactly as that expression rounds (the
    division in `total`'s dtype, then one cast), without a temporary of `total`'s size."""
    if scale == 1.0:
        return total.to(reference.dtype)
    out = torch.empty(total.shape, dtype=reference.dtype, device=total.device)
    if total.dtype == reference.dtype:
        return torch.div(total, scale, out=out)
    flat_total, flat_out = total.reshape(-1), out.reshape(-1)
    for start in range(0, flat_total.numel(), CHUNK):
        part = flat_total[start : start + CHUNK]
        quotient = buffers.get(total.dtype, total.device, part.numel())
        torch.div(part, scale, out=quotient)
        flat_out[start : start + CHUNK].copy_(quotient)
    return out
