"""Inverted dropout as a pure function of an explicit key.

Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks from Overfitting"
(JMLR 15). "Inverted": kept units are scaled by ``1 / (1 - rate)`` during training, so the
expected activation equals the deterministic network's and evaluation applies no dropout and
no rescaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_rate(rate: float, name: str = "rate") -> float:
    """``rate`` as a float if it is a number in ``[0, 1)``, else a ValueError/TypeError."""
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise TypeError(f"{name} must be a float in [0, 1), got {rate!r}")
    if not 0.0 <= rate < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {rate}")
    return float(rate)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zeroes each entry of ``x`` with probability ``rate``, scales the rest by ``1/(1-rate)``.

    ``x`` is ``[B, ...]``; example ``j``'s keep mask is
    ``jax.random.bernoulli(fold_in(key, j), 1 - rate, x.shape[1:])``. The mask of an example
    thus depends on ``key`` and its position only, not on the batch size, so padding a batch
    with masked examples leaves the real examples' masks (and the update) unchanged, the same
    key gives the same masks (padded and packed local training draw the same) and tests can
    rebuild them.

    Args:
      x: activations ``[B, ...]``.
      rate: drop probability in ``[0, 1)`` (a Python float, fixed when traced).
      key: a PRNG key.

    Returns:
      ``where(keep, x / (1 - rate), 0)``, same shape and dtype as ``x``.
    """
    rate = check_rate(rate)
    if rate == 0.0:
        return x
    keep = jax.vmap(lambda j: jax.random.bernoulli(
        jax.random.fold_in(key, j), 1.0 - rate, x.shape[1:]))(jnp.arange(x.shape[0]))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
