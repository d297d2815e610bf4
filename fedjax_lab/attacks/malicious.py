"""Which clients are malicious, and how that reaches the jitted round as data.

The malicious set is fixed for a whole run and drawn on the host from the run seed
(``host_rng(seed, ATTACK_STREAM, 0)``), as in the threat model of Bagdasaryan et al. (2020),
"How To Backdoor Federated Learning", and Baruch et al. (2019), "A Little Is Enough": the
adversary controls a fixed subset of the population, some of which are sampled in a round.

Malicious-ness reaches the compiled round as DATA, never as Python branching: ``mark_malicious``
adds a per-example float32 column :data:`MALICIOUS_KEY` (1 on every row of a malicious client,
0 elsewhere) to the population's arrays. The cohort builder carries it like ``x`` and ``y``
(padded, packed, device table or host examples alike), and
:func:`fedjax_lab.attacks.with_model_poisoning` reads it back per client slot inside the
round (``max`` over the slot's real examples), so one compiled program serves every round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_lab.core import rng as rng_lib
from fedjax_lab.data.federated import FederatedData

#: The per-example column of ``mark_malicious`` (1.0 on a malicious client's rows).
MALICIOUS_KEY = "malicious"
#: Substream of ``ATTACK_STREAM`` that draws the malicious set.
SELECTION_SUBSTREAM = 0


def num_malicious(num_clients: int, fraction: float) -> int:
    """``round(fraction * num_clients)`` (Python's round: halves to even), checked.

    Raises:
      ValueError: ``fraction`` outside ``[0, 1)`` or ``num_clients < 1``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(f"malicious fraction must be a float in [0, 1), got {fraction!r}")
    if not 0.0 <= fraction < 1.0:  # also rejects NaN; 1.0 leaves no honest client
        raise ValueError(f"malicious fraction must be in [0, 1), got {fraction}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    return round(fraction * num_clients)


def select_malicious(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted population indices of the run's malicious clients.

    ``num_malicious(num_clients, fraction)`` distinct clients drawn uniformly without
    replacement with ``host_rng(seed, ATTACK_STREAM, SELECTION_SUBSTREAM)``: the same seed
    gives the same set on every host and every resume.
    """
    count = num_malicious(num_clients, fraction)
    rng = rng_lib.host_rng(seed, rng_lib.ATTACK_STREAM, SELECTION_SUBSTREAM)
    return np.sort(rng.choice(num_clients, size=count, replace=False)).astype(np.int64)


def check_malicious(data: FederatedData, malicious: Sequence[int] | np.ndarray) -> np.ndarray:
    """``malicious`` as sorted unique int64 population indices; ValueError when out of range."""
    ids = np.asarray(malicious)
    if ids.size and (ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"malicious must be a 1-D list of client indices, got {malicious!r}")
    ids = ids.astype(np.int64).reshape(-1)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"malicious client indices must be distinct, got {ids.tolist()}")
    bad = ids[(ids < 0) | (ids >= data.num_clients)]
    if bad.size:
        raise ValueError(f"malicious client indices {bad.tolist()} are outside the population "
                         f"of {data.num_clients} clients")
    return np.sort(ids)


def malicious_rows(data: FederatedData, malicious: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[N]`` bool: whether each example row belongs to a malicious client."""
    ids = check_malicious(data, malicious)
    rows = np.zeros(int(data.offsets[-1]), bool)
    for i in ids:
        rows[data.offsets[i]:data.offsets[i + 1]] = True
    return rows


def replace_arrays(data: FederatedData, arrays: dict[str, Any]) -> FederatedData:
    """``data`` with new in-memory arrays (same clients and offsets; labels re-checked)."""
    if data.is_lazy:
        raise ValueError("attacks rewrite the population's arrays in memory; a lazily read "
                         "population (RowSource) is not supported: load it in memory")
    return FederatedData(data.client_ids, arrays, data.offsets, data.num_classes, data.label_key)


def mark_malicious(data: FederatedData, malicious: Sequence[int] | np.ndarray) -> FederatedData:
    """``data`` with the float32 column :data:`MALICIOUS_KEY` (1 on malicious clients' rows)."""
    if not data.is_lazy and MALICIOUS_KEY in data.arrays:
        raise ValueError(f"the population already has a {MALICIOUS_KEY!r} array")
    column = malicious_rows(data, malicious).astype(np.float32)
    return replace_arrays(data, {**data.arrays, MALICIOUS_KEY: column})
