"""One jitted round program of a decentralized algorithm: vmap over nodes, or sharded.

Both programs take ``(state, W, batches, keys)`` with every node's state stacked, the round's
``[n, n]`` mixing matrix and node-stacked batches, and return ``(state, metrics)``. They differ
only in the :class:`~fedjax_lab.topologies.nodes.NodeComm` they hand the algorithm:

* :func:`vmap_round`: all nodes in one block; ``mix`` is the dense ``W @ x`` (an einsum over
  the node axis), or the neighbour gather of :func:`~fedjax_lab.topologies.nodes.sparse_mix`.
* :func:`sharded_round`: the nodes are split into equal contiguous blocks over devices with
  ``jax.shard_map``. ``exchange="permute"`` writes ``W @ x`` as
  ``sum_s diag(a_s) roll(x, -s)`` over the topology's non-zero diagonals ``s``
  (:meth:`Topology.offsets`; 3 for a ring, <= 7 for a torus) and moves each rolled block with
  collective permutes (``jax.lax.ppermute``); ``exchange="gather"`` all-gathers every node's
  model and multiplies by the device's rows of ``W`` (any ``W``). ``"auto"`` permutes when
  that moves fewer node models than the gather. Sums over nodes use ``psum``. Results equal
  the vmap program's up to float summation order (tested to 1e-5).

The node keys are split from the round key for ALL nodes before sharding, so a seed gives the
same run on any number of devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_lab.core.types import Batches
from fedjax_lab.topologies.graphs import Topology
from fedjax_lab.topologies.nodes import (
    DecentralizedAlgorithm,
    GossipState,
    NodeComm,
    dense_mix,
    sparse_mix,
)

EXCHANGES = ("auto", "permute", "gather")
RoundProgram = Callable[[GossipState, jax.Array, Batches, jax.Array], tuple[GossipState, Any]]


@functools.lru_cache(maxsize=32)
def _dense_vmap_round(algorithm: DecentralizedAlgorithm, num_nodes: int) -> RoundProgram:
    def round_fn(state, matrix, batches, keys):
        comm = NodeComm(lambda tree: dense_mix(matrix, tree), lambda x: jnp.sum(x, axis=0),
                        num_nodes)
        return algorithm.round(state, batches, keys, comm)

    return jax.jit(round_fn)


def vmap_round(algorithm: DecentralizedAlgorithm, num_nodes: int, *,
               sparse: tuple[Any, Any] | None = None) -> RoundProgram:
    """The jitted round of ``algorithm`` over all ``num_nodes`` nodes on one device.

    Args:
      algorithm: the decentralized algorithm.
      num_nodes: ``n``.
      sparse: optional ``(indices, weights)`` of :func:`~fedjax_lab.topologies.nodes.sparse_rows`
        of a static ``W``: the mix gathers each node's in-neighbours instead of the dense
        einsum (the ``W`` argument is then ignored).
    """
    if sparse is None:
        # The mixing matrix is an argument, so one compiled program serves every topology
        # (and every round of a time-varying one) of this algorithm and node count.
        return _dense_vmap_round(algorithm, num_nodes)
    idx, val = jnp.asarray(sparse[0]), jnp.asarray(sparse[1])

    def round_fn(state, matrix, batches, keys):
        del matrix  # the neighbour lists stand for it
        comm = NodeComm(lambda tree: sparse_mix(idx, val, tree), lambda x: jnp.sum(x, axis=0),
                        num_nodes)
        return algorithm.round(state, batches, keys, comm)

    return jax.jit(round_fn)


def _global_roll(x: jax.Array, shift: int, axis: str, devices: int) -> jax.Array:
    """Rows ``(i + shift) mod n`` of the global node axis for this device's block of rows."""
    m = x.shape[0]
    q, r = divmod(shift, m)

    def from_device_ahead(k: int, rows: jax.Array) -> jax.Array:
        k %= devices
        if k == 0:
            return rows
        # Device d receives these rows of device d + k's block.
        return jax.lax.ppermute(rows, axis, [((d + k) % devices, d) for d in range(devices)])

    if r == 0:
        return from_device_ahead(q, x)
    # Only the rows that land here travel: m - r of the block q ahead, r of the next one.
    return jnp.concatenate([from_device_ahead(q, x[r:]), from_device_ahead(q + 1, x[:r])],
                           axis=0)


def resolve_exchange(topology: Topology, num_devices: int, exchange: str = "auto") -> str:
    """The concrete exchange ``"auto"`` stands for: ``"permute"`` when the non-zero shifts
    of ``W`` bring fewer node models to a device than the all-gather does."""
    if exchange != "auto":
        return exchange
    n = topology.num_nodes
    m = n // num_devices
    # Each non-zero shift brings m node models to every device; the gather all n - m foreign.
    moved = m * sum(1 for s in topology.offsets() if s)
    return "permute" if moved < n - m else "gather"


def sharded_round(
    algorithm: DecentralizedAlgorithm,
    topology: Topology,
    devices: Sequence[jax.Device] | None = None,
    *,
    exchange: str = "auto",
    axis_name: str = "nodes",
) -> RoundProgram:
    """The jitted round of ``algorithm`` with the nodes split over ``devices``.

    Args:
      algorithm: the decentralized algorithm.
      topology: its graph; fixes ``n`` and, for ``"permute"``, the diagonals that move.
      devices: the devices (default: all); ``n`` must be a multiple of their number.
      exchange: ``"permute"``, ``"gather"`` or ``"auto"`` (see the module docstring).
      axis_name: the mesh axis name.

    Raises:
      ValueError: naming the argument: an unknown ``exchange``, or nodes that do not split
        evenly over the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one jax.Device (or None for all)")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    n, num_dev = topology.num_nodes, len(devices)
    if n % num_dev:
        raise ValueError(
            f"{n} nodes do not split evenly over {num_dev} devices; use a number of nodes "
            f"that is a multiple of {num_dev} (or fewer devices)"
        )
    m = n // num_dev
    offsets = topology.offsets()
    exchange = resolve_exchange(topology, num_dev, exchange)
    mesh = Mesh(np.array(devices), (axis_name,))

    def block_round(state, rows, batches, keys):
        base = jax.lax.axis_index(axis_name) * m
        local = jnp.arange(m)
        if exchange == "gather":
            def mix_leaf(x):
                everyone = jax.lax.all_gather(x, axis_name, tiled=True)
                return jnp.einsum("ij,j...->i...", rows.astype(x.dtype), everyone,
                                  precision=jax.lax.Precision.HIGHEST)
        else:
            coeffs = [rows[local, (base + local + s) % n] for s in offsets]

            def mix_leaf(x):
                out = jnp.zeros_like(x)
                for s, a in zip(offsets, coeffs, strict=True):
                    rolled = x if s == 0 else _global_roll(x, s, axis_name, num_dev)
                    out = out + a.reshape((m,) + (1,) * (x.ndim - 1)).astype(x.dtype) * rolled
                return out

        comm = NodeComm(lambda tree: jax.tree.map(mix_leaf, tree),
                        lambda x: jax.lax.psum(jnp.sum(x, axis=0), axis_name), n)
        return algorithm.round(state, batches, keys, comm)

    ax = P(axis_name)
    state_spec = GossipState(params=ax, round=P(), extra=ax)
    batch_spec = Batches(arrays=None, mask=ax, weight=ax, index=ax, table=P())
    program = jax.shard_map(
        block_round, mesh=mesh,
        in_specs=(state_spec, ax, batch_spec, ax),
        out_specs=(state_spec, P()),
        # The local loops start from per-node values and the metrics are psums (replicated
        # by construction); the varying-axis type check would reject the scan carries.
        check_vma=False,
    )
    node_sharding = NamedSharding(mesh, ax)
    replicated = NamedSharding(mesh, P())

    def place(state, matrix, batches, keys):
        state = GossipState(jax.device_put(state.params, node_sharding),
                            jax.device_put(state.round, replicated),
                            jax.device_put(state.extra, node_sharding))
        batches = Batches(None, *(jax.device_put(b, node_sharding)
                                  for b in (batches.mask, batches.weight, batches.index)),
                          table=jax.device_put(batches.table, replicated))
        return (state, jax.device_put(matrix, node_sharding), batches,
                jax.device_put(keys, node_sharding))

    jitted = jax.jit(program)

    def round_fn(state, matrix, batches, keys):
        return jitted(*place(state, matrix, batches, keys))

    return round_fn
