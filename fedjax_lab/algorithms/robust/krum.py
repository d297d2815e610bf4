"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent").

Each valid client ``i`` gets the score ``sum of ||u_i - u_j||^2 over its n - f - 2 nearest other
valid clients``; Krum returns the update with the lowest score, Multi-Krum the mean of the
``m`` lowest-scoring updates. The guarantee needs ``n > 2f + 2`` valid clients with at most
``f`` Byzantine ones. Rounds where fewer clients were valid (rejections) still aggregate, using
``max(n - f - 2, 1)`` neighbours and ``min(m, n)`` selected updates, and are counted in the
``krum_underfull`` metric. The selected slots are reported (``selects=True``): see
:mod:`fedjax_lab.algorithms.robust.detection`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust._base import Aggregator, num_valid
from fedjax_lab.algorithms.robust.detection import SELECTED


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def pairwise_sq_distances(updates: jax.Array) -> jax.Array:
    """``[C, C]`` squared L2 distances between the rows of ``[C, D]``."""

    # One row at a time (exact differences, memory C*D instead of C*C*D).
    def row(u):
        return jnp.sum(jnp.square(updates - u[None, :]), axis=1)

    return jax.lax.map(row, updates)


def krum_scores(updates: jax.Array, valid: jax.Array, f: int) -> jax.Array:
    """``[C]`` Krum scores; invalid slots score ``+inf``."""
    return scores_from_distances(pairwise_sq_distances(updates), valid, f)


def scores_from_distances(dist: jax.Array, valid: jax.Array, f: int) -> jax.Array:
    """``[C]`` Krum scores from the ``[C, C]`` squared distances, over the ``valid`` rows only.

    Bulyan calls it with a shrinking ``valid`` set, reusing one distance matrix.
    """
    c = dist.shape[0]
    n = num_valid(valid)
    others = valid[None, :] & ~jnp.eye(c, dtype=bool)
    nearest = jnp.sort(jnp.where(others, dist, jnp.inf), axis=1)
    # n - f - 2 neighbours; at least 1 when underfull, at most the n - 1 that exist.
    k = jnp.minimum(jnp.maximum(n - f - 2, 1), n - 1)
    take = jnp.arange(c)[None, :] < k
    scores = jnp.sum(jnp.where(take, nearest, 0.0), axis=1)
    return jnp.where(valid, scores, jnp.inf)


def multi_krum(f: int, m: int) -> Aggregator:
    """Mean of the ``m`` updates with the lowest Krum scores (``m = 1`` is Krum).

    Args:
      f: number of Byzantine clients to tolerate; cohorts need more than ``2f + 2`` slots.
      m: number of selected updates averaged, ``m >= 1``.
    """
    f = _check_int("krum: f", f, 0)
    m = _check_int("multi_krum: m", m, 1)

    def estimate(updates: jax.Array, weights: jax.Array, valid: jax.Array):
        del weights
        c = updates.shape[0]
        n = num_valid(valid)
        scores = krum_scores(updates, valid, f)
        order = jnp.argsort(scores, stable=True)
        chosen = jnp.zeros(c, bool).at[order].set(jnp.arange(c) < jnp.minimum(m, n))
        chosen = chosen & valid
        total = jnp.sum(jnp.where(chosen[:, None], updates, 0.0), axis=0)
        count = jnp.maximum(jnp.sum(chosen.astype(jnp.int32)), 1).astype(updates.dtype)
        underfull = jnp.logical_and(n > 0, jnp.logical_or(n <= 2 * f + 2, n < m))
        return total / count, {"krum_underfull": underfull.astype(jnp.float32),
                               SELECTED: chosen}

    name = f"krum{f}" if m == 1 else f"multi_krum{f}_{m}"
    return Aggregator(
        name=name,
        estimate=estimate,
        min_slots=max(2 * f + 3, m),
        metric_names=("krum_underfull",),
        selects=True,
    )


def krum(f: int) -> Aggregator:
    """Krum: the single update with the lowest score (Blanchard et al. 2017, Alg. Krum)."""
    return multi_krum(f, 1)
