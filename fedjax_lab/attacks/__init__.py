"""Attacks on federated learning as composable wrappers over any algorithm.

* Who: :func:`select_malicious` draws a fixed seeded set of malicious clients;
  :func:`mark_malicious` gives their examples the per-example column that carries
  malicious-ness into the jitted round as data.
* Model poisoning (:func:`with_model_poisoning`): :func:`scale` (Bagdasaryan et al. 2020),
  :func:`noise`, :func:`sign_flip` (per client) and the OMNISCIENT :func:`alie` (Baruch et al.
  2019) and :func:`ipm` (Xie et al. 2020), which see the round's honest updates.
* Data poisoning (host side, before training): :func:`label_flip` and the pixel-pattern
  :func:`backdoor` (Bagdasaryan et al. 2020), measured by :func:`attack_success_evaluator`;
  :func:`with_malicious_flag` reports which clients are malicious without changing uploads, so
  a selecting defense's exclusions can be scored (precision/recall of detection).
"""

from fedjax_lab.attacks.alie import alie, alie_z
from fedjax_lab.attacks.backdoor import (
    ATTACK_SUCCESS,
    add_trigger,
    attack_success_evaluator,
    backdoor,
    triggered_test,
)
from fedjax_lab.attacks.ipm import ipm
from fedjax_lab.attacks.label_flip import FLIP_MAPS, flip_map, label_flip
from fedjax_lab.attacks.malicious import (
    MALICIOUS_KEY,
    mark_malicious,
    num_malicious,
    select_malicious,
)
from fedjax_lab.attacks.model_poisoning import (
    MALICIOUS_CLIENTS,
    ModelAttack,
    with_malicious_flag,
    with_model_poisoning,
)
from fedjax_lab.attacks.noise import noise
from fedjax_lab.attacks.scale import scale
from fedjax_lab.attacks.sign_flip import sign_flip

__all__ = [
    "ATTACK_SUCCESS",
    "FLIP_MAPS",
    "MALICIOUS_CLIENTS",
    "MALICIOUS_KEY",
    "ModelAttack",
    "add_trigger",
    "alie",
    "alie_z",
    "attack_success_evaluator",
    "backdoor",
    "flip_map",
    "ipm",
    "label_flip",
    "mark_malicious",
    "noise",
    "num_malicious",
    "scale",
    "select_malicious",
    "sign_flip",
    "triggered_test",
    "with_malicious_flag",
    "with_model_poisoning",
]
