"""What every decentralized algorithm shares: stacked node state, local training, metrics.

All nodes' models are ONE pytree with a leading node axis ``[n, ...]``. An algorithm's round is
a pure function of a *block* of nodes (all of them under vmap, one device's contiguous share
under ``shard_map``) and of a :class:`NodeComm`, the only place where nodes talk to each other:
``comm.mix(tree)`` is the block's rows of ``W @ tree`` and ``comm.total(x)`` the sum over ALL
nodes of a per-node quantity. The vmap and sharded programs
(:mod:`fedjax_lab.topologies.node_backends`) differ only in the ``NodeComm`` they pass, so the
algorithms never see devices.

Local training is the authoring kit's (:func:`fedjax_lab.algorithms.kit.local_training`):
each node runs the masked minibatch steps of an optax optimizer on its own client's batches
(laid out by :class:`fedjax_lab.data.CohortBuilder`), from its own model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.algorithms.kit import LocalState, LocalTraining
from fedjax_lab.core.rng import local_steps_key
from fedjax_lab.core.types import Batches, Metrics, Params, PyTree, ServerState

#: Round metric: mean training loss over every node's real examples of the round (NaN when
#: none).
TRAIN_LOSS = "train_loss"
#: Round metric: real examples the nodes trained on in the round.
TRAIN_EXAMPLES = "train_examples"
#: Round metric: ``(1/n) sum_i ||z_i - mean_j z_j||^2`` of the node models ``z_i`` after the
#: round's gossip (PushSum: the de-biased ``x_i / w_i``).
CONSENSUS_DISTANCE = "consensus_distance"
#: Round metric: bits all nodes broadcast to their neighbours in the round (32 per float for
#: dense gossip; the compressor's exact ``bits`` for CHOCO-SGD).
GOSSIP_BITS = "gossip_bits"
#: Every algorithm's round metrics hold these.
NODE_METRICS = (TRAIN_LOSS, TRAIN_EXAMPLES, CONSENSUS_DISTANCE, GOSSIP_BITS)


class GossipState(NamedTuple):
    """State of every node, stacked on a leading node axis.

    Attributes:
      params: ``[n, ...]`` node models (PushSum: the numerators ``x_i``).
      round: int32 scalar round counter (shared).
      extra: per-node algorithm state, every leaf ``[n, ...]`` (PushSum's weights ``w_i``,
        CHOCO-SGD's public copies ``x_hat_i`` and compressor states).
    """

    params: Params
    round: jax.Array
    extra: PyTree = ()


class NodeComm(NamedTuple):
    """How a block of nodes talks to the others inside one round program.

    Attributes:
      mix: ``tree [m, ...] -> tree [m, ...]``: this block's rows of ``W @ tree`` (``W`` of the
        round, over all ``n`` nodes).
      total: ``x [m, ...] -> x.shape[1:]``: the sum of a per-node quantity over all nodes.
      num_nodes: ``n``.
    """

    mix: Callable[[PyTree], PyTree]
    total: Callable[[jax.Array], jax.Array]
    num_nodes: int


class DecentralizedAlgorithm(NamedTuple):
    """A decentralized algorithm as pure functions over stacked node state.

    Attributes:
      init: ``stacked params [n, ...] -> GossipState``.
      round: ``(state, batches, keys, comm) -> (state, metrics)`` for a block of nodes:
        ``batches`` is a :class:`~fedjax_lab.core.types.Batches` with a leading node axis on
        ``mask``/``weight``/``index`` (``table`` shared), ``keys`` the block's node keys. The
        metrics are :data:`NODE_METRICS` (totals over all nodes via ``comm.total``).
      estimate: ``state -> [n, ...]`` every node's current model (PushSum: ``x_i / w_i``).
      name: e.g. ``"dsgd"``.
      stochastic: the mixing matrices it needs: ``"doubly"`` or ``"column"``.
    """

    init: Callable[[Params], GossipState]
    round: Callable[..., tuple[GossipState, Metrics]]
    estimate: Callable[[GossipState], Params]
    name: str
    stochastic: str = "doubly"


def batches_axes() -> Batches:
    """``in_axes`` of node-stacked :class:`Batches` (the example table is shared)."""
    return Batches(arrays=None, mask=0, weight=0, index=0, table=None)


def local_train(
    training: LocalTraining, params: Params, round_idx: jax.Array, batches: Batches,
    key: jax.Array,
) -> LocalState:
    """One node's local training from ``params``: the kit's masked steps over ``batches``.

    The node plays the kit's "server state" with its own model, so objective transforms and
    per-round optimizers (:func:`fedjax_lab.algorithms.kit.per_round`) work unchanged. A keyed
    objective (dropout) draws from ``local_steps_key(key)`` exactly as a federated client does.
    """
    node = ServerState(params=params, opt_state=(), round=round_idx)
    context = ((), local_steps_key(key)) if training.keyed else ()

    def body(carry, inputs):
        step_input, mask = inputs
        return training.step(node, context, carry, batches.step_arrays(step_input), mask), None

    carry, _ = jax.lax.scan(body, training.start(node), (batches.step_inputs(), batches.mask))
    return carry


def local_train_nodes(
    training: LocalTraining, params: Params, round_idx: jax.Array, batches: Batches,
    keys: jax.Array,
) -> LocalState:
    """:func:`local_train` vmapped over a block of nodes."""
    return jax.vmap(local_train, in_axes=(None, 0, None, batches_axes(), 0))(
        training, params, round_idx, batches, keys)


def node_size(tree: PyTree) -> int:
    """Coordinates of one node's model (leaves without the node axis)."""
    return sum(int(x[0].size) for x in jax.tree.leaves(tree))


def consensus_distance(models: Params, comm: NodeComm) -> jax.Array:
    """``(1/n) sum_i ||z_i - z_bar||^2`` over all nodes (``z_bar`` their mean)."""
    n = comm.num_nodes
    mean = jax.tree.map(lambda z: comm.total(z) / n, models)
    sq = sum(
        jnp.sum(jnp.square(z - m[None]).reshape(z.shape[0], -1), axis=1)
        for z, m in zip(jax.tree.leaves(models), jax.tree.leaves(mean), strict=True)
    )
    return comm.total(sq) / n


def node_metrics(
    local: LocalState, models: Params, comm: NodeComm, bits: jax.Array
) -> Metrics:
    """The round's :data:`NODE_METRICS` from the nodes' local carries and new models.

    ``bits`` is the per-node ``[m]`` number of bits each node broadcast this round.
    """
    examples = comm.total(local.num_examples)
    loss = comm.total(local.loss_sum)
    return {
        TRAIN_LOSS: jnp.where(examples > 0, loss / jnp.maximum(examples, 1.0), jnp.nan),
        TRAIN_EXAMPLES: examples,
        CONSENSUS_DISTANCE: consensus_distance(models, comm),
        GOSSIP_BITS: comm.total(bits),
    }


def replicate(params: Params, num_nodes: int) -> Params:
    """``params`` copied to every node: ``[n, ...]`` leaves (all nodes start in consensus)."""
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num_nodes, *jnp.shape(p))), params)


def node_average(models: Params) -> Params:
    """The node average ``(1/n) sum_i z_i`` (one model, no node axis)."""
    return jax.tree.map(lambda z: jnp.mean(z, axis=0), models)


def dense_mix(matrix: jax.Array, tree: PyTree) -> PyTree:
    """``W @ tree`` over the leading node axis (``out_i = sum_j W_ij tree_j``), in float32 at
    full precision (an accelerator's default bf16 passes would break the 1e-5 references)."""
    return jax.tree.map(
        lambda x: jnp.einsum("ij,j...->i...", matrix.astype(x.dtype), x,
                             precision=jax.lax.Precision.HIGHEST), tree)


def sparse_rows(matrix: Any) -> tuple[Any, Any]:
    """The non-zero entries of each row of ``W`` as ``(indices [n, k], weights [n, k])``.

    ``k`` is the largest in-degree (self included); shorter rows are padded with index 0 and
    weight 0. For the neighbour-gather mix :func:`sparse_mix` of sparse graphs.
    """
    w = np.asarray(matrix)
    k = int((w != 0).sum(axis=1).max())
    idx = np.zeros((len(w), k), np.int32)
    val = np.zeros((len(w), k), np.float32)
    for i, row in enumerate(w):
        nz = np.flatnonzero(row)
        idx[i, : len(nz)] = nz
        val[i, : len(nz)] = row[nz]
    return idx, val


def sparse_mix(indices: jax.Array, weights: jax.Array, tree: PyTree) -> PyTree:
    """``W @ tree`` from :func:`sparse_rows`: each node gathers its ``k`` in-neighbours."""
    def one(x):
        gathered = x[indices]  # [n, k, ...]
        w = weights.reshape(weights.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
        return jnp.sum(w * gathered, axis=1)

    return jax.tree.map(one, tree)
