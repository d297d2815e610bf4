"""FedNova (Wang et al. 2020): numpy reference with heterogeneous tau_i, identities, additivity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, fednova
from fedjax_lab.algorithms.fednova import momentum_norm
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.federated import FederatedData
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


def numpy_a_norm(tau, rho):
    """||a||_1 by its definition: step j's gradient is applied sum_{k>=j} rho^(k-j) times."""
    return sum(sum(rho ** (k - j) for k in range(j, tau)) for j in range(tau))


def numpy_fednova(data, params, *, rounds, cpr, batch_size, epochs, lr, rho, seed, weighting):
    x = to_np(params)
    builder = make_builder(data, batch_size=batch_size, local_epochs=epochs, seed=seed)
    taus = []
    for k in range(rounds):
        normalized = {key: np.zeros_like(v) for key, v in x.items()}
        p_sum = tau_sum = 0.0
        for i in sampled_clients(data, cpr, seed, k):
            steps = client_steps(builder, i, k)
            local = local_sgd(x, data, steps, lr, momentum=rho)
            a = numpy_a_norm(len(steps), rho)
            p = float(data.sizes[i]) if weighting == "examples" else 1.0
            for key in x:
                normalized[key] += p * (local[key] - x[key]) / a
            p_sum += p
            tau_sum += p * a
        tau_eff = tau_sum / p_sum
        taus.append(tau_eff)
        x = {key: x[key] + tau_eff * normalized[key] / p_sum for key in x}
    return x, taus


@pytest.mark.parametrize(
    ("rho", "weighting"),
    [(0.0, "examples"), (0.0, "uniform"), (0.7, "examples")],
    ids=["sgd", "sgd-uniform", "momentum"],
)
def test_fednova_matches_numpy_reference(rho, weighting):
    # Sizes 7..15 with B=4 and 2 epochs: tau_i in {2, 4, 6, 8} differ across clients.
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = fednova(MODEL, 0.2, batch_size=4, local_epochs=2, client_momentum=rho,
                  weighting=weighting)
    res = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=4, seed=7)
    ref, taus = numpy_fednova(data, params, rounds=3, cpr=4, batch_size=4, epochs=2, lr=0.2,
                              rho=rho, seed=7, weighting=weighting)
    np.testing.assert_allclose(res.server_state.params["w"], ref["w"], atol=1e-5)
    np.testing.assert_allclose(res.server_state.params["b"], ref["b"], atol=1e-5)
    np.testing.assert_allclose([h["tau_eff"] for h in res.history], taus, rtol=1e-6)


def test_fednova_differs_from_fedavg_when_steps_differ():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    kw = {"rounds": 2, "clients_per_round": 4, "seed": 7}
    nova = run(fednova(MODEL, 0.2, batch_size=4, local_epochs=2), VmapBackend("vmap"), data,
               params, **kw)
    avg = run(fedavg(MODEL, optax.sgd(0.2), batch_size=4, local_epochs=2), VmapBackend("vmap"),
              data, params, **kw)
    diff = jnp.max(jnp.abs(nova.server_state.params["w"] - avg.server_state.params["w"]))
    assert float(diff) > 1e-3


def test_equal_steps_is_fedavg():
    data = make_population([7, 12, 3, 9], seed=2)
    params = MODEL.init(jax.random.key(1))
    kw = {"rounds": 3, "clients_per_round": 3, "seed": 4}
    nova = run(fednova(MODEL, 0.3, batch_size=4, local_epochs=None, num_steps=3),
               VmapBackend("vmap"), data, params, **kw)
    avg = run(fedavg(MODEL, optax.sgd(0.3), batch_size=4, local_epochs=None, num_steps=3),
              VmapBackend("vmap"), data, params, **kw)
    chex.assert_trees_all_close(nova.server_state.params, avg.server_state.params, atol=1e-6)
    assert [h["tau_eff"] for h in nova.history] == [3.0] * 3
    # One extra float32 per client carries ||a_i||_1.
    assert [h["upload_bits"] for h in nova.history] == [
        h["upload_bits"] + 3 * 32 for h in avg.history
    ]


def test_aggregate_is_additive_across_chunks():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = fednova(MODEL, 0.2, batch_size=4, local_epochs=2)
    kw = {"rounds": 2, "clients_per_round": 4, "seed": 7}
    whole = run(alg, VmapBackend("vmap"), data, params, **kw)
    chunked = run(alg, VmapBackend("vmap", chunk_size=2), data, params, **kw)
    chex.assert_trees_all_close(whole.server_state.params, chunked.server_state.params,
                                atol=1e-6)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_momentum_norm_is_the_heavy_ball_step_count(rho):
    # With a constant unit gradient, tau steps of optax.sgd(lr, momentum=rho) move the
    # parameter by exactly -lr * ||a||_1.
    opt = optax.sgd(0.1, momentum=rho or None)
    for tau in range(1, 9):
        x = jnp.zeros(())
        state = opt.init(x)
        for _ in range(tau):
            upd, state = opt.update(jnp.ones(()), state, x)
            x = optax.apply_updates(x, upd)
        np.testing.assert_allclose(-float(x) / 0.1, float(momentum_norm(jnp.float32(tau), rho)),
                                   rtol=1e-5)
        np.testing.assert_allclose(numpy_a_norm(tau, rho),
                                   float(momentum_norm(jnp.float32(tau), rho)), rtol=1e-5)
    assert float(momentum_norm(jnp.float32(0.0), rho)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"client_lr": 0.0}, ValueError, "client_lr must be a finite float > 0"),
        ({"client_lr": "0.1"}, TypeError, "client_lr must be a float"),
        ({"client_lr": 0.1, "client_momentum": 1.0}, ValueError, r"client_momentum must be in"),
        ({"client_lr": 0.1, "batch_size": -1}, ValueError, "batch_size must be a positive"),
    ],
    ids=["lr0", "lr-str", "momentum1", "batch"],
)
def test_bad_arguments_raise(kwargs, error, match):
    kwargs = {"batch_size": 4, **kwargs}
    lr = kwargs.pop("client_lr")
    with pytest.raises(error, match=match):
        fednova(MODEL, lr, **kwargs)


def test_nonfinite_client_is_rejected():
    good = make_population([6, 9], seed=6)
    x = good.arrays["x"].copy()
    x[good.offsets[1]] = np.inf
    bad = FederatedData(good.client_ids, {"x": x, "y": good.arrays["y"]}, good.offsets)
    params = MODEL.init(jax.random.key(4))
    alg = fednova(MODEL, 0.2, batch_size=4, local_epochs=2)
    res_bad = run(alg, VmapBackend("vmap"), bad, params, rounds=1, clients_per_round=2, seed=0)
    res_good = run(alg, VmapBackend("vmap"), good.subset([0]), params, rounds=1,
                   clients_per_round=1, seed=0)
    assert res_bad.history[0]["rejected"] == 1.0
    # Only the finite client counts, in the update and in tau_eff (its 2 * ceil(6/4) = 4 steps).
    assert res_bad.history[0]["tau_eff"] == 4.0
    chex.assert_trees_all_close(res_bad.server_state.params, res_good.server_state.params,
                                atol=1e-6)
