"""The local-training loop shared by FedAvg-family algorithms.

One client's local steps are a ``lax.scan`` over ``[S, B]`` batches. Padding is exact: a masked
example contributes zero loss and gradient (the loss is a masked mean over real examples), and a
fully masked step leaves parameters, optimizer state and counters unchanged via ``jnp.where``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core import plan
from fedjax_lab.core.tree import tree_where
from fedjax_lab.core.types import Batches, Params, PyTree

# objective(params, arrays, mask) -> masked-mean loss over the real examples of one batch.
Objective = Callable[[Params, dict[str, jax.Array], jax.Array], jax.Array]
# grad_correction(grads, params) -> grads (e.g. SCAFFOLD's  g - c_i + c).
GradCorrection = Callable[[PyTree, Params], PyTree]


class LocalResult(NamedTuple):
    """Outcome of one client's local training."""

    params: Params
    opt_state: PyTree
    loss_sum: jax.Array  # sum over steps of (batch loss * real examples in the batch)
    num_examples: jax.Array  # real examples visited (counting repeats across epochs)
    num_steps: jax.Array  # steps with at least one real example


def masked_mean_objective(
    apply_fn: Callable[[Params, jax.Array], jax.Array],
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array],
) -> Objective:
    """Masked-mean loss of a model over one batch ``{"x": [B, ...], "y": [B, ...]}``."""

    def objective(params: Params, arrays: dict[str, jax.Array], mask: jax.Array) -> jax.Array:
        losses = per_example_loss(apply_fn(params, arrays["x"]), arrays["y"])
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return objective


def local_train(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    params: Params,
    batches: Batches,
    grad_correction: GradCorrection | None = None,
) -> LocalResult:
    """Runs the local steps of one client (scan over the step axis of ``batches``)."""

    def step(carry, inputs):
        p, opt_state, loss_sum, n_ex, n_steps = carry
        step_input, mask = inputs
        arrays = batches.step_arrays(step_input)
        n = jnp.sum(mask)
        loss, grads = jax.value_and_grad(objective)(p, arrays, mask)
        if grad_correction is not None:
            grads = grad_correction(grads, p)
        updates, new_opt_state = optimizer.update(grads, opt_state, p)
        new_p = optax.apply_updates(p, updates)
        active = n > 0
        return (
            tree_where(active, new_p, p),
            tree_where(active, new_opt_state, opt_state),
            loss_sum + jnp.where(active, loss * n, 0.0),
            n_ex + n,
            n_steps + active.astype(jnp.float32),
        ), None

    zero = jnp.zeros((), jnp.float32)
    init = (params, optimizer.init(params), zero, zero, zero)
    (p, opt_state, loss_sum, n_ex, n_steps), _ = jax.lax.scan(
        step, init, (batches.step_inputs(), batches.mask), unroll=plan.scan_unroll()
    )
    return LocalResult(p, opt_state, loss_sum, n_ex, n_steps)
