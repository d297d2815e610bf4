"""A Little Is Enough (ALIE; Baruch, Baruch and Goldberg 2019, NeurIPS, Algorithm 3).

OMNISCIENT: every malicious client of the round uploads the same vector
``mu - z * sigma``, where ``mu`` and ``sigma`` are the coordinate-wise mean and (population,
ddof=0) standard deviation of the round's HONEST valid updates, which the attacker sees. With
``n`` valid clients of which ``m`` are malicious, the paper's largest ``z`` that still lets the
malicious updates pass as "supporters" of the majority is

    s = floor(n / 2 + 1) - m,        z_max = Phi^{-1}((n - s) / n)

(``Phi`` the standard normal CDF). ``n`` and ``m`` are the round's counts (traced values, so
the program compiles once). When ``m >= floor(n / 2 + 1)`` the formula gives ``z = +inf`` and
the uploads are non-finite (reported as such, never clipped); pass a fixed ``z`` for such
fractions. A round without honest clients has no mean: the uploads are NaN.
The round metric ``alie_z`` is the ``z`` used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from fedjax_lab.attacks._checks import check_positive
from fedjax_lab.attacks.model_poisoning import ModelAttack


def alie_z(n: jax.Array, m: jax.Array) -> jax.Array:
    """Baruch et al.'s ``z_max = Phi^{-1}((n - s) / n)`` with ``s = floor(n/2 + 1) - m``."""
    n = jnp.asarray(n, jnp.float32)
    s = jnp.floor(n / 2 + 1) - jnp.asarray(m, jnp.float32)
    return ndtri((n - s) / jnp.maximum(n, 1.0))


def honest_moments(updates: jax.Array, malicious: jax.Array, valid: jax.Array):
    """Coordinate-wise mean and ddof=0 std of the honest valid rows (NaN without any)."""
    honest = (valid & ~malicious).astype(updates.dtype)[:, None]
    count = jnp.sum(honest)
    mean = jnp.sum(honest * updates, axis=0) / count
    var = jnp.sum(honest * jnp.square(updates - mean[None, :]), axis=0) / count
    return mean, jnp.sqrt(var)


def alie(z: float | None = None) -> ModelAttack:
    """The ALIE attack; ``z=None`` takes ``z_max`` of the paper's formula every round.

    Args:
      z: a fixed number of standard deviations > 0, or None for the formula.
    """
    fixed = None if z is None else check_positive("alie: z", z)

    def omniscient(updates, malicious, valid):
        mean, std = honest_moments(updates, malicious, valid)
        n = jnp.sum(valid.astype(jnp.int32))
        m = jnp.sum(malicious.astype(jnp.int32))
        zz = alie_z(n, m) if fixed is None else jnp.float32(fixed)
        attack = (mean - zz * std)[None, :]
        return jnp.where(malicious[:, None], attack, updates), {"alie_z": zz}

    return ModelAttack(name="alie" if z is None else f"alie{fixed:g}", omniscient=omniscient,
                       metric_names=("alie_z",))
