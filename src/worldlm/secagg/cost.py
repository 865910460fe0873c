"""What a round costs as the cohort grows: bytes per client and compute, complete vs SecAgg+.

Dropouts are drawn at MaskedInputCollection, the costly case for the server (it must rebuild
each dropped client's key and strip the masks its surviving neighbours added for it), as in
the evaluation of Bonawitz et al. 2017 (§7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from worldlm.config import SecAggConfig
from worldlm.secagg.graph import neighbourhood_graph
from worldlm.secagg.messages import Stage
from worldlm.secagg.simulate import run_secagg


@dataclass(frozen=True, kw_only=True)
class CostRow:
    """One configuration's cost; per-client figures are means over the included clients."""

    clients: int
    neighbours: int  # requested k; 0 = complete graph
    degree: float  # mean number of neighbours actually used
    dropout: float
    length: int
    bytes_sent: float
    bytes_received: float
    client_seconds: float
    server_seconds: float

    @property
    def expansion(self) -> float:
        """Bytes a client sends over those of its plain float32 update."""
        return self.bytes_sent / (4 * self.length)


def secagg_plus_neighbours(clients: int) -> int:
    """k = 2 ceil(log2 n): a SecAgg+ degree that grows with the logarithm of the cohort (even,
    as the Harary graph rounds odd k up anyway)."""
    return 2 * math.ceil(math.log2(clients))


def measure_cost(
    clients: int,
    *,
    neighbours: int,
    dropout: float,
    length: int,
    bits: int = 32,
    threshold: float = 0.5,
    seed: int = 0,
) -> CostRow:
    """Run one simulated round over random inputs and report its cost."""
    rng = np.random.default_rng(seed)
    ids = [f"client{i:04d}" for i in range(clients)]
    inputs = {c: rng.uniform(-1, 1, length).astype(np.float32) for c in ids}
    dropped = set(rng.choice(ids, size=round(dropout * clients), replace=False).tolist())
    config = SecAggConfig(neighbours=neighbours, threshold=threshold, bits=bits)
    result = run_secagg(inputs, config, {Stage.MASKED_INPUT: dropped}, rng_seed=seed)
    kept = result.included
    graph = neighbourhood_graph(ids, neighbours, seed)
    return CostRow(
        clients=clients,
        neighbours=neighbours,
        degree=float(np.mean([len(graph[c]) for c in ids])),
        dropout=dropout,
        length=length,
        bytes_sent=float(np.mean([result.bytes_sent[c] for c in kept])),
        bytes_received=float(np.mean([result.bytes_received[c] for c in kept])),
        client_seconds=float(np.mean([result.client_seconds[c] for c in kept])),
        server_seconds=result.server_seconds,
    )
