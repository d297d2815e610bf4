"""Per-example losses. Masking happens in the local loop, so these return ``[B]`` vectors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross entropy; extra axes (e.g. per-token) are averaged per example."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    return loss.reshape(loss.shape[0], -1).mean(axis=1)


def correct_predictions(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example accuracy in [0, 1] (fraction of correct positions for sequence outputs)."""
    hit = (jnp.argmax(logits, axis=-1) == labels.astype(jnp.int32)).astype(jnp.float32)
    return hit.reshape(hit.shape[0], -1).mean(axis=1)
