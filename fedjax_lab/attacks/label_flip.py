"""Label flipping (data poisoning; e.g. Biggio et al. 2012, Tolpegin et al. 2020 "Data
Poisoning Attacks Against Federated Learning Systems").

Every training example of a malicious client has its label ``y`` replaced by ``map[y]``, on the
host before training (the clients then train honestly on poisoned data). Maps:

* ``"reverse"``: ``y -> num_classes - 1 - y`` (the fixed map of Fang et al. 2020, §4);
* ``"permutation"``: a uniformly random permutation of the classes drawn once per run with
  ``host_rng(seed, ATTACK_STREAM, PERMUTATION_SUBSTREAM)`` (it may fix some classes);
* an explicit sequence of ``num_classes`` labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedjax_lab.attacks.malicious import malicious_rows, replace_arrays
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.data.federated import FederatedData

#: Substream of ``ATTACK_STREAM`` that draws the ``"permutation"`` map.
PERMUTATION_SUBSTREAM = 1
FLIP_MAPS = ("reverse", "permutation")


def flip_map(mapping: str | Sequence[int], num_classes: int, seed: int = 0) -> np.ndarray:
    """The ``[num_classes]`` int32 label map of ``mapping`` (see the module docstring)."""
    if num_classes < 2:
        raise ValueError(f"label flipping needs num_classes >= 2, got {num_classes}")
    if isinstance(mapping, str):
        if mapping == "reverse":
            return np.arange(num_classes - 1, -1, -1, dtype=np.int32)
        if mapping == "permutation":
            rng = rng_lib.host_rng(seed, rng_lib.ATTACK_STREAM, PERMUTATION_SUBSTREAM)
            return rng.permutation(num_classes).astype(np.int32)
        raise ValueError(f"label flip map must be one of {FLIP_MAPS} or a list of labels, got "
                         f"{mapping!r}")
    table = np.asarray(mapping)
    if (table.shape != (num_classes,) or not np.issubdtype(table.dtype, np.integer)
            or table.min() < 0 or table.max() >= num_classes):
        raise ValueError(f"label flip map must hold {num_classes} labels in [0, {num_classes}), "
                         f"got {mapping!r}")
    return table.astype(np.int32)


def label_flip(data: FederatedData, malicious: Sequence[int] | np.ndarray,
               mapping: str | Sequence[int] = "reverse", seed: int = 0) -> FederatedData:
    """``data`` with the labels of the malicious clients' examples mapped by ``mapping``.

    Args:
      data: in-memory population with class labels and ``num_classes``.
      malicious: population indices of the malicious clients.
      mapping: ``"reverse"``, ``"permutation"`` (seeded by ``seed``) or a label list.
      seed: the run seed (only ``"permutation"`` draws from it).
    """
    if data.num_classes is None or data.label_key is None:
        raise ValueError("label flipping needs a population with class labels and num_classes")
    table = flip_map(mapping, data.num_classes, seed)
    rows = malicious_rows(data, malicious)
    y = np.asarray(data.arrays[data.label_key]).copy()
    y[rows] = table[y[rows]]
    return replace_arrays(data, {**data.arrays, data.label_key: y})
