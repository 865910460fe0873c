"""Device choice and precision (`train.precision`): bf16 autocast on CUDA by default, fp32
on CPU, or bfloat16 weights throughout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from worldlm.errors import ConfigError


def pick_device(name: str) -> torch.device:
    """`auto` means CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' was asked for but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        # TF32 tensor cores for the float32 matmuls autocast leaves (the optimizer's, the
        # loss's): about 8x an fp32 matmul on Ampere and later, at a 10-bit mantissa.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def autocast_enabled(device: torch.device, precision: str = "auto") -> bool:
    """bf16 autocast runs for `auto` on CUDA only: `fp32` asks for none, and under `bf16` the
    weights are bfloat16 already."""
    return device.type == "cuda" and precision == "auto"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "auto") -> Iterator[None]:
    """bf16 autocast where `autocast_enabled` (fp32 master weights stay in the optimizer)."""
    if autocast_enabled(device, precision):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
