"""Centered clipping (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust
Optimization", the centered clipping (CC) rule).

``iterations`` times: ``v <- v + (1/n) sum_i clip(u_i - v, tau)`` over the ``n`` valid updates,
with ``clip(z, tau) = z * min(1, tau / ||z||)``. Each attacker moves ``v`` by at most
``tau / n`` per iteration, however large its update.

Starting point: the paper starts from the previous round's aggregate (server momentum). An
``Aggregator`` here sees one round and carries no state between rounds, so ``v`` starts from
the coordinate-wise median of the valid updates (Yin et al. 2018), itself robust for fewer than
half attackers. Breakdown point 1/2: below it the start lies within the honest clients' range
and the ``a`` attackers' total pull on the output is at most ``iterations * tau * a / n`` in
norm however far away they are (the whole output moves at most ``iterations * tau`` from the
start); at ``a >= n / 2`` the median start already belongs to the attackers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust._base import Aggregator, num_valid
from fedjax_lab.algorithms.robust.clip_norm import client_norms
from fedjax_lab.algorithms.robust.median import median


def centered_clipping(tau: float, iterations: int = 1) -> Aggregator:
    """Centered clipping from the coordinate median (unweighted over valid clients).

    Args:
      tau: clipping radius ``tau > 0`` (finite) around the current center.
      iterations: clipping iterations ``L >= 1`` (the paper uses 1 with momentum).
    """
    if (isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau)
            or tau <= 0):
        raise ValueError(f"centered_clipping: tau must be a finite number > 0, got {tau!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(
            f"centered_clipping: iterations must be an integer >= 1, got {iterations!r}")
    tau = float(tau)
    start = median().estimate

    def estimate(updates: jax.Array, weights: jax.Array, valid: jax.Array):
        n = jnp.maximum(num_valid(valid), 1).astype(updates.dtype)
        x = jnp.where(valid[:, None], updates, 0.0)  # NaN in invalid rows cannot leak

        def step(_, v):
            diff = x - v[None, :]
            norms = client_norms(diff)
            over = norms > tau
            factor = jnp.where(over, tau / jnp.where(over, norms, 1.0), 1.0)
            moved = jnp.where(valid[:, None], diff * factor[:, None], 0.0)
            return v + jnp.sum(moved, axis=0) / n

        v0, _ = start(updates, weights, valid)
        return jax.lax.fori_loop(0, iterations, step, v0), {}

    return Aggregator(name=f"cclip{tau:g}_{iterations}", estimate=estimate)
