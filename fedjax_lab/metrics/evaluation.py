"""Global evaluation of a model on a centralized test set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.losses import correct_predictions, softmax_cross_entropy
from fedjax_lab.data.labels import check_labels


def make_evaluator(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int = 1024,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    num_classes: int | None = None,
    metrics: dict[str, Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]]
    | None = None,
) -> Callable[[Any], dict[str, float]]:
    """Returns ``evaluate(params) -> {"test_loss", "test_accuracy"}`` over ``arrays``.

    With ``metrics`` (a task whose targets are not one class per example, e.g. per-token or
    multi-hot targets: ``fedjax_lab.metrics.tasks``), ``arrays["y"]`` holds those targets
    (``[n, ...]``, checked by the task's loader, not as class labels) and the result is
    ``{"test_loss", "test_<name>" for each metric}``: each metric's numerators and denominators
    are summed over the set and divided (NaN when the denominators sum to 0).

    The test set is put on the device once and cut into fixed-size masked batches, so the
    jitted batch function compiles once. Batches are a Python loop rather than ``lax.map``
    because XLA:CPU runs convolutions much slower inside loops.

    The labels ``arrays["y"]`` are checked on the host (JAX would clamp an out-of-range label
    to another class and count a wrong accuracy): integers of shape ``[n]`` in
    ``[0, num_classes)``. Without ``num_classes`` the range is checked against the model's
    output size on the first call (``jax.eval_shape``: nothing is compiled for it).

    Raises:
      ValueError: an empty set, or labels that are not integers in ``[0, num_classes)``.
    """
    if metrics is None:
        labels = check_labels(arrays["y"], num_classes, "evaluation set: labels 'y'")
    else:
        labels = np.asarray(arrays["y"])
        if not metrics or labels.ndim < 1 or len(labels) != len(arrays["x"]):
            raise ValueError("evaluation set: `metrics` needs at least one metric and targets "
                             "'y' with one row per example")
    n = len(labels)
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

    @jax.jit
    def metric_sums(params, x, y, m):
        logits = apply_fn(params, x)
        sums = {"loss": (jnp.sum(per_example_loss(logits, y) * m), jnp.float32(0))}
        for name, fn in metrics.items():
            num, den = fn(logits, y)
            sums[name] = (jnp.sum(num * m), jnp.sum(den * m))
        return sums

    if metrics is not None:
        def evaluate_metrics(params: Any) -> dict[str, float]:
            total = None
            for i in range(num_batches):
                sl = slice(i * b, (i + 1) * b)
                got = metric_sums(params, device["x"][sl], device["y"][sl], mask[sl])
                total = got if total is None else jax.tree.map(jnp.add, total, got)
            total = jax.device_get(total)
            out = {"test_loss": float(total["loss"][0]) / n}
            for name in metrics:
                num, den = total[name]
                out[f"test_{name}"] = float(num) / float(den) if den > 0 else float("nan")
            return out

        return evaluate_metrics

    checked = num_classes is not None

    def evaluate(params: Any) -> dict[str, float]:
        nonlocal checked
        if not checked:  # the model's output size is known once params are
            logits = jax.eval_shape(apply_fn, params, device["x"][:1])
            check_labels(labels, logits.shape[-1], "evaluation set: labels 'y' (against the "
                         f"model's {logits.shape[-1]} outputs)")
            checked = True
        loss = acc = 0.0
        for i in range(num_batches):
            sl = slice(i * b, (i + 1) * b)
            lo, ac = batch_sums(params, device["x"][sl], device["y"][sl], mask[sl])
            loss, acc = loss + lo, acc + ac
        loss, acc = jax.device_get((loss, acc))
        return {"test_loss": float(loss) / n, "test_accuracy": float(acc) / n}

    return evaluate
