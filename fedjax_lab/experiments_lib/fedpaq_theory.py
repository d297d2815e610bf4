"""FedPAQ's strongly convex rate, measured: ``f(x_T) - f* = O(1/T)`` with ``eta_k ~ 1/k``.

Reisizadeh, Mokhtari, Hassani, Jadbabaie, Pedarsani (2020), "FedPAQ: A Communication-Efficient
Federated Learning Method with Periodic Averaging and Quantization", AISTATS, Theorem 1 and
Remarks 1-2: for a mu-strongly convex, L-smooth loss, FedPAQ with period ``tau``, ``r`` of ``n``
nodes and an unbiased quantizer, run with ``eta_k = c / (k·tau + k0)`` (the theorem's
``c = 4/mu``), has ``E||x_K - x*||² = O(tau/T)`` for constant ``tau``; with L-smoothness the
optimality gap ``f(x_T) - f*`` is ``O(1/T)`` too.

The check: L2-regularised logistic regression (``mu >= l2``) on the ``lr`` setting's data,
FedPAQ with ``(s, tau, r) = (1, 2, n/2)``, ``c = 2/mu`` (``c·mu > 1`` is what the ``1/T`` rate
needs; 4/mu only enlarges ``k0``), ``k0 = ceil(c·L)`` so that the first step is ``1/L``.
``f*`` comes from a long centralized run (Nesterov's accelerated gradient for strongly convex
functions). The gap is averaged over seeds at ``T_max / 2^j`` and the log-log slope is fitted
by least squares over the checkpoints past ``2·k0`` (the ``1/(k·tau + k0)`` regime); ≈ -1 is
the theorem's rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.algorithms.fedpaq import fedpaq
from fedjax_lab.compressors import qsgd
from fedjax_lab.data.datasets import federate
from fedjax_lab.experiments_lib.fedpaq import (
    FedPAQFigureConfig,
    global_objective,
    load_setting_data,
)
from fedjax_lab.models import get_model
from fedjax_lab.sweep import sweep

THEORY_TAU = 2
THEORY_LEVELS = 1
CHECKPOINTS = 5


def fit_loglog_slope(ts: Sequence[float], gaps: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit ``log gap = slope·log T + b``; returns ``(slope, b)``.

    Raises:
      ValueError: fewer than two points, or a ``T`` or gap that is not finite and > 0 (a
        gap <= 0 means ``f*`` is not below every iterate: run the centralized solver longer).
    """
    t = np.asarray(ts, np.float64)
    g = np.asarray(gaps, np.float64)
    if t.shape != g.shape or t.ndim != 1 or len(t) < 2:
        raise ValueError(f"ts and gaps must be 1-D of one length >= 2, got {t.shape}, {g.shape}")
    for name, v in (("ts", t), ("gaps", g)):
        if not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"{name} must be finite and > 0 for a log-log fit, got {v}")
    slope, intercept = np.polyfit(np.log(t), np.log(g), 1)
    return float(slope), float(intercept)


def smoothness_bound(x: np.ndarray, l2: float) -> float:
    """``L <= lambda_max(X~ᵀX~ / N) / 2 + l2`` for two-class softmax cross-entropy.

    ``X~`` is the flattened inputs with a column of ones (the bias); the Hessian of the
    two-class cross-entropy in the logits is ``diag(p) - ppᵀ``, whose eigenvalues are <= 1/2.
    """
    xt = np.c_[x.reshape(len(x), -1).astype(np.float64), np.ones(len(x))]
    return float(np.linalg.eigvalsh(xt.T @ xt / len(xt))[-1]) / 2 + l2


def centralized_minimum(objective: Callable[[Any, Any], jax.Array], params: Any, data: Any,
                        lipschitz: float, mu: float, iterations: int) -> tuple[float, float]:
    """``(f*, ||grad f||)`` after ``iterations`` of Nesterov's method for strongly convex
    ``f = objective(., data)`` (``data`` is a program argument, not an embedded constant).

    Step ``1/L``, momentum ``(sqrt(L) - sqrt(mu)) / (sqrt(L) + sqrt(mu))`` (Nesterov 2004,
    scheme 2.2.19): the error contracts by ``1 - sqrt(mu/L)`` per iteration.
    """
    grad = jax.grad(objective)
    beta = (math.sqrt(lipschitz) - math.sqrt(mu)) / (math.sqrt(lipschitz) + math.sqrt(mu))

    @jax.jit
    def solve(x0, data):
        def body(_, carry):
            x, y = carry
            x_new = jax.tree.map(lambda a, g: a - g / lipschitz, y, grad(y, data))
            y_new = jax.tree.map(lambda a, b: a + beta * (a - b), x_new, x)
            return x_new, y_new

        x, _ = jax.lax.fori_loop(0, iterations, body, (x0, x0))
        g = grad(x, data)
        return objective(x, data), jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))

    f_star, gnorm = solve(params, data)
    return float(f_star), float(gnorm)


def run_theory(cfg: FedPAQFigureConfig) -> dict[str, Any]:
    """Measures the gap ``f(x_T) - f*`` of FedPAQ with ``eta_k = c/(k·tau + k0)`` and its slope."""
    dataset, source = load_setting_data(cfg, "lr")
    l2 = cfg.theory_l2
    model = get_model("logreg", dataset.input_shape, dataset.num_classes)
    loss_fn = global_objective(model, l2)
    train = {k: jnp.asarray(v) for k, v in dataset.train.items()}
    data = federate(dataset, "iid", cfg.num_clients, seed=cfg.seed)
    params = model.init(jax.random.key(cfg.seed))
    lipschitz = smoothness_bound(dataset.train["x"], l2)
    mu = l2
    c = 2.0 / mu
    k0 = math.ceil(c * lipschitz)
    tau, r = THEORY_TAU, cfg.num_clients // 2
    t_max = cfg.theory_iterations or (160 if cfg.quick else 16 * k0)
    rounds = max(CHECKPOINTS, t_max // tau)
    # Checkpoints rounds/2^j (j = 0..4), as round counts; iterations T = rounds·tau.
    check_rounds = sorted({max(1, rounds >> j) for j in range(CHECKPOINTS)})
    checks = jnp.asarray(check_rounds, jnp.int32)

    def gated(p, d, r):
        # Only the checkpoints (after round r + 1) pay for the full-data objective.
        return {"objective": jax.lax.cond(jnp.any(r + 1 == checks), loss_fn,
                                          lambda *_: jnp.float32(jnp.nan), p, d)}

    def make(h):
        opt = kit.per_round(lambda learning_rate: optax.chain(
            optax.add_decayed_weights(l2), optax.sgd(learning_rate)),
            learning_rate=lambda k: h["c"] / (k * tau + k0))
        return fedpaq(model, opt, num_steps=tau, batch_size=cfg.batch_size,
                      compressor=qsgd(num_levels=THEORY_LEVELS))

    seeds = [cfg.seed + i for i in range(cfg.theory_seeds)]
    res = sweep(make, {"c": [c]}, data, params, seeds=seeds, rounds=rounds,
                clients_per_round=r, keep_params=False, round_eval=gated,
                round_eval_data=train)
    f_star, grad_norm = centralized_minimum(loss_fn, params, train, lipschitz, mu,
                                            iterations=max(500, math.ceil(
                                                40 * math.sqrt(lipschitz / mu))))
    values = np.asarray(res.history["objective"][:, 0, :], np.float64)  # [seeds, rounds]
    ts = [k * tau for k in check_rounds]
    per_seed = values[:, [k - 1 for k in check_rounds]]
    gaps = (per_seed - f_star).mean(axis=0)
    fit_ts = [t for t in ts if t >= 2 * k0] or ts
    fit_gaps = [g for t, g in zip(ts, gaps, strict=True) if t in fit_ts]
    out: dict[str, Any] = {
        "source": source, "l2": l2, "mu": mu, "L": lipschitz, "c": c, "k0": k0,
        "tau": tau, "r": r, "s": THEORY_LEVELS, "seeds": seeds,
        "step_size": f"eta_k = {c:g} / (k·{tau} + {k0}) for round k",
        "f_star": f_star, "f_star_grad_norm": grad_norm,
        "T": ts, "gap": [float(g) if np.isfinite(g) else None for g in gaps],
        "gap_per_seed": [[float(v - f_star) for v in row] for row in per_seed],
        "fit_T": fit_ts, "slope": None, "expected_slope": -1.0,
    }
    try:
        out["slope"], out["intercept"] = fit_loglog_slope(fit_ts, fit_gaps)
    except ValueError as e:  # a gap <= 0 or non-finite: reported, never a made-up slope
        out["slope_error"] = str(e)
    return out
