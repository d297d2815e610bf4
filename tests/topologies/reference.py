"""Plain numpy references of the decentralized algorithms (float64, Python loops over nodes).

They share nothing with the library but the batch layout (which examples each node visits in
each round, from the same ``CohortBuilder``), so a bug in local training, mixing, de-biasing or
compression shows up as a difference.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from fedjax_lab import topologies
from fedjax_lab.algorithms import kit
from fedjax_lab.compressors import top_k
from fedjax_lab.data.cohort import CohortBuilder
from tests.helpers import LinearModel, make_population, np_softmax_ce_grad

N_NODES = 8
BATCH = 4
STEPS = 2
LR = 0.3
ROUNDS = 3

MODEL = LinearModel(dim=5, classes=3)
# Node 6 has 3 examples < the batch of 4: its steps are partly masked.
DATA = make_population([6, 9, 4, 7, 5, 8, 3, 10], seed=1)
PARAMS = MODEL.init(jax.random.key(0))
W0, B0 = np.asarray(PARAMS["w"], np.float64), np.asarray(PARAMS["b"], np.float64)
OBJECTIVE = kit.model_objective(MODEL)
# One object per algorithm for every test module: the vmap round program is cached per
# algorithm and node count, so tests of the same shapes share one compilation.
DSGD = topologies.dsgd(OBJECTIVE, optax.sgd(LR))
PUSHSUM = topologies.pushsum(OBJECTIVE, optax.sgd(LR))
TOP_K, GAMMA = 5, 0.4
CHOCO_TOP_K = topologies.choco_sgd(OBJECTIVE, optax.sgd(LR), top_k(TOP_K), gamma=GAMMA)


def builder(data, steps=STEPS, seed=0):
    return CohortBuilder(data, batch_size=BATCH, local_epochs=None, num_steps=steps,
                         cohort_size=data.num_clients,
                         seed=seed, device_table=True, ladder=None)


def local_sgd(w, b, data, index, mask):
    """One node's ``STEPS`` masked SGD steps (the kit's masked-mean objective)."""
    x_all, y_all = data.arrays["x"].astype(np.float64), data.arrays["y"]
    for step in range(index.shape[0]):
        real = index[step][mask[step] > 0]
        if len(real) == 0:
            continue
        gw, gb = np_softmax_ce_grad(w, b, x_all[real], y_all[real])
        w, b = w - LR * gw, b - LR * gb
    return w, b


def layouts(data, rounds=ROUNDS, steps=STEPS, seed=0):
    bld = builder(data, steps, seed)
    out = []
    for r in range(rounds):
        c = bld.build(r, np.arange(data.num_clients))
        out.append((c.index, c.mask))
    return out


def dsgd(data, w0, b0, matrices, rounds=ROUNDS, steps=STEPS):
    """``x <- W (local SGD(x))``; ``matrices`` cycles by round; returns ``[n, ...]`` w, b."""
    n = data.num_clients
    w = np.stack([w0] * n).astype(np.float64)
    b = np.stack([b0] * n).astype(np.float64)
    for r, (index, mask) in enumerate(layouts(data, rounds, steps)):
        half = [local_sgd(w[i], b[i], data, index[i], mask[i]) for i in range(n)]
        hw, hb = np.stack([h[0] for h in half]), np.stack([h[1] for h in half])
        mat = matrices[r % len(matrices)]
        w, b = np.einsum("ij,jkl->ikl", mat, hw), mat @ hb
    return w, b


def pushsum(data, w0, b0, matrix, rounds=ROUNDS):
    """SGP: ``z = x / w``, ``x += local(z) - z``, ``x <- A x``, ``w <- A w``; returns z."""
    n = data.num_clients
    xw = np.stack([w0] * n).astype(np.float64)
    xb = np.stack([b0] * n).astype(np.float64)
    weight = np.ones(n)
    for index, mask in layouts(data, rounds):
        for i in range(n):
            zw, zb = xw[i] / weight[i], xb[i] / weight[i]
            tw, tb = local_sgd(zw, zb, data, index[i], mask[i])
            xw[i], xb[i] = xw[i] + tw - zw, xb[i] + tb - zb
        xw, xb, weight = np.einsum("ij,jkl->ikl", matrix, xw), matrix @ xb, matrix @ weight
    return xw / weight[:, None, None], xb / weight[:, None], weight


def choco_top_k(data, w0, b0, matrix, k, gamma, rounds=ROUNDS):
    """CHOCO-SGD with top-k of ``x_half - x_hat`` (flattened in jax.tree order: b, then w)."""
    n = data.num_clients
    w = np.stack([w0] * n).astype(np.float64)
    b = np.stack([b0] * n).astype(np.float64)
    hat_w, hat_b = np.zeros_like(w), np.zeros_like(b)
    for index, mask in layouts(data, rounds):
        for i in range(n):
            w[i], b[i] = local_sgd(w[i], b[i], data, index[i], mask[i])
            diff = np.concatenate([b[i] - hat_b[i], (w[i] - hat_w[i]).ravel()])
            keep = np.argsort(-np.abs(diff), kind="stable")[:k]
            q = np.zeros_like(diff)
            q[keep] = diff[keep]
            hat_b[i] += q[: b.shape[1]]
            hat_w[i] += q[b.shape[1]:].reshape(w.shape[1:])
        mw, mb = np.einsum("ij,jkl->ikl", matrix, hat_w), matrix @ hat_b
        w, b = w + gamma * (mw - hat_w), b + gamma * (mb - hat_b)
    return w, b


def centralized_average_sgd(data, w0, b0, rounds=ROUNDS):
    """One model; each round one SGD step on the mean over nodes of their batch gradients
    (what D-SGD with ``W = 11^T / n`` and one local step must equal)."""
    x_all, y_all = data.arrays["x"].astype(np.float64), data.arrays["y"]
    w, b = w0.astype(np.float64), b0.astype(np.float64)
    for index, mask in layouts(data, rounds, steps=1):
        grads = [np_softmax_ce_grad(w, b, x_all[index[i, 0][mask[i, 0] > 0]],
                                    y_all[index[i, 0][mask[i, 0] > 0]])
                 for i in range(data.num_clients)]
        w = w - LR * np.mean([g[0] for g in grads], axis=0)
        b = b - LR * np.mean([g[1] for g in grads], axis=0)
    return w, b


def consensus(w, b):
    """``(1/n) sum_i ||z_i - z_bar||^2`` of stacked numpy models."""
    return float(np.mean(np.sum((w - w.mean(0)) ** 2, axis=(1, 2))
                         + np.sum((b - b.mean(0)) ** 2, axis=1)))
