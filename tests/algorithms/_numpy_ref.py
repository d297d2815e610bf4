"""Plain numpy / Python-loop pieces shared by the algorithm reference implementations.

They replay exactly the library's client sampling and data order (``sample_clients`` with
``host_rng(seed, SAMPLING, r)`` and ``CohortBuilder.client_index``) in float64 numpy.
"""

from __future__ import annotations

import numpy as np

from fedjax_lab.core import rng as rng_lib
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData, sample_clients
from tests.helpers import np_softmax_ce_grad


def to_np(params) -> dict[str, np.ndarray]:
    return {"w": np.asarray(params["w"], np.float64), "b": np.asarray(params["b"], np.float64)}


def sampled_clients(data, clients_per_round: int, seed: int, round_idx: int) -> np.ndarray:
    return sample_clients(data.num_clients, clients_per_round,
                          rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, round_idx))


def make_builder(data, *, batch_size, seed, local_epochs=None, num_steps=None, cohort_size=1):
    if local_epochs is None and num_steps is None:
        local_epochs = 1
    return CohortBuilder(data, batch_size=batch_size, local_epochs=local_epochs,
                         num_steps=num_steps, cohort_size=cohort_size, seed=seed,
                         device_table=False)


def client_steps(builder: CohortBuilder, client: int, round_idx: int,
                 max_steps: int | None = None) -> list[np.ndarray]:
    """The example indices of each real local step of a client (padding steps removed)."""
    steps = [s[s >= 0] for s in builder.client_index(int(client), round_idx)]
    steps = [s for s in steps if len(s)]
    return steps if max_steps is None else steps[:max_steps]


def local_sgd(params, data, steps, lr, *, momentum=0.0, prox_mu=0.0, correction=None):
    """Runs (heavy-ball) SGD steps on the softmax-CE of the linear model; returns new params.

    ``prox_mu`` adds ``mu (w - w0)`` (FedProx), ``correction`` adds a constant (SCAFFOLD).
    """
    x_all = data.arrays["x"].astype(np.float64)
    y_all = data.arrays["y"]
    p = {k: v.copy() for k, v in params.items()}
    u = {k: np.zeros_like(v) for k, v in params.items()}
    for idx in steps:
        gw, gb = np_softmax_ce_grad(p["w"], p["b"], x_all[idx], y_all[idx])
        g = {"w": gw, "b": gb}
        for k in p:
            g[k] = g[k] + prox_mu * (p[k] - params[k])
            if correction is not None:
                g[k] = g[k] + correction[k]
            u[k] = momentum * u[k] + g[k]
            p[k] = p[k] - lr * u[k]
    return p


def global_loss(params, data) -> float:
    """Mean softmax cross entropy over the whole population (float64)."""
    x = data.arrays["x"].astype(np.float64)
    y = data.arrays["y"]
    logits = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def make_shared_population(sizes: list[int], dim: int = 5, classes: int = 3, seed: int = 0):
    """Clients whose labels all come from ONE linear map (a learnable, homogeneous problem)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, classes))
    clients = {}
    for i, n in enumerate(sizes):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        clients[f"c{i}"] = {"x": x, "y": np.argmax(x @ w, axis=1).astype(np.int32)}
    return FederatedData.from_clients(clients)
