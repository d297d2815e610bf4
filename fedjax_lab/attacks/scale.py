"""Scaling / model replacement (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning").

The attacker uploads its update multiplied by a boost factor ``gamma``: with the global model
``G`` and its local model ``L`` it submits ``X = gamma * (L - G) + G`` (their Eq. 3), i.e. the
delta ``gamma * (L - G)``, so that after averaging with ``n`` clients at server learning rate
``eta`` the global model is (approximately) replaced by ``L`` when ``gamma = n / eta``.
Combined with the backdoor data attack it is their "model replacement"; alone it is a
magnitude attack. Not omniscient: each malicious client uses only its own update.
"""

from __future__ import annotations

import jax

from fedjax_lab.attacks._checks import check_positive
from fedjax_lab.attacks.model_poisoning import ModelAttack


def scale(boost: float) -> ModelAttack:
    """Malicious upload ``boost * u`` for the client's honest update ``u``.

    Args:
      boost: the factor ``gamma > 0`` (Bagdasaryan et al. use ``n / eta``).
    """
    boost = check_positive("scale: boost", boost)

    def per_client(update: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return boost * update

    return ModelAttack(name=f"scale{boost:g}", per_client=per_client)
