"""A deployed child's own checkpoints: its state after every task it answered.

Two faults need them. A child that dies and is restarted picks up where its last answered task
left it (an inner aggregator keeps its personalized key layers). And when a parent restarts from
its own last checkpoint (`worldlm serve --resume`), it sends again tasks of rounds its children
already trained; a child that sees a parent round index it has already done first rolls back to
its state from before that round, so nothing is applied twice and a resumed deployment repeats
the uninterrupted one bit for bit. A fresh start of the same config is a parent that runs round
0 again: the child goes back to its initial state, which is always kept.

A checkpoint is tagged with the number of parent rounds it covers (`task.round + 1`; tag 0 is
the state before any task) and written atomically by `worldlm.checkpoint`.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import torch

from worldlm.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from worldlm.core.messages import EvalReport, EvalTask, TrainTask, Update
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.core.transport import ChildInfo, NodeHandler
from worldlm.errors import CheckpointError
from worldlm.federation.leaf import Leaf
from worldlm.federation.privacy_policy import DPPolicy, DPRule
from worldlm.federation.secure_child import SecureChild

log = logging.getLogger(__name__)


class Snapshottable(NodeHandler, Protocol):
    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...


class JournaledNode:
    """A child node (leaf or inner aggregator) whose state is saved after each task."""

    def __init__(self, node: Snapshottable, directory: Path, run_id: str, keep: int) -> None:
        self.node, self.directory, self.run_id, self.keep = node, directory, run_id, keep
        self.path = node.path
        # Tags of every state in the current timeline, pruned or not: a rewind must land on
        # the newest of them, or the state it lands on would miss a round.
        self.history: list[int] = []
        # Secure rounds train through `handle_train` below, so they are journaled the same way;
        # their secrets are not: a restarted child declines the rest of a round in flight.
        self.secure_child = SecureChild(self)
        self._open()

    @property
    def done(self) -> int:
        """Parent rounds covered by the node's current state."""
        return self.history[-1]

    def _open(self) -> None:
        """Restore the newest checkpoint of this run, or record the initial state as tag 0."""
        if not list_checkpoints(self.directory):
            self._save(0)
            return
        path, tensors, meta = load_latest(self.directory)
        self._restore(path, tensors, meta)
        log.info("%s: restored its state after %d parent rounds (%s)", self.path, self.done, path)

    def _restore(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("run_id") != self.run_id or meta.get("node_path") != self.path:
            raise CheckpointError(
                f"{path} holds the state of {meta.get('node_path')!r} in run "
                f"{meta.get('run_id')!r}, not of {self.path!r} in run {self.run_id!r}; "
                f"remove {self.directory} or give this node another state directory"
            )
        self.node.restore(tensors, meta["node"])
        self.history = [int(tag) for tag in meta["history"]]

    def _save(self, tag: int) -> None:
        self.history.append(tag)
        self._write(tag)
        # The initial state (tag 0) stays, so the same config can always start over.
        saved = list_checkpoints(self.directory)
        for old in saved[1 : -self.keep]:
            old.unlink(missing_ok=True)

    def _write(self, tag: int) -> None:
        """The node's state now, as the checkpoint of `tag` (atomically)."""
        tensors, meta = self.node.snapshot()
        meta = {"run_id": self.run_id, "node_path": self.path, "node": meta}
        meta["history"] = self.history
        save_checkpoint(self.directory, tag, tensors, meta, keep=1 << 30)

    def _rewind_to(self, parent_round: int) -> None:
        """Go back to the state from before parent round `parent_round`."""
        target = max(tag for tag in self.history if tag <= parent_round)
        path = self.directory / checkpoint_name(target)
        if not path.is_file():
            raise CheckpointError(
                f"{self.path}: the parent runs round {parent_round} again, but {self.directory} "
                f"no longer holds the state from before it (keeps {self.keep}); restart the run"
            )
        tensors, meta = load_checkpoint(path)
        policy = dp_policy(self.node)
        released = [] if policy is None else policy.spent_rounds()
        local = local_dp_leaf(self.node)
        # Releases so far, lost ones included: the state rewound to may predate an earlier
        # rewind's charge, which must not be forgotten with it.
        released_local = 0 if local is None else local.sessions + local.lost_releases
        self._restore(path, tensors, meta)
        if local is not None and released_local > local.sessions + local.lost_releases:
            # A leaf's local-DP releases of the undone rounds reached its parent; the re-runs
            # release again with fresh noise: both count (kept with the state rewound to).
            undone = released_local - local.sessions - local.lost_releases
            local.charge_lost_releases(undone)
            log.warning("%s: charged %d local-DP releases undone by the rewind", self.path, undone)
            self._write(target)
        if policy is not None:
            # The rounds undone released noisy aggregates to the parent; their re-runs draw
            # fresh noise, so both are charged, as the root does on resume.
            lost = rounds_undone(released, policy.spent_rounds())
            if lost:
                policy.charge_lost(lost)
                log.warning("%s: charged %d DP rounds undone by the rewind", self.path, len(lost))
                # Into the state rewound to, before the newer states (the proof that those
                # rounds ran) are deleted: a crash now must not forget the charge.
                self._write(target)
        for newer in list_checkpoints(self.directory):  # the timeline that is now undone
            if _tag_of(newer) > target:
                newer.unlink(missing_ok=True)
        log.warning(
            "%s: the parent runs round %d again; rolled back to %s",
            self.path,
            parent_round,
            path.name,
        )

    def info(self) -> ChildInfo:
        return self.node.info()

    def handle_train(self, task: TrainTask) -> Update:
        if task.round < self.done:
            self._rewind_to(task.round)
        update = self.node.handle_train(task)
        self._save(task.round + 1)
        return update

    def handle_secure(self, message: SecureMessage) -> SecureReply:
        return self.secure_child.handle(message)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        return self.node.handle_eval(task)


def dp_policy(node: object) -> DPPolicy | None:
    """The DP policy of an aggregator with central DP, else None."""
    rule = getattr(node, "rule", None)
    return rule.policy if isinstance(rule, DPRule) else None


def local_dp_leaf(node: object) -> Leaf | None:
    """The leaf, if it privatizes its own changes (local DP), else None."""
    return node if isinstance(node, Leaf) and node.local_dp is not None else None


def rounds_undone(before: list[float], after: list[float]) -> list[float]:
    """The sampling rates accounted in `before` and not in `after` (multisets of rates)."""
    return list((Counter(before) - Counter(after)).elements())


def journal_keep(every: int, inner_rounds_above: list[int]) -> int:
    """How many states a child must keep to replay what its parent can run again.

    The root goes back at most `checkpoint.every` rounds; each aggregator between the root and
    this child multiplies that by its `inner_rounds`. One more for the state before them."""
    span = every
    for rounds in inner_rounds_above:
        span *= rounds
    return span + 2


def _tag_of(path: Path) -> int:
    return int(path.name.removeprefix("round-").removesuffix(".wlm"))
