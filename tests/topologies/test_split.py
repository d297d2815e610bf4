"""Split learning / SplitFed against centralized training and a Python-loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import models
from fedjax_lab.core import softmax_cross_entropy
from fedjax_lab.data import CohortBuilder, FederatedData
from fedjax_lab.topologies import (
    Layer,
    builtin_layers,
    init_state,
    split_model,
    splitfed,
    vanilla_split_learning,
)

SHAPE, CLASSES, HIDDEN, B, LR = (4, 4, 1), 3, (6, 5), 4, 0.3


@pytest.fixture(scope="module")
def split():
    return split_model(builtin_layers("mlp", SHAPE, CLASSES, hidden=HIDDEN), SHAPE, cut="dense_0")


@pytest.fixture(scope="module")
def params():
    # Random params of the mlp's structure (eval_shape: no init program to compile).
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32),
                        jax.eval_shape(models.mlp(SHAPE, CLASSES, HIDDEN).init,
                                       jax.random.key(0)))


def population(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return FederatedData.from_clients(
        {str(i): {"x": rng.normal(size=(n, *SHAPE)).astype(np.float32),
                  "y": rng.integers(0, CLASSES, n).astype(np.int32)}
         for i, n in enumerate(sizes)}, num_classes=CLASSES)


def batches(data, round_idx, seed=0):
    """The round's batches [K, S, B] (the library's cohort layout: same shuffles as trained)."""
    builder = CohortBuilder(data, batch_size=B, local_epochs=1, cohort_size=data.num_clients,
                            seed=seed, device_table=False, ladder=None)
    cohort = builder.build(round_idx, np.arange(data.num_clients))
    return cohort.arrays["x"], cohort.arrays["y"], cohort.mask


@jax.jit
def whole_grad(params, x, y, mask):
    """Gradient of the whole model's masked mean loss (the centralized reference)."""
    model = models.mlp(SHAPE, CLASSES, HIDDEN)

    def loss(p):
        per = softmax_cross_entropy(model.apply(p, x), y)
        return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return jax.grad(loss)(params)


def close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_builtin_layers_match_library_models(split, params):
    x = np.random.default_rng(1).normal(size=(5, *SHAPE)).astype(np.float32)

    @jax.jit
    def outputs(params, x):
        client, server = split.split_params(params)
        acts = split.client.apply(client, x)
        return (models.mlp(SHAPE, CLASSES, HIDDEN).apply(params, x),
                split.whole.apply(params, x), acts, split.server.apply(server, acts))

    whole, uncut, acts, composed = outputs(params, x)
    close(uncut, whole)
    close(composed, whole)
    assert acts.shape == (5, HIDDEN[0]) and split.cut_shape == (HIDDEN[0],)
    client, server = split.split_params(params)
    assert split.merge_params(client, server).keys() == params.keys()


def test_cnn_cut_matches_femnist_cnn():
    shape = (8, 8, 1)
    cnn = models.femnist_cnn(shape, 10)
    s = split_model(builtin_layers("cnn", shape, 10), shape, cut="conv_1")
    # Random params of femnist_cnn's structure (eval_shape: no conv init program to compile).
    rng = np.random.default_rng(0)
    p = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32),
                     jax.eval_shape(cnn.init, jax.random.key(0)))
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    assert s.cut_shape == (2, 2, 64) and s.cut_size == 256

    @jax.jit  # one program for both paths: conv compiles are the slow part of this test
    def both(p, x):
        client, server = s.split_params(p)
        return s.server.apply(server, s.client.apply(client, x)), cnn.apply(p, x)

    close(*both(p, x))


def test_bad_cuts_and_models_are_rejected():
    layers = builtin_layers("mlp", SHAPE, CLASSES, hidden=HIDDEN)
    with pytest.raises(ValueError, match=r"no layer has that name.*\['dense_0', 'dense_1'\]"):
        split_model(layers, SHAPE, cut="dense_7")
    with pytest.raises(ValueError, match="last layer"):
        split_model(layers, SHAPE, cut="head")
    with pytest.raises(ValueError, match="one-layer model cannot be cut"):
        split_model(builtin_layers("mlp", SHAPE, CLASSES, hidden=()), SHAPE, cut="head")
    with pytest.raises(ValueError, match="cannot be cut"):
        builtin_layers("resnet18", SHAPE, CLASSES)
    with pytest.raises(ValueError, match="unique"):
        split_model([Layer("a", "dense", 3), Layer("a", "dense", 2)], SHAPE, cut="a")
    with pytest.raises(ValueError, match="kind"):
        split_model([Layer("a", "lstm", 3), Layer("b", "dense", 2)], SHAPE, cut="a")


def test_splitfed_one_client_is_centralized_sgd(split, params):
    data = population([11])
    trainer = splitfed(split, optax.sgd(LR), data, batch_size=B, seed=5)
    state = init_state(split, params, optax.sgd(LR))
    ref = params
    for r in range(2):
        state, metrics = trainer.run_round(state, r)
        xs, ys, mask = batches(data, r, seed=5)
        for s in range(xs.shape[1]):
            g = whole_grad(ref, xs[0, s], ys[0, s], mask[0, s])
            ref = jax.tree.map(lambda p, g: p - LR * g, ref, g)
    close(split.merge_params(state.client_params, state.server_params), ref)
    assert metrics["activation_bytes"] == 11 * HIDDEN[0] * 4


def test_splitfed_matches_python_loop_reference(split, params):
    sizes = [7, 3, 9]
    data = population(sizes, seed=1)
    trainer = splitfed(split, optax.sgd(LR), data, batch_size=B, seed=2)
    state = init_state(split, params, optax.sgd(LR))
    client, server = split.split_params(params)
    for r in range(2):
        state, metrics = trainer.run_round(state, r)
        xs, ys, mask = batches(data, r, seed=2)
        clients = [client] * len(sizes)
        for s in range(xs.shape[1]):
            m = mask[:, s].sum(axis=1)
            server_grad = None
            for k in range(len(sizes)):
                if m[k] == 0:
                    continue
                g = whole_grad(split.merge_params(clients[k], server), xs[k, s], ys[k, s],
                               mask[k, s])
                gc, gs = split.split_params(g)
                clients[k] = jax.tree.map(lambda p, g: p - LR * g, clients[k], gc)
                share = float(m[k] / m.sum())
                term = jax.tree.map(lambda g, share=share: g * share, gs)
                server_grad = term if server_grad is None else jax.tree.map(
                    jnp.add, server_grad, term)
            server = jax.tree.map(lambda p, g: p - LR * g, server, server_grad)
        n = np.asarray(sizes, np.float32) / sum(sizes)
        client = jax.tree.map(lambda *c, n=n: sum(w * ci for w, ci in zip(n, c, strict=True)),
                              *clients)
    close(state.client_params, client)
    close(state.server_params, server)
    # Bytes: every real example's activations up and gradients down, 4 bytes per float; the
    # client part (dense_0: 16x6 kernel + 6 bias) uploaded and broadcast by each client.
    act = sum(sizes) * HIDDEN[0] * 4
    weights = 3 * 2 * (16 * 6 + 6) * 4
    assert metrics == pytest.approx({"train_loss": metrics["train_loss"],
                                     "activation_bytes": act, "gradient_bytes": act,
                                     "model_bytes": weights, "total_bytes": 2 * act + weights})
    assert np.isfinite(metrics["train_loss"])


def test_vanilla_split_learning_is_sequential_centralized_training(split, params):
    sizes = [6, 3, 5]
    data = population(sizes, seed=2)
    # Momentum: the client part's optimizer state must travel with its weights in the relay.
    opt = optax.sgd(LR, momentum=0.9)
    trainer = vanilla_split_learning(split, opt, data, batch_size=B, seed=4)
    state = init_state(split, params, opt)
    ref, ref_state = params, opt.init(params)
    for r in range(2):
        state, metrics = trainer.run_round(state, r)
        xs, ys, mask = batches(data, r, seed=4)
        for k in range(len(sizes)):  # relay order: client 0's batches, then client 1's, ...
            for s in range(xs.shape[1]):
                if mask[k, s].sum() == 0:
                    continue
                g = whole_grad(ref, xs[k, s], ys[k, s], mask[k, s])
                updates, ref_state = opt.update(g, ref_state, ref)
                ref = optax.apply_updates(ref, updates)
    close(split.merge_params(state.client_params, state.server_params), ref)
    act = sum(sizes) * HIDDEN[0] * 4
    relay = 3 * 2 * (16 * 6 + 6) * 4  # weights + momentum trace, one hand-off per client
    assert (metrics["activation_bytes"], metrics["gradient_bytes"], metrics["model_bytes"],
            metrics["total_bytes"]) == (act, act, relay, 2 * act + relay)
