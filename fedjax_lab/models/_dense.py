"""A dense layer written so that XLA:CPU computes its kernel gradient with a fast matmul.

Autodiff of ``y = x @ w`` (``x: [B, d]``, ``w: [d, k]``) yields the kernel gradient as
``dot(x, g)`` contracting the batch axis of both operands. XLA:CPU (jax 0.10.2) runs that
dimension layout with its generic dot emitter, while ``gᵀ @ x`` (left operand contracting its
last axis) goes to its YNNPACK kernel; under ``vmap`` over clients (batched dots) the generic
form was 2.5x slower here (203 vs 82 us for 10 clients' ``[20, 784] x [20, 10]``), and it was
the largest single cost of a vmapped logistic-regression round.

:func:`dense_dot_general` computes the same product as ``yᵀ = wᵀ xᵀ`` with optimization barriers
around the two transposes, so that reverse-mode autodiff produces ``gᵀ @ x`` and XLA cannot fold
the transposes back into the slow form. It is still an ordinary composition of differentiable
primitives: forward- and reverse-mode autodiff (Hessians included), ``vmap`` and ``jit`` all
work, and parameters keep flax's ``[d, k]`` kernel layout. Off CPU the plain ``dot_general`` is
used (accelerators choose dot layouts well).

Where it is used, and why only there (measured in one process each, medians, this CPU): the
logistic regression layer (input = data, so no input gradient; 10 outputs) — vmapped W1 round
3.6 -> 2.3 ms, and the centralized 10-step program 1.22 -> 0.85 ms. For layers with wide outputs
or whose input gradient is needed the transposed form loses: MLP 784-200-200-10 vmapped round
29-32 -> 31-43 ms (all layers or the head only), FEMNIST CNN unrolled round 1.78 -> 2.00 s.
Those models keep ``nn.Dense``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def dense_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.dot_general`` for ``nn.Dense`` (``lhs [..., d] x rhs [d, k]``), CPU-friendly."""
    dense_layout = (((lhs.ndim - 1,), (0,)), ((), ()))
    if (
        jax.default_backend() != "cpu"
        or rhs.ndim != 2
        or lhs.ndim < 1
        or dimension_numbers != dense_layout
    ):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    kernel_t = lax.optimization_barrier(rhs.T)  # [k, d]
    out_t = jnp.einsum("kd,...d->k...", kernel_t, lhs, precision=precision,
                       preferred_element_type=preferred_element_type)
    return jnp.moveaxis(lax.optimization_barrier(out_t), 0, -1)


def Dense(features: int, name: str) -> nn.Dense:
    """``nn.Dense`` using :func:`dense_dot_general` (same parameters, same numbers)."""
    return nn.Dense(features, name=name, dot_general=dense_dot_general)
