"""Casts to a 16-bit float: half the bytes of float32, rounded to nearest.

Error bounds, per element x (round to nearest even):
* bf16 (8 significant bits, float32's exponent range): |x' - x| <= 2^-8 |x| for every
  finite x down to float32's smallest normal; no overflow.
* fp16 (11 significant bits): |x' - x| <= 2^-11 |x| for 2^-14 <= |x| <= 65504; below 2^-14
  the absolute error is at most 2^-25. Finite values beyond ±65504 are clipped to it (an
  honest change is never sent as infinite, which the parent would refuse); error feedback
  carries the clipped part to the next reply.
"""

from __future__ import annotations

import torch

from worldlm.compression.base import Parts, TensorCodec, check_tensor

CAST = "cast"


class CastCodec(TensorCodec):
    parts = (CAST,)

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def encode_tensor(self, x: torch.Tensor) -> Parts:
        if self.dtype == torch.float16:
            top = torch.finfo(torch.float16).max
            x = torch.where(torch.isfinite(x), x.clamp(-top, top), x)
        return {CAST: x.to(self.dtype)}

    def decode_tensor(self, where: str, parts: Parts, like: torch.Tensor) -> torch.Tensor:
        value = parts[CAST]
        check_tensor(f"{where} {CAST}", value, (self.dtype,), tuple(like.shape))
        return value.to(like.dtype)


def bf16() -> CastCodec:
    return CastCodec("bf16", torch.bfloat16)


def fp16() -> CastCodec:
    return CastCodec("fp16", torch.float16)
