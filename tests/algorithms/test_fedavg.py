"""FedAvg against a numpy reference, the centralized-GD identity, padding and rejection."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import Batches
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData, sample_clients
from fedjax_lab.runner import run
from tests.helpers import LinearModel, make_population, np_softmax_ce_grad

MODEL = LinearModel(dim=5, classes=3)


def numpy_fedavg(data, params, *, rounds, clients_per_round, batch_size, lr, epochs, seed):
    """Plain Python-loop FedAvg with the same sampling and data order as the library."""
    w = np.asarray(params["w"], np.float64)
    b = np.asarray(params["b"], np.float64)
    builder = CohortBuilder(data, batch_size=batch_size, local_epochs=epochs,
                            cohort_size=clients_per_round, seed=seed, device_table=False)
    x_all, y_all = data.arrays["x"].astype(np.float64), data.arrays["y"]
    for r in range(rounds):
        clients = sample_clients(data.num_clients, clients_per_round,
                                 rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, r))
        dw_sum, db_sum, n_sum = 0.0, 0.0, 0.0
        for c in clients:
            wc, bc = w.copy(), b.copy()
            for step in builder.client_index(int(c), r):
                idx = step[step >= 0]
                if len(idx) == 0:
                    continue
                gw, gb = np_softmax_ce_grad(wc, bc, x_all[idx], y_all[idx])
                wc -= lr * gw
                bc -= lr * gb
            n = data.sizes[c]
            dw_sum, db_sum, n_sum = dw_sum + n * (wc - w), db_sum + n * (bc - b), n_sum + n
        w, b = w + dw_sum / n_sum, b + db_sum / n_sum
    return w, b


@pytest.mark.parametrize("plan", ["vmap", "unrolled", "loop"])
@pytest.mark.parametrize("device_table", [True, False], ids=["table", "host"])
def test_fedavg_matches_numpy_reference(plan, device_table):
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = fedavg(MODEL, optax.sgd(0.3), batch_size=4, local_epochs=2)
    result = run(alg, VmapBackend(plan), data, params, rounds=3, clients_per_round=4, seed=7,
                 device_table=device_table)
    w, b = numpy_fedavg(data, params, rounds=3, clients_per_round=4, batch_size=4, lr=0.3,
                        epochs=2, seed=7)
    np.testing.assert_allclose(result.server_state.params["w"], w, atol=1e-5)
    np.testing.assert_allclose(result.server_state.params["b"], b, atol=1e-5)


def test_one_full_batch_step_equals_centralized_gd():
    # Equal sizes, all clients, one full-batch GD step each: the example-weighted mean of the
    # client deltas is exactly -lr * (gradient of the global mean loss).
    data = make_population([10] * 6, seed=3)
    params = MODEL.init(jax.random.key(1))
    lr = 0.5
    alg = fedavg(MODEL, optax.sgd(lr), batch_size=10, local_epochs=1)
    result = run(alg, VmapBackend("vmap"), data, params, rounds=1, clients_per_round=6, seed=0)
    gw, gb = np_softmax_ce_grad(np.asarray(params["w"], np.float64),
                                np.asarray(params["b"], np.float64),
                                data.arrays["x"].astype(np.float64), data.arrays["y"])
    np.testing.assert_allclose(result.server_state.params["w"], params["w"] - lr * gw, atol=1e-6)
    np.testing.assert_allclose(result.server_state.params["b"], params["b"] - lr * gb, atol=1e-6)


def test_uniform_weighting_is_not_example_weighting():
    # With unequal sizes the two weightings must differ: a test that catches wrong weighting.
    data = make_population([2, 30], seed=4)
    params = MODEL.init(jax.random.key(2))
    out = {}
    for weighting in ("examples", "uniform"):
        alg = fedavg(MODEL, optax.sgd(0.5), batch_size=32, weighting=weighting)
        out[weighting] = run(alg, VmapBackend("vmap"), data, params, rounds=1,
                             clients_per_round=2, seed=0).server_state.params["w"]
    assert float(jnp.max(jnp.abs(out["examples"] - out["uniform"]))) > 1e-3


def _client_batches(x, y, index):
    mask = (index >= 0).astype(np.float32)
    safe = np.where(index >= 0, index, 0)
    return Batches({"x": jnp.asarray(x[safe]), "y": jnp.asarray(y[safe])}, jnp.asarray(mask),
                   jnp.asarray(float(len(x)), jnp.float32))


def test_padding_is_a_noop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=7).astype(np.int32)
    index = np.array([[0, 1, 2], [3, 4, 5], [6, -1, -1]])
    # Padded to more steps (S 3 -> 5) and a larger batch (B 3 -> 6); padded slots point at real
    # examples (index 0 after masking), so only the mask keeps them out.
    padded = np.full((5, 6), -1)
    padded[:3, :3] = index
    alg = fedavg(MODEL, optax.sgd(0.1, momentum=0.9), batch_size=3)
    state = alg.init(MODEL.init(jax.random.key(0)))
    update = jax.jit(lambda b: alg.client_update(state, (), b, key=jax.random.key(0)))
    a, _ = update(_client_batches(x, y, index))
    b, _ = update(_client_batches(x, y, padded))
    chex.assert_trees_all_close(a.update, b.update, atol=1e-7, rtol=0)
    chex.assert_trees_all_close(a.metrics, b.metrics, atol=1e-6, rtol=0)


def test_padded_client_slot_has_zero_weight_and_no_effect():
    data = make_population([6, 8, 5], seed=5)
    params = MODEL.init(jax.random.key(3))
    alg = fedavg(MODEL, optax.sgd(0.2), batch_size=4)
    builder = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=3, seed=0)
    padded_builder = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=5, seed=0)
    be = VmapBackend("vmap")
    key = jax.random.key(9)
    s1, _, _ = be.run_round(alg, alg.init(params), (), builder.build(0, [0, 1, 2]), key)
    s2, _, m2 = be.run_round(alg, alg.init(params), (), padded_builder.build(0, [0, 1, 2]), key)
    chex.assert_trees_all_close(s1.params, s2.params, atol=1e-7, rtol=0)
    assert float(m2["clients"]) == 3.0


def test_nonfinite_client_is_rejected_and_counted():
    good = make_population([6, 6], seed=6)
    x = good.arrays["x"].copy()
    x[good.offsets[1]] = np.nan  # client 1 has a NaN feature -> NaN delta
    bad = FederatedData(good.client_ids, {"x": x, "y": good.arrays["y"]}, good.offsets)
    only_good = good.subset([0])
    params = MODEL.init(jax.random.key(4))
    alg = fedavg(MODEL, optax.sgd(0.2), batch_size=6)
    res_bad = run(alg, VmapBackend("vmap"), bad, params, rounds=1, clients_per_round=2, seed=0)
    res_good = run(alg, VmapBackend("vmap"), only_good, params, rounds=1, clients_per_round=1,
                   seed=0)
    assert res_bad.history[0]["rejected"] == 1.0
    assert np.all(np.isfinite(res_bad.server_state.params["w"]))
    chex.assert_trees_all_close(res_bad.server_state.params, res_good.server_state.params,
                                atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 4, "local_epochs": 0}, "local_epochs must be a positive integer"),
        ({"batch_size": 4, "local_epochs": 1, "num_steps": 3}, "exactly one of"),
        ({"batch_size": 4, "weighting": "median"}, "weighting must be"),
    ],
    ids=["batch0", "epochs0", "both", "weighting"],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fedavg(MODEL, optax.sgd(0.1), **kwargs)


def test_zero_total_weight_leaves_params_unchanged():
    data = make_population([4], seed=7)
    params = MODEL.init(jax.random.key(5))
    alg = fedavg(MODEL, optax.sgd(0.2), batch_size=4)
    builder = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=2, seed=0)
    state, _, metrics = VmapBackend("vmap").run_round(
        alg, alg.init(params), (), builder.build(0, []), jax.random.key(0))
    chex.assert_trees_all_equal(state.params, params)
    assert float(metrics["clients"]) == 0.0
