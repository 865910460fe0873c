"""Symmetric int8 quantization with one float32 scale per output row (per channel).

A tensor of two or more dimensions is read as rows (its first dimension, a linear layer's
output channels) by the rest; a 1-D (or 0-D) tensor is one row. Per row,

    scale = max |x| / 127,   q = round(x / scale) in [-127, 127],   x' = q * scale

so |x' - x| <= scale / 2 for every element (plus the rounding of x' to the tensor's dtype,
at most half an ulp of x'). A row of zeros has scale 0 and comes back exactly. About a
quarter of float32's bytes: one byte per element and four per row.
"""

from __future__ import annotations

import torch

from worldlm.compression.base import Parts, TensorCodec, check_tensor
from worldlm.errors import WireError

Q, SCALE = "q", "scale"
QMAX = 127  # symmetric: -128 is never sent


def rows_of(shape: torch.Size | tuple[int, ...]) -> int:
    """Rows that get a scale of their own: the first dimension, or 1 for a 1-D or 0-D tensor."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    rows = rows_of(x.shape)
    return x.reshape(rows, x.numel() // rows if rows else 0)  # (rows, cols)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 values shaped like x and one float32 scale per row, shape (rows,)."""
    rows = rows_of(x.shape)
    flat = _as_rows(x.detach()).double()  # float64, so that the error bound holds exactly
    if flat.shape[1] == 0:
        return torch.zeros(x.shape, dtype=torch.int8), torch.zeros(rows, dtype=torch.float32)
    # The receiver multiplies by the float32 scale, so q is computed with that same scale.
    scale = (flat.abs().amax(dim=1) / QMAX).to(torch.float32)  # (rows,)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    q = torch.round(flat / divisor[:, None]).clamp(-QMAX, QMAX)
    return q.to(torch.int8).reshape(x.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale per row, in `dtype`."""
    value = _as_rows(q).double() * scale.double()[:, None]
    return value.reshape(q.shape).to(dtype)


class Int8Codec(TensorCodec):
    name = "int8"
    parts = (Q, SCALE)

    def encode_tensor(self, x: torch.Tensor) -> Parts:
        q, scale = quantize(x)
        return {Q: q, SCALE: scale}

    def decode_tensor(self, where: str, parts: Parts, like: torch.Tensor) -> torch.Tensor:
        q, scale = parts[Q], parts[SCALE]
        check_tensor(f"{where} {Q}", q, (torch.int8,), tuple(like.shape))
        check_tensor(f"{where} {SCALE}", scale, (torch.float32,), (rows_of(like.shape),))
        if not bool(torch.isfinite(scale).all()):
            raise WireError(f"{where}: scale has NaN or infinite values")
        if bool((scale < 0).any()):
            raise WireError(f"{where}: scale has negative values")
        if q.numel() and int(q.min()) < -QMAX:
            raise WireError(f"{where}: q holds -128; symmetric int8 sends -127..127")
        return dequantize(q, scale, like.dtype)
