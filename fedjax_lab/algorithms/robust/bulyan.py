"""Bulyan (El Mhamdi, Guerraoui, Rouault 2018, "The Hidden Vulnerability of Distributed Learning
in Byzantium", Sec. 4).

For ``n`` valid clients and ``f`` tolerated Byzantine ones:

1. Selection: ``theta = n - 2f`` times, run Krum on the clients not yet selected and move its
   choice into the selection set (the Krum score of a client uses its ``r - f - 2`` nearest
   remaining neighbours, ``r`` the number remaining; clamped to ``[1, r - 1]`` as in
   :mod:`~fedjax_lab.algorithms.robust.krum`).
2. Aggregation: per coordinate, average the ``beta = theta - 2f`` selected values closest to
   the selected values' median.

The guarantee needs ``n >= 4f + 3`` (the cohort size is checked when the round is traced).
Rounds where rejections left fewer valid clients still aggregate, with
``theta = max(n - 2f, 1)`` and ``beta = theta - 2f`` raised to 1 (odd ``theta``) or 2 (even
``theta``, where one value would be a tie between the two middle ones), and are counted in the
``bulyan_underfull`` metric. Invalid slots are masked out of every step. The slots left out of
the selection set are reported as excluded (``selects=True``, see
:mod:`fedjax_lab.algorithms.robust.detection`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust._base import Aggregator, num_valid, sorted_valid
from fedjax_lab.algorithms.robust.detection import SELECTED
from fedjax_lab.algorithms.robust.krum import pairwise_sq_distances, scores_from_distances


def bulyan(f: int) -> Aggregator:
    """Bulyan over Krum (El Mhamdi et al. 2018, Sec. 4), unweighted over valid clients.

    Args:
      f: number of Byzantine clients to tolerate, an integer ``>= 0``; cohorts need at least
        ``4f + 3`` client slots.
    """
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"bulyan: f must be an integer >= 0, got {f!r}")

    def estimate(updates: jax.Array, weights: jax.Array, valid: jax.Array):
        del weights
        c = updates.shape[0]
        n = num_valid(valid)
        theta = jnp.maximum(n - 2 * f, 1)
        # theta - 2f has theta's parity; when underfull the clamp keeps that parity, so the
        # kept values are a block centred on the median (beta = 1 of an even theta would tie).
        beta = jnp.maximum(theta - 2 * f, 2 - theta % 2)
        dist = pairwise_sq_distances(updates)

        # theta recursive Krum selections; the loop has C steps (static) and steps >= theta
        # select nothing, so the round compiles once for any number of valid clients.
        def select(k, carry):
            remaining, selected = carry
            best = jnp.argmin(scores_from_distances(dist, remaining, f))
            take = jnp.logical_and(k < theta, remaining[best])
            return remaining.at[best].set(remaining[best] & ~take), selected.at[best].set(
                selected[best] | take)

        _, selected = jax.lax.fori_loop(0, c, select, (valid, jnp.zeros(c, bool)))
        ranked = sorted_valid(updates, selected)
        med = 0.5 * ranked[(theta - 1) // 2] + 0.5 * ranked[theta // 2]
        # Per coordinate, the beta selected values closest to the median (ties: lower slot).
        gap = jnp.where(selected[:, None], jnp.abs(updates - med[None, :]), jnp.inf)
        rank = jnp.argsort(jnp.argsort(gap, axis=0, stable=True), axis=0)
        keep = jnp.logical_and(rank < beta, selected[:, None])
        total = jnp.sum(jnp.where(keep, updates, 0.0), axis=0)
        est = jnp.where(n > 0, total / beta.astype(updates.dtype), 0.0)
        underfull = jnp.logical_and(n > 0, n < 4 * f + 3)
        return est, {"bulyan_underfull": underfull.astype(jnp.float32), SELECTED: selected}

    # Exclusion = not among the theta Krum selections (the per-coordinate trimming of step 2
    # drops values, not clients).
    return Aggregator(name=f"bulyan{f}", estimate=estimate, min_slots=4 * f + 3,
                      metric_names=("bulyan_underfull",), selects=True)
