"""Runtime objects every node of an in-process run shares (never part of the config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class Observer(Protocol):
    """Receives progress events; the CLI draws them, tests ignore them."""

    def leaf_started(self, path: str, steps: int) -> None: ...

    def leaf_step(self, path: str, step: int, loss: float | None) -> None: ...


class SilentObserver:
    def leaf_started(self, path: str, steps: int) -> None:
        del path, steps

    def leaf_step(self, path: str, step: int, loss: float | None) -> None:
        del path, step, loss


@dataclass(frozen=True)
class RunContext:
    run_id: str
    seed: int
    device: torch.device
    observer: Observer = field(default_factory=SilentObserver)
