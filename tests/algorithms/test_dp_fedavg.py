"""DP-FedAvg: numpy reference, per-client sensitivity, noise statistics, fixed denominator."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.dp_fedavg import dp_fedavg
from fedjax_lab.algorithms.robust import client_contributions
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.core.types import Aggregate
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.privacy import dp_fedavg_privacy, privacy_callback
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
LR, BATCH = 0.5, 4


def make(z=0.0, clip=0.1, cpr=4, compressor=None, key=0, lr=LR):
    return dp_fedavg(MODEL, optax.sgd(lr), batch_size=BATCH, clip_norm=clip, noise_multiplier=z,
                     clients_per_round=cpr, key=jax.random.key(key), compressor=compressor)


def numpy_dp_fedavg(data, params, *, rounds, clients_per_round, denominator, clip, seed):
    """Noise-free DP-FedAvg in float64 numpy: clip each delta, sum, divide by q N."""
    p = to_np(params)
    builder = make_builder(data, batch_size=BATCH, local_epochs=1, seed=seed)
    for r in range(rounds):
        total = {k: np.zeros_like(v) for k, v in p.items()}
        for c in sampled_clients(data, clients_per_round, seed, r):
            q = local_sgd(p, data, client_steps(builder, c, r), LR)
            delta = {k: q[k] - p[k] for k in p}
            if not all(np.all(np.isfinite(v)) for v in delta.values()):
                continue  # rejected client: contributes nothing, denominator unchanged
            norm = np.sqrt(sum(np.sum(v**2) for v in delta.values()))
            scale = min(1.0, clip / norm)
            total = {k: total[k] + scale * delta[k] for k in p}
        p = {k: p[k] + total[k] / denominator for k in p}
    return p["w"], p["b"]


@pytest.mark.parametrize("with_nan_client", [False, True], ids=["clean", "rejected"])
def test_noise_free_dp_fedavg_matches_numpy(with_nan_client):
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    if with_nan_client:
        x = data.arrays["x"].copy()
        x[data.offsets[np.arange(6)]] = np.where(np.arange(6)[:, None] % 2 == 0, x[
            data.offsets[np.arange(6)]], np.nan)
        data = FederatedData(data.client_ids, {"x": x, "y": data.arrays["y"]}, data.offsets)
    params = MODEL.init(jax.random.key(0))
    alg = make(z=0.0, clip=0.1, cpr=5)
    result = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=4, seed=7)
    w, b = numpy_dp_fedavg(data, params, rounds=3, clients_per_round=4, denominator=5.0,
                           clip=0.1, seed=7)
    np.testing.assert_allclose(result.server_state.params["w"], w, atol=1e-6)
    np.testing.assert_allclose(result.server_state.params["b"], b, atol=1e-6)
    assert all(h["clipped_clients"] > 0 for h in result.history)
    if with_nan_client:
        assert sum(h["rejected"] for h in result.history) > 0


def _outputs(alg, compressor=None, n=6):
    data = make_population([8] * n, seed=2)
    params = MODEL.init(jax.random.key(1))
    cohort = CohortBuilder(data, batch_size=BATCH, local_epochs=1, cohort_size=n,
                           seed=0).build(0, np.arange(n))
    states = jax.tree.map(lambda x: jnp.stack([x] * n), alg.client_init(params))
    outputs, _ = VmapBackend("vmap").client_outputs(
        alg, alg.init(params), states, cohort, jax.random.split(jax.random.key(3), n))
    return outputs


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "qsgd"])
def test_each_client_changes_the_sum_by_at_most_the_clip_norm(compressed):
    # The DP sensitivity claim: removing any one client moves the (pre-noise) sum by <= S,
    # measured on what is actually summed (decoded, clipped updates).
    clip = 0.05
    comp = qsgd(num_levels=2) if compressed else None
    alg = make(clip=clip, compressor=comp, lr=5.0)
    outputs = _outputs(alg)
    raw = jax.vmap(comp.decode)(outputs.update) if compressed else outputs.update
    assert min(_norm(jax.tree.map(lambda x, i=i: x[i], raw)) for i in range(6)) > 10 * clip
    # What the aggregate sums per client: the decoded update clipped to norm S.
    summed = jax.jit(lambda o: client_contributions(alg, o))(outputs)
    for i in range(6):
        assert _norm(jax.tree.map(lambda x, i=i: x[i], summed)) <= clip * (1 + 1e-5)
    agg = jax.jit(alg.aggregate)
    full = agg(outputs).update_sum
    for i in range(6):
        without = agg(outputs._replace(weight=outputs.weight.at[i].set(0.0))).update_sum
        diff = _norm(jax.tree.map(jnp.subtract, full, without))
        assert diff <= clip * (1 + 1e-5), (i, diff)
        assert diff >= clip * (1 - 1e-5)  # the update was large, so it is clipped TO S
    assert float(agg(outputs).metric_sums["clipped_clients"]) == 6.0


def test_noise_std_matches_the_noise_multiplier():
    # 10^4 rounds of pure noise (no client), vmapped: params move by noise / (q N) with
    # per-coordinate std z S / (q N). Tolerance: 5 standard errors of the sample variance,
    # sd(s^2) = sigma^2 sqrt(2 / (n - 1)), and of the mean, sigma / sqrt(n).
    z, clip, cpr, rounds = 1.3, 0.7, 4, 10_000
    alg = make(z=z, clip=clip, cpr=cpr)
    params = MODEL.init(jax.random.key(0))
    state = alg.init(params)
    zero = Aggregate(update_sum=jax.tree.map(jnp.zeros_like, params),
                     weight_sum=jnp.zeros((), jnp.float32),
                     metric_sums={k: jnp.zeros(()) for k in (
                         "train_loss_sum", "train_examples", "clients", "rejected",
                         "upload_bits", "local_steps", "clipped_clients")})

    def moved(r):
        new, _ = alg.server_update(state._replace(round=r), zero)
        return jnp.concatenate([(a - b).ravel() for a, b in zip(
            jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True)])

    draws = np.asarray(jax.jit(jax.vmap(moved))(jnp.arange(rounds, dtype=jnp.int32)),
                       np.float64)
    sigma = z * clip / cpr
    n = draws.size
    # Variance across ROUNDS per coordinate, pooled: repeated draws would show up as ~0.
    var = np.mean(np.var(draws, axis=0, ddof=1))
    assert abs(var - sigma**2) <= 5 * sigma**2 * np.sqrt(2.0 / (n - draws.shape[1]))
    assert abs(draws.mean()) <= 5 * sigma / np.sqrt(n)
    # Coordinates are independent too: correlation of two coordinates across rounds ~ 0.
    corr = np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]
    assert abs(corr) <= 5 / np.sqrt(rounds)


def test_noise_is_drawn_from_the_key_and_round():
    params = MODEL.init(jax.random.key(0))
    data = make_population([6, 8, 5, 9], seed=3)
    common = {"rounds": 2, "clients_per_round": 3, "seed": 0}
    alg, be = make(z=1.0, key=1), VmapBackend("vmap")  # one compile for every run of alg
    a = run(alg, be, data, params, **common)
    b = run(alg, be, data, params, **common)
    c = run(make(z=1.0, key=2), be, data, params, **common)
    chex.assert_trees_all_equal(a.server_state.params, b.server_state.params)
    assert _norm(jax.tree.map(jnp.subtract, a.server_state.params, c.server_state.params)) > 0
    # Resuming from round 1 draws round 1's noise again.
    first = run(alg, be, data, params, **{**common, "rounds": 1})
    resumed = run(alg, be, data, params, rounds=1, clients_per_round=3, seed=0,
                  server_state=first.server_state, start_round=1)
    chex.assert_trees_all_close(resumed.server_state.params, a.server_state.params, atol=1e-7)


def test_round_without_clients_still_releases_noise():
    data = make_population([4], seed=4)
    params = MODEL.init(jax.random.key(5))
    cohort = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=2, seed=0).build(0, [])
    be = VmapBackend("vmap")
    noisy = make(z=1.0)
    s, _, m = be.run_round(noisy, noisy.init(params), (), cohort, jax.random.key(0))
    assert _norm(jax.tree.map(jnp.subtract, s.params, params)) > 0
    quiet = make(z=0.0)
    s, _, m = be.run_round(quiet, quiet.init(params), (), cohort, jax.random.key(0))
    chex.assert_trees_all_equal(s.params, params)
    assert float(m["dp_noise_std"]) == 0.0 and float(m["clients"]) == 0.0


def test_aggregate_is_additive_so_chunking_is_exact():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = make(z=0.5, clip=0.1)
    assert alg.additive
    whole = run(alg, VmapBackend("vmap"), data, params, rounds=2, clients_per_round=4, seed=0)
    chunked = run(alg, VmapBackend("vmap", chunk_size=2), data, params, rounds=2,
                  clients_per_round=4, seed=0)
    chex.assert_trees_all_close(whole.server_state.params, chunked.server_state.params,
                                atol=1e-6)
    assert whole.history[0]["noise_multiplier"] == pytest.approx(0.5)
    assert whole.history[0]["dp_noise_std"] == pytest.approx(0.5 * 0.1 / 4)


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ({"clip_norm": 0.0}, ValueError, "clip_norm must be a finite number > 0"),
        ({"clip_norm": float("nan")}, ValueError, "clip_norm must be a finite number > 0"),
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier must be a finite number >= 0"),
        ({"clients_per_round": 0}, ValueError, "clients_per_round must be a positive integer"),
        ({"key": 0}, TypeError, "key must be a scalar typed PRNG key"),
        ({"key": jax.random.PRNGKey(0)}, TypeError, "key must be a scalar typed PRNG key"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
    ],
    ids=["clip0", "clip_nan", "z_neg", "cpr0", "key_int", "key_raw", "batch0"],
)
def test_bad_arguments_raise(override, error, match):
    kwargs = {"batch_size": 4, "clip_norm": 1.0, "noise_multiplier": 1.0,
              "clients_per_round": 3, "key": jax.random.key(0), **override}
    with pytest.raises(error, match=match):
        dp_fedavg(MODEL, optax.sgd(0.1), **kwargs)


def test_privacy_callback_reports_the_budget_spent_each_round():
    data = make_population([6, 8, 5, 9, 7, 4], seed=3)
    params = MODEL.init(jax.random.key(0))
    callback = privacy_callback(noise_multiplier=1.0, clients_per_round=3, num_clients=6,
                                delta=1e-3)
    result = run(make(z=1.0, cpr=3), VmapBackend("vmap"), data, params, rounds=3,
                 clients_per_round=3, seed=0, callbacks=[callback])
    eps = [h["dp_epsilon"] for h in result.history]
    assert eps[0] < eps[1] < eps[2]
    want = dp_fedavg_privacy(noise_multiplier=1.0, clients_per_round=3, num_clients=6,
                             rounds=3, delta=1e-3)
    assert eps[2] == want.epsilon and result.history[2]["dp_delta"] == 1e-3
    assert result.history[0]["noise_multiplier"] == 1.0
    with pytest.raises(ValueError, match="sampling rate would exceed 1"):
        privacy_callback(noise_multiplier=1.0, clients_per_round=7, num_clients=6, delta=1e-3)
