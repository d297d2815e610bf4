"""FedPAQ §5 time model: exact communication time, computation-time distribution, run fields."""

import math

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, fedpaq
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.runner import run
from fedjax_lab.systems import Availability, TimeModel, bandwidth_for_ratio, cohort_work
from tests.algorithms._numpy_ref import sampled_clients
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
K_SE = 5.0
SAMPLES = 20_000


def _comp_samples(tm, work):
    return np.array([tm.comp_time(work, seed=1, round_idx=r) for r in range(SAMPLES)])


def test_mean_of_max_matches_theory_for_equal_work():
    # r clients doing tau*B = 50 examples each, plus padded slots: the max of r i.i.d.
    # shifted exponentials has mean w*shift + (w/scale) H_r and variance (w/scale)^2 Σ 1/k^2.
    tm = TimeModel(bandwidth=1.0, shift=0.3, scale=2.0)
    r, w = 25, 5 * 10
    work = np.concatenate([np.full(r, float(w)), np.zeros(7)])
    samples = _comp_samples(tm, work)
    m = w / tm.scale
    mean = w * tm.shift + m * sum(1.0 / k for k in range(1, r + 1))
    var = m**2 * sum(1.0 / k**2 for k in range(1, r + 1))
    assert abs(samples.mean() - mean) < K_SE * math.sqrt(var / SAMPLES)
    # The whole distribution: P(max <= t) = (1 - exp(-(t - w shift)/m))^r at a few quantiles.
    for q in (0.1, 0.5, 0.9):
        t = w * tm.shift - m * math.log(1.0 - q ** (1.0 / r))
        assert abs(np.mean(samples <= t) - q) < K_SE * math.sqrt(q * (1 - q) / SAMPLES)
    assert samples.min() >= w * tm.shift


def test_mean_of_max_matches_theory_for_unequal_work():
    # Stragglers / epochs give different work per client: E[max] = ∫ (1 - Π_i F_i(t)) dt.
    tm = TimeModel(bandwidth=1.0, shift=1.0, scale=0.5)
    work = np.array([10.0, 25.0, 40.0, 0.0, 5.0])
    shifts, means = work * tm.shift, work / tm.scale
    t = np.linspace(0.0, 40.0 + 40 * means.max(), 400_001)
    cdf = np.ones_like(t)
    for s, m in zip(shifts, means, strict=True):
        if m > 0:
            cdf *= np.where(t >= s, 1.0 - np.exp(-(t - s) / m), 0.0)
    dt = t[1] - t[0]
    mean = np.sum(1.0 - cdf) * dt
    second = np.sum(2.0 * t * (1.0 - cdf)) * dt
    var = second - mean**2
    samples = _comp_samples(tm, work)
    assert abs(samples.mean() - mean) < K_SE * math.sqrt(var / SAMPLES)


def test_bandwidth_for_ratio_gives_the_ratio():
    p, shift, scale = 130, 0.5, 4.0
    bw = bandwidth_for_ratio(100, p, shift=shift, scale=scale)
    assert math.isclose((p * 32 / bw) / (shift + 1 / scale), 100.0, rel_tol=1e-12)
    tm = TimeModel.from_ratio(1000, p, shift=shift, scale=scale)
    assert math.isclose((p * 32 / tm.bandwidth) / (shift + 1 / scale), 1000.0, rel_tol=1e-12)


def test_cohort_work_counts_processed_examples():
    data = make_population([3, 20, 12], seed=0)
    builder = CohortBuilder(data, batch_size=10, num_steps=5, local_epochs=None, cohort_size=4,
                            seed=0)
    work = cohort_work(builder.build(0, [0, 1, 2]))
    # tau * min(B, n_i): the 3-example client uses all 3 examples per step.
    np.testing.assert_array_equal(work, [5 * 3, 5 * 10, 5 * 10, 0])


def test_no_participant_costs_no_time():
    tm = TimeModel(bandwidth=10.0)
    assert tm.comp_time(np.zeros(4), seed=0, round_idx=0) == 0.0
    assert tm.comp_time(np.zeros(0), seed=0, round_idx=0) == 0.0
    assert tm.comm_time(0.0) == 0.0


def test_run_reports_exact_comm_time_cumulative_bits_and_wall_time():
    data = make_population([8, 12, 6, 9, 10], seed=1)
    params = MODEL.init(jax.random.key(0))
    tm = TimeModel.from_ratio(100, 18, shift=1.0, scale=1.0)
    alg = fedpaq(MODEL, optax.sgd(0.1), num_steps=3, batch_size=4,
                 compressor=qsgd(num_levels=1))
    res = run(alg, VmapBackend("vmap"), data, params, rounds=6, clients_per_round=3, seed=2,
              time_model=tm, availability=Availability(dropout=0.3))
    h = res.history
    bits = np.array([r["upload_bits"] for r in h])
    np.testing.assert_array_equal([r["cum_uplink_bits"] for r in h], np.cumsum(bits))
    comm = np.array([r["sim_comm_time"] for r in h])
    np.testing.assert_allclose(np.diff(comm, prepend=0.0), bits / tm.bandwidth, rtol=1e-12)
    comp = np.array([r["sim_comp_time"] for r in h])
    np.testing.assert_allclose([r["sim_time"] for r in h], comm + comp, rtol=1e-12)
    # Each round's computation time is the seeded draw over the clients that trained.
    builder = CohortBuilder(data, batch_size=4, num_steps=3, local_epochs=None,
                            cohort_size=3, seed=2)
    for r in range(6):
        cohort, _ = Availability(dropout=0.3).apply(
            builder.build(r, sampled_clients(data, 3, 2, r)), seed=2, round_idx=r)
        expect = tm.comp_time(cohort_work(cohort), seed=2, round_idx=r)
        assert math.isclose(comp[r] - (comp[r - 1] if r else 0.0), expect, rel_tol=1e-9)
    walls = [r["wall_time"] for r in h]
    assert np.all(np.diff(walls) >= 0) and walls[0] > 0
    assert sum(r["dropped"] for r in h) > 0  # the dropout path was exercised


def test_run_without_time_model_reports_bits_and_stays_deterministic():
    data = make_population([5, 6], seed=0)
    res = run(fedavg(MODEL, optax.sgd(0.1), batch_size=4), VmapBackend("vmap"), data,
              MODEL.init(jax.random.key(0)), rounds=2, clients_per_round=2, seed=0)
    assert res.history[1]["cum_uplink_bits"] == 2 * 2 * 32 * 18
    assert "sim_time" not in res.history[1] and "wall_time" not in res.history[1]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: TimeModel(bandwidth=0.0), ValueError, "bandwidth must be a finite float > 0"),
        (lambda: TimeModel(bandwidth=1.0, shift=-1.0), ValueError, "shift must be"),
        (lambda: TimeModel(bandwidth=1.0, scale=math.inf), ValueError, "scale must be"),
        (lambda: TimeModel(bandwidth="fast"), TypeError, "bandwidth must be a positive float"),
        (lambda: bandwidth_for_ratio(math.nan, 10, shift=1.0, scale=1.0), ValueError,
         "ratio must be"),
        (lambda: bandwidth_for_ratio(100, 0, shift=1.0, scale=1.0), ValueError,
         "num_params must be >= 1"),
        (lambda: TimeModel(bandwidth=1.0).comp_time(np.array([1.0, -2.0]), seed=0, round_idx=0),
         ValueError, "work must be a 1-D array of finite counts"),
        (lambda: TimeModel(bandwidth=1.0).comp_time(np.array([np.nan]), seed=0, round_idx=0),
         ValueError, "work must be"),
        (lambda: TimeModel(bandwidth=1.0).comm_time(-1.0), ValueError, "upload_bits must be"),
    ],
    ids=["bw0", "shift<0", "scale-inf", "bw-str", "ratio-nan", "p0", "work<0", "work-nan",
         "bits<0"],
)
def test_bad_arguments_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_runner_rejects_a_non_time_model():
    data = make_population([5, 6], seed=0)
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=4)
    with pytest.raises(TypeError, match="time_model must be a fedjax_lab"):
        run(alg, VmapBackend("vmap"), data, MODEL.init(jax.random.key(0)), rounds=1,
            clients_per_round=1, seed=0, time_model=100.0)
