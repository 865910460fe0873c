"""Device choice and mixed precision: bf16 autocast on CUDA, plain fp32 on CPU."""

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


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (fp32 master weights stay in the optimizer); nothing on CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
