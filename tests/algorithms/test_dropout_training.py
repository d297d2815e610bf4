"""Local training with dropout: keyed local steps, padded == packed, a numpy reference.

A client's ``i``-th real local step draws its dropout masks from
``local_step_key(local_steps_key(client_key), i)`` (``fedjax_lab.core.rng``); the tests rebuild
the masks from that derivation, never from golden draws.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import kit
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.testing import check_algorithm
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import Batches
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import sample_clients
from fedjax_lab.models.dropout import dropout
from fedjax_lab.runner import ClientStateStore, run
from tests.helpers import make_population

RATE = 0.5
SIZES = [1, 40, 3, 17, 9, 25]


class DropoutMLP(NamedTuple):
    """``relu(x W1 + b1)`` with dropout, then ``W2 + b2``: the smallest model with dropout."""

    dim: int = 5
    hidden: int = 8
    classes: int = 3

    def init(self, key):
        k1, k2 = jax.random.split(key)
        return {"w1": 0.5 * jax.random.normal(k1, (self.dim, self.hidden)),
                "b1": jnp.full(self.hidden, 0.1, jnp.float32),
                "w2": 0.5 * jax.random.normal(k2, (self.hidden, self.classes)),
                "b2": jnp.zeros(self.classes)}

    @staticmethod
    def _forward(params, x, key):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"][None, :])
        if key is not None:
            h = dropout(h, RATE, key)
        return h @ params["w2"] + params["b2"][None, :]

    def apply(self, params, x):
        return self._forward(params, x, None)

    def apply_train(self, params, x, *, key):
        return self._forward(params, x, key)


MODEL = DropoutMLP()


def _fedavg(**kw):
    return fedavg(MODEL, optax.sgd(0.3), batch_size=4, **kw)


def _run(alg, backend, *, rounds=2, cpr=4):
    params = MODEL.init(jax.random.key(0))
    store = ClientStateStore(alg.client_init(params))
    result = run(alg, backend, make_population(SIZES, seed=1), params, rounds=rounds,
                 clients_per_round=cpr, seed=2, client_store=store)
    return result


def _assert_same(ref, got):
    chex.assert_trees_all_close(got.server_state, ref.server_state, rtol=1e-5, atol=1e-5)
    for a, b in zip(ref.history, got.history, strict=True):
        for k in set(a) - {"round_seconds", "computed_steps", "packed_slots"}:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k


def test_packed_equals_padded_with_dropout():
    # Clients of 1 to 40 examples, 2 epochs, 2 slots, segments that cut clients.
    alg = _fedavg(local_epochs=2)
    padded = _run(alg, VmapBackend("vmap", packing="off"))
    packed = _run(alg, VmapBackend("vmap", packing=PackingPolicy(slots=2, segment_steps=3)))
    assert all(h["packed_slots"] == 2 for h in packed.history)
    _assert_same(padded, packed)


def _mask(steps_key, step, batch, hidden):
    """The dropout keep mask of one local step, rebuilt from the documented derivation."""
    key = rng_lib.local_step_key(steps_key, step)
    return np.stack([np.asarray(jax.random.bernoulli(jax.random.fold_in(key, j), 1 - RATE,
                                                     (hidden,)))
                     for j in range(batch)]).astype(np.float64)


def _np_grads(p, x, y, keep):
    """Gradient of the mean softmax CE of the dropout MLP with keep mask ``keep`` (float64)."""
    pre = x @ p["w1"] + p["b1"]
    h = np.maximum(pre, 0.0)
    d = h * keep / (1 - RATE)
    logits = d @ p["w2"] + p["b2"]
    logits = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    prob[np.arange(len(y)), y] -= 1.0
    g_logits = prob / len(y)
    g_d = g_logits @ p["w2"].T
    g_pre = g_d * keep / (1 - RATE) * (pre > 0)
    return {"w2": d.T @ g_logits, "b2": g_logits.sum(0), "w1": x.T @ g_pre, "b1": g_pre.sum(0)}


def test_fedavg_with_dropout_matches_a_numpy_reference():
    data = make_population(SIZES, seed=1)
    params = MODEL.init(jax.random.key(0))
    seed, cpr, batch, lr, rounds = 2, 4, 4, 0.3, 2
    result = run(_fedavg(), VmapBackend("vmap", packing="off"), data, params, rounds=rounds,
                 clients_per_round=cpr, seed=seed)
    builder = CohortBuilder(data, batch_size=batch, local_epochs=1, cohort_size=cpr, seed=seed,
                            device_table=False)
    x_all, y_all = data.arrays["x"].astype(np.float64), data.arrays["y"]
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    root = jax.random.key(seed)
    for r in range(rounds):
        clients = sample_clients(data.num_clients, cpr,
                                 rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, r))
        keys = rng_lib.client_keys(rng_lib.round_key(root, r), cpr)
        total, n_sum = {k: 0.0 for k in w}, 0.0
        for slot, c in enumerate(clients):
            steps_key = rng_lib.local_steps_key(keys[slot])
            wc = {k: v.copy() for k, v in w.items()}
            real = [s[s >= 0] for s in builder.client_index(int(c), r)]
            for i, idx in enumerate(s for s in real if len(s)):
                # Example j of the batch is at batch position j (real examples come first).
                keep = _mask(steps_key, i, len(idx), MODEL.hidden)
                g = _np_grads(wc, x_all[idx], y_all[idx], keep)
                wc = {k: wc[k] - lr * g[k] for k in wc}
            n = data.sizes[c]
            total = {k: total[k] + n * (wc[k] - w[k]) for k in w}
            n_sum += n
        w = {k: w[k] + total[k] / n_sum for k in w}
    got = {k: np.asarray(v) for k, v in result.server_state.params.items()}
    for k in w:
        np.testing.assert_allclose(got[k], w[k], rtol=1e-4, atol=1e-5, err_msg=k)


def _one_step(local, key, num_steps):
    """Params after one local step of a client with key ``key`` that took ``num_steps``."""
    params = MODEL.init(jax.random.key(0))
    alg = _fedavg()
    state = alg.init(params)
    carry = local.start(state)._replace(num_steps=jnp.float32(num_steps))
    ctx = local.client_context(state, alg.client_init(params), key)
    arrays = {"x": jnp.ones((4, MODEL.dim)), "y": jnp.zeros(4, jnp.int32)}
    return local.step(state, ctx, carry, arrays, jnp.ones(4)).params


def test_different_clients_and_steps_draw_different_masks_and_masked_steps_do_nothing():
    local = _fedavg().client_update
    assert local.keyed
    a, b = jax.random.key(10), jax.random.key(11)
    base = _one_step(local, a, 0)
    chex.assert_trees_all_equal(_one_step(local, a, 0), base)  # same client, same step
    for other in (_one_step(local, b, 0), _one_step(local, a, 1)):
        assert any(not np.allclose(x, y) for x, y in zip(
            jax.tree.leaves(other), jax.tree.leaves(base), strict=True))
    # A fully masked step is an exact no-op.
    alg = _fedavg()
    params = MODEL.init(jax.random.key(0))
    state = alg.init(params)
    carry = local.start(state)
    ctx = local.client_context(state, alg.client_init(params), a)
    arrays = {"x": jnp.ones((4, MODEL.dim)), "y": jnp.zeros(4, jnp.int32)}
    chex.assert_trees_all_equal(local.step(state, ctx, carry, arrays, jnp.zeros(4)), carry)


def test_two_clients_with_the_same_data_train_differently():
    alg = _fedavg()
    params = MODEL.init(jax.random.key(0))
    state = alg.init(params)
    x = jax.random.normal(jax.random.key(1), (2, 4, MODEL.dim))
    batches = Batches({"x": x, "y": jnp.zeros((2, 4), jnp.int32)}, jnp.ones((2, 4)),
                      jnp.float32(8))
    update = jax.jit(alg.client_update)
    outs = [update(state, (), batches, key=jax.random.key(k))[0].update for k in (0, 1, 0)]
    chex.assert_trees_all_equal(outs[0], outs[2])
    assert not np.allclose(np.asarray(outs[0]["w1"]), np.asarray(outs[1]["w1"]))


def test_deterministic_models_are_unchanged():
    objective = kit.model_objective(MODEL._replace())
    assert isinstance(objective, kit.KeyedObjective)
    plain = kit.model_objective(MODEL.apply)
    assert not isinstance(plain, kit.KeyedObjective)
    assert not fedavg(MODEL.apply, optax.sgd(0.1), batch_size=4).client_update.keyed


@pytest.mark.slow
def test_check_algorithm_passes_for_fedavg_with_dropout():
    data = make_population([3, 9, 5, 12, 7, 4, 6, 10], seed=3)
    check_algorithm(_fedavg(), MODEL.init(jax.random.key(0)), data)
