"""The local training of gradient-based algorithms, as the pieces of a ``LocalUpdate``.

A client starts from the global model with a fresh optimizer state and takes masked minibatch
steps. Padding is exact: a masked example contributes zero loss and gradient (the loss is a
masked mean over real examples), and a fully masked step leaves parameters, optimizer state and
counters unchanged via ``jnp.where``. Written as ``start``/``step`` (fedjax_lab.core.local) so
that backends can run several clients back to back in one slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.tree import tree_where
from fedjax_lab.core.types import Params, PyTree, ServerState

# objective(params, arrays, mask) -> masked-mean loss over the real examples of one batch.
Objective = Callable[[Params, dict[str, jax.Array], jax.Array], jax.Array]
# objective_for(server_state) -> the objective of this round (e.g. FedProx's proximal term
# around the global model).
ObjectiveFor = Callable[[ServerState], Objective]
# grad_correction(grads, params, context) -> grads (e.g. SCAFFOLD's  g + (c - c_i)).
GradCorrection = Callable[[PyTree, Params, PyTree], PyTree]


class LocalState(NamedTuple):
    """The carry of one client's local training."""

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
        # Padded positions hold some other example (row 0 of a device table): zero them, so
        # that a non-finite value there cannot leak into this client's loss or gradient (a 0
        # mask times NaN is NaN, in the forward and the backward pass alike).
        x = arrays["x"]
        x = jnp.where((mask > 0).reshape(mask.shape + (1,) * (x.ndim - 1)), x,
                      jnp.zeros((), x.dtype))
        losses = per_example_loss(apply_fn(params, x), arrays["y"])
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return objective


def optimizer_start(
    optimizer: optax.GradientTransformation,
) -> Callable[[ServerState], LocalState]:
    """``start``: the global model, a fresh optimizer state, zero counters."""

    def start(server_state: ServerState) -> LocalState:
        params = server_state.params
        zero = jnp.zeros((), jnp.float32)
        return LocalState(params, optimizer.init(params), zero, zero, zero)

    return start


def optimizer_step(
    objective_for: ObjectiveFor,
    optimizer: optax.GradientTransformation,
    grad_correction: GradCorrection | None = None,
) -> Callable[..., LocalState]:
    """``step``: one masked minibatch step of ``optimizer`` on the round's objective."""

    def step(
        server_state: ServerState, context: PyTree, carry: LocalState,
        arrays: dict[str, jax.Array], mask: jax.Array,
    ) -> LocalState:
        p, opt_state = carry.params, carry.opt_state
        n = jnp.sum(mask)
        loss, grads = jax.value_and_grad(objective_for(server_state))(p, arrays, mask)
        if grad_correction is not None:
            grads = grad_correction(grads, p, context)
        updates, new_opt_state = optimizer.update(grads, opt_state, p)
        new_p = optax.apply_updates(p, updates)
        active = n > 0
        return LocalState(
            tree_where(active, new_p, p),
            tree_where(active, new_opt_state, opt_state),
            carry.loss_sum + jnp.where(active, loss * n, 0.0),
            carry.num_examples + n,
            carry.num_steps + active.astype(jnp.float32),
        )

    return step
