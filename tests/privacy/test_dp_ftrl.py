"""DP-FTRL with tree aggregation (Kairouz et al. 2021): numpy reference, tree-noise variance
and covariance of the released prefix sums, and the tree accountant against dp_accounting,
our RDP and the analytic Gaussian."""

import itertools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import dp_ftrl
from fedjax_lab.algorithms.dp_ftrl import tree_noise
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core.types import Aggregate
from fedjax_lab.privacy import (
    analytic_gaussian_epsilon,
    dp_ftrl_privacy,
    tree_depth,
    tree_sensitivity_squared,
)
from fedjax_lab.privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp
from fedjax_lab.runner import run
from tests.algorithms._numpy_ref import to_np
from tests.helpers import LinearModel, make_population
from tests.privacy._dp_ref import BATCH, LR, l2, round_deltas, scaled

MODEL = LinearModel(dim=5, classes=3)


def make(z=0.0, clip=0.5, cpr=5, lr=0.7, momentum=0.5, key=0):
    return dp_ftrl(MODEL, optax.sgd(LR), batch_size=BATCH, clip_norm=clip, noise_multiplier=z,
                   clients_per_round=cpr, key=jax.random.key(key), server_lr=lr,
                   momentum=momentum)


def nodes(t):
    """The binary decomposition of prefix t: node (level l, index t >> l) per set bit l."""
    return {(level, t >> level) for level in range(t.bit_length()) if (t >> level) & 1}


def test_noise_free_dp_ftrl_with_momentum_matches_numpy():
    # z = 0: theta_t = theta_0 - eta M_t, M_t = gamma M_{t-1} + sum_{tau<=t} g_tau,
    # g = -(sum of clipped deltas) / m.
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    clip, m, eta, gamma = 0.9, 5, 0.7, 0.5
    result = run(make(clip=clip, cpr=m, lr=eta, momentum=gamma), VmapBackend("vmap"), data,
                 params, rounds=3, clients_per_round=4, seed=7)
    p0 = to_np(params)
    p = dict(p0)
    gsum = {k: np.zeros_like(v) for k, v in p.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    clipped = 0
    for r in range(3):
        deltas = round_deltas(data, p, r, clients_per_round=4, seed=7)
        clipped += sum(l2(d) > clip for d in deltas)
        g = {k: -sum(scaled(d, min(1.0, clip / l2(d)))[k] for d in deltas) / m for k in p}
        gsum = {k: gsum[k] + g[k] for k in p}
        buf = {k: gamma * buf[k] + gsum[k] for k in p}
        p = {k: p0[k] - eta * buf[k] for k in p}
    np.testing.assert_allclose(result.server_state.params["w"], p["w"], atol=1e-6)
    np.testing.assert_allclose(result.server_state.params["b"], p["b"], atol=1e-6)
    assert 0 < clipped < 12
    assert [h["tree_nodes"] for h in result.history] == [1, 1, 2]  # popcount of t = 1, 2, 3


def test_released_prefix_noise_has_the_tree_variance_and_covariance():
    # 10^4 independent tree keys (jit(vmap)): the noise of prefix t is the sum of its
    # decomposition's node draws, so Var = |nodes(t)| sigma^2 and Cov(t, t') = |shared| sigma^2
    # per coordinate. Tolerance: 5 standard errors (sd of a sample covariance of two normals
    # with variances a, b and covariance c is sqrt((a b + c^2) / n)).
    n, sigma, ts = 10_000, 0.3, (1, 2, 3, 6, 7, 8, 13)
    zeros = jnp.zeros((4,), jnp.float32)

    def draws(key):
        return jnp.stack([tree_noise(key, t, zeros, sigma) for t in ts])

    x = np.asarray(jax.jit(jax.vmap(draws))(jax.random.split(jax.random.key(0), n)),
                   np.float64)  # [n, len(ts), 4]
    samples = n * x.shape[2]
    flat = x.transpose(0, 2, 1).reshape(samples, len(ts))
    cov = np.cov(flat, rowvar=False)
    for i, t in enumerate(ts):
        for j, u in enumerate(ts):
            want = len(nodes(t) & nodes(u)) * sigma**2
            a, b = len(nodes(t)) * sigma**2, len(nodes(u)) * sigma**2
            assert abs(cov[i, j] - want) <= 5 * math.sqrt((a * b + want**2) / samples), (t, u)
    assert len(nodes(7)) == 3 and len(nodes(6) & nodes(7)) == 2  # the test is not vacuous


def test_server_releases_w0_minus_lr_times_noisy_prefix():
    # A round with no client at prefix t: theta - theta_0 = -eta tree_noise(key, t) / m, through
    # server_update (momentum 0), drawn for 10^4 keys: variance popcount(t) (eta z C / m)^2.
    n, z, clip, m, eta, t = 10_000, 1.1, 0.4, 4, 0.6, 7
    params = MODEL.init(jax.random.key(0))
    zero = Aggregate(update_sum=jax.tree.map(jnp.zeros_like, params),
                     weight_sum=jnp.zeros((), jnp.float32),
                     metric_sums={k: jnp.zeros(()) for k in (
                         "train_loss_sum", "train_examples", "clients", "rejected",
                         "upload_bits", "local_steps", "clipped_clients")})

    def moved(key):
        alg = dp_ftrl(MODEL, optax.sgd(LR), batch_size=BATCH, clip_norm=clip,
                      noise_multiplier=z, clients_per_round=m, key=key, server_lr=eta)
        state = alg.init(params)._replace(round=jnp.asarray(t - 1, jnp.int32))
        new, metrics = alg.server_update(state, zero)
        want = jax.tree.map(lambda w0, e: w0 - eta * e / m, params,
                            tree_noise(key, t, params, z * clip))
        gap = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in zip(
            jax.tree.leaves(new.params), jax.tree.leaves(want), strict=True)]))
        step = jnp.concatenate([(a - b).ravel() for a, b in zip(
            jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True)])
        return step, gap, metrics["dp_noise_std"]

    steps, gaps, std = jax.jit(jax.vmap(moved))(jax.random.split(jax.random.key(1), n))
    assert float(jnp.max(gaps)) <= 1e-6
    steps = np.asarray(steps, np.float64)
    var = (eta * z * clip / m) ** 2 * 3  # popcount(7) = 3 nodes
    assert abs(steps.var() - var) <= 5 * var * math.sqrt(2.0 / steps.size)
    assert float(std[0]) == pytest.approx(math.sqrt(3) * z * clip / m)


def _brute_sensitivity(rounds, k):
    """max over participation sets of sum over released nodes of (participations in it)^2."""
    released = [(lv, j) for lv in range(tree_depth(rounds)) for j in range(1, rounds + 1)
                if j * 2**lv <= rounds]
    best = 0
    for chosen in itertools.combinations(range(1, rounds + 1), k):
        best = max(best, sum(sum((j - 1) * 2**lv < r <= j * 2**lv for r in chosen) ** 2
                             for lv, j in released))
    return best


def test_tree_sensitivity_is_the_worst_participation_pattern():
    for k in range(1, 9):  # a full tree (T = 8): the formula is reached
        assert tree_sensitivity_squared(8, k) == _brute_sensitivity(8, k)
    for rounds, k in ((6, 2), (6, 3), (11, 3), (13, 4)):  # partial trees: an upper bound
        assert _brute_sensitivity(rounds, k) <= tree_sensitivity_squared(rounds, k)
    assert tree_sensitivity_squared(100, 1) == tree_depth(100) == math.ceil(math.log2(101))


def test_tree_accountant_against_dp_accounting_rdp_and_closed_forms():
    z, rounds, delta = 2.0, 100, 1e-5
    depth = tree_depth(rounds)  # 7
    google = dp_ftrl_privacy(noise_multiplier=z, rounds=rounds, delta=delta,
                             accountant="dp_accounting")
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, rounds))
    assert google.epsilon == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    # Closed form of the RDP curve: alpha D / (2 z^2), converted on our integer orders.
    closed, _ = epsilon_from_rdp(DEFAULT_ORDERS,
                                 [a * depth / (2 * z**2) for a in DEFAULT_ORDERS], delta)
    own = dp_ftrl_privacy(noise_multiplier=z, rounds=rounds, delta=delta, accountant="rdp")
    assert own.epsilon == pytest.approx(closed, rel=1e-12)
    assert google.epsilon <= own.epsilon <= 1.01 * google.epsilon
    # The whole tree is one Gaussian mechanism with multiplier z / sqrt(D): PLD ~ exact.
    exact = analytic_gaussian_epsilon(z / math.sqrt(depth), delta)
    pld = dp_ftrl_privacy(noise_multiplier=z, rounds=rounds, delta=delta,
                          accountant="dp_accounting_pld")
    assert pld.epsilon == pytest.approx(exact, rel=2e-3)
    assert exact < google.epsilon
    # k participations: the effective multiplier z / sqrt(S^2).
    many = dp_ftrl_privacy(noise_multiplier=z, rounds=rounds, delta=delta, participations=5,
                           accountant="dp_accounting")
    effective = z / math.sqrt(tree_sensitivity_squared(100, 5))
    assert many.noise_multiplier == pytest.approx(effective)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(effective))
    assert many.epsilon == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    assert many.epsilon > google.epsilon
    assert dp_ftrl_privacy(noise_multiplier=z, rounds=0, delta=delta).epsilon == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"momentum": 1.0}, "momentum must be in"), ({"lr": 0.0}, "server_lr"),
     ({"clip": -1.0}, "clip_norm"), ({"cpr": 0}, "clients_per_round")],
    ids=["momentum", "lr", "clip", "cpr"],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)
    with pytest.raises(ValueError, match="participations must be"):
        dp_ftrl_privacy(noise_multiplier=1.0, rounds=3, delta=1e-5, participations=0)
