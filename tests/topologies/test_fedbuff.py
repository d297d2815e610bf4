"""FedBuff: a Python-loop reference of the event loop, FedAvg as its synchronous special case,
determinism, the time model, and bad input."""

import math

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, scaffold
from fedjax_lab.backends import ProgramCache, VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import sample_clients
from fedjax_lab.runner import run
from fedjax_lab.systems import TimeModel
from fedjax_lab.topologies import (
    ClientTimes,
    constant_staleness,
    polynomial_staleness,
    run_fedbuff,
    staleness_weight,
)
from tests.helpers import LinearModel, make_population, np_softmax_ce_grad

MODEL = LinearModel(dim=5, classes=3)
SIZES = [5, 9, 3, 12, 7, 6, 10, 4, 8, 11]
BATCH, LR, SEED = 4, 0.2, 3


@pytest.fixture(scope="module")
def programs():
    return ProgramCache()  # one compiled step per (algorithm, S) for the whole module


@pytest.fixture(scope="module")
def data():
    return make_population(SIZES, dim=5, classes=3, seed=1)


@pytest.fixture(scope="module")
def params():
    return MODEL.init(jax.random.key(0))


def fixed_delays(clients, work, rng):
    """Deterministic durations with ties (clients 0 and 4 of equal work finish together)."""
    del rng
    return 1.0 + 0.5 * (np.asarray(clients) % 4) + 0.01 * np.asarray(work)


def zero_delays(clients, work, rng):
    del work, rng
    return np.zeros(len(clients))


def numpy_fedbuff(data, params, *, concurrency, k, steps, server_lr, exponent, weighting):
    """FedBuff as a plain Python loop (linear scans, no heap), float64 numpy training.

    Uses the library's sampler, batch layout and durations rule only as *inputs* (the same
    random draws); the event order, buffer, staleness, local SGD and server step are here.
    """
    w = np.asarray(params["w"], np.float64)
    b = np.asarray(params["b"], np.float64)
    builder = CohortBuilder(data, batch_size=BATCH, local_epochs=1, cohort_size=k, seed=SEED,
                            device_table=False)
    x_all, y_all = data.arrays["x"].astype(np.float64), data.arrays["y"]
    models = [(w.copy(), b.copy())]  # every version, kept (a reference need not be frugal)
    flight = []  # dicts: client, finish, seq, version, draw
    buffer, draws, seq = [], 0, 0
    history, taus = [], []

    def start(m, now):
        nonlocal draws, seq
        busy = {f["client"] for f in flight} | {f["client"] for f in buffer}
        free = [c for c in range(data.num_clients) if c not in busy]
        rng = rng_lib.host_rng(SEED, rng_lib.SAMPLING_STREAM, draws)
        picks = [free[i] for i in sample_clients(len(free), m, rng)]
        work = [np.count_nonzero(builder.client_index(c, draws) >= 0) for c in picks]
        dur = fixed_delays(np.array(picks), np.array(work), None)
        for c, d in zip(picks, dur, strict=True):
            flight.append(dict(client=c, finish=now + d, seq=seq, version=len(models) - 1,
                               draw=draws))
            seq += 1
        draws += 1

    def train(job):
        w0, b0 = models[job["version"]]
        wc, bc = w0.copy(), b0.copy()
        for rows in builder.client_index(job["client"], job["draw"]):
            rows = rows[rows >= 0]
            if len(rows):
                gw, gb = np_softmax_ce_grad(wc, bc, x_all[rows], y_all[rows])
                wc, bc = wc - LR * gw, bc - LR * gb
        n = data.sizes[job["client"]] if weighting == "examples" else 1.0
        return wc - w0, bc - b0, n

    start(concurrency, 0.0)
    while len(models) - 1 < steps:
        now = min(f["finish"] for f in flight)
        group = sorted((f for f in flight if f["finish"] == now), key=lambda f: f["seq"])
        for f in group:
            flight.remove(f)
            buffer.append(f)
            if len(buffer) == k:
                version = len(models) - 1
                sw, sb, total, tau_step = 0.0, 0.0, 0.0, []
                for job in buffer:
                    tau = version - job["version"]
                    s = (1.0 + tau) ** -exponent
                    dw, db, n = train(job)
                    sw, sb, total = sw + s * n * dw, sb + s * n * db, total + n
                    tau_step.append(tau)
                w_new = models[-1][0] + server_lr * sw / total
                b_new = models[-1][1] + server_lr * sb / total
                models.append((w_new, b_new))
                history.append(now)
                taus += tau_step
                buffer.clear()
                if len(models) - 1 == steps:
                    break
        if len(models) - 1 == steps:
            break
        start(len(group), now)
    return models[-1], history, taus


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_matches_python_loop_reference(data, params, programs, weighting):
    alg = fedavg(MODEL, optax.sgd(LR), batch_size=BATCH, local_epochs=1,
                 server_optimizer=optax.sgd(0.7), weighting=weighting)
    res = run_fedbuff(alg, data, params, concurrency=4, buffer_size=2, seed=SEED,
                      delays=fixed_delays, server_steps=7, staleness=polynomial_staleness(0.5),
                      programs=programs)
    (w, b), times, taus = numpy_fedbuff(data, params, concurrency=4, k=2, steps=7,
                                        server_lr=0.7, exponent=0.5, weighting=weighting)
    assert max(taus) >= 2  # the weights are exercised, not all 1
    np.testing.assert_allclose(res.server_state.params["w"], w, atol=1e-5)
    np.testing.assert_allclose(res.server_state.params["b"], b, atol=1e-5)
    np.testing.assert_allclose([r["sim_time"] for r in res.history], times, rtol=1e-12)
    assert res.staleness_histogram == {t: taus.count(t) for t in sorted(set(taus))}
    assert res.staleness_max == max(taus)
    assert math.isclose(res.staleness_mean, np.mean(taus))
    # Versions nobody started from are dropped: at most C + K = 6 of the run's 8.
    assert 2 <= res.max_versions_held <= 4 + 2


@pytest.mark.parametrize("compressed", [False, True], ids=["fedavg", "fedavg_qsgd"])
def test_synchronous_special_case_is_fedavg(data, params, programs, compressed):
    # K = concurrency, zero durations, constant weight, server lr 1: every step is a round of
    # the synchronous runner (same clients, batches and keys; the QSGD draws prove the keys).
    alg = fedavg(MODEL, optax.sgd(LR), batch_size=BATCH, local_epochs=1,
                 compressor=qsgd(num_levels=2) if compressed else None)
    rounds = 3
    res = run_fedbuff(alg, data, params, concurrency=4, buffer_size=4, seed=SEED,
                      delays=zero_delays, server_steps=rounds, staleness=constant_staleness(),
                      programs=programs)
    # The padded program (packing computes the same numbers, tested in tests/backends).
    sync = run(alg, VmapBackend(packing="off"), data, params, rounds=rounds, clients_per_round=4,
               seed=SEED)
    chex.assert_trees_all_close(res.server_state.params, sync.server_state.params, atol=1e-5)
    for a, s in zip(res.history, sync.history, strict=True):
        for key in ("train_loss", "update_norm", "upload_bits", "train_examples"):
            assert a[key] == pytest.approx(s[key], rel=1e-5), key
        assert a["staleness_max"] == 0.0 and a["sim_time"] == 0.0
    assert res.staleness_histogram == {0: 4 * rounds}


def test_deterministic_by_seed_and_time_budget(data, params, programs):
    alg = fedavg(MODEL, optax.sgd(LR), batch_size=BATCH, local_epochs=1,
                 server_optimizer=optax.sgd(0.7), weighting="uniform")
    tm = TimeModel(bandwidth=1000.0, shift=0.1, scale=1.0)

    def once(seed, **kw):
        times = ClientTimes(tm, data.num_clients, upload_bits=32.0 * 18, slowdown_sigma=1.0,
                            seed=seed)
        return run_fedbuff(alg, data, params, concurrency=4, buffer_size=2, seed=seed,
                           delays=times, programs=programs, **kw)

    a, b = once(SEED, server_steps=6), once(SEED, server_steps=6)
    assert a.history == b.history and a.staleness_histogram == b.staleness_histogram
    chex.assert_trees_all_equal(a.server_state.params, b.server_state.params)
    assert [r["sim_time"] for r in once(SEED + 1, server_steps=6).history] != [
        r["sim_time"] for r in a.history]
    # A budget between steps 3 and 4 stops after step 3 with the same run up to there.
    budget = 0.5 * (a.history[2]["sim_time"] + a.history[3]["sim_time"])
    c = once(SEED, time_budget=budget)
    assert c.history == a.history[:3]


def test_client_times_formula(data):
    tm = TimeModel(bandwidth=50.0, shift=0.2, scale=4.0)
    times = ClientTimes(tm, data.num_clients, upload_bits=100.0, slowdown_sigma=0.0)
    clients, work = np.array([1, 3, 5]), np.array([5.0, 12.0, 0.0])
    e = np.random.default_rng(7).standard_exponential(3)
    got = times(clients, work, np.random.default_rng(7))
    np.testing.assert_allclose(got, work * 0.2 + e * work / 4.0 + 100.0 / 50.0, rtol=1e-12)
    slow = ClientTimes(tm, data.num_clients, upload_bits=0.0, slowdown_sigma=1.5, seed=2)
    assert np.all(slow.slowdown > 0) and np.std(np.log(slow.slowdown)) > 0.5


def test_staleness_weights():
    tau = np.array([0, 1, 3, 8])
    np.testing.assert_allclose(polynomial_staleness(0.5)(tau), 1 / np.sqrt(1 + tau))
    np.testing.assert_allclose(staleness_weight("polynomial", 1.0)(tau), 1 / (1 + tau))
    np.testing.assert_allclose(staleness_weight("constant")(tau), 1.0)
    with pytest.raises(ValueError, match="staleness weighting must be one of"):
        staleness_weight("hinge")
    with pytest.raises(ValueError, match="exponent"):
        polynomial_staleness(-1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(buffer_size=5, concurrency=4), "K=5 > concurrency=4"),
        (dict(buffer_size=0), "buffer_size"),
        (dict(buffer_size=-2), "buffer_size"),
        (dict(concurrency=11, buffer_size=1), "needs >= 11 clients"),
        (dict(concurrency=8, buffer_size=4), "needs >= 11 clients"),
        (dict(concurrency=0), "concurrency"),
        (dict(server_steps=None), "give server_steps"),
        (dict(time_budget=math.nan), "time_budget"),
        (dict(eval_every=0), "eval_every"),
        (dict(delays=lambda c, w, r: np.full(len(c), np.inf)), "non-finite durations"),
        (dict(delays=lambda c, w, r: np.full(len(c), np.nan)), "non-finite durations"),
        (dict(delays=lambda c, w, r: -np.ones(len(c))), "negative durations"),
        (dict(delays=lambda c, w, r: np.ones(len(c) + 1)), "one duration per client"),
        (dict(server_steps=None, time_budget=5.0, delays=zero_delays), "never advance"),
        (dict(staleness=lambda t: -np.ones(len(t))), "staleness weights must be finite"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_refused(data, params, programs, kwargs, match):
    alg = fedavg(MODEL, optax.sgd(LR), batch_size=BATCH, local_epochs=1)
    args = dict(concurrency=4, buffer_size=2, seed=SEED, delays=fixed_delays, server_steps=2,
                programs=programs)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run_fedbuff(alg, data, params, **args)


def test_algorithms_with_extra_terms_are_refused(data, params):
    alg = scaffold(MODEL, LR, num_clients=data.num_clients, batch_size=BATCH)
    with pytest.raises(ValueError, match="extra terms"):
        run_fedbuff(alg, data, params, concurrency=4, buffer_size=2, seed=SEED,
                    delays=fixed_delays, server_steps=1)
