"""Bulyan, geometric median (RFA) and centered clipping: numpy references, masking of invalid
rows, breakdown points and bad hyperparameters."""

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import (
    bulyan,
    centered_clipping,
    geometric_median,
    with_aggregator,
)
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.runner import run
from tests.algorithms.robust._numpy_rules import (
    np_bulyan,
    np_centered_clipping,
    np_geometric_median,
)
from tests.algorithms.robust.test_rules import (
    attacked,
    random_case,
    run_rule,
    within_honest_range,
)
from tests.algorithms.robust.test_with_aggregator import LR, numpy_robust_fedavg
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)

# Rule objects built once: jax.jit caches on the function object, so each compiles once per
# shape across the tests below.
BULYAN = {f: bulyan(f) for f in (0, 1, 2)}
GEOMED = geometric_median(iterations=4, nu=1e-6, tol=1e-5)
# Weiszfeld converges linearly (rate ~ a / (n - a) with a far attackers): enough steps to reach
# the median itself in the breakdown tests.
GEOMED_LONG = geometric_median(iterations=300)
CCLIP = centered_clipping(0.7, iterations=3)
C = 11  # every case is padded to 11 slots: one compilation per rule object


def run_padded(rule, x, w, valid):
    """``run_rule`` on the rows padded to ``C`` slots with invalid NaN rows."""
    pad = C - len(x)
    x = np.concatenate([x, np.full((pad, x.shape[1]), np.nan)])
    return run_rule(rule, x, np.concatenate([w, np.zeros(pad)]),
                    np.concatenate([valid, np.zeros(pad, bool)]))


# ----------------------------------------------------------------------- numpy references
# Bulyan compiles slowly (a fori_loop of Krum selections), so its cases share one [11, 4] shape
# and vary the number of valid slots: under- and over-full for every f.
@pytest.mark.parametrize("n", [0, 1, 2, 4, 5, 7, 8, 10, 11], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("f", [0, 1, 2], ids=lambda f: f"f{f}")
def test_bulyan_matches_numpy(f, n):
    x, w, valid = random_case(C, 4, n, seed=13 * n + 100 * f)
    est, metrics = run_rule(BULYAN[f], x, w, valid)
    np.testing.assert_allclose(est, np_bulyan(x, valid, f), atol=1e-5)
    assert float(metrics["bulyan_underfull"]) == float(0 < n < 4 * f + 3)


NS = [0, 1, 2, 5, 8, 11]


@pytest.mark.parametrize("n", NS, ids=lambda n: f"n{n}")
def test_geometric_median_matches_numpy(n):
    x, w, valid = random_case(C, 4, n, seed=5 + n)
    est, metrics = run_rule(GEOMED, x, w, valid)
    ref, last = np_geometric_median(x, w, valid, iterations=4, nu=1e-6)
    np.testing.assert_allclose(est, ref, atol=1e-5)
    np.testing.assert_allclose(float(metrics["geomed_last_step"]), last, atol=1e-5)
    assert float(metrics["geomed_converged"]) == float(float(metrics["geomed_last_step"]) <= 1e-5)


@pytest.mark.parametrize("n", NS, ids=lambda n: f"n{n}")
def test_centered_clipping_matches_numpy(n):
    x, w, valid = random_case(C, 4, n, seed=3 + n)
    est, _ = run_rule(CCLIP, x, w, valid)
    np.testing.assert_allclose(est, np_centered_clipping(x, valid, 0.7, 3), atol=1e-5)


def test_geometric_median_converges_and_reports_it():
    # Many steps on a small problem: the reported last step falls under tol, and the result
    # satisfies the (smoothed) optimality condition sum_i alpha_i (z - u_i)/||z - u_i|| = 0.
    x, w, valid = random_case(C, 4, 9, seed=4)
    est, metrics = run_rule(GEOMED_LONG, x, w, valid)
    assert float(metrics["geomed_converged"]) == 1.0
    r = est[None, :] - x[valid]
    grad = (w[valid, None] * r / np.linalg.norm(r, axis=1)[:, None]).sum(0)
    assert np.linalg.norm(grad) < 1e-3 * w.sum()


def test_invalid_rows_ignored_whatever_they_hold():
    x, w, valid = random_case(C, 4, 7, seed=11)
    for garbage in (np.nan, np.inf, -np.inf, 1e30):
        y = x.copy()
        y[~valid] = garbage
        for rule in (BULYAN[1], GEOMED, CCLIP):
            est, metrics = run_rule(rule, y, w, valid)
            clean, _ = run_rule(rule, x, w, valid)
            assert np.all(np.isfinite(est)), (rule.name, garbage)
            np.testing.assert_array_equal(est, clean)
            # Scalar metrics are finite; a selecting rule's [C] selection never holds an
            # invalid slot.
            assert all(np.isfinite(float(v)) for k, v in metrics.items() if k != "selected")
            if rule.selects:
                assert not np.any(np.asarray(metrics["selected"])[~valid])


# ------------------------------------------------------------------------ breakdown points
@pytest.mark.parametrize("colluding", [True, False], ids=["colluding", "spread"])
@pytest.mark.parametrize("f", [1, 2], ids=lambda f: f"f{f}")
def test_bulyan_stays_in_honest_range_with_up_to_f_attackers(f, colluding):
    n = 4 * f + 3
    for a in range(f + 1):
        x, w, valid = attacked(n, a, colluding=colluding, seed=f)
        est, metrics = run_padded(BULYAN[f], x, w, valid)
        assert within_honest_range(est, x, a), (f, a)
        assert float(metrics["bulyan_underfull"]) == 0.0


@pytest.mark.parametrize("f", [1, 2], ids=lambda f: f"f{f}")
def test_bulyan_breaks_when_attackers_are_a_majority(f):
    # a > n/2 identical attackers: Krum picks them first and they are the majority of the
    # theta selected, so the median and its beta nearest values are theirs.
    n = 4 * f + 3
    x, w, valid = attacked(n, n // 2 + 1)
    est, _ = run_padded(BULYAN[f], x, w, valid)
    assert np.abs(est).max() > 1e5


@pytest.mark.parametrize("n", [9, 11], ids=lambda n: f"n{n}")
def test_geometric_median_breakdown_point_is_one_half(n):
    for a in range(n + 1):
        x, w, valid = attacked(n, a)
        est, _ = run_padded(GEOMED_LONG, x, w, valid)
        if a < n / 2:
            # Within a few honest radii of the honest points, however far the attackers are.
            assert np.linalg.norm(est - x[: n - a].mean(0)) < 5.0 * np.sqrt(x.shape[1]), (n, a)
        else:
            assert np.abs(est).max() > 1e5, (n, a)


@pytest.mark.parametrize("n", [9, 10, 11], ids=lambda n: f"n{n}")
def test_centered_clipping_moves_at_most_tau_per_attacker_below_one_half(n):
    for a in range(n + 1):
        x, w, valid = attacked(n, a)
        est, _ = run_padded(CCLIP, x, w, valid)
        if a < n / 2:
            # The median start is in the honest range (a < n/2); each of the 3 iterations moves
            # it by at most tau per client, tau * a / n from the attackers.
            start = np.median(x, axis=0)
            assert within_honest_range(start, x, a)
            assert np.linalg.norm(est - start) <= 3 * 0.7 + 1e-5, (n, a)
            assert np.abs(est).max() < 10.0, (n, a)
        else:
            assert np.abs(est).max() > 1e5, (n, a)


def test_weighted_geometric_median_follows_alpha():
    # RFA weights clients by alpha_i: a client with most of the weight pulls the median to it.
    x, w, valid = attacked(5, 1)
    w[-1] = 10.0  # the attacker holds 10 / 14 of the mass: past the (weighted) breakdown point
    est, _ = run_padded(GEOMED_LONG, x, w, valid)
    assert np.abs(est).max() > 1e5


def test_fedavg_with_rfa_matches_numpy_with_example_count_weights():
    # End to end: with_aggregator hands RFA the clients' example counts as alpha_i.
    data = make_population([7, 12, 3, 9, 15, 5, 8, 10], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = with_aggregator(fedavg(MODEL, optax.sgd(LR), batch_size=4), GEOMED)
    result = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=6, seed=7)
    w, b = numpy_robust_fedavg(
        data, params, lambda x, a: np_geometric_median(x, a, np.ones(len(x), bool), 4, 1e-6)[0],
        rounds=3, clients_per_round=6, seed=7)
    np.testing.assert_allclose(result.server_state.params["w"], w, atol=1e-5)
    np.testing.assert_allclose(result.server_state.params["b"], b, atol=1e-5)
    assert all(np.isfinite(h["geomed_last_step"]) for h in result.history)


def test_bulyan_cohort_smaller_than_4f_plus_3_is_refused():
    data = make_population([5] * 7, seed=0)
    alg = with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=5), bulyan(1))
    with pytest.raises(ValueError, match="bulyan1 needs at least 7 client slots"):
        run(alg, VmapBackend("vmap"), data, MODEL.init(jax.random.key(0)), rounds=1,
            clients_per_round=6, seed=0)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: bulyan(-1), "bulyan: f must be an integer >= 0"),
        (lambda: bulyan(1.0), "bulyan: f must be an integer >= 0"),
        (lambda: bulyan(True), "bulyan: f must be an integer >= 0"),
        (lambda: geometric_median(0), "iterations must be an integer >= 1"),
        (lambda: geometric_median(2.5), "iterations must be an integer >= 1"),
        (lambda: geometric_median(nu=0.0), "nu must be a finite number > 0"),
        (lambda: geometric_median(nu=float("nan")), "nu must be a finite number > 0"),
        (lambda: geometric_median(tol=-1.0), "tol must be a finite number >= 0"),
        (lambda: centered_clipping(0.0), "tau must be a finite number > 0"),
        (lambda: centered_clipping(float("inf")), "tau must be a finite number > 0"),
        (lambda: centered_clipping(1.0, iterations=0), "iterations must be an integer >= 1"),
    ],
    ids=["bulyan_neg", "bulyan_float", "bulyan_bool", "geomed_it0", "geomed_itfloat",
         "geomed_nu0", "geomed_nunan", "geomed_tolneg", "cclip_tau0", "cclip_tauinf",
         "cclip_it0"],
)
def test_bad_hyperparameters_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
