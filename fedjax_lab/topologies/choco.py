"""CHOCO-SGD: decentralized SGD with compressed gossip of model differences.

Koloskova, Stich, Jaggi (2019), "Decentralized Stochastic Optimization and Gossip Algorithms
with Compressed Communication", ICML, Algorithm 2 (CHOCO-SGD). Every node ``i`` keeps its model
``x_i`` and a public copy ``x_hat_i`` that all its neighbours also hold (they apply the same
decoded messages, so one stacked ``x_hat`` stands for every copy). A round:

    x_i^{t+1/2}   = local SGD steps on node i's data from x_i^t
    q_i           = Q(x_i^{t+1/2} - x_hat_i^t)                  (compressed, sent to neighbours)
    x_hat_i^{t+1} = x_hat_i^t + decode(q_i)
    x_i^{t+1}     = x_i^{t+1/2} + gamma sum_j W_ij (x_hat_j^{t+1} - x_hat_i^{t+1})

with a doubly stochastic ``W`` and the consensus step size ``gamma`` in (0, 1]. Only ``q_i``
travels; the difference to the last public copy shrinks as the nodes converge, which is what
makes biased compressors (top-k, sign) usable. With the identity compressor and ``gamma = 1``,
``x_hat^{t+1} = x^{t+1/2}`` and the update is exactly D-SGD's ``x^{t+1} = W x^{t+1/2}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.kit import ClientOptimizer, Objective, local_training
from fedjax_lab.compressors import Compressor
from fedjax_lab.core.types import Batches, Metrics, Params
from fedjax_lab.topologies.nodes import (
    DecentralizedAlgorithm,
    GossipState,
    NodeComm,
    local_train_nodes,
    node_metrics,
)

# fold_in tag of the compressor's key, so it differs from the local steps' key of the node.
_COMPRESS_STREAM = 0x43484F43


def choco_sgd(
    objective: Objective,
    optimizer: optax.GradientTransformation | ClientOptimizer,
    compressor: Compressor,
    *,
    gamma: float,
) -> DecentralizedAlgorithm:
    """CHOCO-SGD (Koloskova et al. 2019, Algorithm 2) with local steps.

    Args:
      objective: a node's masked-mean batch loss, e.g. ``kit.model_objective(model)``.
      optimizer: the local optimizer (fresh state every round), e.g. ``optax.sgd(0.1)``.
      compressor: a :class:`fedjax_lab.compressors.Compressor` (e.g. ``top_k(0.1)``), applied
        to ``x_i - x_hat_i`` with a per-node key.
      gamma: the consensus step size, in (0, 1] (the paper tunes it per compressor; small
        for aggressive compression).

    Returns:
      A :class:`~fedjax_lab.topologies.nodes.DecentralizedAlgorithm` needing a doubly
      stochastic ``W``; ``extra`` is ``(x_hat, compressor states)`` and the gossip bits are
      the compressor's exact ``bits`` of every ``q_i``.

    Raises:
      ValueError: ``gamma`` outside (0, 1]; TypeError: ``compressor`` is not a Compressor.
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a fedjax_lab.compressors.Compressor (e.g. "
                        f"compressors.top_k(0.1)), got {type(compressor).__name__}")
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma (the consensus step size) must be in (0, 1], got {gamma!r}")
    gamma = float(gamma)
    training = local_training(objective, optimizer)

    def init(params: Params) -> GossipState:
        n = jax.tree.leaves(params)[0].shape[0]
        one = jax.tree.map(lambda p: p[0], params)
        comp_state = jax.tree.map(
            lambda s: jnp.broadcast_to(s, (n, *jnp.shape(s))), compressor.init(one))
        # x_hat starts at 0 (the paper's initialisation): the first message is the model.
        x_hat = jax.tree.map(jnp.zeros_like, params)
        return GossipState(params, jnp.zeros((), jnp.int32), (x_hat, comp_state))

    def round_fn(state: GossipState, batches: Batches, keys: jax.Array, comm: NodeComm
                 ) -> tuple[GossipState, Metrics]:
        x_hat, comp_state = state.extra
        local = local_train_nodes(training, state.params, state.round, batches, keys)
        half = local.params
        diff = jax.tree.map(jnp.subtract, half, x_hat)
        ckeys = jax.vmap(lambda k: jax.random.fold_in(k, _COMPRESS_STREAM))(keys)

        def send(d, s, k):
            payload, s = compressor.encode(d, s, key=k)
            return compressor.decode(payload), s, compressor.bits(payload)

        q, comp_state, bits = jax.vmap(send)(diff, comp_state, ckeys)
        x_hat = jax.tree.map(jnp.add, x_hat, q)
        mixed_hat = comm.mix(x_hat)
        x = jax.tree.map(lambda h, wh, xh: h + gamma * (wh - xh), half, mixed_hat, x_hat)
        return (GossipState(x, state.round + 1, (x_hat, comp_state)),
                node_metrics(local, x, comm, bits.astype(jnp.float32)))

    return DecentralizedAlgorithm(init, round_fn, lambda state: state.params, "choco")
