"""Global evaluation of a model on a centralized test set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.losses import correct_predictions, softmax_cross_entropy


def make_evaluator(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int = 1024,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Callable[[Any], dict[str, float]]:
    """Returns ``evaluate(params) -> {"test_loss", "test_accuracy"}`` over ``arrays``.

    The test set is put on the device once and cut into fixed-size masked batches, so the
    jitted batch function compiles once. Batches are a Python loop rather than ``lax.map``
    because XLA:CPU runs convolutions much slower inside loops.
    """
    n = len(arrays["y"])
    if n == 0:
        raise ValueError("the evaluation set is empty; pass a test split with examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    b = min(batch_size, n)
    num_batches = -(-n // b)
    pad = num_batches * b - n
    device = {
        k: jnp.asarray(np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]))
        for k, v in arrays.items()
    }
    mask = jnp.asarray(np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]))

    @jax.jit
    def batch_sums(params, x, y, m):
        logits = apply_fn(params, x)
        return (
            jnp.sum(per_example_loss(logits, y) * m),
            jnp.sum(correct_predictions(logits, y) * m),
        )

    def evaluate(params: Any) -> dict[str, float]:
        loss = acc = 0.0
        for i in range(num_batches):
            sl = slice(i * b, (i + 1) * b)
            lo, ac = batch_sums(params, device["x"][sl], device["y"][sl], mask[sl])
            loss, acc = loss + lo, acc + ac
        loss, acc = jax.device_get((loss, acc))
        return {"test_loss": float(loss) / n, "test_accuracy": float(acc) / n}

    return evaluate
