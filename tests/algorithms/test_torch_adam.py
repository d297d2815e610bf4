"""torch_adam against a float64 numpy transcription of torch.optim.Adam's documented update,
and the CLI context's client optimizers (FedML's cross-silo Adam + AMSGrad + weight decay)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import torch_adam
from fedjax_lab.registry import AlgorithmContext

# Gradients that shrink after step 2: v then decreases, so AMSGrad's max(vmax, v) matters
# (visibly with b2 = 0.9, which the comparisons below use next to PyTorch's default).
SCALES = (3.0, 2.0, 0.1, 0.05, 0.02)
B2 = 0.9


def _torch_adam_reference(p0, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8, amsgrad=False):
    """torch.optim.Adam's update (PyTorch docs' pseudo-code / FedML-era torch 1.x), float64."""
    p = np.asarray(p0, np.float64).copy()
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64) + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        denom = np.sqrt(vmax if amsgrad else v) / np.sqrt(1 - b2**t) + eps
        p = p - lr / (1 - b1**t) * m / denom
    return p


def _run(optimizer, p0, grads):
    params = {"w": jnp.asarray(p0)}
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for g in grads:
        updates, state = update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["w"])


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [(s * rng.normal(size=(3, 4))).astype(np.float32) for s in SCALES]
    return p0, grads


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_matches_pytorch_update(problem, amsgrad, wd):
    p0, grads = problem
    got = _run(torch_adam(0.01, weight_decay=wd, b2=B2, amsgrad=amsgrad), p0, grads)
    want = _torch_adam_reference(p0, grads, 0.01, wd, b2=B2, amsgrad=amsgrad)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_amsgrad_differs_from_adam_and_from_optax_amsgrad(problem):
    # The problem separates the variants, so the test above can tell them apart.
    p0, grads = problem
    ams = _torch_adam_reference(p0, grads, 0.01, 0.0, b2=B2, amsgrad=True)
    assert np.max(np.abs(ams - _torch_adam_reference(p0, grads, 0.01, 0.0, b2=B2))) > 1e-3
    # optax.amsgrad takes the max of the bias-corrected v: not PyTorch's update.
    assert np.max(np.abs(_run(optax.amsgrad(0.01, b2=B2), p0, grads) - ams)) > 1e-3


def _context(name, wd, momentum=0.0):
    return AlgorithmContext(model=None, client_lr=0.01, client_momentum=momentum, batch_size=1,
                            local_epochs=1, local_steps=None, num_clients=1,
                            clients_per_round=1, seed=0, client_optimizer_name=name,
                            client_weight_decay=wd)


def test_context_client_optimizers(problem):
    p0, grads = problem
    # FedML's cross-silo optimizer: torch.optim.Adam(lr, weight_decay=wd, amsgrad=True).
    np.testing.assert_allclose(
        _run(_context("amsgrad", 0.001).client_optimizer(), p0, grads),
        _torch_adam_reference(p0, grads, 0.01, 0.001, amsgrad=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _run(_context("adam", 0.0).client_optimizer(), p0, grads),
        _torch_adam_reference(p0, grads, 0.01, 0.0), rtol=1e-5, atol=1e-6)
    # SGD with PyTorch's weight_decay and momentum: u <- mu u + (g + wd p); p <- p - lr u.
    p, u = np.asarray(p0, np.float64), 0.0
    for g in grads:
        u = 0.9 * u + (g + 0.1 * p)
        p = p - 0.01 * u
    np.testing.assert_allclose(_run(_context("sgd", 0.1, 0.9).client_optimizer(), p0, grads), p,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="client optimizer must be one of"):
        _context("rmsprop", 0.0).client_optimizer()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"learning_rate": 0.1, "weight_decay": -1.0}, "weight_decay must be finite"),
    ({"learning_rate": 0.1, "b2": 1.0}, "b2 must be finite and in"),
    ({"learning_rate": 0.1, "eps": 0.0}, "eps must be > 0"),
])
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        torch_adam(**kwargs)


def test_weight_decay_needs_params():
    opt = torch_adam(0.1, weight_decay=0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs params"):
        opt.update(params, opt.init(params))
