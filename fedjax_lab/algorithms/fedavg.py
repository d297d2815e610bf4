"""Federated Averaging and its generalisation with server optimizers.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(FedAvg); Reddi et al. 2021, "Adaptive Federated Optimization" (server optimizer applied to the
pseudo-gradient ``-mean(delta)``; plain FedAvg is ``server_optimizer=optax.sgd(1.0)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import _local, _uplink
from fedjax_lab.core.local import LocalUpdate
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.tree import tree_all_finite, tree_where
from fedjax_lab.core.types import (
    Aggregate,
    Algorithm,
    ClientOutput,
    DataSpec,
    Params,
    PyTree,
    ServerState,
)

Weighting = Literal["examples", "uniform"]


def validate_data_spec(batch_size: Any, local_epochs: Any, num_steps: Any) -> DataSpec:
    """Checks the local-data hyperparameters before anything is compiled."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if (local_epochs is None) == (num_steps is None):
        raise ValueError(
            "give exactly one of local_epochs (passes over the data) or num_steps (fixed steps)"
        )
    for name, value in (("local_epochs", local_epochs), ("num_steps", num_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return DataSpec(batch_size, local_epochs, num_steps)


def make_fedavg_family(
    model: Any,
    client_optimizer: optax.GradientTransformation,
    *,
    server_optimizer: optax.GradientTransformation,
    data_spec: DataSpec,
    compressor: Any = None,
    weighting: Weighting = "examples",
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    prox_mu: float = 0.0,
    name: str = "fedavg",
) -> Algorithm:
    """The shared body of FedAvg / FedOpt / FedProx (they differ only in these arguments).

    Non-finite client deltas are rejected: the client gets weight 0, its compressor state is
    kept, and the ``rejected`` metric counts it (DESIGN.md "Errors"). A round to which no
    client contributed reports ``train_loss`` and ``update_norm`` as NaN (a mean over nobody),
    and leaves the server state unchanged.
    """
    if weighting not in ("examples", "uniform"):
        raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
    # A jax scalar mu (swept) always adds the proximal term; a Python 0 skips it entirely.
    traced_mu = isinstance(prox_mu, jax.Array)
    if not traced_mu and prox_mu < 0:
        raise ValueError(f"mu must be >= 0, got {prox_mu}")
    base_objective = _local.masked_mean_objective(model.apply, per_example_loss)

    def init(params: Params) -> ServerState:
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            round=jnp.zeros((), jnp.int32),
        )

    def client_init(params: Params) -> PyTree:
        return compressor.init(params) if compressor is not None else ()

    def objective_for(server_state: ServerState) -> _local.Objective:
        if not (traced_mu or prox_mu > 0):
            return base_objective
        global_params = server_state.params

        # FedProx (Li et al. 2020): proximal term keeps local models near the global one.
        def objective(p, arrays, mask):
            prox = sum(
                jnp.sum(jnp.square(a - g))
                for a, g in zip(jax.tree.leaves(p), jax.tree.leaves(global_params), strict=True)
            )
            return base_objective(p, arrays, mask) + 0.5 * prox_mu * prox

        return objective

    def finish(
        server_state: ServerState, client_state: PyTree, result: _local.LocalState,
        client_weight: jax.Array, *, key: jax.Array,
    ) -> tuple[ClientOutput, PyTree]:
        global_params = server_state.params
        delta = jax.tree.map(jnp.subtract, result.params, global_params)
        real = client_weight > 0
        finite = tree_all_finite(delta)
        ok = jnp.logical_and(real, finite)
        delta = tree_where(finite, delta, jax.tree.map(jnp.zeros_like, delta))
        payload, new_state, bits = _uplink.encode_uplink(
            compressor, delta, client_state, ok, key=key
        )
        weight = client_weight if weighting == "examples" else jnp.ones_like(client_weight)
        weight = jnp.where(ok, weight, 0.0)
        realf = real.astype(jnp.float32)
        metrics = {
            "train_loss_sum": jnp.where(ok, result.loss_sum, 0.0),
            "train_examples": jnp.where(ok, result.num_examples, 0.0),
            "local_steps": result.num_steps,
            "clients": realf,
            "rejected": jnp.logical_and(real, ~finite).astype(jnp.float32),
            "upload_bits": jnp.where(ok, bits, 0.0),
        }
        return ClientOutput(payload, weight, metrics), new_state

    client_update = LocalUpdate(
        start=_local.optimizer_start(client_optimizer),
        step=_local.optimizer_step(objective_for, client_optimizer),
        finish=finish,
    )

    def aggregate(outputs: ClientOutput) -> Aggregate:
        return Aggregate(
            update_sum=_uplink.decode_weighted_sum(compressor, outputs.update, outputs.weight),
            weight_sum=jnp.sum(outputs.weight),
            metric_sums={k: jnp.sum(v) for k, v in outputs.metrics.items()},
        )

    def server_update(state: ServerState, agg: Aggregate) -> tuple[ServerState, dict]:
        total = agg.weight_sum
        any_client = total > 0
        mean = jax.tree.map(lambda s: s / jnp.maximum(total, 1e-30).astype(s.dtype), agg.update_sum)
        pseudo_grad = jax.tree.map(jnp.negative, mean)
        updates, new_opt = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_state = ServerState(
            params=tree_where(any_client, new_params, state.params),
            opt_state=tree_where(any_client, new_opt, state.opt_state),
            round=state.round + 1,
            extra=state.extra,
        )
        m = agg.metric_sums
        # A mean over no contributing client is undefined: NaN, never 0.0 (which would make a
        # round whose every client was rejected look like a perfect one).
        nan = jnp.float32(jnp.nan)
        metrics = {
            "train_loss": jnp.where(
                m["train_examples"] > 0,
                m["train_loss_sum"] / jnp.maximum(m["train_examples"], 1.0), nan,
            ),
            "train_examples": m["train_examples"],
            "clients": m["clients"],
            "rejected": m["rejected"],
            "upload_bits": m["upload_bits"],
            "local_steps": m["local_steps"] / jnp.maximum(m["clients"], 1.0),
            "update_norm": jnp.where(
                any_client,
                jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(mean))), nan,
            ),
        }
        return new_state, metrics

    return Algorithm(
        init=init,
        client_init=client_init,
        client_update=client_update,
        aggregate=aggregate,
        server_update=server_update,
        data_spec=data_spec,
        name=name,
    )


def fedavg(
    model: Any,
    client_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    compressor: Any = None,
    weighting: Weighting = "examples",
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """Federated Averaging (McMahan et al. 2017, Algorithm 1).

    Each sampled client runs ``local_epochs`` passes (or ``num_steps`` steps) of
    ``client_optimizer`` from the global model on batches of ``batch_size``; the server averages
    the deltas weighted by client example counts (``weighting="examples"``, n_k/n in the paper)
    and applies ``server_optimizer`` to the pseudo-gradient ``-mean(delta)`` (Reddi et al. 2021);
    ``server_optimizer=None`` means ``optax.sgd(1.0)``, i.e. plain FedAvg.

    Args:
      model: a ``fedjax_lab.models.Model`` (only ``apply`` is used).
      client_optimizer: any optax transformation, re-initialised every round.
      batch_size: local minibatch size.
      local_epochs: local passes over the client's data per round.
      num_steps: alternatively, a fixed number of local steps per round.
      server_optimizer: optax transformation on the server (default sgd(1.0)).
      compressor: optional uplink ``Compressor`` (its state is the client state).
      weighting: "examples" (n_k-weighted) or "uniform" (plain mean over clients).
      per_example_loss: ``(logits, labels) -> [B]`` loss.
    """
    spec = validate_data_spec(batch_size, local_epochs, num_steps)
    return make_fedavg_family(
        model,
        client_optimizer,
        server_optimizer=server_optimizer if server_optimizer is not None else optax.sgd(1.0),
        data_spec=spec,
        compressor=compressor,
        weighting=weighting,
        per_example_loss=per_example_loss,
        name="fedavg",
    )
