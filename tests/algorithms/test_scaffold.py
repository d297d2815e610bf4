"""SCAFFOLD (Karimireddy et al. 2020): numpy reference with persistent c_i, drift correction."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import ScaffoldClientState, fedavg, scaffold
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.runner import ClientStateStore, run
from fedjax_lab.systems import Availability
from tests.algorithms._numpy_ref import (
    client_steps,
    global_loss,
    local_sgd,
    make_builder,
    sampled_clients,
    to_np,
)
from tests.helpers import LinearModel, make_population, np_softmax_ce_grad

MODEL = LinearModel(dim=5, classes=3)


def numpy_scaffold(data, params, *, rounds, cpr, batch_size, epochs, lr, server_lr, seed,
                   weighting):
    """Algorithm 1 of Karimireddy et al. (2020), option II, as a Python loop."""
    x = to_np(params)
    c = {k: np.zeros_like(v) for k, v in x.items()}
    controls = {}
    builder = make_builder(data, batch_size=batch_size, local_epochs=epochs, seed=seed)
    for k in range(rounds):
        dy = {key: np.zeros_like(v) for key, v in x.items()}
        dc = {key: np.zeros_like(v) for key, v in x.items()}
        w_sum = 0.0
        for i in sampled_clients(data, cpr, seed, k):
            ci = controls.get(int(i), {key: np.zeros_like(v) for key, v in x.items()})
            steps = client_steps(builder, i, k)
            y = local_sgd(x, data, steps, lr, correction={key: c[key] - ci[key] for key in x})
            ci_new = {key: ci[key] - c[key] + (x[key] - y[key]) / (len(steps) * lr) for key in x}
            w = float(data.sizes[i]) if weighting == "examples" else 1.0
            for key in x:
                dy[key] += w * (y[key] - x[key])
                dc[key] += ci_new[key] - ci[key]
            w_sum += w
            controls[int(i)] = ci_new
        x = {key: x[key] + server_lr * dy[key] / w_sum for key in x}
        c = {key: c[key] + dc[key] / data.num_clients for key in x}
    return x, c, controls


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_scaffold_matches_numpy_reference(weighting):
    # Partial participation (4 of 6) over 4 rounds: clients come back with stale c_i, and
    # heterogeneous sizes give different K_i.
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = scaffold(MODEL, 0.2, num_clients=6, batch_size=4, local_epochs=2, server_lr=0.8,
                   weighting=weighting)
    store = ClientStateStore(alg.client_init(params))
    res = run(alg, VmapBackend("vmap"), data, params, rounds=4, clients_per_round=4, seed=7,
              client_store=store)
    x, c, controls = numpy_scaffold(data, params, rounds=4, cpr=4, batch_size=4, epochs=2,
                                    lr=0.2, server_lr=0.8, seed=7, weighting=weighting)
    for key in ("w", "b"):
        np.testing.assert_allclose(res.server_state.params[key], x[key], atol=1e-5)
        np.testing.assert_allclose(res.server_state.extra[key], c[key], atol=1e-5)
    assert sorted(store.states) == sorted(controls)
    for i, ci in controls.items():
        assert isinstance(store.states[i], ScaffoldClientState)
        for key in ("w", "b"):
            np.testing.assert_allclose(store.states[i].control[key], ci[key], atol=1e-5)


def _optimum(data, params):
    w, b = to_np(params)["w"], to_np(params)["b"]
    x, y = data.arrays["x"].astype(np.float64), data.arrays["y"]
    for _ in range(20000):
        gw, gb = np_softmax_ce_grad(w, b, x, y)
        w, b = w - 0.5 * gw, b - 0.5 * gb
    assert max(np.abs(gw).max(), np.abs(gb).max()) < 1e-9  # really the optimum
    return global_loss({"w": w, "b": b}, data)


def test_scaffold_converges_where_fedavg_drifts():
    # 8 clients labelled by 8 different linear maps, 50 full-batch local steps per round, all
    # clients every round. FedAvg's fixed point is not the global optimum (client drift);
    # SCAFFOLD's corrected local steps make the optimum its fixed point.
    data = make_population([20] * 8, seed=0)
    params = MODEL.init(jax.random.key(0))
    best = _optimum(data, params)
    kw = {"rounds": 40, "clients_per_round": 8, "seed": 0}
    avg = fedavg(MODEL, optax.sgd(0.1), batch_size=20, local_epochs=None, num_steps=50,
                 weighting="uniform")
    sca = scaffold(MODEL, 0.1, num_clients=8, batch_size=20, local_epochs=None, num_steps=50)
    gap_avg = global_loss(run(avg, VmapBackend("vmap"), data, params, **kw)
                          .server_state.params, data) - best
    gap_sca = global_loss(run(sca, VmapBackend("vmap"), data, params, **kw)
                          .server_state.params, data) - best
    # Measured: FedAvg 1.0e-2 above the optimum, SCAFFOLD 3e-14 (float32 parameters).
    assert gap_avg > 5e-3
    assert gap_sca < 1e-5
    assert gap_sca < gap_avg / 500


def test_dropped_clients_keep_their_control_and_add_nothing():
    data = make_population([6, 8, 5, 7], seed=3)
    params = MODEL.init(jax.random.key(2))
    alg = scaffold(MODEL, 0.2, num_clients=4, batch_size=4)
    avail = Availability(dropout=0.5)
    store = ClientStateStore(alg.client_init(params))
    res = run(alg, VmapBackend("vmap"), data, params, rounds=1, clients_per_round=4, seed=1,
              availability=avail, client_store=store)
    dropped, _, _ = avail.draw(np.full(4, 2), np.ones(4, bool), seed=1, round_idx=0)
    assert 0 < dropped.sum() < 4, "pick a seed where some but not all clients drop"
    assert res.history[0]["dropped"] == float(dropped.sum())
    for i in range(4):
        ci = store.states[i].control["w"]
        assert (np.abs(ci).max() == 0.0) == bool(dropped[i])
    # The same round with only the present clients gives the same x and c (with c divided by
    # the same population size N = 4).
    kept = [i for i in range(4) if not dropped[i]]
    solo = VmapBackend("vmap").run_round(
        alg, alg.init(params),
        ClientStateStore(alg.client_init(params)).gather(kept),
        make_builder(data, batch_size=4, seed=1, cohort_size=len(kept)).build(0, kept),
        jax.random.key(0))[0]
    chex.assert_trees_all_close(res.server_state.params, solo.params, atol=1e-6)
    chex.assert_trees_all_close(res.server_state.extra, solo.extra, atol=1e-6)


def test_aggregate_is_additive_across_chunks_and_compressor_state_is_kept():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = scaffold(MODEL, 0.2, num_clients=6, batch_size=4, compressor=qsgd(num_levels=4))
    kw = {"rounds": 2, "clients_per_round": 4, "seed": 7}
    whole = run(alg, VmapBackend("vmap"), data, params, **kw)
    chunked = run(alg, VmapBackend("vmap", chunk_size=2), data, params, **kw)
    chex.assert_trees_all_close(whole.server_state, chunked.server_state, atol=1e-6)
    # Δy is quantized (fewer than 32 bits/coordinate), Δc is sent dense: 32 * 18 per client.
    d = 5 * 3 + 3
    assert 4 * 32 * d < whole.history[0]["upload_bits"] < 4 * 2 * 32 * d


def test_no_client_leaves_server_state_unchanged():
    data = make_population([4], seed=7)
    params = MODEL.init(jax.random.key(5))
    alg = scaffold(MODEL, 0.2, num_clients=1, batch_size=4)
    cohort = make_builder(data, batch_size=4, seed=0, cohort_size=2).build(0, [])
    state, states, metrics = VmapBackend("vmap").run_round(
        alg, alg.init(params), ClientStateStore(alg.client_init(params)).gather([-1, -1]),
        cohort, jax.random.key(0))
    chex.assert_trees_all_equal(state.params, params)
    chex.assert_trees_all_equal(state.extra, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(states.control, jax.tree.map(
        lambda p: jnp.zeros((2, *p.shape)), params))
    assert float(metrics["clients"]) == 0.0


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0.0,), {"num_clients": 4}, ValueError, "client_lr must be a finite float > 0"),
        ((0.1,), {"num_clients": 4, "server_lr": -1.0}, ValueError, "server_lr must be"),
        ((0.1,), {"num_clients": 0}, ValueError, "num_clients must be the population size"),
        ((0.1,), {"num_clients": 4.0}, ValueError, "num_clients must be the population size"),
        (("0.1",), {"num_clients": 4}, TypeError, "client_lr must be a float"),
        ((0.1,), {"num_clients": 4, "weighting": "median"}, ValueError, "weighting must be"),
    ],
    ids=["lr0", "server-lr", "n0", "n-float", "lr-str", "weighting"],
)
def test_bad_arguments_raise(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        scaffold(MODEL, *args, batch_size=4, **kwargs)


def test_nonfinite_client_is_rejected_and_keeps_its_control():
    good = make_population([6, 6], seed=6)
    x = good.arrays["x"].copy()
    x[good.offsets[1]] = np.nan  # client 1 has a NaN feature -> NaN Δy and Δc
    bad = FederatedData(good.client_ids, {"x": x, "y": good.arrays["y"]}, good.offsets)
    params = MODEL.init(jax.random.key(4))
    alg = scaffold(MODEL, 0.2, num_clients=2, batch_size=6)
    store = ClientStateStore(alg.client_init(params))
    res = run(alg, VmapBackend("vmap"), bad, params, rounds=2, clients_per_round=2, seed=0,
              client_store=store)
    assert [h["rejected"] for h in res.history] == [1.0, 1.0]
    assert np.all(np.isfinite(res.server_state.params["w"]))
    assert np.all(np.isfinite(res.server_state.extra["w"]))
    chex.assert_trees_all_equal(store.states[1].control, jax.tree.map(jnp.zeros_like, params))
    assert float(np.abs(store.states[0].control["w"]).max()) > 0
