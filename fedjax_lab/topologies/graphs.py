"""Communication graphs of decentralized learning as validated mixing matrices.

A :class:`Topology` holds one mixing matrix ``W`` (``[n, n]``) or a cycle of them (time-varying
graphs, round ``r`` uses ``matrices[r % T]``). A gossip step replaces the stacked node models
``x`` (leading node axis) by ``W @ x``: node ``i`` receives ``W[i, j] x_j`` from node ``j``.

* **Doubly stochastic** matrices (rows and columns sum to 1) are what D-SGD needs (Lian et al.
  2017, "Can Decentralized Algorithms Outperform Centralized Algorithms?"; Koloskova et al.
  2020, "A Unified Theory of Decentralized SGD with Changing Topology and Local Updates",
  Assumption 4): the node average is preserved and the nodes reach consensus. Undirected graphs
  get Metropolis-Hastings weights ``W_ij = 1 / (1 + max(d_i, d_j))`` for an edge, the rest of
  the row on the diagonal (Xiao & Boyd 2004), which are symmetric and doubly stochastic.
* **Column stochastic** matrices (columns sum to 1) are what PushSum / Stochastic Gradient Push
  needs on directed graphs (Kempe et al. 2003; Assran et al. 2019, "Stochastic Gradient Push
  for Distributed Deep Learning"): node ``j`` splits its mass among itself and its
  out-neighbours, so the total is preserved but the average is not reached without
  de-biasing.

Every constructor checks what it returns (:func:`check_mixing`): square, finite, non-negative,
stochastic in the required sense, and connected (strongly connected for directed graphs; the
union over the cycle for time-varying ones). :attr:`Topology.spectral_gap` is ``1 - |lambda_2|``
of ``W`` (second largest eigenvalue modulus): the per-round contraction of the consensus
distance for a symmetric ``W`` is ``|lambda_2|^2`` (Koloskova et al. 2020, ``p = 1 -
|lambda_2|^2``). For a cycle it is ``1 - |lambda_2(W_{T-1} ... W_0)|^{1/T}``, the per-round
rate over one period.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Stochastic = Literal["doubly", "column"]
#: Tolerance of the row/column sum checks (float64 arithmetic on float inputs).
SUM_TOLERANCE = 1e-6


@dataclass(frozen=True, eq=False)
class Topology:
    """A validated mixing matrix, or a cycle of them.

    Attributes:
      matrices: ``[T, n, n]`` float64; round ``r`` mixes with ``matrices[r % T]``.
      name: e.g. ``"ring(16)"``.
      stochastic: ``"doubly"`` (D-SGD, CHOCO-SGD) or ``"column"`` (PushSum only).
      spectral_gap: ``1 - |lambda_2|`` (per round over the cycle, see the module docstring).
    """

    matrices: np.ndarray
    name: str
    stochastic: Stochastic
    spectral_gap: float

    @property
    def num_nodes(self) -> int:
        return int(self.matrices.shape[1])

    @property
    def period(self) -> int:
        """``T``: how many matrices the cycle has (1 for a static graph)."""
        return int(self.matrices.shape[0])

    def matrix(self, round_idx: int) -> np.ndarray:
        """The ``[n, n]`` matrix of round ``round_idx``."""
        return self.matrices[round_idx % self.period]

    def offsets(self) -> tuple[int, ...]:
        """Shifts ``s`` with some ``W[i, (i + s) % n] != 0`` in any matrix of the cycle.

        ``W @ x = sum_s diag(W[i, (i + s) % n]) roll(x, -s)``: a ring has 3 such shifts, a 2-D
        torus at most 7 and the exponential graph ``ceil(log2 n) + 1``, so the sharded gossip
        moves only these rolled blocks (collective permutes) instead of every node's model.
        """
        n = self.num_nodes
        rows = np.arange(n)
        return tuple(
            s for s in range(n)
            if np.any(self.matrices[:, rows, (rows + s) % n] != 0.0)
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able description: name, nodes, period, stochasticity, spectral gap."""
        return {"name": self.name, "nodes": self.num_nodes, "period": self.period,
                "stochastic": self.stochastic, "spectral_gap": self.spectral_gap}


# ----------------------------------------------------------------------------- validation
def _is_connected(adjacency: np.ndarray) -> bool:
    """Strong connectivity of a directed adjacency (``a[i, j]``: an edge j -> i)."""
    n = adjacency.shape[0]
    for graph in (adjacency, adjacency.T):  # everyone reachable from 0 and 0 from everyone
        seen = np.zeros(n, bool)
        seen[0] = True
        frontier = [0]
        while frontier:
            nxt = np.flatnonzero(np.any(graph[:, frontier] > 0, axis=1) & ~seen)
            seen[nxt] = True
            frontier = list(nxt)
        if not seen.all():
            return False
    return True


def second_eigenvalue_modulus(matrix: np.ndarray) -> float:
    """``|lambda_2|``: the second largest eigenvalue modulus (0 for a single node)."""
    moduli = np.sort(np.abs(np.linalg.eigvals(np.asarray(matrix, np.float64))))[::-1]
    return float(moduli[1]) if len(moduli) > 1 else 0.0


def check_mixing(
    matrices: Any, *, stochastic: Stochastic = "doubly", num_nodes: int | None = None,
    name: str = "W",
) -> np.ndarray:
    """``matrices`` (one ``[n, n]`` or a sequence ``[T, n, n]``) as checked float64 ``[T, n, n]``.

    Args:
      matrices: the mixing matrix or the cycle of matrices of a time-varying graph.
      stochastic: ``"doubly"`` (rows and columns sum to 1) or ``"column"`` (columns sum to 1).
      num_nodes: the number of nodes the caller needs, if known.
      name: how messages name the argument.

    Raises:
      ValueError: naming ``name`` and the fix, for a matrix that is not square, of the wrong
        size, non-finite, negative somewhere, not stochastic in the required sense, or whose
        graph (the union over the cycle) is not (strongly) connected.
    """
    if stochastic not in ("doubly", "column"):
        raise ValueError(f"stochastic must be 'doubly' or 'column', got {stochastic!r}")
    try:
        w = np.asarray(matrices, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric [n, n] matrix or a sequence of them") from None
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3 or w.shape[1] != w.shape[2] or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(
            f"{name} must be a square [n, n] matrix (or a non-empty sequence of them), got "
            f"shape {np.shape(matrices)}"
        )
    n = w.shape[1]
    if num_nodes is not None and n != num_nodes:
        raise ValueError(
            f"{name} is {n} x {n} but there are {num_nodes} nodes; build the topology with "
            f"num_nodes={num_nodes} (one node per client of the population)"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} has non-finite entries (NaN or inf); every weight must be a "
                         "finite number in [0, 1]")
    if np.any(w < 0):
        t, i, j = np.argwhere(w < 0)[0]
        raise ValueError(
            f"{name} has a negative weight {w[t, i, j]:g} at [{i}, {j}]"
            + (f" of matrix {t}" if w.shape[0] > 1 else "")
            + "; mixing weights must be >= 0 (use Metropolis-Hastings weights, e.g. "
            "topologies.from_adjacency)"
        )
    cols = w.sum(axis=1)
    bad = np.abs(cols - 1.0) > SUM_TOLERANCE
    if np.any(bad):
        t, j = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} is not {'doubly' if stochastic == 'doubly' else 'column'} stochastic: "
            f"column {j} sums to {cols[t, j]:.6g}, not 1; normalise the weights each node "
            "sends (or use topologies.from_adjacency / directed)"
        )
    if stochastic == "doubly":
        rows = w.sum(axis=2)
        bad = np.abs(rows - 1.0) > SUM_TOLERANCE
        if np.any(bad):
            t, i = np.argwhere(bad)[0]
            raise ValueError(
                f"{name} is not doubly stochastic: row {i} sums to {rows[t, i]:.6g}, not 1; "
                "D-SGD and CHOCO-SGD need rows and columns summing to 1 (Metropolis-Hastings "
                "weights: topologies.from_adjacency); a column-stochastic matrix of a directed "
                "graph is for PushSum (stochastic='column')"
            )
    if not _is_connected(np.any(w > 0, axis=0)):
        raise ValueError(
            f"the graph of {name} is not {'strongly ' if stochastic == 'column' else ''}"
            "connected (some nodes never hear from others, so they cannot reach consensus); "
            "add edges (or, for erdos_renyi, raise p or change the seed)"
        )
    return w


def _spectral_gap(w: np.ndarray) -> float:
    product = np.eye(w.shape[1])
    for m in w:
        product = m @ product
    return float(1.0 - second_eigenvalue_modulus(product) ** (1.0 / w.shape[0]))


def from_matrices(
    matrices: Any, *, stochastic: Stochastic = "doubly", name: str = "custom"
) -> Topology:
    """A topology from given mixing matrices (one, or the cycle of a time-varying graph).

    Args:
      matrices: ``[n, n]`` or ``[T, n, n]``; checked by :func:`check_mixing`.
      stochastic: ``"doubly"`` (D-SGD, CHOCO-SGD) or ``"column"`` (PushSum).
      name: the topology's name in reports.
    """
    return _build(matrices, stochastic, name, "matrices")


def _build(matrices: Any, stochastic: Stochastic, name: str, what: str) -> Topology:
    w = check_mixing(matrices, stochastic=stochastic, name=what)
    return Topology(w, name, stochastic, _spectral_gap(w))


# ---------------------------------------------------------------------------- constructors
def _check_nodes(num_nodes: Any, minimum: int = 1, name: str = "num_nodes") -> int:
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int | np.integer) or (
        num_nodes < minimum
    ):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {num_nodes!r}")
    return int(num_nodes)


def metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings weights of an undirected graph (Xiao & Boyd 2004).

    ``W_ij = 1 / (1 + max(d_i, d_j))`` for an edge ``i ~ j``, ``W_ii = 1 - sum_j W_ij``:
    symmetric, non-negative and doubly stochastic for any undirected graph.
    """
    a = np.asarray(adjacency, bool)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be a square [n, n] matrix, got shape {a.shape}")
    if not np.array_equal(a, a.T):
        raise ValueError("adjacency must be symmetric (an undirected graph); for a directed "
                         "graph use topologies.directed (PushSum)")
    a = a & ~np.eye(len(a), dtype=bool)
    deg = a.sum(axis=1)
    w = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    w[np.diag_indices(len(a))] = 1.0 - w.sum(axis=1)
    return w


def from_adjacency(adjacency: Any, *, name: str = "graph") -> Topology:
    """A doubly stochastic topology of an undirected graph (Metropolis-Hastings weights)."""
    return _build(metropolis_hastings(np.asarray(adjacency)), "doubly", name, name)


def _adjacency(n: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    a = np.zeros((n, n), bool)
    for i, j in edges:
        if i != j:
            a[i, j] = a[j, i] = True
    return a


def ring(num_nodes: int) -> Topology:
    """Each node talks to its two neighbours on a cycle (weights 1/3; 1/2 for two nodes)."""
    n = _check_nodes(num_nodes)
    return from_adjacency(_adjacency(n, ((i, (i + 1) % n) for i in range(n))),
                          name=f"ring({n})")


def torus(rows: int, cols: int) -> Topology:
    """A 2-D torus of ``rows x cols`` nodes (node ``r * cols + c``), 4 neighbours each."""
    r_, c_ = _check_nodes(rows, name="rows"), _check_nodes(cols, name="cols")
    edges = []
    for r in range(r_):
        for c in range(c_):
            i = r * c_ + c
            edges += [(i, ((r + 1) % r_) * c_ + c), (i, r * c_ + (c + 1) % c_)]
    return from_adjacency(_adjacency(r_ * c_, edges), name=f"torus({r_}x{c_})")


def torus_shape(num_nodes: int) -> tuple[int, int]:
    """The most square ``rows x cols`` factorisation of ``num_nodes`` (rows <= cols)."""
    n = _check_nodes(num_nodes)
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def fully_connected(num_nodes: int) -> Topology:
    """Every node averages with every other: ``W = 11^T / n`` (exact averaging, gap 1)."""
    n = _check_nodes(num_nodes)
    return from_matrices(np.full((n, n), 1.0 / n), name=f"fully_connected({n})")


def erdos_renyi(num_nodes: int, p: float, *, seed: int) -> Topology:
    """A seeded Erdős–Rényi graph G(n, p) with Metropolis-Hastings weights.

    Each of the ``n (n - 1) / 2`` edges is present with probability ``p``, drawn with
    ``np.random.default_rng(seed)``. A disconnected draw is a ValueError (raise ``p`` or change
    ``seed``), never silently repaired.
    """
    n = _check_nodes(num_nodes)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
        raise ValueError(f"p must be an edge probability in (0, 1], got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    upper = np.triu(np.random.default_rng(seed).random((n, n)) < p, k=1)
    return from_adjacency(upper | upper.T, name=f"erdos_renyi({n}, p={p:g}, seed={seed})")


def _exponential_offsets(n: int) -> list[int]:
    return [2**k for k in range(max(n - 1, 1).bit_length()) if 2**k < n]


def exponential(num_nodes: int) -> Topology:
    """The static exponential graph (Ying et al. 2021, "Exponential Graph is Provably
    Efficient for Decentralized Deep Training"; Assran et al. 2019).

    Node ``i`` receives from nodes ``i + 2^k mod n`` for ``2^k < n`` with equal weights
    ``1 / (tau + 1)``, ``tau = ceil(log2 n)`` (itself included): a circulant, so doubly
    stochastic, though not symmetric.
    """
    n = _check_nodes(num_nodes)
    offsets = _exponential_offsets(n) if n > 1 else []
    w = np.zeros((n, n))
    for i in range(n):
        w[i, i] = 1.0
        for s in offsets:
            w[i, (i + s) % n] = 1.0
    return from_matrices(w / w.sum(axis=1, keepdims=True), name=f"exponential({n})")


def one_peer_exponential(num_nodes: int, *, directed: bool = False) -> Topology:
    """The time-varying one-peer exponential graph (Ying et al. 2021; Assran et al. 2019).

    Round ``r`` pairs node ``i`` with the one peer ``i + 2^(r mod tau) mod n`` (``tau =
    ceil(log2 n)``), weights 1/2 each: ``W^(r) = (I + P^(r)) / 2`` for the cyclic shift
    ``P^(r)``, doubly stochastic every round. With ``directed`` the same matrices are labelled
    column stochastic (PushSum's sends: keep half, push half to one peer, as in SGP).
    """
    n = _check_nodes(num_nodes, minimum=2)
    mats = []
    for s in _exponential_offsets(n):
        w = 0.5 * np.eye(n)
        w[np.arange(n), (np.arange(n) + s) % n] += 0.5
        mats.append(w)
    return from_matrices(np.stack(mats), stochastic="column" if directed else "doubly",
                         name=f"one_peer_exponential({n})")


def directed(num_nodes: int, edges: Sequence[tuple[int, int]]) -> Topology:
    """A column-stochastic topology of a directed graph, for PushSum (Kempe et al. 2003).

    Node ``j`` keeps a share of its mass and pushes an equal share along each of its out-edges
    ``(j, i)``: ``A_ij = 1 / (1 + outdeg(j))``. Columns sum to 1; rows in general do not.

    Args:
      num_nodes: ``n``.
      edges: ``(source, destination)`` pairs of node indices; must give a strongly connected
        graph.
    """
    n = _check_nodes(num_nodes)
    a = np.eye(n, dtype=bool)
    for e in edges:
        if len(e) != 2 or not all(isinstance(v, int | np.integer) and 0 <= v < n for v in e):
            raise ValueError(f"edges must be (source, destination) pairs of node indices in "
                             f"[0, {n}), got {e!r}")
        a[e[1], e[0]] = True
    return from_matrices(a / a.sum(axis=0, keepdims=True), stochastic="column",
                         name=f"directed({n}, {int(a.sum()) - n} edges)")


#: Named constructors of ``n`` nodes for the experiment CLI (``--topology``).
TOPOLOGIES = ("ring", "torus", "fully_connected", "erdos_renyi", "exponential",
              "one_peer_exponential")


def topology_by_name(name: str, num_nodes: int, *, p: float = 0.3, seed: int = 0) -> Topology:
    """One of :data:`TOPOLOGIES` over ``num_nodes`` (the torus takes :func:`torus_shape`)."""
    if name == "ring":
        return ring(num_nodes)
    if name == "torus":
        return torus(*torus_shape(num_nodes))
    if name == "fully_connected":
        return fully_connected(num_nodes)
    if name == "erdos_renyi":
        return erdos_renyi(num_nodes, p, seed=seed)
    if name == "exponential":
        return exponential(num_nodes)
    if name == "one_peer_exponential":
        return one_peer_exponential(num_nodes)
    raise ValueError(f"unknown topology {name!r}; valid names: {', '.join(TOPOLOGIES)}")
