"""Tests of the error-feedback wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import (
    ErrorFeedbackState,
    scaled_sign,
    stc,
    terngrad,
    top_k,
    with_error_feedback,
)
from fedjax_lab.compressors.testing import check_compressor


def test_contract(tree):
    check_compressor(with_error_feedback(stc(0.2)), tree)


def test_contract_stochastic_inner(rich_tree):
    check_compressor(with_error_feedback(terngrad()), rich_tree)


def _numpy_top_k(x, k):
    kept = sorted(range(len(x)), key=lambda i: (-abs(float(x[i])), i))[:k]
    out = np.zeros_like(x)
    out[kept] = x[kept]
    return out


def test_matches_python_loop_reference_over_rounds(make_step):
    c = with_error_feedback(top_k(3))
    step = make_step(c)
    rng = np.random.default_rng(0)
    updates = rng.standard_normal((6, 10)).astype(np.float32)
    state = c.init({"w": jnp.zeros(10)})
    residual = np.zeros(10, np.float32)
    total_sent = np.zeros(10, np.float64)
    for u in updates:
        _, state, decoded, _ = step({"w": u}, state)
        corrected = u + residual
        sent = _numpy_top_k(corrected, 3)
        residual = corrected - sent
        np.testing.assert_array_equal(decoded["w"], sent)
        np.testing.assert_allclose(state.residual["w"], residual, rtol=1e-6, atol=1e-7)
        total_sent += sent
    # Nothing is lost: what was sent plus what is still owed equals everything that came in.
    np.testing.assert_allclose(
        total_sent + state.residual["w"], updates.astype(np.float64).sum(0), atol=1e-5
    )


def test_error_feedback_removes_the_bias_of_scaled_sign_over_rounds(make_step):
    # A constant update x: scaled_sign alone always sends (‖x‖₁/d)·sign(x), off by up to 1.96
    # here. With EF the average sent is x - r_T/T (telescoping), and r_T stays bounded.
    x = {"w": np.asarray([3.0, -0.1, 0.05, 1.0], np.float32)}
    plain = make_step(scaled_sign())(x)[2]["w"]
    assert np.abs(plain - x["w"]).max() > 1.9
    c = with_error_feedback(scaled_sign())
    step = make_step(c)
    state, total, rounds = c.init(x), np.zeros(4), 400
    for _ in range(rounds):
        _, state, decoded, _ = step(x, state)
        total += np.asarray(decoded["w"], np.float64)
        residual = np.asarray(state.residual["w"], np.float64)
        assert np.abs(residual).max() <= 4 * np.abs(np.asarray(x["w"])).sum()
    np.testing.assert_allclose(total / rounds, np.asarray(x["w"]) - residual / rounds, atol=1e-5)
    assert np.abs(total / rounds - np.asarray(x["w"])).max() < 0.05


def test_state_and_tree_mismatches_are_rejected():
    c = with_error_feedback(stc(0.5))
    state = c.init({"w": jnp.zeros(4)})
    assert isinstance(state, ErrorFeedbackState)
    with pytest.raises(ValueError, match="does not match the tree given to init"):
        c.encode({"w": jnp.zeros(5)}, state, key=jax.random.key(0))
    with pytest.raises(TypeError, match="state must be the ErrorFeedbackState"):
        c.encode({"w": jnp.zeros(4)}, (), key=jax.random.key(0))
    with pytest.raises(TypeError, match="expected a Compressor"):
        with_error_feedback(lambda x: x)
