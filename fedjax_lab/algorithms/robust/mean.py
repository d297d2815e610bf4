"""The weighted mean as an ``Aggregator``: the plain FedAvg rule, additive.

With ``transforms=(clip_norm(S),)`` it is norm-clipped FedAvg, the aggregation of DP-FedAvg
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust._base import Aggregator


def mean() -> Aggregator:
    """Weighted mean ``sum_i w_i u_i / sum_i w_i`` over valid clients (additive).

    Invalid slots have weight 0; they are also masked so that garbage in them (e.g. NaN in a
    padded slot) cannot leak into the sum through ``0 * NaN``.
    """

    def estimate(updates: jax.Array, weights: jax.Array, valid: jax.Array):
        w = jnp.where(valid, weights, 0.0)
        total = jnp.sum(w)
        weighted = jnp.where(valid[:, None], updates, 0.0) * w[:, None]
        return jnp.sum(weighted, axis=0) / jnp.maximum(total, 1e-30), {}

    return Aggregator(name="mean", estimate=estimate, additive=True)
