"""FedOpt (Reddi et al. 2021): adaptive servers vs a numpy Algorithm 2, FedAvgM, identities."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import (
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedopt,
    fedyogi,
    reddi_adaptive,
)
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
ROUNDS, CPR, BATCH, EPOCHS, LR, SEED = 4, 4, 4, 1, 0.2, 11


def numpy_fedopt(data, params, server_step):
    """FedAvg clients + a server rule ``server_step(x, delta, state) -> (x, state)``."""
    x = to_np(params)
    builder = make_builder(data, batch_size=BATCH, local_epochs=EPOCHS, seed=SEED)
    state = None
    for k in range(ROUNDS):
        total = {key: np.zeros_like(v) for key, v in x.items()}
        n_sum = 0.0
        for i in sampled_clients(data, CPR, SEED, k):
            local = local_sgd(x, data, client_steps(builder, i, k), LR)
            n = float(data.sizes[i])
            for key in x:
                total[key] += n * (local[key] - x[key])
            n_sum += n
        delta = {key: total[key] / n_sum for key in x}
        x, state = server_step(x, delta, state)
    return x


def reddi_step(kind, eta, b1, b2, tau):
    """Algorithm 2 of Reddi et al. (2021), literally (v_{-1} = tau^2, no bias correction)."""

    def step(x, delta, state):
        if state is None:
            state = ({k: np.zeros_like(v) for k, v in x.items()},
                     {k: np.full_like(v, tau**2) for k, v in x.items()})
        m, v = state
        m = {k: b1 * m[k] + (1 - b1) * delta[k] for k in x}
        d2 = {k: delta[k] ** 2 for k in x}
        if kind == "adagrad":
            v = {k: v[k] + d2[k] for k in x}
        elif kind == "adam":
            v = {k: b2 * v[k] + (1 - b2) * d2[k] for k in x}
        else:
            v = {k: v[k] - (1 - b2) * d2[k] * np.sign(v[k] - d2[k]) for k in x}
        x = {k: x[k] + eta * m[k] / (np.sqrt(v[k]) + tau) for k in x}
        return x, (m, v)

    return step


def momentum_step(eta, beta):
    """FedAvgM (Hsu et al. 2019): v = beta v + delta, x = x + eta v."""

    def step(x, delta, state):
        v = {k: np.zeros_like(d) for k, d in delta.items()} if state is None else state
        v = {k: beta * v[k] + delta[k] for k in x}
        return {k: x[k] + eta * v[k] for k in x}, v

    return step


FACTORIES = {"adagrad": fedadagrad, "adam": fedadam, "yogi": fedyogi}


@pytest.mark.parametrize("kind", ["adagrad", "adam", "yogi"])
def test_adaptive_servers_match_numpy_algorithm_2(kind):
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    # tau = 0.01 puts the first rounds' |delta| on both sides of tau, exercising yogi's sign.
    hp = {"b1": 0.9, "b2": 0.95, "tau": 0.01}
    alg = FACTORIES[kind](MODEL, optax.sgd(LR), server_lr=0.05, batch_size=BATCH,
                          local_epochs=EPOCHS, **hp)
    assert alg.name == f"fed{kind}"
    res = run(alg, VmapBackend("vmap"), data, params, rounds=ROUNDS, clients_per_round=CPR,
              seed=SEED)
    ref = numpy_fedopt(data, params, reddi_step(kind, 0.05, **hp))
    np.testing.assert_allclose(res.server_state.params["w"], ref["w"], atol=1e-5)
    np.testing.assert_allclose(res.server_state.params["b"], ref["b"], atol=1e-5)


def test_adaptive_servers_differ_from_each_other():
    # Guards against the three rules collapsing to one (a reference bug would hide it).
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    finals = {
        kind: run(f(MODEL, optax.sgd(LR), server_lr=0.05, batch_size=BATCH, tau=0.01),
                  VmapBackend("vmap"), data, params, rounds=ROUNDS, clients_per_round=CPR,
                  seed=SEED).server_state.params["w"]
        for kind, f in FACTORIES.items()
    }
    for a, b in (("adagrad", "adam"), ("adam", "yogi"), ("adagrad", "yogi")):
        assert float(jnp.max(jnp.abs(finals[a] - finals[b]))) > 1e-4


def test_fedavgm_matches_numpy_reference():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = fedavgm(MODEL, optax.sgd(LR), batch_size=BATCH, server_lr=0.7, momentum=0.8)
    res = run(alg, VmapBackend("vmap"), data, params, rounds=ROUNDS, clients_per_round=CPR,
              seed=SEED)
    ref = numpy_fedopt(data, params, momentum_step(0.7, 0.8))
    np.testing.assert_allclose(res.server_state.params["w"], ref["w"], atol=1e-5)
    np.testing.assert_allclose(res.server_state.params["b"], ref["b"], atol=1e-5)


def test_fedopt_with_server_sgd_one_is_fedavg():
    data = make_population([7, 12, 3, 9], seed=2)
    params = MODEL.init(jax.random.key(1))
    kw = {"rounds": 3, "clients_per_round": 3, "seed": 4}
    a = run(fedopt(MODEL, optax.sgd(0.3), optax.sgd(1.0), batch_size=4, local_epochs=2),
            VmapBackend("vmap"), data, params, **kw)
    b = run(fedavg(MODEL, optax.sgd(0.3), batch_size=4, local_epochs=2),
            VmapBackend("vmap"), data, params, **kw)
    chex.assert_trees_all_close(a.server_state.params, b.server_state.params, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["adagrad", "adam", "yogi"])
def test_reddi_adaptive_edge_leaves(kind):
    # Empty leaves, scalars and d=1 leaves go through unchanged in shape; zero pseudo-gradients
    # leave the parameters where they are (m stays 0).
    opt = reddi_adaptive(kind, 0.1)
    params = {"empty": jnp.zeros((0, 3)), "scalar": jnp.asarray(1.5), "one": jnp.ones((1,))}
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = jax.jit(opt.update)(zeros, state)
    chex.assert_trees_all_equal_shapes(updates, params)
    chex.assert_trees_all_close(updates, zeros, atol=0)
    grads = {"empty": jnp.zeros((0, 3)), "scalar": jnp.asarray(2.0), "one": jnp.full((1,), -2.0)}
    updates, _ = jax.jit(opt.update)(grads, state)
    assert float(updates["scalar"]) < 0 < float(updates["one"][0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: reddi_adaptive("sgd", 0.1), ValueError, "kind must be"),
        (lambda: reddi_adaptive("adam", 0.0), ValueError, r"server_lr must be in \(0.0"),
        (lambda: reddi_adaptive("adam", 0.1, b1=1.0), ValueError, r"b1 must be in \[0.0, 1.0\)"),
        (lambda: reddi_adaptive("adam", 0.1, b2=-0.1), ValueError, "b2 must be in"),
        (lambda: reddi_adaptive("adam", 0.1, tau=0.0), ValueError, "tau must be in"),
        (lambda: reddi_adaptive("adam", True), TypeError, "server_lr must be a float"),
        (lambda: fedavgm(MODEL, optax.sgd(0.1), batch_size=4, momentum=1.0), ValueError,
         "momentum must be in"),
        (lambda: fedopt(MODEL, optax.sgd(0.1), "adam", batch_size=4), TypeError,
         "server_optimizer must be an optax.GradientTransformation"),
        (lambda: fedadam(MODEL, optax.sgd(0.1), server_lr=0.1, batch_size=0), ValueError,
         "batch_size must be a positive integer"),
    ],
    ids=["kind", "lr0", "b1", "b2", "tau", "lr-bool", "momentum", "not-optax", "batch"],
)
def test_bad_arguments_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()
