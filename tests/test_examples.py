"""The authoring-kit examples: FedDyn and FedCM in <= 40 lines of public API, each against a
numpy reference and ``check_algorithm``."""

from __future__ import annotations

import ast
import pathlib

import jax
import numpy as np
import pytest

from examples.fedcm import fedcm
from examples.feddyn import feddyn
from fedjax_lab.algorithms.testing import check_algorithm
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.runner import ClientStateStore, run
from tests.algorithms._numpy_ref import (
    client_steps,
    local_sgd,
    make_builder,
    sampled_clients,
    to_np,
)
from tests.helpers import LinearModel, make_population, np_softmax_ce_grad

MODEL = LinearModel(dim=5, classes=3)
SIZES = [7, 12, 3, 9, 15, 5]
EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def numpy_feddyn(data, params, *, rounds, cpr, batch_size, lr, alpha, seed):
    """Acar et al. 2021, Algorithm 1 with local SGD, as a Python loop over clients."""
    x = to_np(params)
    h = {k: np.zeros_like(v) for k, v in x.items()}
    g = {i: {k: np.zeros_like(v) for k, v in x.items()} for i in range(data.num_clients)}
    builder = make_builder(data, batch_size=batch_size, local_epochs=1, seed=seed)
    m = data.num_clients
    for t in range(rounds):
        deltas = []
        for i in sampled_clients(data, cpr, seed, t):
            # grad of L_i - <g_i, w> + alpha/2 ||w - x||^2 = grad L_i - g_i + alpha (w - x)
            neg_g = {k: -v for k, v in g[i].items()}
            local = local_sgd(x, data, client_steps(builder, i, t), lr, prox_mu=alpha,
                              correction=neg_g)
            d = {k: local[k] - x[k] for k in x}
            g[i] = {k: g[i][k] - alpha * d[k] for k in x}
            deltas.append(d)
        h = {k: h[k] - alpha / m * sum(d[k] for d in deltas) for k in x}
        x = {k: x[k] + np.mean([d[k] for d in deltas], axis=0) - h[k] / alpha for k in x}
    return x, g


def numpy_fedcm(data, params, *, rounds, cpr, batch_size, lr, alpha, server_lr, steps, seed):
    """Xu et al. 2021, Algorithm 1 (FedCM), as a Python loop over clients and steps."""
    x = to_np(params)
    momentum = {k: np.zeros_like(v) for k, v in x.items()}
    builder = make_builder(data, batch_size=batch_size, num_steps=steps, seed=seed)
    xs, ys = data.arrays["x"].astype(np.float64), data.arrays["y"]
    for t in range(rounds):
        deltas = []
        for i in sampled_clients(data, cpr, seed, t):
            w = {k: v.copy() for k, v in x.items()}
            for idx in client_steps(builder, i, t):
                gw, gb = np_softmax_ce_grad(w["w"], w["b"], xs[idx], ys[idx])
                for k, grad in (("w", gw), ("b", gb)):
                    w[k] -= lr * (alpha * grad + (1 - alpha) * momentum[k])
            deltas.append({k: w[k] - x[k] for k in x})
        momentum = {k: -np.mean([d[k] for d in deltas], axis=0) / (lr * steps) for k in x}
        x = {k: x[k] - server_lr * momentum[k] for k in x}
    return x


def test_feddyn_matches_numpy_reference():
    data = make_population(SIZES, seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = feddyn(MODEL, 0.1, alpha=0.5, num_clients=len(SIZES), batch_size=4)
    store = ClientStateStore(alg.client_init(params))
    res = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=4, seed=7,
              client_store=store)
    ref, g = numpy_feddyn(data, params, rounds=3, cpr=4, batch_size=4, lr=0.1, alpha=0.5, seed=7)
    np.testing.assert_allclose(res.server_state.params["w"], ref["w"], atol=1e-5)
    np.testing.assert_allclose(res.server_state.params["b"], ref["b"], atol=1e-5)
    for i, state in store.states.items():
        np.testing.assert_allclose(state["w"], g[i]["w"], atol=1e-5)


def test_fedcm_matches_numpy_reference():
    data = make_population(SIZES, seed=2)
    params = MODEL.init(jax.random.key(1))
    kw = dict(lr=0.2, alpha=0.3, server_lr=0.8)
    alg = fedcm(MODEL, num_steps=3, batch_size=4, **kw)
    res = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=4, seed=5)
    ref = numpy_fedcm(data, params, rounds=3, cpr=4, batch_size=4, steps=3, seed=5, **kw)
    np.testing.assert_allclose(res.server_state.params["w"], ref["w"], atol=1e-5)
    np.testing.assert_allclose(res.server_state.params["b"], ref["b"], atol=1e-5)


@pytest.mark.parametrize("build", [
    lambda: feddyn(MODEL, 0.1, alpha=0.5, num_clients=len(SIZES), batch_size=4),
    lambda: fedcm(MODEL, 0.2, alpha=0.3, server_lr=0.8, num_steps=3, batch_size=4),
], ids=["feddyn", "fedcm"])
def test_examples_pass_check_algorithm(build):
    check_algorithm(build(), MODEL.init(jax.random.key(0)), make_population(SIZES, seed=3))


@pytest.mark.parametrize("name", ["feddyn.py", "fedcm.py"])
def test_examples_are_short_and_use_public_imports_only(name):
    source = (EXAMPLES / name).read_text()
    assert len(source.splitlines()) <= 40
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
            assert not any(part.startswith("_") for n in names for part in n.split(".")), names
