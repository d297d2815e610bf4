"""Federated Averaging and its generalisation with server optimizers.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(FedAvg); Reddi et al. 2021, "Adaptive Federated Optimization" (server optimizer applied to the
pseudo-gradient ``-mean(delta)``; plain FedAvg is ``server_optimizer=optax.sgd(1.0)``).

Written with the authoring kit (:mod:`fedjax_lab.algorithms.kit`): FedProx, FedOpt, FedPAQ and
DP-FedAvg are this function with other arguments or wrappers, not copies of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.types import Algorithm, ClientOutput, PyTree, ServerState


def fedavg(
    model: Any,
    client_optimizer: optax.GradientTransformation | kit.ClientOptimizer,
    *,
    batch_size: int,
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    compressor: Any = None,
    weighting: kit.Weighting = "examples",
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    objective_transform: kit.ObjectiveTransform | None = None,
    grad_transform: kit.GradTransform | None = None,
) -> Algorithm:
    """Federated Averaging (McMahan et al. 2017, Algorithm 1).

    Each sampled client runs ``local_epochs`` passes (or ``num_steps`` steps) of
    ``client_optimizer`` from the global model on batches of ``batch_size``; the server averages
    the deltas weighted by client example counts (``weighting="examples"``, n_k/n in the paper)
    and applies ``server_optimizer`` to the pseudo-gradient ``-mean(delta)`` (Reddi et al. 2021);
    ``server_optimizer=None`` means ``optax.sgd(1.0)``, i.e. plain FedAvg.

    Non-finite client deltas are rejected: the client gets weight 0, its compressor state is
    kept, and the ``rejected`` metric counts it (DESIGN.md "Errors"). A round to which no
    client contributed reports ``train_loss`` and ``update_norm`` as NaN and leaves the server
    model unchanged.

    Args:
      model: a ``fedjax_lab.models.Model`` (only ``apply`` is used).
      client_optimizer: any optax transformation (fresh state every round), or
        ``kit.per_round(...)`` for hyperparameters that follow the round (schedules).
      batch_size: local minibatch size.
      local_epochs: local passes over the client's data per round.
      num_steps: alternatively, a fixed number of local steps per round.
      server_optimizer: optax transformation on the server (default sgd(1.0)).
      compressor: optional uplink ``Compressor`` (its state is the client state); the
        algorithm carries it (``Algorithm.compressor``) for backends that ship its bytes.
      weighting: "examples" (n_k-weighted) or "uniform" (plain mean over clients).
      per_example_loss: ``(logits, labels) -> [B]`` loss.
      objective_transform: changes the local objective (e.g. ``kit.proximal(mu)``: FedProx).
      grad_transform: changes each local step's gradient.
    """
    spec = kit.data_spec(batch_size, local_epochs, num_steps)
    weighting = kit.check_weighting(weighting)
    server_optimizer = server_optimizer if server_optimizer is not None else optax.sgd(1.0)
    train = kit.local_training(
        kit.model_objective(model, per_example_loss), client_optimizer,
        objective_transform=objective_transform, grad_transform=grad_transform,
    )

    def client_init(params):
        return compressor.init(params) if compressor is not None else ()

    def finish(
        server_state: ServerState, client_state: PyTree, result: kit.LocalState,
        client_weight: jax.Array, *, key: jax.Array,
    ) -> tuple[ClientOutput, PyTree]:
        delta = jax.tree.map(jnp.subtract, result.params, server_state.params)
        return kit.upload(compressor, delta, client_state, result, client_weight, key=key,
                          weighting=weighting)

    def server_update(state: ServerState, agg) -> tuple[ServerState, dict]:
        mean = kit.mean_update(agg)
        new_state = kit.server_step(server_optimizer, state, mean, agg.weight_sum > 0)
        return new_state, kit.round_metrics(agg, mean)

    return Algorithm(
        init=kit.server_init(server_optimizer),
        client_init=client_init,
        client_update=train.update(finish),
        aggregate=kit.weighted_aggregate(compressor),
        server_update=server_update,
        data_spec=spec,
        name="fedavg",
        compressor=compressor,
    )
