"""A parent's bookkeeping for tasks that outlive one exchange (FedBuff on real clocks): the train
tasks it dispatched without waiting, and the order in which threads read one child's link.

A child answers its tasks one at a time, in the order they came (`child.answer_parent`). A
parent may now have a dispatched task and an exchange's task (an evaluation) out to the same
child, each with a thread waiting for its reply; whichever read the link first would take the
other's reply and refuse it. So the threads read a link in turns, in the order their tasks were
sent (`ReaderTurns`), and each reply reaches the thread that waits for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from worldlm.core.messages import Update
from worldlm.core.transport import Dropout
from worldlm.errors import TransportError

_POLL_SECONDS = 1.0  # how often a wait for an arrival checks that something is still in flight


class Turn:
    """One thread's turn at reading a child's link."""

    def __init__(self, before: threading.Event | None, mine: threading.Event) -> None:
        self._before, self._mine = before, mine

    def wait(self, timeout: float) -> bool:
        """Whether every earlier reader of the link is done (waits up to `timeout` seconds)."""
        return self._before is None or self._before.wait(timeout)

    def done(self) -> None:
        """Let the next reader read, once the earlier ones are done too: a reader that gave up
        waiting must not let a later one read beside an earlier one still reading. Each reader
        ends by its own deadline, so this wait ends."""
        if self._before is not None:
            self._before.wait()
        self._mine.set()


class ReaderTurns:
    """Turns at reading each child's link, handed out in the order tasks are sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, threading.Event] = {}

    def take(self, child: str) -> Turn:
        """The next turn at `child`'s link; take it in the thread that sends, before sending."""
        mine = threading.Event()
        with self._lock:
            before, self._last[child] = self._last.get(child), mine
        return Turn(before, mine)


class InFlightTasks:
    """Dispatched train tasks, by nonce, from their dispatch until their outcome (the reply, or
    a `Dropout` saying why none came) is taken; thread-safe. `refuse` records a reply that
    came for a task the parent forgot (`abandon`)."""

    def __init__(self, refuse: Callable[[Dropout], None]) -> None:
        self._lock = threading.Lock()
        self._flying: dict[str, str] = {}  # nonce -> child, until its outcome is taken
        self._abandoned: dict[str, str] = {}  # nonce -> why a reply to it is refused
        self._landed: queue.Queue[tuple[str, Update | Dropout]] = queue.Queue()
        self._refuse = refuse

    def start(self, nonce: str, child: str) -> None:
        with self._lock:
            if child in self._flying.values():
                raise TransportError(
                    f"{child}: a task is already in flight to it; take its arrival first"
                )
            self._flying[nonce] = child

    def land(self, nonce: str, outcome: Update | Dropout) -> None:
        """The outcome of task `nonce` (called by the thread that waited for it)."""
        with self._lock:
            why = self._abandoned.pop(nonce, None)
            if why is None:
                self._landed.put((nonce, outcome))
                return
        if isinstance(outcome, Update):
            self._refuse(Dropout(outcome.sender, why, left_out=False))

    def pending(self) -> int:
        with self._lock:
            return len(self._flying)

    def take(self, timeout: float | None) -> Update | Dropout | None:
        """The next outcome to arrive, or None after `timeout` seconds (None: as long as
        something is in flight) or once nothing is."""
        waited = 0.0
        while self.pending():
            wait = _POLL_SECONDS if timeout is None else min(_POLL_SECONDS, timeout - waited)
            try:
                nonce, outcome = self._landed.get(timeout=max(wait, 0.0))
            except queue.Empty:
                waited += wait
                if timeout is not None and waited >= timeout:
                    return None
                continue
            with self._lock:
                self._flying.pop(nonce, None)
            return outcome
        return None

    def abandon(self, why: str) -> list[str]:
        """Forget every task in flight; an outcome still to come for one is refused with
        `why` (a reply) or dropped (a dropout). Returns the children they were sent to."""
        with self._lock:
            children = sorted(self._flying.values())
            self._abandoned.update(dict.fromkeys(self._flying, why))
            self._flying.clear()
            # Outcomes that landed but were not taken: refused now, which also lets go of
            # their buffers (each holds the receive gate's admission).
            landed: list[Update | Dropout] = []
            while True:
                try:
                    nonce, outcome = self._landed.get_nowait()
                except queue.Empty:
                    break
                self._abandoned.pop(nonce, None)
                landed.append(outcome)
        for outcome in landed:
            if isinstance(outcome, Update):
                self._refuse(Dropout(outcome.sender, why, left_out=False))
        return children
