"""Receive buffers that are handed back when their last user lets go, for the next message.

A message's bytes land in one buffer that tensors then share (`decode(copy=False)`). Fresh
memory for every message costs the kernel a page fault and a zeroed page per 4 KiB; a 1 GB
message spent about 15% of its receive time there. Federated rounds send the same sizes again
and again, so a buffer freed by its consumer is worth keeping for the next message of that size.

A buffer is lent as a memoryview over a *lease* (a numpy view of the buffer). Everything built
over the message (memoryview slices, `torch.frombuffer` tensors) keeps the lease alive, so the
buffer cannot be handed out again while anything can still read or write it. When the lease
dies, a weakref callback returns the buffer to the pool if fewer than `max_idle` are idle, and
lets it go otherwise: idle memory is bounded whatever the number of children, and a buffer in
use is never held by the pool beyond its users.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import numpy as np

DEFAULT_MAX_IDLE = 2


class BufferPool:
    """Lends writable byte buffers of exact sizes, reusing those whose users are all gone."""

    def __init__(self, max_idle: int = DEFAULT_MAX_IDLE) -> None:
        if isinstance(max_idle, bool) or not isinstance(max_idle, int) or max_idle < 0:
            raise ValueError(f"max_idle must be an integer >= 0, got {max_idle!r}")
        self.max_idle = max_idle
        # Reentrant: a lease may die (and call back) while this thread holds the lock.
        self._lock = threading.RLock()
        self._idle: list[np.ndarray] = []
        # The weakrefs must outlive their leases for the callbacks to run; keyed by id because
        # a weakref hashes as its referent, and arrays do not hash.
        self._leases: dict[int, weakref.ref[np.ndarray]] = {}
        self.reused = 0

    def acquire(self, nbytes: int, on_free: Callable[[], None] | None = None) -> memoryview:
        """A writable buffer of exactly `nbytes` bytes; raises MemoryError if none can be had.
        `on_free` is called once nothing uses the buffer any more."""
        with self._lock:
            base = self._take_idle(nbytes)
            if base is None:
                base = np.empty(nbytes, dtype=np.uint8)
            else:
                self.reused += 1
            lease = base[:]
            ref = weakref.ref(lease, lambda ref: self._give_back(ref, base, on_free))
            self._leases[id(ref)] = ref
        return lease.data.cast("B")

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._idle)

    def _take_idle(self, nbytes: int) -> np.ndarray | None:
        for i, base in enumerate(self._idle):
            if base.nbytes == nbytes:
                return self._idle.pop(i)
        return None

    def _give_back(
        self, ref: weakref.ref[np.ndarray], base: np.ndarray, on_free: Callable[[], None] | None
    ) -> None:
        with self._lock:
            self._leases.pop(id(ref), None)
            if base.nbytes and len(self._idle) < self.max_idle:
                self._idle.append(base)
        if on_free is not None:
            on_free()


# One per process: every link's receive side draws from it, so idle memory stays bounded.
SHARED_POOL = BufferPool()
