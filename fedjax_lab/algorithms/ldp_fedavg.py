"""FedAvg with local differential privacy: each client noises its own update before upload.

The client is the only trusted party (local DP; Kasiviswanathan et al. 2011, "What Can We Learn
Privately?"; the Gaussian and Laplace mechanisms of Dwork & Roth 2014, "The Algorithmic
Foundations of Differential Privacy", Thm. 3.6 and Thm. A.1). In the client's ``finish`` (the
position of the uplink compressor), before anything leaves the device:

    gaussian:  Delta_k <- clip_L2(Delta_k, C) + N(0, (m C)^2 I)
    laplace:   Delta_k <- clip_L1(Delta_k, C) + Lap(m C)^d      (i.i.d. per coordinate)

with ``m`` the ``noise_multiplier``. Sensitivity model: the released message is a function of
the client's whole local dataset, and local DP compares ANY two datasets of one client, so
the clipped update can move anywhere in the ball of radius ``C``: the L2 (Gaussian) or L1
(Laplace) sensitivity is ``2 C``. One upload is therefore ``(2/m)``-DP (Laplace) or the
Gaussian mechanism with noise multiplier ``m / 2`` (Gaussian); participations compose
(:func:`fedjax_lab.privacy.ldp_privacy`). The server (and any compressor after the noise) only
post-processes, so the server averages the noised updates uniformly over reporting clients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.algorithms.dp_adaptive_clip import _number
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.types import Algorithm, ClientOutput, PyTree, ServerState

Mechanism = Literal["gaussian", "laplace"]
MECHANISMS = ("gaussian", "laplace")


def local_noise(mechanism: Mechanism, key: jax.Array, tree: PyTree, scale: float) -> PyTree:
    """I.i.d. noise shaped like ``tree``: ``N(0, scale^2)`` or ``Lap(scale)`` per coordinate."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    draw = jax.random.normal if mechanism == "gaussian" else jax.random.laplace
    return jax.tree.unflatten(treedef, [
        (scale * draw(k, x.shape, jnp.float32)).astype(x.dtype)
        for k, x in zip(keys, leaves, strict=False)])


def clip_update(mechanism: Mechanism, delta: PyTree, bound: float) -> tuple[PyTree, jax.Array]:
    """``delta`` scaled into the L2 (gaussian) or L1 (laplace) ball of radius ``bound``, and
    whether it was scaled down."""
    leaves = jax.tree.leaves(delta)
    if mechanism == "gaussian":
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))
    else:
        norm = sum(jnp.sum(jnp.abs(x)) for x in leaves)
    over = norm > bound
    factor = jnp.where(over, bound / jnp.where(over, norm, 1.0), 1.0)
    return jax.tree.map(lambda x: x * factor.astype(x.dtype), delta), over


def ldp_fedavg(
    model: Any,
    client_optimizer: optax.GradientTransformation | Any,
    *,
    batch_size: int,
    clip_norm: float,
    noise_multiplier: float,
    mechanism: Mechanism = "gaussian",
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    compressor: Any = None,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """FedAvg whose clients clip and noise their updates themselves (local DP).

    Args:
      model: a ``fedjax_lab.models.Model`` (only ``apply`` is used).
      client_optimizer: local optax optimizer, or ``kit.per_round(...)``.
      batch_size: local minibatch size.
      clip_norm: ``C``, the L2 (gaussian) or L1 (laplace) bound on each client's update.
      noise_multiplier: ``m``; the noise std (gaussian) or Laplace scale (laplace) per
        coordinate is ``m C``. ``0``: clipped FedAvg without privacy.
      mechanism: ``"gaussian"`` or ``"laplace"``.
      local_epochs: local passes over the client's data per round.
      num_steps: alternatively, a fixed number of local steps per round.
      server_optimizer: optax optimizer on the pseudo-gradient (default ``sgd(1.0)``).
      compressor: optional uplink ``Compressor`` applied AFTER the noise (post-processing).
      per_example_loss: ``(logits, labels) -> [B]`` loss.

    Returns:
      An additive ``Algorithm`` (uniform mean of the noised updates over reporting clients);
      round metrics add ``clipped_clients`` and ``noise_multiplier``.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    bound = _number("clip_norm", clip_norm, allow_zero=False)
    m = _number("noise_multiplier", noise_multiplier, allow_zero=True)
    spec = kit.data_spec(batch_size, local_epochs, num_steps)
    server_optimizer = server_optimizer if server_optimizer is not None else optax.sgd(1.0)
    train = kit.local_training(kit.model_objective(model, per_example_loss), client_optimizer)
    scale = m * bound

    def client_init(params: PyTree) -> PyTree:
        return compressor.init(params) if compressor is not None else ()

    def finish(server_state: ServerState, client_state: PyTree, result: kit.LocalState,
               client_weight: jax.Array, *, key: jax.Array) -> tuple[ClientOutput, PyTree]:
        noise_key, compress_key = jax.random.split(key)
        delta = jax.tree.map(jnp.subtract, result.params, server_state.params)
        clipped, over = clip_update(mechanism, delta, bound)
        noisy = jax.tree.map(jnp.add, clipped, local_noise(mechanism, noise_key, delta, scale))
        output, state = kit.upload(compressor, noisy, client_state, result, client_weight,
                                   key=compress_key, weighting="uniform")
        metrics = {**output.metrics,
                   "clipped_clients": jnp.where(output.weight > 0, over, False).astype(
                       jnp.float32)}
        return output._replace(metrics=metrics), state

    def server_update(state: ServerState, agg: Any) -> tuple[ServerState, dict]:
        mean = kit.mean_update(agg)
        new_state = kit.server_step(server_optimizer, state, mean, agg.weight_sum > 0)
        return new_state, {**kit.round_metrics(agg, mean),
                           "clipped_clients": agg.metric_sums["clipped_clients"],
                           "noise_multiplier": jnp.asarray(m, jnp.float32)}

    return Algorithm(
        init=kit.server_init(server_optimizer),
        client_init=client_init,
        client_update=train.update(finish),
        aggregate=kit.weighted_aggregate(compressor),
        server_update=server_update,
        data_spec=spec,
        name=f"ldp_fedavg_{mechanism}",
        compressor=compressor,
    )
