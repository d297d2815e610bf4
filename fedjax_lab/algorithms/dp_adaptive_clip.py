"""DP-FedAvg with adaptive quantile clipping.

Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS), Algorithm 1. The clip norm ``C`` is server state and follows the
``gamma``-quantile of the clients' update norms by a private geometric update:

    b_k     = 1[ ||Delta_k|| <= C ]                             (each sampled client k)
    Delta_k = Delta_k * min(1, C / ||Delta_k||)
    Delta   = (sum_k Delta_k + N(0, (z_Delta C)^2 I)) / m       (m: expected clients)
    b       = (sum_k b_k + N(0, sigma_b^2)) / m
    theta  <- server_optimizer step on -Delta
    C      <- C * exp(-eta_C (b - gamma))                       (geometric update, Sec. 3)

One round releases two Gaussian mechanisms: the sum with L2 sensitivity ``C`` and noise
``z_Delta C``, and the count, whose sensitivity is 1/2 once centred (``b_k - 1/2``; centring is
post-processing of the released count since ``m`` is public), with noise ``sigma_b``. Their
composition is the Gaussian mechanism with noise multiplier ``z`` when (Andrew et al. 2021,
Sec. 3.1, "Theorem 1")

    z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2),

so the accountant of plain DP-FedAvg with the overall ``z``
(:func:`fedjax_lab.privacy.dp_fedavg_privacy`) covers the whole run.

Clipping happens on the client, against the round's ``C`` it reads from the server state, so
the uploaded update is the raw clipped float32 delta: no compressor (a lossy decode could leave
the L2 ball and break the sensitivity bound). The noise is drawn on the server from
``fold_in(key, round)`` like DP-FedAvg's; the aggregate stays additive (sums of clipped updates
and of indicators), so every backend runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.algorithms.dp_fedavg import gaussian_noise
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.types import Aggregate, Algorithm, ClientOutput, PyTree, ServerState

CLIP_NORM = "clip_norm"
BELOW_CLIP = "below_clip"


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """``z_Delta`` of the update sum so that sum and count together have multiplier ``z``.

    Andrew et al. 2021, Sec. 3.1: ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``.

    Args:
      noise_multiplier: ``z``, the requested overall noise multiplier (``>= 0``; 0: no noise).
      count_stddev: ``sigma_b``, the std of the noise on the count of unclipped clients.

    Raises:
      ValueError: ``2 sigma_b <= z`` (the count alone would spend more than the whole budget).
    """
    if noise_multiplier == 0:
        return 0.0
    if not 2.0 * count_stddev > noise_multiplier:
        raise ValueError(
            f"clip_count_stddev sigma_b={count_stddev} must exceed noise_multiplier / 2 = "
            f"{noise_multiplier / 2}: the count's noise multiplier 2 sigma_b must be larger than "
            "the overall z (Andrew et al. 2021 suggest sigma_b = clients_per_round / 20)"
        )
    return (noise_multiplier**-2 - (2.0 * count_stddev) ** -2) ** -0.5


def _number(name: str, value: Any, *, allow_zero: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value!r}")
    return float(value)


def dp_fedavg_adaptive(
    model: Any,
    client_optimizer: optax.GradientTransformation | Any,
    *,
    batch_size: int,
    initial_clip_norm: float,
    noise_multiplier: float,
    clients_per_round: int,
    key: jax.Array,
    target_quantile: float = 0.5,
    clip_lr: float = 0.2,
    clip_count_stddev: float | None = None,
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """DP-FedAvg whose clip norm tracks a quantile of the update norms (Andrew et al. 2021).

    Args:
      model: a ``fedjax_lab.models.Model`` (only ``apply`` is used).
      client_optimizer: local optax optimizer, or ``kit.per_round(...)``.
      batch_size: local minibatch size.
      initial_clip_norm: ``C`` of round 0 (``> 0``).
      noise_multiplier: the OVERALL ``z`` of each round (update sum and count together); the
        accountant uses this value. ``0``: no noise at all (``sigma_b`` is ignored).
      clients_per_round: ``m``, the expected number of clients per round (fixed denominator).
      key: typed PRNG key of the server's noise; round ``r`` uses ``fold_in(key, r)``.
      target_quantile: ``gamma`` in ``[0, 1]``, the fraction of clients meant to be unclipped.
      clip_lr: ``eta_C >= 0``, the step of the geometric update (paper: 0.2).
      clip_count_stddev: ``sigma_b``, the std of the noise on the unclipped count; None: the
        paper's ``m / 20``. Must exceed ``z / 2``.
      local_epochs: local passes over the client's data per round.
      num_steps: alternatively, a fixed number of local steps per round.
      server_optimizer: optax optimizer on the pseudo-gradient (default ``sgd(1.0)``).
      per_example_loss: ``(logits, labels) -> [B]`` loss.

    Returns:
      An additive ``Algorithm``; ``ServerState.extra`` is ``{"clip_norm": C}``. Round metrics
      add ``clip_norm`` (the ``C`` used in the round), ``below_clip_fraction`` (the noised
      ``b``), ``clipped_clients``, ``update_noise_multiplier`` (``z_Delta``) and
      ``noise_multiplier`` (``z``).
    """
    c0 = _number("initial_clip_norm", initial_clip_norm, allow_zero=False)
    z = _number("noise_multiplier", noise_multiplier, allow_zero=True)
    eta = _number("clip_lr", clip_lr, allow_zero=True)
    gamma = _number("target_quantile", target_quantile, allow_zero=True)
    if gamma > 1:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
    if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) or (
            clients_per_round < 1):
        raise ValueError(f"clients_per_round must be a positive integer (the expected number of "
                         f"clients per round), got {clients_per_round!r}")
    sigma_b = (clients_per_round / 20.0 if clip_count_stddev is None
               else _number("clip_count_stddev", clip_count_stddev, allow_zero=True))
    z_delta = update_noise_multiplier(z, sigma_b)
    if z == 0:
        sigma_b = 0.0  # no privacy requested: the count is exact too
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            and key.shape == ()):
        raise TypeError(f"key must be a scalar typed PRNG key, e.g. jax.random.key(0); got {key!r}")
    spec = kit.data_spec(batch_size, local_epochs, num_steps)
    server_optimizer = server_optimizer if server_optimizer is not None else optax.sgd(1.0)
    train = kit.local_training(kit.model_objective(model, per_example_loss), client_optimizer)
    base_init = kit.server_init(server_optimizer)
    denominator = float(clients_per_round)

    def init(params: PyTree) -> ServerState:
        return base_init(params)._replace(extra={CLIP_NORM: jnp.asarray(c0, jnp.float32)})

    def finish(server_state: ServerState, client_state: PyTree, result: kit.LocalState,
               client_weight: jax.Array, *, key: jax.Array) -> tuple[ClientOutput, PyTree]:
        bound = server_state.extra[CLIP_NORM]
        delta = jax.tree.map(jnp.subtract, result.params, server_state.params)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(delta)))
        below = norm <= bound
        factor = jnp.where(below, 1.0, bound / jnp.where(below, 1.0, norm))
        clipped = jax.tree.map(lambda x: x * factor.astype(x.dtype), delta)
        # b_k travels as an additive extra; kit.upload zeroes it for a client that does not send.
        output, state = kit.upload(None, clipped, client_state, result, client_weight, key=key,
                                   weighting="uniform",
                                   extra={BELOW_CLIP: below.astype(jnp.float32)})
        metrics = {**output.metrics,
                   "clipped_clients": jnp.where(output.weight > 0, 1.0 - below, 0.0)}
        return output._replace(metrics=metrics), state

    def server_update(state: ServerState, agg: Aggregate) -> tuple[ServerState, dict]:
        bound = state.extra[CLIP_NORM]
        k_update, k_count = jax.random.split(jax.random.fold_in(key, state.round))
        noise = gaussian_noise(k_update, agg.update_sum, 1.0)
        noisy_sum = jax.tree.map(lambda s, n: s + (z_delta * bound).astype(s.dtype) * n,
                                 agg.update_sum, noise)
        below = (agg.extra[BELOW_CLIP] + sigma_b * jax.random.normal(k_count, ())) / denominator
        mean = jax.tree.map(lambda s: s / denominator, noisy_sum)
        # A round with no accepted client still releases noise and moves C, as analysed.
        new_state = kit.server_step(server_optimizer, state, mean, jnp.asarray(True))
        new_bound = bound * jnp.exp(-eta * (below - gamma))
        new_state = new_state._replace(extra={CLIP_NORM: new_bound.astype(jnp.float32)})
        metrics = {
            **kit.round_metrics(agg, mean),
            "clipped_clients": agg.metric_sums["clipped_clients"],
            CLIP_NORM: bound,
            "below_clip_fraction": below,
            "update_noise_multiplier": jnp.asarray(z_delta, jnp.float32),
            "noise_multiplier": jnp.asarray(z, jnp.float32),
        }
        return new_state, metrics

    return Algorithm(
        init=init,
        client_init=lambda params: (),
        client_update=train.update(finish),
        aggregate=kit.weighted_aggregate(None),
        server_update=server_update,
        data_spec=spec,
        name="dp_fedavg_adaptive",
    )
