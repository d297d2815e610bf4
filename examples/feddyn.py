"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization", Alg. 1).

Client k minimises ``L_k(w) - <g_k, w> + alpha/2 ||w - w^t||^2`` (``g_k``: its state), then
sets ``g_k -= alpha (w_k - w^t)``; the server keeps ``h -= alpha/m sum_k (w_k - w^t)`` (m: the
population's size) and sets ``w^{t+1} = mean_k w_k - h / alpha``.
"""

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.core.types import Algorithm


def feddyn(model, lr, *, alpha, num_clients, batch_size, local_epochs=1):
    """FedDyn with local SGD of step ``lr`` on a population of ``num_clients``."""
    sgd1, dot, sub = optax.sgd(1.0), kit.tree_vdot, lambda a, b: jax.tree.map(jnp.subtract, a, b)

    def dyn(objective, server, g):  # an objective transform; its context is the state g_k
        return lambda w, a, m: (objective(w, a, m) - dot(g, w)
                                + alpha / 2 * dot(sub(w, server.params), sub(w, server.params)))

    def finish(server, g, local, weight, *, key):
        delta = sub(local.params, server.params)
        out, _ = kit.upload(None, delta, (), local, weight, key=key, weighting="uniform")
        return out, jax.tree.map(lambda g, d: jnp.where(out.weight > 0, g - alpha * d, g), g, delta)

    def server_update(server, agg):
        h = jax.tree.map(lambda h, s: h - alpha / num_clients * s, server.extra, agg.update_sum)
        mean = kit.mean_update(agg)  # uniform weights: the accepted clients' mean delta
        step = sub(mean, jax.tree.map(lambda h: h / alpha, h))
        new = kit.server_step(sgd1, server, step, agg.weight_sum > 0)
        return new._replace(extra=h), kit.round_metrics(agg, mean)

    train = kit.local_training(kit.model_objective(model), optax.sgd(lr), objective_transform=dyn)
    return Algorithm(lambda p: kit.server_init(sgd1)(p)._replace(extra=sub(p, p)),
                     lambda p: sub(p, p), train.update(finish, context=lambda server, g: g),
                     kit.weighted_aggregate(None), server_update,
                     kit.data_spec(batch_size, local_epochs), name="feddyn")
