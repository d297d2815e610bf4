"""Adaptive quantile clipping (Andrew et al. 2021, Alg. 1): numpy reference, noise split and
noise statistics of the update and of the clip-norm step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import dp_fedavg_adaptive
from fedjax_lab.algorithms.dp_adaptive_clip import update_noise_multiplier
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core.types import Aggregate
from fedjax_lab.runner import run
from tests.algorithms._numpy_ref import to_np
from tests.helpers import LinearModel, make_population
from tests.privacy._dp_ref import BATCH, LR, l2, round_deltas, scaled

MODEL = LinearModel(dim=5, classes=3)


def make(z=0.0, c0=0.1, cpr=4, gamma=0.5, eta=0.2, sigma_b=None, key=0):
    return dp_fedavg_adaptive(MODEL, optax.sgd(LR), batch_size=BATCH, initial_clip_norm=c0,
                              noise_multiplier=z, clients_per_round=cpr, key=jax.random.key(key),
                              target_quantile=gamma, clip_lr=eta, clip_count_stddev=sigma_b)


def test_noise_free_adaptive_clipping_matches_numpy():
    # z = 0: no noise on the sum nor the count; C follows C exp(-eta (b/m - gamma)) exactly.
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    c0, gamma, eta, m, rounds = 0.9, 0.7, 0.5, 5, 4
    result = run(make(c0=c0, cpr=m, gamma=gamma, eta=eta), VmapBackend("vmap"), data, params,
                 rounds=rounds, clients_per_round=4, seed=7)
    p, bound, bounds, fractions = to_np(params), c0, [], []
    for r in range(rounds):
        total = {k: np.zeros_like(v) for k, v in p.items()}
        below = 0
        for d in round_deltas(data, p, r, clients_per_round=4, seed=7):
            norm = l2(d)
            below += norm <= bound
            total = {k: total[k] + v for k, v in scaled(d, min(1.0, bound / norm)).items()}
        p = {k: p[k] + total[k] / m for k in p}
        bounds.append(bound)
        fractions.append(below / m)
        bound = bound * np.exp(-eta * (below / m - gamma))
    np.testing.assert_allclose(result.server_state.params["w"], p["w"], atol=1e-6)
    np.testing.assert_allclose(result.server_state.params["b"], p["b"], atol=1e-6)
    np.testing.assert_allclose([h["clip_norm"] for h in result.history], bounds, rtol=1e-5)
    np.testing.assert_allclose([h["below_clip_fraction"] for h in result.history], fractions,
                               atol=1e-7)
    np.testing.assert_allclose(float(result.server_state.extra["clip_norm"]), bound, rtol=1e-5)
    # The run saw both clipped and unclipped clients, so the indicator was exercised.
    assert 0 < sum(fractions) < rounds * 4 / m


def test_update_noise_multiplier_makes_the_overall_z():
    # Composition of the sum (multiplier z_Delta) and the centred count (multiplier 2 sigma_b).
    for z, sigma_b in ((1.0, 2.0), (0.7, 0.5), (3.0, 10.0)):
        z_delta = update_noise_multiplier(z, sigma_b)
        assert z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2, rel=1e-12)
        assert z_delta > z
    assert update_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
        update_noise_multiplier(1.0, 0.5)
    with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
        make(z=1.0, cpr=4)  # default sigma_b = m / 20 = 0.2 <= z / 2


@pytest.mark.parametrize(
    ("override", "match"),
    [({"c0": 0.0}, "initial_clip_norm"), ({"gamma": 1.5}, "target_quantile"),
     ({"eta": -0.1}, "clip_lr"), ({"z": -1.0}, "noise_multiplier"),
     ({"cpr": 0}, "clients_per_round")],
    ids=["c0", "gamma", "eta", "z", "cpr"],
)
def test_bad_arguments_raise(override, match):
    with pytest.raises(ValueError, match=match):
        make(**{"sigma_b": 5.0, **override})


def test_noise_of_the_update_and_of_the_clip_step():
    # 10^4 rounds with no client, vmapped over the round index (independent fold_in keys):
    # the model moves by N(0, (z_Delta C / m)^2) per coordinate and log(C'/C) = -eta (n_b/m -
    # gamma) with n_b ~ N(0, sigma_b^2). Tolerances: 5 standard errors of mean and variance.
    z, c0, m, sigma_b, gamma, eta, n = 1.2, 0.3, 4, 2.0, 0.4, 0.2, 10_000
    alg = make(z=z, c0=c0, cpr=m, gamma=gamma, eta=eta, sigma_b=sigma_b)
    params = MODEL.init(jax.random.key(0))
    state = alg.init(params)
    zero = Aggregate(update_sum=jax.tree.map(jnp.zeros_like, params),
                     weight_sum=jnp.zeros((), jnp.float32),
                     metric_sums={k: jnp.zeros(()) for k in (
                         "train_loss_sum", "train_examples", "clients", "rejected",
                         "upload_bits", "local_steps", "clipped_clients")},
                     extra={"below_clip": jnp.zeros(())})

    def moved(r):
        new, _ = alg.server_update(state._replace(round=r), zero)
        step = jnp.concatenate([(a - b).ravel() for a, b in zip(
            jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True)])
        return step, jnp.log(new.extra["clip_norm"] / c0)

    steps, logs = jax.jit(jax.vmap(moved))(jnp.arange(n, dtype=jnp.int32))
    steps, logs = np.asarray(steps, np.float64), np.asarray(logs, np.float64)
    sigma = update_noise_multiplier(z, sigma_b) * c0 / m
    var = np.mean(np.var(steps, axis=0, ddof=1))
    assert abs(var - sigma**2) <= 5 * sigma**2 * np.sqrt(2.0 / (steps.size - steps.shape[1]))
    assert abs(steps.mean()) <= 5 * sigma / np.sqrt(steps.size)
    s_log = eta * sigma_b / m
    assert abs(logs.mean() - eta * gamma) <= 5 * s_log / np.sqrt(n)
    assert abs(logs.var(ddof=1) - s_log**2) <= 5 * s_log**2 * np.sqrt(2.0 / (n - 1))
    # The count's noise and the update's noise are independent draws.
    assert abs(np.corrcoef(steps[:, 0], logs)[0, 1]) <= 5 / np.sqrt(n)

