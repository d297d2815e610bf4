"""The driver of a decentralized run: one node per client, every node trains every round.

:func:`run_decentralized` lays out each round's local batches of ALL clients with the library's
:class:`~fedjax_lab.data.CohortBuilder` (client ``i`` is node ``i``; one fixed ``[n, S, B]``
shape, so the round compiles once), picks the round's mixing matrix from the topology (a
time-varying one cycles by round), runs the algorithm's jitted round program (vmap or sharded,
:mod:`fedjax_lab.topologies.node_backends`) and evaluates the node average with an evaluator
of :func:`fedjax_lab.metrics.evaluation.make_evaluator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.rng import client_keys, round_key
from fedjax_lab.core.types import Batches, Params
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.topologies.graphs import Topology, check_mixing
from fedjax_lab.topologies.node_backends import sharded_round, vmap_round
from fedjax_lab.topologies.nodes import (
    DecentralizedAlgorithm,
    GossipState,
    node_average,
    replicate,
)

BACKENDS = ("vmap", "sharded")


class DecentralizedResult(NamedTuple):
    """What :func:`run_decentralized` returns.

    Attributes:
      state: the final stacked node state.
      history: one dict of floats per round (``round``, the algorithm's node metrics, and
        ``test_loss``/``test_accuracy`` of the node average on evaluated rounds).
      average: the final node average ``(1/n) sum_i x_i`` (one model).
    """

    state: GossipState
    history: list[dict[str, float]]
    average: Params


def check_compatible(algorithm: DecentralizedAlgorithm, topology: Topology,
                     data: FederatedData | None = None) -> None:
    """ValueError (naming the fix) when the topology does not fit the algorithm or the data."""
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a fedjax_lab.topologies.Topology (e.g. "
                        f"topologies.ring(n)), got {type(topology).__name__}")
    if data is not None and data.num_clients != topology.num_nodes:
        raise ValueError(
            f"the topology {topology.name} has {topology.num_nodes} nodes but the population "
            f"has {data.num_clients} clients; each client is one node: build both with the "
            "same number"
        )
    check_mixing(topology.matrices, stochastic=algorithm.stochastic,
                 name=f"the mixing matrix of {topology.name} (for {algorithm.name})")


def node_batches(builder: CohortBuilder, round_idx: int, num_nodes: int) -> Batches:
    """Every node's ``[n, S, B]`` batches of a round (indices into the device table)."""
    cohort = builder.build(round_idx, np.arange(num_nodes))
    return Batches(arrays=None, mask=jnp.asarray(cohort.mask), weight=jnp.asarray(cohort.weight),
                   index=jnp.asarray(cohort.index), table=builder.table)


def run_decentralized(
    algorithm: DecentralizedAlgorithm,
    topology: Topology,
    data: FederatedData,
    params: Params,
    *,
    rounds: int,
    batch_size: int,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    seed: int = 0,
    evaluate: Callable[[Params], dict[str, float]] | None = None,
    eval_every: int = 1,
    backend: str = "vmap",
    devices: Sequence[jax.Device] | None = None,
    exchange: str = "auto",
) -> DecentralizedResult:
    """Runs ``rounds`` rounds of ``algorithm`` on ``topology``, node ``i`` = client ``i``.

    Args:
      algorithm: e.g. :func:`~fedjax_lab.topologies.dsgd`.
      topology: the graph; its node count must equal ``data.num_clients``.
      data: the population.
      params: the initial model, copied to every node.
      rounds: number of rounds (>= 1).
      batch_size: local minibatch size.
      local_steps: local steps per round (give this or ``local_epochs``).
      local_epochs: local passes over each node's data per round.
      seed: the run seed (batch order and node keys).
      evaluate: ``model -> {"test_loss", "test_accuracy", ...}`` of the node average.
      eval_every: evaluate every this many rounds (and after the last).
      backend: ``"vmap"`` or ``"sharded"`` (nodes split over ``devices``).
      devices: the sharded backend's devices (default: all).
      exchange: the sharded backend's neighbour exchange (``"auto"``, ``"permute"``,
        ``"gather"``).

    Raises:
      ValueError: naming the argument, before anything is compiled.
    """
    check_compatible(algorithm, topology, data)
    for name, value in (("rounds", rounds), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if local_steps is not None and local_epochs is not None:
        raise ValueError("give local_steps (fixed steps per round) or local_epochs (passes over "
                         "each node's data), not both")
    if local_steps is None and local_epochs is None:
        local_epochs = 1
    n = topology.num_nodes
    builder = CohortBuilder(data, batch_size=batch_size, local_epochs=local_epochs,
                            num_steps=local_steps, cohort_size=n, seed=seed,
                            device_table=True, ladder=None)
    if backend == "vmap":
        program = vmap_round(algorithm, n)
    else:
        program = sharded_round(algorithm, topology, devices, exchange=exchange)
    state = algorithm.init(replicate(params, n))
    matrices = jnp.asarray(topology.matrices, jnp.float32)
    root = jax.random.key(seed)
    history: list[dict[str, float]] = []
    for r in range(rounds):
        keys = client_keys(round_key(root, r), n)
        state, metrics = program(state, matrices[r % topology.period],
                                 node_batches(builder, r, n), keys)
        row = {"round": float(r + 1),
               **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        if evaluate is not None and ((r + 1) % eval_every == 0 or r + 1 == rounds):
            row.update(evaluate(node_average(state.params)))
        history.append(row)
    return DecentralizedResult(state, history, node_average(state.params))
