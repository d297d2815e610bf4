"""The SecAgg+ neighbour graph: a randomly relabelled Harary graph ``H(k, n)``.

Bell et al. (2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead") let each
client mask with, and share its secrets among, only its ``k`` neighbours in a sparse random
graph (``k = O(log n)``) instead of all ``n - 1`` others (Bonawitz et al., 2017). As in their
practical variant (and Flower's SecAgg+), the graph here is the Harary graph ``H(k, n)`` (node
``i`` linked to ``i ± 1, ..., i ± k/2`` mod ``n``: ``k``-regular and ``k``-connected) under a
random relabelling drawn from a public seed, so the server cannot pick the neighbourhoods.
``k >= n - 1`` gives the complete graph, i.e. plain SecAgg.
"""

from __future__ import annotations

import numpy as np


def neighbour_graph(num_clients: int, degree: int | None, seed: int) -> list[np.ndarray]:
    """Each client's sorted neighbours (client indices in ``[0, num_clients)``, no self loop).

    Args:
      num_clients: ``n >= 1``.
      degree: ``k`` (even, ``2 <= k``), or None for the complete graph; ``k >= n - 1`` also
        gives the complete graph.
      seed: public seed of the relabelling.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    n = num_clients
    if degree is None or degree >= n - 1:
        return [np.array([j for j in range(n) if j != i], dtype=np.int64) for i in range(n)]
    if degree < 2 or degree % 2:
        raise ValueError(
            f"neighbours must be an even number >= 2 (the Harary graph H(k, n) is k-regular for "
            f"even k), got {degree}"
        )
    label = np.random.default_rng(seed).permutation(n)  # position -> client
    offsets = np.concatenate([np.arange(1, degree // 2 + 1), -np.arange(1, degree // 2 + 1)])
    out = [np.empty(0, dtype=np.int64)] * n
    for pos in range(n):
        out[int(label[pos])] = np.sort(label[(pos + offsets) % n]).astype(np.int64)
    return out
