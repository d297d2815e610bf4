"""Inner-product manipulation (IPM; Xie, Koyejo and Gupta 2020, "Fall of Empires: Breaking
Byzantine-tolerant SGD by Inner Product Manipulation", UAI, §4).

OMNISCIENT: every malicious client of the round uploads ``-epsilon * mean`` of the round's
honest valid updates, which the attacker sees, so that the inner product of the aggregate with
the true descent direction turns negative. The paper breaks Krum with a small ``epsilon``
(0.1) and mean/median with a large one. A round without honest clients has no mean: the
uploads are NaN.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_lab.attacks._checks import check_positive
from fedjax_lab.attacks.alie import honest_moments
from fedjax_lab.attacks.model_poisoning import ModelAttack


def ipm(epsilon: float = 0.1) -> ModelAttack:
    """The IPM attack: malicious upload ``-epsilon * mean(honest updates)``.

    Args:
      epsilon: the factor > 0.
    """
    epsilon = check_positive("ipm: epsilon", epsilon)

    def omniscient(updates, malicious, valid):
        mean, _ = honest_moments(updates, malicious, valid)
        return jnp.where(malicious[:, None], (-epsilon * mean)[None, :], updates), {}

    return ModelAttack(name=f"ipm{epsilon:g}", omniscient=omniscient)
