"""FedProx: numpy reference, mu=0 is FedAvg, the proximal pull, bad mu."""

import math

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, fedprox
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.runner import run
from tests.algorithms._numpy_ref import (
    client_steps,
    local_sgd,
    make_builder,
    sampled_clients,
    to_np,
)
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)


def numpy_fedprox(data, params, *, rounds, cpr, batch_size, epochs, lr, mu, seed):
    """Li et al. 2020, Algorithm 2 with SGD on h_k = F_k + mu/2 ||w - w_t||^2."""
    x = to_np(params)
    builder = make_builder(data, batch_size=batch_size, local_epochs=epochs, seed=seed)
    for k in range(rounds):
        total = {key: np.zeros_like(v) for key, v in x.items()}
        n_sum = 0.0
        for i in sampled_clients(data, cpr, seed, k):
            local = local_sgd(x, data, client_steps(builder, i, k), lr, prox_mu=mu)
            n = float(data.sizes[i])
            for key in x:
                total[key] += n * (local[key] - x[key])
            n_sum += n
        x = {key: x[key] + total[key] / n_sum for key in x}
    return x


@pytest.mark.parametrize("mu", [0.5, 3.0], ids=["mu0.5", "mu3"])
def test_fedprox_matches_numpy_reference(mu):
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = fedprox(MODEL, optax.sgd(0.2), mu=mu, batch_size=4, local_epochs=2)
    res = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=4, seed=7)
    ref = numpy_fedprox(data, params, rounds=3, cpr=4, batch_size=4, epochs=2, lr=0.2, mu=mu,
                        seed=7)
    np.testing.assert_allclose(res.server_state.params["w"], ref["w"], atol=1e-5)
    np.testing.assert_allclose(res.server_state.params["b"], ref["b"], atol=1e-5)


def test_mu_zero_is_fedavg():
    data = make_population([7, 12, 3, 9], seed=2)
    params = MODEL.init(jax.random.key(1))
    kw = {"rounds": 3, "clients_per_round": 3, "seed": 4}
    a = run(fedprox(MODEL, optax.sgd(0.3), mu=0.0, batch_size=4, local_epochs=2),
            VmapBackend("vmap"), data, params, **kw)
    b = run(fedavg(MODEL, optax.sgd(0.3), batch_size=4, local_epochs=2),
            VmapBackend("vmap"), data, params, **kw)
    chex.assert_trees_all_close(a.server_state.params, b.server_state.params, atol=0, rtol=0)


def test_larger_mu_keeps_local_models_closer_to_the_global_model():
    data = make_population([30, 30], seed=3)
    params = MODEL.init(jax.random.key(2))
    norms = []
    for mu in (0.0, 1.0, 10.0):
        alg = fedprox(MODEL, optax.sgd(0.05), mu=mu, batch_size=5, local_epochs=3)
        res = run(alg, VmapBackend("vmap"), data, params, rounds=1, clients_per_round=2, seed=0)
        norms.append(res.history[0]["update_norm"])
    assert norms[0] > norms[1] > norms[2] > 0


@pytest.mark.parametrize(
    ("mu", "error", "match"),
    [
        (-0.1, ValueError, "mu must be a finite float >= 0"),
        (math.nan, ValueError, "mu must be a finite float >= 0"),
        (math.inf, ValueError, "mu must be a finite float >= 0"),
        (True, TypeError, "mu must be a float"),
        ("0.1", TypeError, "mu must be a float"),
    ],
    ids=["negative", "nan", "inf", "bool", "str"],
)
def test_bad_mu_raises(mu, error, match):
    with pytest.raises(error, match=match):
        fedprox(MODEL, optax.sgd(0.1), mu=mu, batch_size=4)
