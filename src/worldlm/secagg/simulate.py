"""An in-process round of secure aggregation: every client and the server, with dropouts.

The reference driver for tests and cost measurements, and the model for a transport: each
stage is "clients send, the server answers each kept client", and a client that drops at a
stage (see `Stage`) sends nothing from then on. Bytes are counted with `wire_size` on every
message a client sends or receives, the ClientSetup included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from worldlm.config import SecAggConfig
from worldlm.secagg.client import SecAggClient
from worldlm.secagg.messages import Stage, wire_size
from worldlm.secagg.plan import plan_round
from worldlm.secagg.quantize import Quantizer
from worldlm.secagg.server import SecAggServer

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class SecAggResult:
    """The sum the server released, over `included`, and what the round cost."""

    sum: np.ndarray  # float64, the inputs' shape: decoded sum of the included inputs
    total: np.ndarray  # (length,) uint64: exact sum of the included inputs' encodings
    included: tuple[str, ...]  # clients whose inputs are in the sum (sent a masked input)
    quantizer: Quantizer
    max_error: float  # |sum - sum of clipped included inputs| <= this, per coordinate
    bytes_sent: dict[str, int]  # per client
    bytes_received: dict[str, int]  # per client
    client_seconds: dict[str, float]  # compute per client
    server_seconds: float  # compute in the server


def run_secagg(
    inputs: Mapping[str, np.ndarray],
    config: SecAggConfig,
    dropouts: Mapping[Stage | str, set[str]] | None = None,
    rng_seed: int = 0,
) -> SecAggResult:
    """Run one round over `inputs` (equal shapes) and return the sum over the survivors.

    `dropouts[stage]` are the clients that drop at `stage` (send nothing from it on);
    `rng_seed` draws the public neighbourhood graph only: every secret (keys, seeds, Shamir
    coefficients) comes from the OS CSPRNG. Raises SecAggAborted if too few clients survive.
    """
    ids = sorted(inputs)
    shapes = {np.shape(v) for v in inputs.values()}
    if len(shapes) != 1:
        raise ValueError(f"inputs must share one shape, got {sorted(shapes)}")
    shape = shapes.pop()
    drop = {Stage(s): set(c) for s, c in (dropouts or {}).items()}
    unknown = set().union(*drop.values()) - set(ids) if drop else set()
    if unknown:
        raise ValueError(f"dropouts name clients without inputs: {sorted(unknown)}")

    plan = plan_round(ids, config, length=int(np.prod(shape)), graph_seed=rng_seed)
    server = SecAggServer(plan)
    sent = dict.fromkeys(ids, 0)
    received = dict.fromkeys(ids, 0)
    seconds = dict.fromkeys(ids, 0.0)

    def timed(client: str, call: Callable[..., T], *args: object) -> T:
        start = time.perf_counter()
        out = call(*args)
        seconds[client] += time.perf_counter() - start
        sent[client] += wire_size(out)
        return out

    def deliver(replies: Mapping[str, object]) -> None:
        for c, reply in replies.items():
            received[c] += wire_size(reply)

    setups = server.setups()
    deliver(setups)
    clients = {c: SecAggClient(s) for c, s in setups.items()}

    live = [c for c in ids if c not in drop.get(Stage.ADVERTISE_KEYS, set())]
    broadcasts = server.receive_keys([timed(c, clients[c].advertise_keys) for c in live])
    deliver(broadcasts)

    live = [c for c in broadcasts if c not in drop.get(Stage.SHARE_KEYS, set())]
    shares = [timed(c, clients[c].share_keys, broadcasts[c]) for c in live]
    deliveries = server.receive_shares(shares)
    deliver(deliveries)

    live = [c for c in deliveries if c not in drop.get(Stage.MASKED_INPUT, set())]
    masked = [timed(c, clients[c].masked_input, deliveries[c], np.ravel(inputs[c])) for c in live]
    requests = server.receive_masked(masked)
    deliver(requests)

    live = [c for c in requests if c not in drop.get(Stage.UNMASKING, set())]
    answers = [timed(c, clients[c].unmask, requests[c]) for c in live]
    released = server.receive_unmasking(answers)

    n = len(released.included)
    return SecAggResult(
        sum=plan.quantizer.decode_sum(released.total, n).reshape(shape),
        total=released.total,
        included=released.included,
        quantizer=plan.quantizer,
        max_error=plan.quantizer.max_error(n),
        bytes_sent=sent,
        bytes_received=received,
        client_seconds=seconds,
        server_seconds=server.seconds,
    )
