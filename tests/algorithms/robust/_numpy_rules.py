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


def np_bulyan(x, valid, f):
    """El Mhamdi et al. 2018: theta = n - 2f recursive Krum picks, then per coordinate the mean
    of the beta = theta - 2f picked values closest to their median (ties: lower slot)."""
    idx = [i for i in range(len(x)) if valid[i]]
    n = len(idx)
    if n == 0:
        return np.zeros(x.shape[1])
    theta = max(n - 2 * f, 1)
    beta = max(theta - 2 * f, 1 if theta % 2 else 2)
    remaining, picked = list(idx), []
    for _ in range(theta):
        r = len(remaining)
        k = min(max(r - f - 2, 1), r - 1)
        scores = []
        for i in remaining:
            d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in remaining if j != i)
            scores.append(sum(d[:k]))
        best = remaining[min(range(r), key=lambda t: (scores[t], remaining[t]))]
        picked.append(best)
        remaining.remove(best)
    picked.sort()
    s = x[picked]
    med = np.median(s, axis=0)
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        order = sorted(range(theta), key=lambda t: (abs(s[t, j] - med[j]), t))
        out[j] = np.mean([s[t, j] for t in order[:beta]])
    return out


def np_geometric_median(x, w, valid, iterations, nu):
    """Pillutla et al. 2022: smoothed Weiszfeld from the weighted mean; returns the
    estimate and the size of the last step."""
    v = x[valid]
    a = w[valid]
    if len(v) == 0:
        return np.zeros(x.shape[1]), 0.0
    z = (a[:, None] * v).sum(0) / a.sum()
    prev = z
    for _ in range(iterations):
        b = a / np.maximum(nu, np.linalg.norm(v - z, axis=1))
        prev, z = z, (b[:, None] * v).sum(0) / b.sum()
    return z, float(np.linalg.norm(z - prev))


def np_centered_clipping(x, valid, tau, iterations):
    """Karimireddy et al. 2021: v <- v + mean_i clip(x_i - v, tau), from the coordinate median."""
    v = x[valid]
    if len(v) == 0:
        return np.zeros(x.shape[1])
    c = np.median(v, axis=0)
    for _ in range(iterations):
        d = v - c
        norms = np.linalg.norm(d, axis=1)
        scale = np.minimum(1.0, tau / np.maximum(norms, 1e-300))
        c = c + (d * scale[:, None]).mean(0)
    return c
