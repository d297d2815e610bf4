"""DP-FTRL: private follow-the-regularized-leader with tree aggregation, for federated rounds.

Kairouz, McMahan, Song, Thakkar, Thakurta & Xu 2021, "Practical and Private (Deep) Learning
without Sampling or Shuffling" (ICML), Algorithm 1 (DP-FTRL, and DP-FTRLM with momentum), with
the clients' clipped model deltas in place of gradients, as in federated DP-FTRL:

    g_t   = -(sum_k clip(Delta_k, C)) / m                    (round t = 1, 2, ...; m fixed)
    s_t   = sum_{tau <= t} g_tau + (1/m) sum_{nodes of t} nu_node,   nu_node ~ N(0, (z C)^2 I)
    M_t   = gamma M_{t-1} + s_t                              (momentum; gamma = 0: plain)
    theta_t = theta_0 - eta M_t

The noisy prefix sum ``s_t`` comes from the binary-tree mechanism (Dwork et al. 2010; Chan,
Shi & Song 2011): node ``(l, j)`` covers rounds ``(j-1) 2^l + 1 .. j 2^l`` and has its own
noise, drawn once (here: recomputed from ``fold_in(fold_in(key, l), j)``, so every prefix that
uses a node sees the SAME draw); prefix ``t`` uses the nodes of its binary decomposition, one per
set bit ``l`` of ``t`` with ``j = t >> l``, so its noise has variance
``popcount(t) (z C)^2 / m^2`` per coordinate. Each round's contribution enters one node per
level; :func:`fedjax_lab.privacy.dp_ftrl_privacy` accounts it WITHOUT sampling amplification.

Clipping is DP-FedAvg's: the decoded update of each client clipped to ``C`` inside the additive
aggregate, so compressors can be used. ``ServerState.extra`` holds ``theta_0``, the exact
(noise-free) running sum and the momentum buffer; the noise exists only in what is released.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.algorithms.dp_adaptive_clip import _number
from fedjax_lab.algorithms.dp_fedavg import gaussian_noise
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import clip_norm as clip_transform
from fedjax_lab.algorithms.robust import mean, with_aggregator
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.types import Aggregate, Algorithm, PyTree, ServerState


def tree_noise(key: jax.Array, t: jax.Array, tree: PyTree, std: float) -> PyTree:
    """The tree-aggregation noise of prefix ``t >= 1``: the sum of the noises of the nodes in
    the binary decomposition of ``t`` (node ``(l, t >> l)`` for each set bit ``l``).

    A while loop over the set bits (lowest first) draws ``popcount(t)`` nodes and compiles its
    body once, whatever the number of rounds.
    """
    t = jnp.asarray(t, jnp.int32)

    def body(carry):
        rest, total = carry
        low = rest & -rest  # the lowest set bit
        level = jax.lax.population_count(low - 1)
        node_key = jax.random.fold_in(jax.random.fold_in(key, level), t >> level)
        total = jax.tree.map(jnp.add, total, gaussian_noise(node_key, tree, std))
        return rest - low, total

    _, total = jax.lax.while_loop(lambda carry: carry[0] != 0, body,
                                  (t, jax.tree.map(jnp.zeros_like, tree)))
    return total


def dp_ftrl(
    model: Any,
    client_optimizer: optax.GradientTransformation | Any,
    *,
    batch_size: int,
    clip_norm: float,
    noise_multiplier: float,
    clients_per_round: int,
    key: jax.Array,
    server_lr: float = 1.0,
    momentum: float = 0.0,
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    compressor: Any = None,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """DP-FTRL / DP-FTRLM on clipped client updates (Kairouz et al. 2021, Algorithm 1).

    Args:
      model: a ``fedjax_lab.models.Model`` (only ``apply`` is used).
      client_optimizer: local optax optimizer, or ``kit.per_round(...)``.
      batch_size: local minibatch size.
      clip_norm: ``C``, the L2 bound on each client's decoded update.
      noise_multiplier: ``z``; every tree node's noise has std ``z C`` on the sum.
      clients_per_round: ``m``, the fixed denominator (expected clients per round).
      key: typed PRNG key of the tree's noise.
      server_lr: ``eta > 0`` (``1 / lambda`` of FTRL's regulariser).
      momentum: ``gamma`` in ``[0, 1)`` (DP-FTRLM; 0: DP-FTRL).
      local_epochs: local passes over the client's data per round.
      num_steps: alternatively, a fixed number of local steps per round.
      compressor: optional uplink ``Compressor``; clipping applies to the decoded update.
      per_example_loss: ``(logits, labels) -> [B]`` loss.

    Returns:
      An additive ``Algorithm``; round metrics add ``clipped_clients``, ``tree_nodes``
      (``popcount(t)``) and ``dp_noise_std`` (per-coordinate std of the released prefix sum's
      noise, ``sqrt(popcount(t)) z C / m``).
    """
    bound = _number("clip_norm", clip_norm, allow_zero=False)
    z = _number("noise_multiplier", noise_multiplier, allow_zero=True)
    eta = _number("server_lr", server_lr, allow_zero=False)
    gamma = _number("momentum", momentum, allow_zero=True)
    if gamma >= 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) or (
            clients_per_round < 1):
        raise ValueError(f"clients_per_round must be a positive integer (the fixed denominator), "
                         f"got {clients_per_round!r}")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            and key.shape == ()):
        raise TypeError(f"key must be a scalar typed PRNG key, e.g. jax.random.key(0); got {key!r}")
    base = fedavg(model, client_optimizer, batch_size=batch_size, local_epochs=local_epochs,
                  num_steps=num_steps, compressor=compressor, weighting="uniform",
                  per_example_loss=per_example_loss)
    # update_sum is the plain sum of clipped decoded updates: sensitivity C per round.
    clipped = with_aggregator(base, mean(), transforms=(clip_transform(bound),))
    std = z * bound
    denominator = float(clients_per_round)

    def init(params: PyTree) -> ServerState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ServerState(params=params, opt_state=(), round=jnp.zeros((), jnp.int32),
                           extra={"initial": params, "grad_sum": zeros, "momentum": zeros})

    def server_update(state: ServerState, agg: Aggregate) -> tuple[ServerState, dict]:
        t = state.round + 1  # this round's prefix, 1-based
        grad_sum = jax.tree.map(lambda g, s: g - s / denominator, state.extra["grad_sum"],
                                agg.update_sum)
        noise = tree_noise(key, t, agg.update_sum, std)
        released = jax.tree.map(lambda g, n: g + n / denominator, grad_sum, noise)
        buf = jax.tree.map(lambda b, s: gamma * b + s, state.extra["momentum"], released)
        params = jax.tree.map(lambda w0, b: w0 - eta * b, state.extra["initial"], buf)
        nodes = jax.lax.population_count(t)
        new_state = ServerState(params=params, opt_state=(), round=t,
                                extra={"initial": state.extra["initial"], "grad_sum": grad_sum,
                                       "momentum": buf})
        # The round's own (noise-free) mean update, as other algorithms report it.
        round_mean = jax.tree.map(lambda s: s / denominator, agg.update_sum)
        metrics = {
            **kit.round_metrics(agg, round_mean),
            "clipped_clients": agg.metric_sums["clipped_clients"],
            "tree_nodes": nodes.astype(jnp.float32),
            "dp_noise_std": jnp.sqrt(nodes.astype(jnp.float32)) * std / denominator,
        }
        return new_state, metrics

    return clipped._replace(init=init, server_update=server_update, name="dp_ftrl")
