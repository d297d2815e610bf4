"""DP-FedAvg: user-level differentially private Federated Averaging.

McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent Language
Models", Algorithm 1 with uniform client weights and the fixed-denominator estimator:

    Delta_k = clip(theta_k - theta, S)                       (each sampled client k)
    Delta   = (sum_k Delta_k + N(0, (z S)^2 I)) / (q N)      (server)
    theta  <- server_optimizer step on -Delta               (sgd(1.0): theta + Delta)

``q N`` is the EXPECTED number of clients per round (``clients_per_round``), not the number that
actually reported, so one client changes the noised sum by at most ``S`` and the round is the
Gaussian mechanism with noise multiplier ``z``. The server is trusted (central DP): clipping is
applied to each client's DECODED update inside ``aggregate``, so any uplink compressor can be
used and the bound holds for what is actually summed. Rejected (non-finite) clients contribute 0.
The noise is drawn on the server with ``fold_in(key, round)``; rounds get independent noise and a
resumed run draws the same noise. The aggregate stays additive (sum of clipped updates), so the
noise is added once, in ``server_update``, on every backend.

Privacy: :func:`fedjax_lab.privacy.dp_fedavg_privacy` turns ``(z, q, rounds, delta)`` into
``epsilon`` with an RDP accountant (Poisson sampling at rate ``q``, see its caveat).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import clip_norm as clip_transform
from fedjax_lab.algorithms.robust import mean, with_aggregator
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.types import Aggregate, Algorithm, PyTree, ServerState


def gaussian_noise(key: jax.Array, tree: PyTree, std: float) -> PyTree:
    """Independent ``N(0, std^2)`` noise shaped like ``tree`` (one subkey per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    noise = [
        (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        for k, x in zip(keys, leaves, strict=False)
    ]
    return jax.tree.unflatten(treedef, noise)


def _positive_number(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def dp_fedavg(
    model: Any,
    client_optimizer: optax.GradientTransformation | Any,
    *,
    batch_size: int,
    clip_norm: float,
    noise_multiplier: float,
    clients_per_round: int,
    key: jax.Array,
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    compressor: Any = None,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """DP-FedAvg with per-client clipping and Gaussian noise (McMahan et al. 2018).

    Args:
      model: a ``fedjax_lab.models.Model`` (only ``apply`` is used).
      client_optimizer: local optax optimizer (re-initialised every round), or
        ``kit.per_round(...)``.
      batch_size: local minibatch size.
      clip_norm: ``S``, the L2 bound on each client's (decoded) update.
      noise_multiplier: ``z``; the noise on the sum has std ``z * S``. ``0`` gives clipped
        FedAvg with a fixed denominator and no privacy.
      clients_per_round: the expected number of clients per round, ``q N`` (fixed denominator).
      key: PRNG key of the server's noise (e.g. ``jax.random.key(seed)``); round ``r`` uses
        ``fold_in(key, r)``.
      local_epochs: local passes over the client's data per round.
      num_steps: alternatively, a fixed number of local steps per round.
      server_optimizer: optax optimizer on the pseudo-gradient (default ``sgd(1.0)``).
      compressor: optional uplink ``Compressor``; clipping applies to the decoded update.
      per_example_loss: ``(logits, labels) -> [B]`` loss.

    Returns:
      An additive ``Algorithm``; round metrics add ``clipped_clients``, ``dp_noise_std`` (std of
      the noise on the averaged update, ``z S / clients_per_round``) and ``noise_multiplier``.
    """
    bound = _positive_number("clip_norm", clip_norm)
    z = _positive_number("noise_multiplier", noise_multiplier, allow_zero=True)
    if (
        isinstance(clients_per_round, bool)
        or not isinstance(clients_per_round, int)
        or clients_per_round < 1
    ):
        raise ValueError(
            f"clients_per_round must be a positive integer (the expected number of clients "
            f"per round), got {clients_per_round!r}"
        )
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            and key.shape == ()):
        raise TypeError(f"key must be a scalar typed PRNG key, e.g. jax.random.key(0); got {key!r}")
    base = fedavg(
        model, client_optimizer, batch_size=batch_size, local_epochs=local_epochs,
        num_steps=num_steps, server_optimizer=server_optimizer, compressor=compressor,
        weighting="uniform", per_example_loss=per_example_loss,
    )._replace(name="dp_fedavg")
    # Uniform weights are 1 per accepted client and 0 otherwise, so update_sum is the plain
    # sum of the clipped decoded updates: sensitivity S under adding/removing one client.
    clipped = with_aggregator(base, mean(), transforms=(clip_transform(bound),))
    std = z * bound
    denominator = float(clients_per_round)

    def server_update(state: ServerState, agg: Aggregate) -> tuple[ServerState, dict]:
        noise = gaussian_noise(jax.random.fold_in(key, state.round), agg.update_sum, std)
        noisy = agg._replace(
            update_sum=jax.tree.map(jnp.add, agg.update_sum, noise),
            # Fixed denominator: the estimate is divided by q N whoever reported, and a round
            # with no accepted client still releases (pure) noise, as the analysis assumes.
            weight_sum=jnp.asarray(denominator, jnp.float32),
        )
        new_state, metrics = clipped.server_update(state, noisy)
        metrics = {
            **metrics,
            "dp_noise_std": jnp.asarray(std / denominator, jnp.float32),
            "noise_multiplier": jnp.asarray(z, jnp.float32),
        }
        return new_state, metrics

    return clipped._replace(server_update=server_update, name="dp_fedavg")
