"""Where a simulated leaf keeps its state between its rounds (`run.leaf_state`): in memory, or
in safetensors files of its own under the run directory, so that a process simulating many
leaves holds one leaf's optimizer moments and personal weights at a time, not every leaf's.

Files are written whole and atomically (a temporary file, then a rename), and read back as
they were written: a run keeps its state on disk bit for bit as in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from worldlm.security.certs import safe_name

State = dict[str, torch.Tensor]


class HeldState:
    """Named parts of one leaf's state (each a dict of tensors with JSON metadata)."""

    def __init__(self, directory: Path | None, leaf: str) -> None:
        self.directory, self.leaf = directory, leaf
        self._memory: dict[str, tuple[State, dict[str, Any]]] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    def _file(self, part: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{safe_name(self.leaf)}.{part}.safetensors"

    def put(self, part: str, tensors: State, meta: dict[str, Any] | None = None) -> None:
        meta = meta or {}
        if self.directory is None:
            self._memory[part] = (tensors, meta)
            return
        path = self._file(part)
        tmp = path.with_suffix(".tmp")
        # Own copies, contiguous and on the CPU: safetensors refuses tensors sharing memory
        # (tied weights), and the file must not depend on the device.
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(plain, str(tmp), metadata={"meta": json.dumps(meta)})
        os.replace(tmp, path)

    def get(self, part: str) -> tuple[State, dict[str, Any]]:
        """The part as last put (empty if never)."""
        if self.directory is None:
            return self._memory.get(part, ({}, {}))
        path = self._file(part)
        if not path.is_file():
            return {}, {}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
        return load_file(str(path)), meta

    def drop(self, part: str) -> None:
        if self.directory is None:
            self._memory.pop(part, None)
        else:
            self._file(part).unlink(missing_ok=True)


def flatten_optimizer(state: dict[str, Any]) -> tuple[State, dict[str, Any]]:
    """An optimizer's state_dict as tensors ("index/slot") and JSON (its param groups)."""
    tensors: State = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"optimizer state {slot!r} is {type(value).__name__}, not a tensor: "
                    'run.leaf_state = "disk" keeps tensors only; use "memory"'
                )
            tensors[f"{index}/{slot}"] = value
    return tensors, {"param_groups": state["param_groups"]}


def unflatten_optimizer(tensors: State, meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, slot = key.split("/", 1)
        state.setdefault(int(index), {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}
