"""Plain numpy references of the robust rules over the valid rows of ``[C, D]``."""

import math

import numpy as np


def np_median(x, valid):
    return np.median(x[valid], axis=0) if valid.any() else np.zeros(x.shape[1])


def np_trimmed_mean(x, valid, beta):
    v = np.sort(x[valid], axis=0)
    n = len(v)
    if n == 0:
        return np.zeros(x.shape[1])
    k = math.floor(beta * n)
    return v[k : n - k].mean(axis=0)


def np_multi_krum(x, valid, f, m):
    idx = [i for i in range(len(x)) if valid[i]]
    n = len(idx)
    if n == 0:
        return np.zeros(x.shape[1])
    k = min(max(n - f - 2, 1), n - 1)
    scores = []
    for i in idx:
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in idx if j != i)
        scores.append(sum(d[:k]))
    order = sorted(range(n), key=lambda t: (scores[t], t))  # stable: ties by slot
    chosen = [idx[t] for t in order[: min(m, n)]]
    return x[chosen].mean(axis=0)


def np_mean(x, w, valid):
    w = np.where(valid, w, 0.0)
    return (w[:, None] * np.where(valid[:, None], x, 0.0)).sum(0) / max(w.sum(), 1e-30)
