"""Sign flipping (the "reversed gradient" attack; e.g. Damaskinos et al. 2018, Rajput et al.
2019 "DETOX"): a malicious client uploads ``-scale * u`` for its honest update ``u``, pushing
the model away from its own descent direction. Not omniscient.
"""

from __future__ import annotations

import jax

from fedjax_lab.attacks._checks import check_positive
from fedjax_lab.attacks.model_poisoning import ModelAttack


def sign_flip(scale: float = 1.0) -> ModelAttack:
    """Malicious upload ``-scale * u``.

    Args:
      scale: magnitude factor > 0 (1.0: the plain flipped update).
    """
    scale = check_positive("sign_flip: scale", scale)

    def per_client(update: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return -scale * update

    name = "sign_flip" if scale == 1.0 else f"sign_flip{scale:g}"
    return ModelAttack(name=name, per_client=per_client)
