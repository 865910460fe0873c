"""Runtime objects every node of an in-process run shares (never part of the config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


class AuditTrail(Protocol):
    """Receives the events an auditor needs (who took part, what was accepted or refused and
    why, digests of what was combined); `worldlm.audit.log.AuditLog` keeps them hash-chained."""

    def append(self, event: str, *, node: str, round: int, **fields: Any) -> object: ...


class NoAudit:
    def append(self, event: str, *, node: str, round: int, **fields: Any) -> None:
        del event, node, round, fields


class AuditRelay:
    """Forwards events to a log attached later: a deployed node builds its federation before
    it knows where its log lives (the root's run directory, an inner aggregator's state
    directory). Events before `attach` have no log to go to and are dropped."""

    def __init__(self) -> None:
        self.target: AuditTrail | None = None

    def attach(self, target: AuditTrail) -> None:
        self.target = target

    def append(self, event: str, *, node: str, round: int, **fields: Any) -> None:
        if self.target is not None:
            self.target.append(event, node=node, round=round, **fields)


@dataclass(frozen=True)
class RunContext:
    run_id: str
    seed: int
    device: torch.device
    observer: Observer = field(default_factory=SilentObserver)
    audit: AuditTrail = field(default_factory=NoAudit)
    # Where in-process leaves keep their state between rounds (run.leaf_state = "disk");
    # None: in memory.
    state_dir: Path | None = None
