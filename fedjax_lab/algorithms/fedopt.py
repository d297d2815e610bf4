"""FedOpt: adaptive server optimizers on the averaged client update.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan (2021), "Adaptive Federated
Optimization", ICLR (Algorithm 2: FedAdagrad, FedAdam, FedYogi); Hsu, Qi, Brown (2019),
"Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification"
(FedAvgM: server momentum).

The server treats ``-Δ_t = -mean_i(x_i - x_t)`` as a pseudo-gradient and feeds it to any optax
``GradientTransformation``; FedAvg is ``optax.sgd(1.0)``. The adaptive rules of Algorithm 2 are
provided by :func:`reddi_adaptive` exactly as written in the paper: no bias correction, ``τ``
added outside the square root, ``v_{-1} = τ²``. (optax's adam/yogi/adagrad differ on each of
these points, which matters in the few hundred rounds of a federated run.)
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core.types import Algorithm, PyTree

AdaptiveKind = Literal["adagrad", "adam", "yogi"]


class ReddiState(NamedTuple):
    """First moment ``m`` and second-moment estimate ``v`` of Algorithm 2."""

    m: PyTree
    v: PyTree


def _check_real(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float, got {value!r}")
    ok = (lo < value if lo_open else lo <= value) and value < hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi})"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def reddi_adaptive(
    kind: AdaptiveKind,
    learning_rate: float,
    *,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
) -> optax.GradientTransformation:
    """The server update of Reddi et al. (2021), Algorithm 2, as an optax transformation.

    With ``g = -Δ_t`` (the pseudo-gradient the FedAvg family passes to the server optimizer):
    ``m_t = b1 m_{t-1} + (1-b1) Δ_t``; ``v_t`` is ``v_{t-1} + Δ_t²`` (adagrad),
    ``b2 v_{t-1} + (1-b2) Δ_t²`` (adam) or ``v_{t-1} - (1-b2) Δ_t² sign(v_{t-1} - Δ_t²)``
    (yogi); ``x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)``, with ``m_{-1} = 0``, ``v_{-1} = τ²``.

    Args:
      kind: ``"adagrad"``, ``"adam"`` or ``"yogi"``.
      learning_rate: server learning rate ``η`` (> 0).
      b1: first-moment decay in ``[0, 1)``.
      b2: second-moment decay in ``[0, 1)`` (unused by adagrad).
      tau: adaptivity ``τ`` (> 0).
    """
    if kind not in ("adagrad", "adam", "yogi"):
        raise ValueError(f"kind must be 'adagrad', 'adam' or 'yogi', got {kind!r}")
    lr = _check_real(learning_rate, "server_lr", 0.0, math.inf, lo_open=True)
    b1 = _check_real(b1, "b1", 0.0, 1.0)
    b2 = _check_real(b2, "b2", 0.0, 1.0)
    tau = _check_real(tau, "tau", 0.0, math.inf, lo_open=True)

    def init(params: PyTree) -> ReddiState:
        return ReddiState(
            m=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(lambda p: jnp.full_like(p, tau * tau), params),
        )

    def second_moment(v: jax.Array, g2: jax.Array) -> jax.Array:
        if kind == "adagrad":
            return v + g2
        if kind == "adam":
            return b2 * v + (1.0 - b2) * g2
        return v - (1.0 - b2) * g2 * jnp.sign(v - g2)

    def update(updates: PyTree, state: ReddiState, params: PyTree = None):
        del params  # the rule does not depend on the parameters
        m = jax.tree.map(lambda mm, g: b1 * mm + (1.0 - b1) * g, state.m, updates)
        v = jax.tree.map(lambda vv, g: second_moment(vv, g * g), state.v, updates)
        out = jax.tree.map(lambda mm, vv: -lr * mm / (jnp.sqrt(vv) + tau), m, v)
        return out, ReddiState(m, v)

    return optax.GradientTransformation(init, update)


def fedopt(
    model: Any,
    client_optimizer: Any,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    name: str = "fedopt",
    **fedavg_kwargs: Any,
) -> Algorithm:
    """FedOpt (Reddi et al. 2021, Algorithm 1) with any optax server optimizer.

    Clients run ``client_optimizer`` locally as in FedAvg; the server applies
    ``server_optimizer`` to the pseudo-gradient ``-Δ_t`` (the weighted mean of the client
    deltas). ``server_optimizer=optax.sgd(1.0)`` is FedAvg.

    Args:
      model: a ``fedjax_lab.models.Model``.
      client_optimizer: local optimizer (optax, or ``kit.per_round(...)``).
      server_optimizer: any optax ``GradientTransformation`` (e.g. :func:`reddi_adaptive`).
      batch_size: local minibatch size.
      name: name used in logs.
      **fedavg_kwargs: the other arguments of :func:`~fedjax_lab.algorithms.fedavg`
        (``local_epochs``, ``num_steps``, ``compressor``, ``weighting``, ``per_example_loss``).
    """
    if not isinstance(server_optimizer, optax.GradientTransformation):
        raise TypeError(
            "server_optimizer must be an optax.GradientTransformation (e.g. optax.sgd(1.0)), "
            f"got {type(server_optimizer).__name__}"
        )
    return fedavg(model, client_optimizer, batch_size=batch_size,
                  server_optimizer=server_optimizer, **fedavg_kwargs)._replace(name=name)


def fedadagrad(model: Any, client_optimizer: Any, *, server_lr: float, b1: float = 0.9,
               b2: float = 0.99, tau: float = 1e-3, **fedopt_kwargs: Any) -> Algorithm:
    """FedAdagrad (Reddi et al. 2021, Algorithm 2): ``v_t = v_{t-1} + Δ_t²``.

    :func:`fedopt` with ``reddi_adaptive("adagrad", server_lr, b1=b1, b2=b2, tau=tau)``;
    ``**fedopt_kwargs`` are :func:`fedopt`'s (``batch_size``, ...).
    """
    server = reddi_adaptive("adagrad", server_lr, b1=b1, b2=b2, tau=tau)
    return fedopt(model, client_optimizer, server, name="fedadagrad", **fedopt_kwargs)


def fedadam(model: Any, client_optimizer: Any, *, server_lr: float, b1: float = 0.9,
            b2: float = 0.99, tau: float = 1e-3, **fedopt_kwargs: Any) -> Algorithm:
    """FedAdam (Reddi et al. 2021, Algorithm 2): ``v_t = b2 v_{t-1} + (1-b2) Δ_t²``.

    :func:`fedopt` with ``reddi_adaptive("adam", server_lr, b1=b1, b2=b2, tau=tau)``;
    ``**fedopt_kwargs`` are :func:`fedopt`'s (``batch_size``, ...).
    """
    server = reddi_adaptive("adam", server_lr, b1=b1, b2=b2, tau=tau)
    return fedopt(model, client_optimizer, server, name="fedadam", **fedopt_kwargs)


def fedyogi(model: Any, client_optimizer: Any, *, server_lr: float, b1: float = 0.9,
            b2: float = 0.99, tau: float = 1e-3, **fedopt_kwargs: Any) -> Algorithm:
    """FedYogi (Reddi et al. 2021, Algorithm 2): ``v_t = v_{t-1} - (1-b2) Δ_t² sign(v_{t-1} -
    Δ_t²)``.

    :func:`fedopt` with ``reddi_adaptive("yogi", server_lr, b1=b1, b2=b2, tau=tau)``;
    ``**fedopt_kwargs`` are :func:`fedopt`'s (``batch_size``, ...).
    """
    server = reddi_adaptive("yogi", server_lr, b1=b1, b2=b2, tau=tau)
    return fedopt(model, client_optimizer, server, name="fedyogi", **fedopt_kwargs)


def fedavgm(model: Any, client_optimizer: Any, *, server_lr: float = 1.0, momentum: float = 0.9,
            **fedopt_kwargs: Any) -> Algorithm:
    """FedAvgM (Hsu et al. 2019): server momentum ``v = β v + Δ_t``, ``x ← x + η v``.

    That is :func:`fedopt` with ``optax.sgd(server_lr, momentum=momentum)`` (heavy ball on the
    pseudo-gradient ``-Δ_t``), the momentum baseline of Reddi et al. (2021);
    ``**fedopt_kwargs`` are :func:`fedopt`'s (``batch_size``, ...).
    """
    lr = _check_real(server_lr, "server_lr", 0.0, math.inf, lo_open=True)
    beta = _check_real(momentum, "momentum", 0.0, 1.0)
    return fedopt(model, client_optimizer, optax.sgd(lr, momentum=beta or None), name="fedavgm",
                  **fedopt_kwargs)
