"""PushSum / Stochastic Gradient Push for directed graphs (column-stochastic mixing).

Assran, Loizou, Ballas, Rabbat (2019), "Stochastic Gradient Push for Distributed Deep
Learning", ICML, Algorithm 1 (SGP), on the PushSum consensus of Kempe, Dobra, Gehrke (2003).
Each node keeps a numerator ``x_i`` and a weight ``w_i`` (initially 1); its model is the
de-biased ``z_i = x_i / w_i``. A round, with ``A`` column stochastic:

    z_i         = x_i / w_i
    x_i^{+1/2}  = x_i + (local SGD steps on node i's data from z_i) - z_i
    x^{+1}      = A x^{+1/2},   w^{+1} = A w

(one local step of SGD is exactly SGP's ``x_i - gamma grad F_i(z_i)``). Columns summing to 1
preserve ``sum_i x_i`` and ``sum_i w_i = n``, so the node average ``(1/n) sum_i x_i`` is the
average of the nodes' contributions; ``A`` need not be row stochastic, and the ratio
``z_i = x_i / w_i`` removes the bias a directed graph puts on ``x_i`` alone. Without
gradients every ``z_i`` converges to the average of the initial ``x_i`` on a strongly
connected graph.
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


def _debias(x: Params, w: jax.Array) -> Params:
    return jax.tree.map(lambda v: v / w.reshape(w.shape + (1,) * (v.ndim - 1)).astype(v.dtype),
                        x)


def pushsum(
    objective: Objective, optimizer: optax.GradientTransformation | ClientOptimizer
) -> DecentralizedAlgorithm:
    """Stochastic Gradient Push (Assran et al. 2019, Algorithm 1) with local steps.

    Args:
      objective: a node's masked-mean batch loss, e.g. ``kit.model_objective(model)``.
      optimizer: the local optimizer (fresh state every round), e.g. ``optax.sgd(0.1)``.

    Returns:
      A :class:`~fedjax_lab.topologies.nodes.DecentralizedAlgorithm` for a column-stochastic
      ``A``; ``extra`` holds the PushSum weights ``w`` ``[n]``, and ``estimate`` the de-biased
      models ``x_i / w_i``. Each node sends its numerator (dense float32) and its weight.
    """
    training = local_training(objective, optimizer)

    def init(params: Params) -> GossipState:
        n = jax.tree.leaves(params)[0].shape[0]
        return GossipState(params, jnp.zeros((), jnp.int32), jnp.ones((n,), jnp.float32))

    def estimate(state: GossipState) -> Params:
        return _debias(state.params, state.extra)

    def round_fn(state: GossipState, batches: Batches, keys: jax.Array, comm: NodeComm
                 ) -> tuple[GossipState, Metrics]:
        z = estimate(state)
        local = local_train_nodes(training, z, state.round, batches, keys)
        half = jax.tree.map(lambda x, zt, zi: x + (zt - zi), state.params, local.params, z)
        x, w = comm.mix((half, state.extra))
        bits = jnp.full(keys.shape[:1], 32.0 * (node_size(x) + 1), jnp.float32)
        return (GossipState(x, state.round + 1, w),
                node_metrics(local, _debias(x, w), comm, bits))

    return DecentralizedAlgorithm(init, round_fn, estimate, "pushsum", stochastic="column")
