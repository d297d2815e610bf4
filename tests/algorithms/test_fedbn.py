"""FedBN: numpy reference (BatchNorm layers stay on the clients), contract, bad arguments."""

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedbn import fedbn
from fedjax_lab.algorithms.testing import check_algorithm
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.models.bn_mlp import BatchNormMLP
from fedjax_lab.runner import ClientStateStore, run
from tests.algorithms._numpy_ref import client_steps, make_builder, sampled_clients
from tests.helpers import LinearModel, make_population

MODEL = BatchNormMLP(dim=5, hidden=4, num_classes=3)
SIZES = [7, 12, 3, 9, 15, 5]


def _np(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def np_forward(p, stats, x, momentum=0.9, eps=1e-5):
    """The BatchNorm MLP in train mode (batch statistics), float64: (logits, new stats)."""
    h = x @ p["dense1"]["w"] + p["dense1"]["b"]
    mean, var = h.mean(axis=0), ((h - h.mean(axis=0)) ** 2).mean(axis=0)
    new_stats = {"bn": {"mean": momentum * stats["bn"]["mean"] + (1 - momentum) * mean,
                        "var": momentum * stats["bn"]["var"] + (1 - momentum) * var}}
    h = (h - mean) / np.sqrt(var + eps) * p["bn"]["scale"] + p["bn"]["bias"]
    return np.maximum(h, 0.0) @ p["dense2"]["w"] + p["dense2"]["b"], new_stats


def np_loss(p, x, y):
    logits, _ = np_forward(p, {"bn": {"mean": 0.0, "var": 1.0}}, x)
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


def np_grad(p, x, y, h=1e-6):
    """Central finite differences of the float64 loss (an independent gradient)."""
    g = jax.tree.map(np.zeros_like, p)
    for layer in p:
        for name, value in p[layer].items():
            for i in np.ndindex(value.shape):
                old = value[i]
                value[i] = old + h
                up = np_loss(p, x, y)
                value[i] = old - h
                down = np_loss(p, x, y)
                value[i] = old
                g[layer][name][i] = (up - down) / (2 * h)
    return g


def numpy_fedbn(data, params, *, rounds, cpr, batch_size, lr, momentum, seed):
    """Li et al. 2021, Algorithm 1: FedAvg of the non-BN layers; BN layers stay local."""
    shared = {k: v for k, v in _np(params).items() if k != "bn"}
    own = {i: {"bn": _np(params)["bn"], "stats": _np(MODEL.init_state())}
           for i in range(data.num_clients)}
    xs, ys = data.arrays["x"].astype(np.float64), data.arrays["y"]
    builder = make_builder(data, batch_size=batch_size, local_epochs=1, seed=seed)
    for t in range(rounds):
        total = jax.tree.map(np.zeros_like, shared)
        n_sum = 0.0
        for i in sampled_clients(data, cpr, seed, t):
            p = {**jax.tree.map(np.copy, shared), "bn": jax.tree.map(np.copy, own[i]["bn"])}
            stats, u = own[i]["stats"], jax.tree.map(np.zeros_like, p)
            for idx in client_steps(builder, i, t):
                _, stats = np_forward(p, stats, xs[idx])
                g = np_grad(p, xs[idx], ys[idx])
                u = jax.tree.map(lambda u, g: momentum * u + g, u, g)
                p = jax.tree.map(lambda p, u: p - lr * u, p, u)
            own[i] = {"bn": p["bn"], "stats": stats}
            n = float(data.sizes[i])
            total = jax.tree.map(lambda s, a, b, n=n: s + n * (a - b), total,
                                 {k: p[k] for k in shared}, shared)
            n_sum += n
        shared = jax.tree.map(lambda s, d, n_sum=n_sum: s + d / n_sum, shared, total)
    return shared, own


def test_fedbn_matches_numpy_reference_and_keeps_batchnorm_local():
    data = make_population(SIZES, seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = fedbn(MODEL, optax.sgd(0.2, momentum=0.5), batch_size=4)
    store = ClientStateStore(alg.client_init(params))
    res = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=4, seed=7,
              client_store=store)
    shared, own = numpy_fedbn(data, params, rounds=3, cpr=4, batch_size=4, lr=0.2, momentum=0.5,
                              seed=7)
    for layer in shared:
        for name in shared[layer]:
            np.testing.assert_allclose(res.server_state.params[layer][name],
                                       shared[layer][name], atol=1e-5)
    # The server never averages BatchNorm: its entry is the initial one.
    np.testing.assert_array_equal(res.server_state.params["bn"]["scale"],
                                  params["bn"]["scale"])
    assert len(store.states) > 1
    for i, state in store.states.items():
        for name in ("scale", "bias"):
            np.testing.assert_allclose(state["params"][name], own[i]["bn"][name], atol=1e-5)
        for name in ("mean", "var"):
            np.testing.assert_allclose(state["stats"]["bn"][name], own[i]["stats"]["bn"][name],
                                       atol=1e-5)


def test_fedbn_passes_check_algorithm():
    check_algorithm(fedbn(MODEL, optax.sgd(0.1, momentum=0.5), batch_size=4),
                    MODEL.init(jax.random.key(0)), make_population([3, 17, 9, 30, 5], seed=2))


def test_fedbn_needs_a_model_with_batchnorm_state():
    with pytest.raises(TypeError, match="lacks init_state"):
        fedbn(LinearModel(dim=5, classes=3), optax.sgd(0.1), batch_size=4)
