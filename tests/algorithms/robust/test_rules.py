"""Robust rules against numpy references, their breakdown points, masking and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.algorithms.robust import clip_norm, krum, mean, median, multi_krum, trimmed_mean
from fedjax_lab.algorithms.robust.trimmed_mean import trim_count
from tests.algorithms.robust._numpy_rules import (
    np_mean,
    np_median,
    np_multi_krum,
    np_trimmed_mean,
)

HUGE = 1e6


def run_rule(rule, x, w, valid):
    # jax.jit caches on the function object, so one rule object compiles once per shape.
    est, metrics = jax.jit(rule.estimate)(jnp.asarray(x, jnp.float32),
                                          jnp.asarray(w, jnp.float32), jnp.asarray(valid))
    return np.asarray(est, np.float64), metrics


def random_case(c, d, n_valid, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(c, d))
    w = rng.uniform(1, 20, size=c)
    valid = np.zeros(c, bool)
    valid[rng.permutation(c)[:n_valid]] = True
    # Invalid slots hold garbage that would change every statistic if it leaked in.
    x[~valid] = 1e9
    x[np.flatnonzero(~valid)[:1]] = np.nan
    w[~valid] = 0.0
    return x, w, valid


CASES = [(1, 3, 1), (2, 4, 2), (5, 3, 5), (8, 6, 8), (8, 6, 5), (9, 1, 7), (6, 0, 4), (7, 5, 0)]
CASE_IDS = [f"C{c}_D{d}_n{n}" for c, d, n in CASES]


@pytest.mark.parametrize(("c", "d", "n"), CASES, ids=CASE_IDS)
def test_median_matches_numpy(c, d, n):
    x, w, valid = random_case(c, d, n, seed=c * 31 + n)
    est, _ = run_rule(median(), x, w, valid)
    np.testing.assert_allclose(est, np_median(x, valid), atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.4], ids=lambda b: f"beta{b}")
@pytest.mark.parametrize(("c", "d", "n"), CASES, ids=CASE_IDS)
def test_trimmed_mean_matches_numpy(c, d, n, beta):
    x, w, valid = random_case(c, d, n, seed=c * 17 + n)
    est, _ = run_rule(trimmed_mean(beta), x, w, valid)
    np.testing.assert_allclose(est, np_trimmed_mean(x, valid, beta), atol=1e-5)


@pytest.mark.parametrize(("f", "m"), [(0, 1), (1, 1), (2, 1), (1, 3), (0, 4)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize(("c", "d", "n"), CASES, ids=CASE_IDS)
def test_krum_matches_brute_force(c, d, n, f, m):
    x, w, valid = random_case(c, d, n, seed=c * 7 + n + 100 * f)
    est, metrics = run_rule(multi_krum(f, m), x, w, valid)
    np.testing.assert_allclose(est, np_multi_krum(x, valid, f, m), atol=1e-5)
    underfull = n > 0 and (n <= 2 * f + 2 or n < m)
    assert float(metrics["krum_underfull"]) == float(underfull)


@pytest.mark.parametrize(("c", "d", "n"), CASES, ids=CASE_IDS)
def test_mean_matches_numpy(c, d, n):
    x, w, valid = random_case(c, d, n, seed=c + n)
    est, _ = run_rule(mean(), x, w, valid)
    np.testing.assert_allclose(est, np_mean(x, w, valid), atol=1e-5)


def test_masking_compiles_once_for_any_number_of_valid_clients():
    rule = median()
    fn = jax.jit(chex.assert_max_traces(rule.estimate, n=1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    for n in range(7):
        valid = jnp.arange(6) < n
        est, _ = fn(x, jnp.ones(6), valid)
        np.testing.assert_allclose(est, np_median(np.asarray(x), np.asarray(valid)), atol=1e-6)


# ------------------------------------------------------------------------ breakdown points
def attacked(n, attackers, d=4, seed=0, colluding=True):
    """``n`` clients; the last ``attackers`` send updates of size ~1e6."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if attackers:
        bad = np.full((attackers, d), HUGE) if colluding else HUGE * (
            1 + rng.random((attackers, d)))
        x[n - attackers:] = bad
    return x, np.ones(n), np.ones(n, bool)


def within_honest_range(est, x, attackers):
    honest = x[: len(x) - attackers]
    return bool(np.all(est >= honest.min(0) - 1e-5) and np.all(est <= honest.max(0) + 1e-5))


@pytest.mark.parametrize("n", [9, 10, 11], ids=lambda n: f"n{n}")
def test_median_breakdown_point_is_one_half(n):
    rule = median()
    for a in range(n + 1):
        x, w, valid = attacked(n, a)
        est, _ = run_rule(rule, x, w, valid)
        if a < n / 2:
            assert within_honest_range(est, x, a), (n, a)
        else:
            assert np.abs(est).max() > 1e5, (n, a)


@pytest.mark.parametrize("beta", [0.1, 0.2, 0.3, 0.45], ids=lambda b: f"beta{b}")
@pytest.mark.parametrize("n", [10, 11], ids=lambda n: f"n{n}")
def test_trimmed_mean_tolerates_floor_beta_n_attackers(n, beta):
    k = trim_count(beta, n)
    rule = trimmed_mean(beta)
    for a in range(n):
        x, w, valid = attacked(n, a)
        est, _ = run_rule(rule, x, w, valid)
        if a <= k:
            assert within_honest_range(est, x, a), (n, beta, a)
        else:
            # One attacker value survives the trim: the mean is at least 1e6 / (n - 2k).
            assert np.abs(est).max() > HUGE / n, (n, beta, a)


def test_plain_mean_breaks_with_one_attacker():
    x, w, valid = attacked(10, 1)
    est, _ = run_rule(mean(), x, w, valid)
    assert np.abs(est).max() > 1e4


@pytest.mark.parametrize("colluding", [True, False], ids=["colluding", "spread"])
@pytest.mark.parametrize("f", [1, 2, 3], ids=lambda f: f"f{f}")
def test_krum_selects_an_honest_update_when_n_exceeds_2f_plus_2(f, colluding):
    n = 2 * f + 3
    rule = krum(f)
    for a in range(f + 1):
        x, w, valid = attacked(n, a, colluding=colluding, seed=f)
        est, _ = run_rule(rule, x, w, valid)
        dists = np.abs(x[: n - a] - est[None, :]).max(axis=1)
        assert dists.min() < 1e-5, (f, a)  # the output IS one of the honest updates


@pytest.mark.parametrize("f", [1, 2, 3], ids=lambda f: f"f{f}")
def test_krum_breaks_when_colluders_fill_a_neighbourhood(f):
    # Once a - 1 >= n - f - 2 identical attackers exist, an attacker's nearest neighbours are
    # all attackers (score 0) and Krum returns the attack: the assumption a <= f is violated.
    n = 2 * f + 3
    a = n - f - 1
    x, w, valid = attacked(n, a)
    est, _ = run_rule(krum(f), x, w, valid)
    assert np.abs(est).max() > 1e5


def test_multi_krum_averages_only_honest_updates_with_f_attackers():
    f, n = 2, 9
    x, w, valid = attacked(n, f)
    est, _ = run_rule(multi_krum(f, n - f), x, w, valid)
    np.testing.assert_allclose(est, x[: n - f].mean(axis=0), atol=1e-5)


def test_robust_rules_ignore_claimed_weights():
    x, w, valid = attacked(7, 2)
    w[-2:] = 1e9  # attackers claim a huge example count
    for rule in (median(), trimmed_mean(0.3), krum(2)):
        est, _ = run_rule(rule, x, w, valid)
        assert np.abs(est).max() < 10.0, rule.name


# --------------------------------------------------------------------------- norm clipping
def test_clip_norm_bounds_every_client_and_keeps_small_ones():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5))
    x[0] *= 100.0
    x[1] = 0.0
    x[2] = 1e30  # would overflow a naive sum of squares in float32
    x[3] *= 1e-3
    valid = np.array([True, True, True, True, False, True])
    x[4] *= 50.0  # invalid and large: not counted
    t = clip_norm(1.0)
    out, metrics = jax.jit(t.apply)(jnp.asarray(x, jnp.float32), jnp.asarray(valid))
    out = np.asarray(out, np.float64)
    norms_in = np.linalg.norm(x, axis=1)
    norms_out = np.linalg.norm(out, axis=1)
    assert np.all(norms_out <= 1.0 + 1e-6)
    for i in range(6):
        if norms_in[i] > 1.0:
            np.testing.assert_allclose(norms_out[i], 1.0, rtol=1e-6)
            np.testing.assert_allclose(out[i] / norms_out[i], x[i] / norms_in[i], rtol=1e-5,
                                       atol=1e-7)
        else:
            np.testing.assert_allclose(out[i], x[i], rtol=1e-6, atol=1e-12)
    assert float(metrics["clipped_clients"]) == float(
        np.sum((norms_in > 1.0) & valid))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: trimmed_mean(0.5), "beta must be a number in"),
        (lambda: trimmed_mean(-0.1), "beta must be a number in"),
        (lambda: trimmed_mean("0.1"), "beta must be a number in"),
        (lambda: krum(-1), "f must be an integer >= 0"),
        (lambda: krum(1.5), "f must be an integer >= 0"),
        (lambda: multi_krum(1, 0), "m must be an integer >= 1"),
        (lambda: clip_norm(0.0), "max_norm must be a finite number > 0"),
        (lambda: clip_norm(float("inf")), "max_norm must be a finite number > 0"),
        (lambda: clip_norm(True), "max_norm must be a finite number > 0"),
    ],
    ids=["beta_half", "beta_neg", "beta_str", "f_neg", "f_float", "m0", "clip0", "clip_inf",
         "clip_bool"],
)
def test_bad_hyperparameters_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
