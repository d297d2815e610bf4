"""SCAFFOLD: control variates against client drift.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh (2020), "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.tree import tree_where
from fedjax_lab.core.types import (
    Aggregate,
    Algorithm,
    ClientOutput,
    Params,
    PyTree,
    ServerState,
)


class ScaffoldClientState(NamedTuple):
    """What a SCAFFOLD client keeps between rounds.

    Attributes:
      control: the client control variate ``c_i`` (params-shaped, starts at 0).
      compressor: the uplink compressor's state (``()`` without one or when stateless).
    """

    control: Params
    compressor: PyTree


def scaffold(
    model: Any,
    client_lr: float,
    *,
    num_clients: int,
    batch_size: int,
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    server_lr: float = 1.0,
    compressor: Any = None,
    weighting: kit.Weighting = "uniform",
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1) with option II control variates.

    Server state: model ``x`` and server control ``c`` (``ServerState.extra``, starts at 0).
    Client ``i`` keeps ``c_i`` across rounds (``ScaffoldClientState``; the runner's
    ``ClientStateStore`` holds it for the whole population and gathers/scatters it per cohort).
    In a round, client ``i`` runs ``K_i`` corrected SGD steps from ``y_i = x``:
    ``y_i ← y_i - η_l (g_i(y_i) - c_i + c)``, then (option II)
    ``c_i⁺ = c_i - c + (x - y_i) / (K_i η_l)`` and sends ``Δy_i = y_i - x`` and
    ``Δc_i = c_i⁺ - c_i``. The server sets ``x ← x + η_g · mean_i Δy_i`` and
    ``c ← c + (1/N) Σ_i Δc_i`` with ``N`` the population size.

    The aggregate is additive (sums of ``w_i Δy_i``, ``w_i`` and ``Δc_i``). ``Δy_i`` goes
    through ``compressor``; ``Δc_i`` is sent as float32 (32 bits per coordinate, counted in
    ``upload_bits``). Clients that do not send (padding, dropped, non-finite) keep ``c_i`` and
    add nothing.

    Args:
      model: a ``fedjax_lab.models.Model``.
      client_lr: local SGD step size ``η_l`` (> 0); option II assumes plain SGD.
      num_clients: population size ``N`` (the divisor of the control update).
      batch_size: local minibatch size.
      local_epochs: local passes per round (exclusive with ``num_steps``); ``K_i`` is the
        number of steps client ``i`` actually took.
      num_steps: alternatively, a fixed number of local steps ``K``.
      server_lr: global step size ``η_g`` (> 0).
      compressor: optional uplink ``Compressor`` for ``Δy_i``.
      weighting: ``"uniform"`` (paper: ``1/|S|``) or ``"examples"`` for the ``Δy`` mean.
      per_example_loss: ``(logits, labels) -> [B]`` loss.
    """
    eta_l = kit.check_number("client_lr", client_lr)
    eta_g = kit.check_number("server_lr", server_lr)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(
            f"num_clients must be the population size (a positive int), got {num_clients!r}"
        )
    spec = kit.data_spec(batch_size, local_epochs, num_steps)
    weighting = kit.check_weighting(weighting)
    server_optimizer = optax.sgd(eta_g)

    def correct(grads, params, server_state, correction):
        del params, server_state  # y <- y - eta_l (g - c_i + c): the correction c - c_i
        return jax.tree.map(jnp.add, grads, correction)

    train = kit.local_training(kit.model_objective(model, per_example_loss), optax.sgd(eta_l),
                               grad_transform=correct)

    def init(params: Params) -> ServerState:
        return kit.server_init(server_optimizer)(params)._replace(
            extra=jax.tree.map(jnp.zeros_like, params))

    def client_init(params: Params) -> ScaffoldClientState:
        return ScaffoldClientState(
            control=jax.tree.map(jnp.zeros_like, params),
            compressor=compressor.init(params) if compressor is not None else (),
        )

    def context(server_state: ServerState, client_state: ScaffoldClientState):
        # The correction c - c_i is constant during the round.
        return jax.tree.map(jnp.subtract, server_state.extra, client_state.control)

    def finish(
        server_state: ServerState, client_state: ScaffoldClientState,
        result: kit.LocalState, client_weight: jax.Array, *, key: jax.Array,
    ) -> tuple[ClientOutput, ScaffoldClientState]:
        x, c, c_i = server_state.params, server_state.extra, client_state.control
        delta_y = jax.tree.map(jnp.subtract, result.params, x)
        # Option II: c_i+ - c_i = -c + (x - y_i) / (K_i η_l) = -c - Δy_i / (K_i η_l).
        inv = 1.0 / (jnp.maximum(result.num_steps, 1.0) * eta_l)
        delta_c = jax.tree.map(lambda cc, d: -cc - d * inv.astype(d.dtype), c, delta_y)
        out, comp_state = kit.upload(
            compressor, delta_y, client_state.compressor, result, client_weight, key=key,
            weighting=weighting, extra=delta_c, extra_bits=kit.dense_bits(delta_c),
            require=result.num_steps > 0,
        )
        sent = out.weight > 0  # clients that do not send keep c_i
        control = tree_where(sent, jax.tree.map(jnp.add, c_i, out.extra), c_i)
        return out, ScaffoldClientState(control=control, compressor=comp_state)

    def server_update(state: ServerState, agg: Aggregate) -> tuple[ServerState, dict]:
        mean = kit.mean_update(agg)
        new_state = kit.server_step(server_optimizer, state, mean, agg.weight_sum > 0)
        new_c = jax.tree.map(
            lambda cc, s: cc + s / jnp.asarray(num_clients, s.dtype), state.extra, agg.extra
        )
        metrics = kit.round_metrics(agg, mean)
        metrics["control_norm"] = jnp.sqrt(
            sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(new_c))
        )
        return new_state._replace(extra=new_c), metrics

    return Algorithm(
        init=init,
        client_init=client_init,
        client_update=train.update(finish, context),
        aggregate=kit.weighted_aggregate(compressor),
        server_update=server_update,
        data_spec=spec,
        name="scaffold",
        compressor=compressor,
    )
