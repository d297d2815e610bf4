"""The uplink of one client: optional compression, exact bit count, rejection bookkeeping.

Shared by every algorithm that sends a model delta (FedAvg family, SCAFFOLD), so that the
non-finite policy (DESIGN.md "Errors") and the bit accounting are the same everywhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lab.core.tree import tree_where
from fedjax_lab.core.types import PyTree


def dense_bits(tree: PyTree) -> jax.Array:
    """Wire size of an uncompressed float32 tree (32 bits per coordinate), as float32."""
    return jnp.asarray(32.0 * sum(x.size for x in jax.tree.leaves(tree)), jnp.float32)


def encode_uplink(
    compressor: Any, delta: PyTree, state: PyTree, ok: jax.Array, *, key: jax.Array
) -> tuple[PyTree, PyTree, jax.Array]:
    """Encodes ``delta`` for the uplink.

    Args:
      compressor: a ``Compressor`` or None (the raw delta is sent, 32 bits per coordinate).
      delta: the client's update (already zeroed if non-finite).
      state: the client's compressor state (``()`` without a compressor).
      ok: scalar bool, whether the client really sends; otherwise its compressor state is kept
        (a padded, dropped or rejected client must not advance error-feedback residuals).
      key: PRNG key of the stochastic compressor.

    Returns:
      ``(payload, new_state, bits)``; ``bits`` is float32 (exact ``compressor.bits``).
    """
    if compressor is None:
        return delta, state, dense_bits(delta)
    payload, new_state = compressor.encode(delta, state, key=key)
    new_state = tree_where(ok, new_state, state)
    return payload, new_state, compressor.bits(payload).astype(jnp.float32)


def decode_weighted_sum(compressor: Any, updates: PyTree, weights: jax.Array) -> PyTree:
    """``Σ_i weights[i] * decode(updates[i])`` over a stacked leading client axis."""
    decoded = jax.vmap(compressor.decode)(updates) if compressor is not None else updates
    return jax.tree.map(lambda d: jnp.tensordot(weights, d, axes=(0, 0)).astype(d.dtype), decoded)
