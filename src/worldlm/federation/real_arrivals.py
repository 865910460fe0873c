"""FedBuff on real clocks (`fedbuff.clock = "real"`): tasks go out through a transport that keeps
them in flight across rounds (`core.transport.AsyncTransport`: gRPC in `worldlm serve`/`join`),
and replies are taken in the order they really arrive.

A reply is checked when it is taken, exactly as a plain round checks one (`Aggregator._take`),
against the task its child was sent, whichever round sent it. Its staleness is the number of
server steps taken between its dispatch and its arrival here, so what a step folds depends on
timing: such a run is not bit-reproducible (docs/fedbuff.md).

A checkpoint keeps the clock and the names of the children in flight, not their work: a
resumed aggregator cannot receive replies to tasks its crashed predecessor sent (their links
went down with it), so that work is lost, recorded in the first round after the resume, and
its children are idle again. In a process that did not crash (an inner aggregator rolled back
by its journal) the transport is told to forget those tasks, and a reply that still comes for
one is refused with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from worldlm.core.chunked import ChunkBuffers
from worldlm.core.messages import State, TrainTask, tensor_bytes
from worldlm.core.transport import AsyncTransport, Dropout
from worldlm.errors import ConfigError
from worldlm.federation.arrivals import HeldChanges, Pending, RoundHost
from worldlm.federation.round_state import Collected

LOST_AT_RESUME = (
    "a reply to a task sent before this aggregator resumed from its checkpoint: that work "
    "was lost with the run it belonged to"
)


class RealArrivals:
    """An `arrivals.ArrivalSource` on the real clock of an `AsyncTransport`."""

    def __init__(self, agg: RoundHost, dtype: torch.dtype) -> None:
        self.agg, self.dtype = agg, dtype
        self.started = time.monotonic()
        self.offset = 0.0  # seconds on the clock before this process took over (a resume)
        self.flying: dict[str, Pending] = {}
        self.seen: dict[str, TrainTask] = {}  # each child in flight: its task, as it decoded it
        self.settled: list[str] = []  # children whose outcome this round learned
        self.lost: list[str] = []  # in flight at the checkpoint this run resumed from
        self.forget_in_flight = False  # set by a resume: the transport may still hold tasks

    def now(self) -> float:
        return self.offset + (time.monotonic() - self.started)

    def in_flight(self) -> list[str]:
        return sorted(self.flying)

    def begin_round(self) -> Collected:
        self.settled = []
        return Collected(HeldChanges(self.seen, self.dtype))

    def dispatch(
        self,
        chosen: list[str],
        state: State,
        version: int,
        counts: Mapping[str, int],
        got: Collected,
        rounds: tuple[int, int],
    ) -> None:
        """Send `state` to `chosen` and return at once: they train while steps go on."""
        del counts  # durations are the real ones
        transport = self._transport()
        sent, seen = self.agg._send(chosen, state, *rounds)
        got.traffic["bytes_down"] += sum(tensor_bytes(t) for t in sent.values())
        now = self.now()
        for child in chosen:
            self.seen[child] = seen[child]
            self.flying[child] = Pending(child, version, now, now, 0.0, None)
        transport.dispatch([sent[child] for child in chosen])

    def arrivals(self, got: Collected, rounds: tuple[int, int]) -> Iterator[Pending]:
        """Each outcome as the transport hands it over (real arrival order), checked."""
        if not self.flying:
            return
        held = got.aggregation
        assert isinstance(held, HeldChanges)
        scratch: tuple[dict[int, dict[str, float]], ChunkBuffers] = ({}, ChunkBuffers())
        for outcome in self._transport().arrivals():
            path = outcome.path if isinstance(outcome, Dropout) else outcome.sender
            # The transport checked the sender against its link and the nonce against the task.
            pending = self.flying.pop(path, None)
            if pending is None:
                continue  # not sent by this aggregator's rounds: nothing to take
            pending.arrives = self.now()
            self.settled.append(path)
            if isinstance(outcome, Dropout):
                got.dropouts.append(outcome)  # recorded by `settle`
            else:
                got.traffic["bytes_up"] += tensor_bytes(outcome)
                self.agg._take(outcome, self.seen, got, scratch, None, rounds)
                pending.change = held.changes.pop(path, None)
                pending.weight = held.weights.pop(path, 0.0)
            # Let the reply go before waiting for the next: it holds the transport's admission.
            del outcome
            self.seen.pop(path, None)
            yield pending
            if not self.flying:
                return
        # The transport holds nothing more in flight: what is still listed here never will come.
        for path in sorted(self.flying):
            got.dropouts.append(Dropout(path, "its task is no longer in flight on the transport"))
            self.settled.append(path)
            self.seen.pop(path, None)
            yield self.flying.pop(path)

    def settle(self, got: Collected, rounds: tuple[int, int]) -> tuple[list[str], list[str]]:
        """Record the round's incidents; a child's miss counts when its outcome arrives."""
        if self.lost:
            got.row["lost_in_flight"] = self.lost
            self.agg._audit("fedbuff_lost_in_flight", rounds[1], children=self.lost)
            self.lost = []
        benched = self.agg._settle(got, self.settled, *rounds)
        return list(self.settled), benched

    def _transport(self) -> AsyncTransport:
        transport = self.agg.transport
        if not isinstance(transport, AsyncTransport):
            raise ConfigError(
                f"nodes.{self.agg.path}.fedbuff.clock: 'real' needs a transport that keeps "
                "tasks in flight across rounds (gRPC: `worldlm serve`/`join`), but this "
                f"aggregator's ({type(transport).__name__}) runs each task to its end when it "
                "is sent; use clock = 'simulated' in `worldlm run`"
            )
        if self.forget_in_flight:
            self.forget_in_flight = False
            transport.abandon(LOST_AT_RESUME)
        return transport

    # --- checkpointing: the clock and who was in flight; their work is lost at a resume ----
    def snapshot(self) -> tuple[State, dict[str, Any]]:
        return {}, {"clock": self.now(), "lost_in_flight": self.in_flight()}

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        del tensors
        self.offset, self.started = float(meta.get("clock", 0.0)), time.monotonic()
        self.lost = [str(c) for c in meta.get("lost_in_flight", [])]
        self.flying, self.seen = {}, {}
        self.forget_in_flight = True
