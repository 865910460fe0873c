"""Planning a round: the neighbourhood graph, Shamir x-coordinates and thresholds, the codec.

A client u with d_u neighbours splits its secrets with threshold
t_u = max(2, ceil(threshold * d_u)): any t_u of its neighbours can rebuild them (so up to
d_u - t_u of them may drop), fewer learn nothing. The floor of 2 keeps one neighbour alone from
rebuilding a secret, which is why every client needs at least 2 neighbours (a cohort of 3 or
more). This is the honest-but-curious server setting; against a server that lies about who
dropped, Bonawitz et al. need t > 2n/3 of the cohort and signed keys, which are not built here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from worldlm.config import SecAggConfig
from worldlm.secagg.errors import SecAggSetupError
from worldlm.secagg.graph import neighbourhood_graph
from worldlm.secagg.messages import ClientSetup
from worldlm.secagg.quantize import Quantizer

SESSION_BYTES = 16


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """Everything public about one round, known to the server; each client gets its part."""

    session: bytes
    clients: tuple[str, ...]  # sorted
    graph: dict[str, frozenset[str]]
    index: dict[str, int]  # Shamir x-coordinate of each client, 1..n
    thresholds: dict[str, int]
    quantizer: Quantizer
    length: int

    def setup_for(self, client: str) -> ClientSetup:
        """The ClientSetup message the server sends `client` before the round."""
        return ClientSetup(
            session=self.session,
            client=client,
            index=self.index[client],
            neighbours={v: self.index[v] for v in sorted(self.graph[client])},
            threshold=self.thresholds[client],
            bits=self.quantizer.bits,
            clip_range=self.quantizer.clip_range,
            max_clients=self.quantizer.max_clients,
            length=self.length,
        )


def plan_round(
    clients: list[str],
    config: SecAggConfig,
    *,
    length: int,
    graph_seed: int,
    session: bytes | None = None,
) -> RoundPlan:
    """Plan a round over `clients` for vectors of `length` values; refuses unsafe setups."""
    ids = tuple(sorted(clients))
    if len(ids) < 3:
        raise SecAggSetupError(
            f"secure aggregation needs at least 3 clients (got {len(ids)}): with 2 the sum "
            f"reveals each input to the other, and a secret needs 2 holders"
        )
    if length < 1:
        raise SecAggSetupError(f"nothing to aggregate: vector length {length}")
    quantizer = Quantizer(bits=config.bits, clip_range=config.clip_range, max_clients=len(ids))
    graph = neighbourhood_graph(list(ids), config.neighbours, graph_seed)
    thresholds = {}
    for c in ids:
        degree = len(graph[c])
        if degree < 2:
            raise SecAggSetupError(
                f"client {c!r} has {degree} neighbour(s); secagg.neighbours must be >= 2"
            )
        # The epsilon keeps 0.3 * 10 = 3.0000000000000004 from rounding up to 4.
        thresholds[c] = max(2, math.ceil(config.threshold * degree - 1e-9))
    return RoundPlan(
        session=os.urandom(SESSION_BYTES) if session is None else session,
        clients=ids,
        graph=graph,
        index={c: i + 1 for i, c in enumerate(ids)},
        thresholds=thresholds,
        quantizer=quantizer,
        length=length,
    )
