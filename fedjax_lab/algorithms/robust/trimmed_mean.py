"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates").

For ``n`` valid clients, each coordinate drops its ``k = floor(beta * n)`` largest and ``k``
smallest values and averages the remaining ``n - 2k``. Breakdown point: bounded within the
honest range as long as the number of Byzantine clients is ``<= k``; one more and the
attackers' values enter the mean.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust._base import Aggregator, num_valid, sorted_valid


def trim_count(beta: float, n: int) -> int:
    """``floor(beta * n)``: values trimmed from each end for ``n`` valid clients."""
    return math.floor(beta * n)


def trimmed_mean(beta: float) -> Aggregator:
    """Coordinate-wise ``beta``-trimmed mean over the valid clients (unweighted).

    Args:
      beta: fraction trimmed from EACH end, ``0 <= beta < 0.5`` (``0`` is the plain mean).
    """
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta must be a number in [0, 0.5), got {beta!r}")
    beta = float(beta)

    def estimate(updates: jax.Array, weights: jax.Array, valid: jax.Array):
        del weights
        c = updates.shape[0]
        n = num_valid(valid)
        # k for every possible n, computed on the host so it is exactly floor(beta * n).
        k = jnp.asarray([trim_count(beta, m) for m in range(c + 1)], jnp.int32)[n]
        ranked = sorted_valid(updates, valid)
        rank = jnp.arange(c, dtype=jnp.int32)[:, None]
        keep = jnp.logical_and(rank >= k, rank < n - k)
        total = jnp.sum(jnp.where(keep, ranked, 0.0), axis=0)
        return total / jnp.maximum(n - 2 * k, 1).astype(updates.dtype), {}

    return Aggregator(name=f"trimmed_mean{beta:g}", estimate=estimate)
