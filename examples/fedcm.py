"""Client-momentum FedAvg: FedCM (Xu et al. 2021, "FedCM: Federated Learning with Client-level
Momentum", Algorithm 1).

Every local step of every client moves along ``alpha g + (1 - alpha) Delta_t``, where the
momentum ``Delta_t`` is server state; after ``K`` local steps of size ``lr``, the server sets
``Delta_{t+1} = -mean_i (x_i - x_t) / (lr K)`` and ``x_{t+1} = x_t - server_lr Delta_{t+1}``.
"""

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.core.types import Algorithm


def fedcm(model, lr, *, alpha, server_lr, num_steps, batch_size):
    """FedCM with ``num_steps`` (``K``) local SGD steps of size ``lr`` per round."""
    server_opt = optax.sgd(server_lr)

    def momentum(grads, params, server, context):  # a gradient transform
        return jax.tree.map(lambda g, d: alpha * g + (1 - alpha) * d, grads, server.extra)

    def finish(server, state, local, weight, *, key):
        delta = jax.tree.map(jnp.subtract, local.params, server.params)
        return kit.upload(None, delta, state, local, weight, key=key, weighting="uniform")

    def server_update(server, agg):
        mean, any_client = kit.mean_update(agg), agg.weight_sum > 0
        step = jax.tree.map(lambda m: m / (lr * num_steps), mean)  # -Delta_{t+1}
        new = kit.server_step(server_opt, server, step, any_client)
        moment = jax.tree.map(lambda s, d: jnp.where(any_client, -s, d), step, server.extra)
        return new._replace(extra=moment), kit.round_metrics(agg, mean)

    train = kit.local_training(kit.model_objective(model), optax.sgd(lr), grad_transform=momentum)
    return Algorithm(lambda p: kit.server_init(server_opt)(p)._replace(extra=jax.tree.map(
        jnp.zeros_like, p)), lambda p: (), train.update(finish), kit.weighted_aggregate(None),
        server_update, kit.data_spec(batch_size, None, num_steps), name="fedcm")
