"""The CPU-friendly dense product: same values and derivatives as ``lax.dot_general``, and the
kernel gradient compiles to the dot layout XLA:CPU runs fast (the reason it exists)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.models._dense import dense_dot_general

DENSE = lambda lhs: (((lhs.ndim - 1,), (0,)), ((), ()))  # noqa: E731  (nn.Dense's numbers)


def _plain(x, w):
    return jax.lax.dot_general(x, w, DENSE(x))


def _ours(x, w):
    return dense_dot_general(x, w, DENSE(x))


@pytest.mark.parametrize("lhs_shape", [(5,), (4, 5), (2, 3, 5), (0, 5)],
                         ids=["vector", "batch", "sequence", "empty-batch"])
def test_values_and_gradients_equal_the_plain_dot(lhs_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    np.testing.assert_allclose(_ours(x, w), _plain(x, w), rtol=1e-6, atol=1e-6)
    assert _ours(x, w).shape == (*lhs_shape[:-1], 3)
    loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w)))  # noqa: E731
    for got, want in zip(jax.grad(loss(_ours), argnums=(0, 1))(x, w),
                         jax.grad(loss(_plain), argnums=(0, 1))(x, w), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_forward_mode_and_hessians_work():
    # optimization barriers have JVP and transpose rules: no custom_vjp restriction.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    f = lambda g: lambda w: jnp.sum(jnp.tanh(g(x, w)))  # noqa: E731
    np.testing.assert_allclose(jax.hessian(f(_ours))(w), jax.hessian(f(_plain))(w),
                               rtol=1e-5, atol=1e-6)
    (_, tangent), (_, want) = jax.jvp(f(_ours), (w,), (w,)), jax.jvp(f(_plain), (w,), (w,))
    np.testing.assert_allclose(tangent, want, rtol=1e-5)


def test_other_dimension_numbers_fall_back_to_dot_general():
    x, w = jnp.ones((2, 4, 5)), jnp.ones((2, 5, 3))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(dense_dot_general(x, w, batched),
                                  jax.lax.dot_general(x, w, batched))


def _dots(fn, *args):
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [line for line in text.splitlines() if " dot(" in line]


def test_vmapped_kernel_gradient_contracts_the_last_axis_of_its_left_operand():
    """10 clients' logistic-regression kernel gradients, as in a vmapped round: every dot has
    lhs_contracting_dims = last axis (the layout XLA:CPU sends to its fast matmul kernel).
    With the plain product the kernel gradient contracts the batch axis (axis 1) instead."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(10, 20, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, (10, 20)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(10, 784, 10)), jnp.float32)

    def kernel_grads(product):
        def loss(w, x, y):
            logits = product(x, w)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        return jax.vmap(jax.grad(loss))

    ours = _dots(kernel_grads(_ours), w, x, y)
    plain = _dots(kernel_grads(_plain), w, x, y)
    assert ours and plain
    assert all(re.search(r"lhs_contracting_dims=\{2\}", d) for d in ours), ours
    assert any(re.search(r"lhs_contracting_dims=\{1\}", d) for d in plain), plain
