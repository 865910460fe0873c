"""Digests of model states for the audit log: which weights were sent, received and produced,
without the weights themselves.

SHA-256 over a canonical layout (names in sorted order, each with its dtype, shape and raw
bytes), so the digest names the contents whatever the dict's order or the tensors' memory
layout, and a party cannot craft two different updates with one digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch


def file_sha256(path: Path) -> str:
    """SHA-256 hex of a file's bytes, read in chunks (checkpoints and models may be large)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex of a tensor dict's names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
