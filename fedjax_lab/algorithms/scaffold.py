"""SCAFFOLD: control variates against client drift.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh (2020), "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import _local, _uplink
from fedjax_lab.algorithms.fedavg import Weighting, make_fedavg_family, validate_data_spec
from fedjax_lab.core.local import LocalUpdate
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.tree import tree_all_finite, tree_where
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
    weighting: Weighting = "uniform",
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
    for name, value in (("client_lr", client_lr), ("server_lr", server_lr)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a float, got {value!r}")
        if not 0 < value < math.inf:
            raise ValueError(f"{name} must be a finite float > 0, got {value}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(
            f"num_clients must be the population size (a positive int), got {num_clients!r}"
        )
    eta_l = float(client_lr)
    # Aggregation of Δy, metrics and the x update are exactly the FedAvg family's.
    base = make_fedavg_family(
        model,
        optax.sgd(eta_l),
        server_optimizer=optax.sgd(float(server_lr)),
        data_spec=validate_data_spec(batch_size, local_epochs, num_steps),
        compressor=compressor,
        weighting=weighting,
        per_example_loss=per_example_loss,
        name="scaffold",
    )
    objective = _local.masked_mean_objective(model.apply, per_example_loss)
    optimizer = optax.sgd(eta_l)

    def init(params: Params) -> ServerState:
        return base.init(params)._replace(extra=jax.tree.map(jnp.zeros_like, params))

    def client_init(params: Params) -> ScaffoldClientState:
        return ScaffoldClientState(
            control=jax.tree.map(jnp.zeros_like, params),
            compressor=compressor.init(params) if compressor is not None else (),
        )

    def context(server_state: ServerState, client_state: ScaffoldClientState) -> PyTree:
        # The correction c - c_i is constant during the round.
        return jax.tree.map(jnp.subtract, server_state.extra, client_state.control)

    def corrected(grads: PyTree, params: Params, correction: PyTree) -> PyTree:
        del params
        return jax.tree.map(jnp.add, grads, correction)

    def finish(
        server_state: ServerState, client_state: ScaffoldClientState,
        result: _local.LocalState, client_weight: jax.Array, *, key: jax.Array,
    ) -> tuple[ClientOutput, ScaffoldClientState]:
        x, c, c_i = server_state.params, server_state.extra, client_state.control
        delta_y = jax.tree.map(jnp.subtract, result.params, x)
        steps = result.num_steps
        # Option II: c_i+ - c_i = -c + (x - y_i) / (K_i η_l) = -c - Δy_i / (K_i η_l).
        inv = 1.0 / (jnp.maximum(steps, 1.0) * eta_l)
        delta_c = jax.tree.map(lambda cc, d: -cc - d * inv.astype(d.dtype), c, delta_y)
        real = client_weight > 0
        finite = jnp.logical_and(tree_all_finite(delta_y), tree_all_finite(delta_c))
        ok = jnp.logical_and(jnp.logical_and(real, finite), steps > 0)
        zeros = jax.tree.map(jnp.zeros_like, x)
        delta_y = tree_where(finite, delta_y, zeros)
        delta_c = tree_where(ok, delta_c, zeros)
        payload, comp_state, bits = _uplink.encode_uplink(
            compressor, delta_y, client_state.compressor, ok, key=key
        )
        new_state = ScaffoldClientState(
            control=tree_where(ok, jax.tree.map(jnp.add, c_i, delta_c), c_i),
            compressor=comp_state,
        )
        weight = client_weight if weighting == "examples" else jnp.ones_like(client_weight)
        weight = jnp.where(ok, weight, 0.0)
        metrics = {
            "train_loss_sum": jnp.where(ok, result.loss_sum, 0.0),
            "train_examples": jnp.where(ok, result.num_examples, 0.0),
            "local_steps": steps,
            "clients": real.astype(jnp.float32),
            "rejected": jnp.logical_and(real, ~finite).astype(jnp.float32),
            "upload_bits": jnp.where(ok, bits + _uplink.dense_bits(delta_c), 0.0),
        }
        return ClientOutput(payload, weight, metrics, extra=delta_c), new_state

    client_update = LocalUpdate(
        start=_local.optimizer_start(optimizer),
        step=_local.optimizer_step(lambda state: objective, optimizer, corrected),
        finish=finish,
        context=context,
    )

    def aggregate(outputs: ClientOutput) -> Aggregate:
        agg = base.aggregate(outputs._replace(extra=()))
        return agg._replace(extra=jax.tree.map(lambda d: jnp.sum(d, axis=0), outputs.extra))

    def server_update(state: ServerState, agg: Aggregate) -> tuple[ServerState, dict]:
        new_state, metrics = base.server_update(state, agg._replace(extra=()))
        new_c = jax.tree.map(
            lambda cc, s: cc + s / jnp.asarray(num_clients, s.dtype), state.extra, agg.extra
        )
        metrics = dict(metrics)
        metrics["control_norm"] = jnp.sqrt(
            sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(new_c))
        )
        return new_state._replace(extra=new_c), metrics

    return base._replace(
        init=init,
        client_init=client_init,
        client_update=client_update,
        aggregate=aggregate,
        server_update=server_update,
    )
