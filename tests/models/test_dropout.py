"""Inverted dropout (Srivastava et al. 2014) and FedML's CNN_DropOut.

Statistics over 10^4 keys with tolerances from the claimed variance (k standard errors), no
golden random draws.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.models import cnn_dropout, femnist_cnn, get_model
from fedjax_lab.models.dropout import dropout

DRAWS = 10_000
K = 5.0  # standard errors: a false failure has probability < 1e-6 per check


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_keep_fraction_is_one_minus_rate(rate):
    keys = jax.random.split(jax.random.key(0), DRAWS)
    x = jnp.ones((4, 8))
    kept = jax.jit(jax.vmap(lambda k: dropout(x, rate, k) != 0))(keys)
    n = kept.size
    se = np.sqrt(rate * (1 - rate) / n)
    assert abs(float(jnp.mean(kept)) - (1 - rate)) < K * se
    # Every entry (example and unit) is kept with the same probability, independently of the
    # batch position: per-entry frequencies over the keys.
    per_entry = np.asarray(jnp.mean(kept, axis=0))
    assert np.all(np.abs(per_entry - (1 - rate)) < K * np.sqrt(rate * (1 - rate) / DRAWS))


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_scaled_activation_is_unbiased(rate):
    keys = jax.random.split(jax.random.key(1), DRAWS)
    x = jax.random.normal(jax.random.key(2), (3, 5))
    out = jax.jit(jax.vmap(lambda k: dropout(x, rate, k)))(keys)
    # Var of one draw: x^2 (1/(1-p) - 1) = x^2 p / (1-p).
    se = np.abs(np.asarray(x)) * np.sqrt(rate / (1 - rate) / DRAWS)
    assert np.all(np.abs(np.asarray(jnp.mean(out, axis=0)) - np.asarray(x)) < K * se + 1e-6)
    # Kept entries are exactly x / (1 - p).
    kept = np.asarray(out) != 0
    scaled = np.broadcast_to(np.asarray(x) / (1 - rate), out.shape)
    np.testing.assert_allclose(np.asarray(out)[kept], scaled[kept], rtol=1e-6)


def test_masks_are_per_example_and_independent_of_the_batch_size():
    key = jax.random.key(3)
    x = jnp.ones((7, 6))
    full = dropout(x, 0.5, key)
    chex.assert_trees_all_equal(dropout(x[:3], 0.5, key), full[:3])
    chex.assert_trees_all_equal(dropout(x, 0.5, key), full)  # same key, same mask
    assert not np.array_equal(np.asarray(dropout(x, 0.5, jax.random.key(4))), np.asarray(full))
    assert not np.array_equal(np.asarray(full[0]), np.asarray(full[1]))


def test_rate_zero_is_the_identity_and_bad_rates_are_refused():
    x = jnp.arange(6.0).reshape(2, 3)
    chex.assert_trees_all_equal(dropout(x, 0.0, jax.random.key(0)), x)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="rate"):
            dropout(x, bad, jax.random.key(0))
    with pytest.raises(TypeError, match="conv_rate"):
        cnn_dropout(conv_rate="0.5")


def test_cnn_dropout_parameters_and_shapes():
    model = get_model("cnn_dropout", (28, 28, 1), 62)
    params = jax.eval_shape(model.init, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == 1_206_590  # FedML CNN_DropOut
    shapes = {k: {n: v.shape for n, v in layer.items()} for k, layer in params.items()}
    assert shapes["conv_0"]["kernel"] == (3, 3, 1, 32)
    assert shapes["conv_1"]["kernel"] == (3, 3, 32, 64)
    assert shapes["dense_0"]["kernel"] == (12 * 12 * 64, 128)
    assert shapes["head"]["kernel"] == (128, 62)
    x = jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32)
    assert jax.eval_shape(model.apply, params, x).shape == (5, 62)
    assert jax.eval_shape(lambda p, x: model.apply_train(p, x, key=jax.random.key(0)),
                          params, x).shape == (5, 62)
    assert model.has_conv and model.apply_train is not None
    assert femnist_cnn().apply_train is None  # deterministic models have none
    with pytest.raises(ValueError, match="too small"):
        cnn_dropout((5, 8, 1), 10)


def test_cnn_dropout_eval_is_deterministic_and_the_network_without_dropout():
    model = cnn_dropout((8, 8, 1), 10)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    no_dropout = cnn_dropout((8, 8, 1), 10, conv_rate=0.0, dense_rate=0.0)
    evaluated = model.apply(params, x)
    chex.assert_trees_all_equal(model.apply(params, x), evaluated)
    for k in range(2):
        chex.assert_trees_all_close(
            no_dropout.apply_train(params, x, key=jax.random.key(k)), evaluated, atol=1e-6)
    train = model.apply_train(params, x, key=jax.random.key(5))
    chex.assert_trees_all_equal(model.apply_train(params, x, key=jax.random.key(5)), train)
    assert not np.allclose(np.asarray(train), np.asarray(evaluated), atol=1e-3)
    assert not np.allclose(np.asarray(model.apply_train(params, x, key=jax.random.key(6))),
                           np.asarray(train), atol=1e-3)
