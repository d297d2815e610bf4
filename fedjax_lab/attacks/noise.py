"""Gaussian-noise uploads (the "Gaussian" Byzantine attack of Blanchard et al. 2017, §5, and
Xie et al. 2018 "Generalized Byzantine-tolerant SGD").

A malicious client uploads ``N(0, sigma^2 I)`` instead of its update (its update is
discarded). The draw uses the client's key folded with ``ATTACK_NOISE_STREAM``, so it is a pure
function of ``(seed, round, slot)`` and leaves every other draw unchanged. Not omniscient.
"""

from __future__ import annotations

import jax

from fedjax_lab.attacks._checks import check_positive
from fedjax_lab.attacks.model_poisoning import ModelAttack


def noise(sigma: float) -> ModelAttack:
    """Malicious upload ``sigma * z``, ``z ~ N(0, I)`` drawn from the client's attack key.

    Args:
      sigma: standard deviation of every coordinate, > 0.
    """
    sigma = check_positive("noise: sigma", sigma)

    def per_client(update: jax.Array, key: jax.Array) -> jax.Array:
        return sigma * jax.random.normal(key, update.shape, update.dtype)

    return ModelAttack(name=f"noise{sigma:g}", per_client=per_client)
