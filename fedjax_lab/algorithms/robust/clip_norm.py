"""Per-client L2 norm clipping before aggregation.

Scales each client's whole update (all leaves together) to norm at most ``max_norm``:
``u * min(1, max_norm / ||u||)``. This bounds any one client's influence on a sum, which is what
DP-FedAvg's sensitivity analysis needs (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models") and limits the damage of a single huge Byzantine update (Sun et al.
2019, "Can You Really Backdoor Federated Learning?").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust._base import Transform


def client_norms(updates: jax.Array) -> jax.Array:
    """``[C]`` L2 norms of the rows of ``[C, D]``, scaled so huge values do not overflow."""
    scale = jnp.max(jnp.abs(updates), axis=1, initial=0.0)
    safe = jnp.where(scale > 0, scale, 1.0)
    return scale * jnp.sqrt(jnp.sum(jnp.square(updates / safe[:, None]), axis=1))


def clip_norm(max_norm: float) -> Transform:
    """Clips every client's update to L2 norm ``<= max_norm``.

    Reports ``clipped_clients``: the number of valid clients whose update was scaled down.

    Args:
      max_norm: the clipping bound ``S > 0`` (finite).
    """
    if (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, int | float)
        or not math.isfinite(max_norm)
        or max_norm <= 0
    ):
        raise ValueError(f"clip_norm: max_norm must be a finite number > 0, got {max_norm!r}")
    bound = float(max_norm)

    def apply(updates: jax.Array, valid: jax.Array):
        norms = client_norms(updates)
        over = norms > bound
        factor = jnp.where(over, bound / jnp.where(over, norms, 1.0), 1.0)
        clipped = jnp.sum(jnp.logical_and(over, valid).astype(jnp.float32))
        return updates * factor[:, None].astype(updates.dtype), {"clipped_clients": clipped}

    return Transform(name=f"clip{bound:g}", apply=apply, metric_names=("clipped_clients",))
