"""with_weak_dp (Sun et al. 2019): the noise is N(0, sigma^2) per parameter on top of the
algorithm's own server step, keyed by fold_in(key, round); bad input.

The wrapped server step is a plain ``params + update_sum`` so the test needs no training run
(the CLI test runs the whole defense against its Python construction).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import with_weak_dp
from fedjax_lab.core.types import Aggregate
from tests.helpers import LinearModel

MODEL = LinearModel(dim=40, classes=10)  # 410 parameters: enough for a std estimate
SIGMA = 0.05


def add_step(state, agg):
    params = jax.tree.map(jnp.add, state.params, agg.update_sum)
    return state._replace(params=params, round=state.round + 1), {"step": jnp.float32(1)}


@pytest.fixture(scope="module")
def setup():
    base = fedavg(MODEL, optax.sgd(0.1), batch_size=4)._replace(server_update=add_step)
    params = MODEL.init(jax.random.key(0))
    delta = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    agg = Aggregate(update_sum=delta, weight_sum=jnp.float32(1), metric_sums={})
    return base, base.init(params), agg


def test_each_round_is_the_server_step_plus_fresh_gaussian_noise(setup):
    base, state, agg = setup
    key = jax.random.key(7)
    noisy = with_weak_dp(base, SIGMA, key)
    step = jax.jit(noisy.server_update)
    clean, _ = base.server_update(state, agg)
    draws = []
    for r in range(2):
        state_r = state._replace(round=jnp.asarray(r, state.round.dtype))
        new, metrics = step(state_r, agg)
        leaves = jax.tree.leaves(clean.params)
        # Reference draw: round r's key, one subkey per leaf in flatten order, std SIGMA.
        keys = jax.random.split(jax.random.fold_in(key, r), len(leaves))
        for x, k, got in zip(leaves, keys, jax.tree.leaves(new.params), strict=True):
            expected = np.asarray(x) + SIGMA * np.asarray(jax.random.normal(k, x.shape))
            np.testing.assert_allclose(got, expected, atol=1e-6)
        noise = np.concatenate([(np.asarray(g) - np.asarray(x)).ravel()
                                for g, x in zip(jax.tree.leaves(new.params), leaves,
                                                strict=True)])
        assert abs(noise.std() / SIGMA - 1) < 0.15  # 410 draws: std error ~3.5%
        assert abs(noise.mean()) < 4 * SIGMA / np.sqrt(noise.size)
        assert float(metrics["weak_dp_std"]) == pytest.approx(SIGMA)
        assert float(metrics["step"]) == 1.0  # the algorithm's own metrics are kept
        draws.append(noise)
    assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 0.2  # rounds draw fresh noise
    assert noisy.name == "fedavg+weakdp0.05"
    assert noisy.additive == base.additive


def test_zero_noise_is_the_algorithm_itself(setup):
    base, state, agg = setup
    a, _ = base.server_update(state, agg)
    b, _ = with_weak_dp(base, 0.0, jax.random.key(0)).server_update(state, agg)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bad_arguments_raise():
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=4)
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
            with_weak_dp(alg, bad, jax.random.key(0))
    with pytest.raises(TypeError, match="key must be a scalar typed PRNG key"):
        with_weak_dp(alg, 0.1, jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="algorithm must be a fedjax_lab Algorithm"):
        with_weak_dp("fedavg", 0.1, jax.random.key(0))
