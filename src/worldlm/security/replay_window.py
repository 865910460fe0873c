"""The replay window of a child (issue 19): the newest signed task it accepted, per run, so that
a statement of an older round is refused even though the root signed it.

A task's position is (epoch, root round, kind, round). The epoch is the root's, inside its
signed statement: each start of the root, fresh or resumed from a checkpoint, signs with a
larger one (`deploy.root_epoch`). Within one epoch a child accepts only tasks after the last it
accepted: a train task of a later (root round, round), an evaluation of its root round or a
later one (the deployed and the global evaluation share a round). The round is its parent's
index, which a hostile parent could raise at will, so a child also accepts no more train tasks
per root round than its parent runs rounds in one (`per_round`: the `inner_rounds` of the
aggregators between the root and the child, multiplied). A larger epoch is the root saying it
rolled back: any round is accepted, and the child remembers the new epoch, so that a replayed
statement of the old epoch is refused from then on.

A deployed child keeps its window in a file in its state directory (it survives the child's
own restart); an in-process one in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from worldlm.errors import WorldLMError
from worldlm.security.downlink_facts import TRAIN


class StaleTask(WorldLMError):
    """A task, correctly signed, of a round older than one this node already accepted."""


@dataclass(frozen=True)
class Stamp:
    """Where a verified task stands in its run: the root's epoch and the task's rounds."""

    run_id: str
    epoch: int
    global_round: int
    round: int
    task: str  # security.downlink_facts: TRAIN, EVAL_DEPLOYED or EVAL_GLOBAL

    def position(self) -> tuple[int, int, int, int]:
        # An evaluation of root round g comes after every train task of g, before those of g+1.
        evaluating = self.task != TRAIN
        return (self.epoch, self.global_round, int(evaluating), 0 if evaluating else self.round)

    def describe(self) -> str:
        what = f"round {self.round}" if self.task == TRAIN else self.task
        return f"root round {self.global_round} ({what}) of epoch {self.epoch}"


def check_fresh(
    last: Stamp | None, stamp: Stamp, path: str, *, trained: int = 0, per_round: int = 1
) -> None:
    """Raise `StaleTask` unless `stamp` may follow `last` (the newest accepted; None: none),
    after `trained` train tasks accepted in `last`'s root round, of at most `per_round`."""
    if last is None or stamp.epoch > last.epoch:
        return  # a first task, or the root restarted (possibly rolled back): any round
    if stamp.epoch < last.epoch:
        raise StaleTask(
            f"{path}: a task signed in an earlier session of the root (epoch {stamp.epoch}; "
            f"this node already accepted epoch {last.epoch}): a replayed statement"
        )
    later = stamp.position() > last.position()
    again = stamp.task != TRAIN and stamp.position() == last.position()
    if not (later or again):
        raise StaleTask(
            f"{path}: a task of {stamp.describe()}, but this node already accepted "
            f"{last.describe()}: a replayed statement of an older round"
        )
    same_round = (stamp.epoch, stamp.global_round) == (last.epoch, last.global_round)
    if stamp.task == TRAIN and same_round and trained >= per_round:
        raise StaleTask(
            f"{path}: a train task of {stamp.describe()}, but this node already trained "
            f"{trained} of root round {stamp.global_round}, as many as its parent runs rounds "
            "in one: a replayed statement"
        )


@dataclass(frozen=True)
class Seen:
    """What a window remembers of a run: the newest stamp accepted, and how many train tasks
    it accepted in that stamp's root round."""

    stamp: Stamp
    trained: int


class ReplayWindow:
    """The newest accepted stamp per run; in memory, or also in the file `path`."""

    def __init__(self, path: Path | None = None, *, per_round: int = 1) -> None:
        self.path, self.per_round = path, per_round
        self.seen: dict[str, Seen] = _read(path) if path is not None else {}

    def admit(self, stamp: Stamp, node_path: str) -> None:
        """Accept `stamp` (and remember it before the task runs) or raise `StaleTask`."""
        seen = self.seen.get(stamp.run_id)
        last, trained = (None, 0) if seen is None else (seen.stamp, seen.trained)
        check_fresh(last, stamp, node_path, trained=trained, per_round=self.per_round)
        if last is None or (stamp.epoch, stamp.global_round) != (last.epoch, last.global_round):
            trained = 0
        self.seen[stamp.run_id] = Seen(stamp, trained + (stamp.task == TRAIN))
        if self.path is not None:
            _write(self.path, self.seen)


def _read(path: Path) -> dict[str, Seen]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        seen = {run: Seen(Stamp(**entry["stamp"]), entry["trained"]) for run, entry in raw.items()}
        for entry in seen.values():
            stamp = entry.stamp
            numbers = (stamp.epoch, stamp.global_round, stamp.round, entry.trained)
            if not all(type(n) is int for n in numbers) or not isinstance(stamp.task, str):
                raise ValueError(f"it holds {entry!r}")
        return seen
    except (ValueError, TypeError, AttributeError, OSError) as exc:
        # Refusing to start is safer than forgetting the window (a replay would then pass).
        raise WorldLMError(
            f"{path}: the replay window is unreadable ({exc}); restore it, or remove it to "
            "accept the next signed task of any round"
        ) from None


def _write(path: Path, seen: dict[str, Seen]) -> None:
    """Atomically: a crash leaves the old window or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({run: asdict(s) for run, s in sorted(seen.items())}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
