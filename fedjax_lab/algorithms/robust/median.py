"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates").

Breakdown point: with ``n`` valid clients of which ``a`` are Byzantine, every coordinate of the
median lies within the range of the honest clients' values as long as ``a < n / 2``; at
``a >= n / 2`` the attackers control it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust._base import Aggregator, num_valid, sorted_valid


def median() -> Aggregator:
    """Coordinate-wise median over the valid clients (unweighted; mean of the two middle values
    for an even count). Zero when no client is valid (the server then skips the round)."""

    def estimate(updates: jax.Array, weights: jax.Array, valid: jax.Array):
        del weights
        n = num_valid(valid)
        ranked = sorted_valid(updates, valid)
        # Invalid rows sort last (+inf), so ranks (n-1)//2 and n//2 are the middle valid ones.
        lo = ranked[jnp.maximum((n - 1) // 2, 0)]
        hi = ranked[jnp.maximum(n // 2, 0)]
        return jnp.where(n > 0, 0.5 * lo + 0.5 * hi, 0.0), {}

    return Aggregator(name="median", estimate=estimate)
