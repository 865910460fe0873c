"""How many messages a parent holds from its children at once, whatever their number.

Each link's reader thread reassembles a child's message as soon as it comes, so without a
limit a parent whose children all answer at once holds every reply, and with ordered delivery
a reply that overtakes a slow earlier one waits decoded: up to N model copies. A `ReceiveGate`
makes a reader wait, before the first chunk of a new message, until fewer than `limit`
messages are held. While it waits it reads nothing more, so gRPC's flow control makes that
child's send wait. A message is held from its admission until everything built over its
buffer is gone (`buffers.BufferPool` calls back when its lease dies): the decoded update, once
the aggregator has folded and dropped it.

The transport names the child it must hear from next (`prefer`). It is admitted whatever the
count, so a round always progresses: the reply the aggregator waits for is never stuck behind
replies that wait for it. So at most `limit` + 2 messages are held: `limit` admitted under the
limit, the one being folded and the next one the round waits for (each of those two may have
passed a full gate). A child that waited here answered in time, so the transport gives it the
time the wait cost it (`delayed`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

DEFAULT_HELD_MESSAGES = 2
_POLL_SECONDS = 0.2  # how often a waiting reader checks that its link is still open


class ReceiveGate:
    """Admission of incoming messages across one parent's links; thread-safe."""

    def __init__(self, limit: int = DEFAULT_HELD_MESSAGES) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        self.limit = limit
        # Reentrant: a message's buffer may die, and call `release`, while this thread holds it.
        self._cond = threading.Condition(threading.RLock())
        self._held = 0
        self._waiting: set[str] = set()  # peers whose reader waits for admission
        self._delayed: set[str] = set()  # peers that waited since the last `prefer(reset=True)`
        self._preferred: frozenset[str] = frozenset()
        self.peak_held = 0  # the most messages held at once (for tests and benchmarks)

    def admit(self, peer: str, closed: Callable[[], bool]) -> Callable[[], None] | None:
        """Wait until `peer` may receive one more message; its release (call it once the
        message is gone; later calls do nothing), or None if `closed()` became true first."""
        with self._cond:
            while not (self._held < self.limit or peer in self._preferred):
                if closed():
                    self._waiting.discard(peer)
                    return None
                self._waiting.add(peer)
                self._delayed.add(peer)
                self._cond.wait(_POLL_SECONDS)
            self._waiting.discard(peer)
            self._held += 1
            self.peak_held = max(self.peak_held, self._held)
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

        return release

    def prefer(self, peers: Iterable[str], *, reset: bool = False) -> None:
        """Admit `peers` whatever the count from now on; `reset` starts a new exchange, whose
        delays are counted afresh."""
        with self._cond:
            self._preferred = frozenset(peers)
            if reset:
                self._delayed = set(self._waiting)
            self._cond.notify_all()

    def delayed(self, peer: str) -> bool:
        """Did `peer`'s reader wait here during this exchange (or is it waiting now)?"""
        with self._cond:
            return peer in self._delayed or peer in self._waiting

    @property
    def held(self) -> int:
        with self._cond:
            return self._held
