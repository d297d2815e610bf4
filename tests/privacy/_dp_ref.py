"""Plain numpy pieces of the DP algorithm references: each sampled client's local delta."""

from __future__ import annotations

import numpy as np

from tests.algorithms._numpy_ref import client_steps, local_sgd, make_builder, sampled_clients

LR, BATCH = 0.5, 4


def round_deltas(data, p, round_idx, *, clients_per_round, seed):
    """float64 deltas ``{"w", "b"}`` of the round's sampled clients from the model ``p``."""
    builder = make_builder(data, batch_size=BATCH, local_epochs=1, seed=seed)
    out = []
    for c in sampled_clients(data, clients_per_round, seed, round_idx):
        q = local_sgd(p, data, client_steps(builder, c, round_idx), LR)
        out.append({k: q[k] - p[k] for k in p})
    return out


def l2(delta) -> float:
    return float(np.sqrt(sum(np.sum(v**2) for v in delta.values())))


def l1(delta) -> float:
    return float(sum(np.sum(np.abs(v)) for v in delta.values()))


def scaled(delta, factor):
    return {k: factor * v for k, v in delta.items()}
