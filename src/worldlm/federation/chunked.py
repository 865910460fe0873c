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

CHUNK = 1 << 20  # values per chunk: 4-8 MB, large enough that per-chunk overhead is small


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
    (at least float32), its squares summed in float64; NaN or infinite if any value is (so it
    doubles as the finiteness check)."""
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
        total += _squares(out)
    return total**0.5


def squared_norm(tensor: torch.Tensor) -> float:
    """||tensor||₂² (a model sent to many children: computed once per round)."""
    flat = tensor.reshape(-1)
    return sum(_squares(flat[i : i + CHUNK]) for i in range(0, flat.numel(), CHUNK))


def _squares(chunk: torch.Tensor) -> float:
    # The sum of squares in float64: the chunk is cast in cache, so this costs little more
    # than a float32 dot product, whose rounding would be about 1e-6 of the result.
    return float(torch.linalg.vector_norm(chunk, dtype=torch.float64)) ** 2


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
