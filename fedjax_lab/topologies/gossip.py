"""D-SGD: local SGD steps on every node, then one gossip step ``x <- W x``.

Lian, Zhang, Zhang, Hsieh, Zhang, Liu (2017), "Can Decentralized Algorithms Outperform
Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic Gradient Descent"
(D-PSGD), in the local-update form of Koloskova, Loizou, Boreiri, Jaggi, Stich (2020), "A
Unified Theory of Decentralized SGD with Changing Topology and Local Updates", Algorithm 1:

    x_i^{t+1/2} = local SGD steps on node i's data from x_i^t
    x_i^{t+1}   = sum_j W_ij x_j^{t+1/2}

with a doubly stochastic ``W`` (a time-varying one cycles by round). With the fully connected
``W = 11^T / n`` every node ends the round at the node average, i.e. FedAvg with all clients
and uniform weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.kit import ClientOptimizer, Objective, local_training
from fedjax_lab.core.types import Batches, Metrics, Params
from fedjax_lab.topologies.nodes import (
    DecentralizedAlgorithm,
    GossipState,
    NodeComm,
    local_train_nodes,
    node_metrics,
    node_size,
)


def dsgd(
    objective: Objective, optimizer: optax.GradientTransformation | ClientOptimizer
) -> DecentralizedAlgorithm:
    """Decentralized SGD with local steps (Lian et al. 2017; Koloskova et al. 2020, Alg. 1).

    Args:
      objective: a node's masked-mean batch loss, e.g. ``kit.model_objective(model)``.
      optimizer: the local optimizer (fresh state every round), e.g. ``optax.sgd(0.1)``.

    Returns:
      A :class:`~fedjax_lab.topologies.nodes.DecentralizedAlgorithm` needing a doubly
      stochastic ``W``; every node broadcasts its dense float32 model once per round.
    """
    training = local_training(objective, optimizer)

    def init(params: Params) -> GossipState:
        return GossipState(params, jnp.zeros((), jnp.int32))

    def round_fn(state: GossipState, batches: Batches, keys: jax.Array, comm: NodeComm
                 ) -> tuple[GossipState, Metrics]:
        local = local_train_nodes(training, state.params, state.round, batches, keys)
        mixed = comm.mix(local.params)
        bits = jnp.full(keys.shape[:1], 32.0 * node_size(mixed), jnp.float32)
        return (GossipState(mixed, state.round + 1, state.extra),
                node_metrics(local, mixed, comm, bits))

    return DecentralizedAlgorithm(init, round_fn, lambda state: state.params, "dsgd")
