"""Geometric median by the smoothed Weiszfeld algorithm: RFA (Pillutla, Kakade, Harchaoui 2022,
"Robust Aggregation for Federated Learning", the smoothed Weiszfeld algorithm).

Approximately minimizes ``sum_i alpha_i * max(nu, ||z - u_i||)`` over ``z`` (the smoothed
geometric median of the valid updates ``u_i`` with the clients' weights ``alpha_i``) by
``iterations`` Weiszfeld steps from the weighted mean:

``beta_i = alpha_i / max(nu, ||z - u_i||)``,  ``z <- sum_i beta_i u_i / sum_i beta_i``.

The number of steps is fixed so the rule is one ``lax.fori_loop`` under ``jit`` (no data-dependent
stopping); convergence is REPORTED instead: ``geomed_last_step`` is ``||z_R - z_{R-1}||`` and
``geomed_converged`` is 1 when that step is ``<= tol``. Weights: RFA weights clients by
``alpha_i`` (their example counts for FedAvg), which a Byzantine client could inflate; with
``uniform`` weighting on the algorithm every valid client has weight 1.

Breakdown point 1/2: with fewer than half of the (weighted) mass Byzantine, the geometric median
stays within a bounded distance of the honest clients' updates however far the attackers are.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust._base import Aggregator
from fedjax_lab.algorithms.robust.clip_norm import client_norms


def geometric_median(iterations: int = 3, nu: float = 1e-6, tol: float = 1e-5) -> Aggregator:
    """RFA's smoothed-Weiszfeld geometric median over the valid clients, weighted by ``alpha_i``.

    Args:
      iterations: Weiszfeld steps ``R >= 1`` (Pillutla et al. find that a few suffice).
      nu: smoothing ``nu > 0``: distances below ``nu`` count as ``nu`` (no division by 0).
      tol: step size under which ``geomed_converged`` reports 1, ``tol >= 0``.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(
            f"geometric_median: iterations must be an integer >= 1, got {iterations!r}")
    for name, value, low_ok in (("nu", nu, False), ("tol", tol, True)):
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value < 0 or (value == 0 and not low_ok)):
            bound = ">= 0" if low_ok else "> 0"
            raise ValueError(f"geometric_median: {name} must be a finite number {bound}, "
                             f"got {value!r}")
    nu, tol = float(nu), float(tol)

    def estimate(updates: jax.Array, weights: jax.Array, valid: jax.Array):
        alpha = jnp.where(valid, weights, 0.0)
        # Garbage (NaN/inf) in invalid rows must not reach any sum through 0 * NaN.
        x = jnp.where(valid[:, None], updates, 0.0)

        def weighted_mean(b):
            return jnp.sum(b[:, None] * x, axis=0) / jnp.maximum(jnp.sum(b), 1e-30)

        def step(_, carry):
            z, _ = carry
            dist = client_norms(x - z[None, :])
            new = weighted_mean(alpha / jnp.maximum(dist, nu))
            return new, z

        z0 = weighted_mean(alpha)
        z, previous = jax.lax.fori_loop(0, iterations, step, (z0, z0))
        last = client_norms((z - previous)[None, :])[0]
        return z, {"geomed_last_step": last,
                   "geomed_converged": (last <= tol).astype(jnp.float32)}

    return Aggregator(name=f"geomed{iterations}", estimate=estimate,
                      metric_names=("geomed_last_step", "geomed_converged"))
