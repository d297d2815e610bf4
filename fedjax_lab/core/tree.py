"""Small pytree helpers used across the library."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.core.types import PyTree


def tree_where(cond: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Select whole pytrees by a scalar predicate (used so padding steps are exact no-ops)."""
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), on_true, on_false)


def tree_scale(tree: PyTree, scale: jax.Array) -> PyTree:
    """Multiply every leaf by a scalar, keeping each leaf's dtype."""
    return jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree)


def tree_sum_leading(tree: PyTree) -> PyTree:
    """Sum every leaf over its leading (client) axis."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), tree)


def tree_all_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: every element of every leaf is finite (empty leaves count as finite)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(leaves))


def tree_size(tree: PyTree) -> int:
    """Total number of elements (static)."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))
