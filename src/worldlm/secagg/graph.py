"""The SecAgg+ neighbourhood graph (Bell et al. 2020): who masks with and shares to whom.

Clients sit on a ring in an order drawn from a public seed, and each is joined to the
ceil(k / 2) nearest on either side: a Harary graph, k-regular for even k (odd k is rounded up
to k + 1, so every pair of neighbours is symmetric). Because the order is random and not
chosen by any client, a coalition cannot place itself around a victim; Bell et al. show that
k = O(log n) neighbours keep the sum private and robust with high probability. k = 0, or
k >= n - 1, gives the complete graph of the original protocol (Bonawitz et al. 2017).
"""

from __future__ import annotations

import numpy as np


def neighbourhood_graph(clients: list[str], k: int, seed: int) -> dict[str, frozenset[str]]:
    """Each client's neighbours: the complete graph for k = 0, else a shuffled Harary graph."""
    ids = sorted(clients)
    if len(set(ids)) != len(ids):
        raise ValueError("client ids must be distinct")
    n = len(ids)
    half = -(-k // 2)
    if k == 0 or 2 * half >= n - 1:
        return {c: frozenset(ids) - {c} for c in ids}
    # The order is public randomness, so numpy's generator is fine here (no secret rests on it).
    ring = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    graph: dict[str, set[str]] = {c: set() for c in ids}
    for i, c in enumerate(ring):
        for d in range(1, half + 1):
            graph[c].add(ring[(i + d) % n])
            graph[c].add(ring[(i - d) % n])
    return {c: frozenset(v) for c, v in graph.items()}
