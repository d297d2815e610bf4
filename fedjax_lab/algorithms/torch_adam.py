"""PyTorch's ``torch.optim.Adam`` (L2 weight decay, optional AMSGrad) as an optax transformation.

FedML's client optimizer for its cross-silo benchmark is ``torch.optim.Adam(params, lr,
weight_decay=wd, amsgrad=True)`` (``fedml_api/distributed/fedavg/MyModelTrainer.py``). It is not
``optax.adamw`` (PyTorch adds ``wd * p`` to the gradient *before* the moments: L2
regularisation, not decoupled decay) and not ``optax.amsgrad`` (PyTorch keeps the maximum of the
raw second moment and bias-corrects it afterwards; optax takes the maximum of the bias-corrected
moment). This transformation follows PyTorch's update exactly.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TorchAdamState(NamedTuple):
    """Step count and the moment estimates (``nu_max``: AMSGrad's running maximum of ``nu``)."""

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def _check(value: Any, name: str, low: float, high: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"torch_adam: {name} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= low and (high is None or value < high)):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"torch_adam: {name} must be finite and in {bound}, got {value}")
    return value


def torch_adam(
    learning_rate: float,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    amsgrad: bool = False,
) -> optax.GradientTransformation:
    """Adam (Kingma & Ba, ICLR 2015) exactly as ``torch.optim.Adam`` computes it.

    With ``g`` the gradient of step ``t`` (from 1)::

        g    <- g + weight_decay * p                      (L2 penalty, PyTorch's weight_decay)
        m    <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        vmax <- max(vmax, v)                              (AMSGrad, Reddi et al., ICLR 2018)
        p    <- p - lr / (1 - b1^t) * m / (sqrt(vmax) / sqrt(1 - b2^t) + eps)

    (``v`` in place of ``vmax`` without AMSGrad). Used with the library's client loop the
    state is fresh every round, as FedML's clients build a new optimizer per round.

    Args:
      learning_rate: step size ``lr`` > 0.
      weight_decay: L2 coefficient >= 0 (0: none); the update then needs ``params``.
      b1: first-moment decay in [0, 1).
      b2: second-moment decay in [0, 1).
      eps: denominator offset > 0.
      amsgrad: use the running maximum of the second moment.

    Returns:
      An ``optax.GradientTransformation`` whose updates are added to the parameters.

    Raises:
      ValueError, TypeError: a hyperparameter outside its range (named).
    """
    lr = _check(learning_rate, "learning_rate", 0.0, None)
    if lr == 0.0:
        raise ValueError("torch_adam: learning_rate must be > 0, got 0.0")
    wd = _check(weight_decay, "weight_decay", 0.0, None)
    b1 = _check(b1, "b1", 0.0, 1.0)
    b2 = _check(b2, "b2", 0.0, 1.0)
    eps = _check(eps, "eps", 0.0, None)
    if eps == 0.0:
        raise ValueError("torch_adam: eps must be > 0 (it keeps the denominator positive)")
    if not isinstance(amsgrad, bool):
        raise TypeError(f"torch_adam: amsgrad must be a bool, got {amsgrad!r}")

    def init(params: Any) -> TorchAdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TorchAdamState(jnp.zeros((), jnp.int32), zeros, zeros,
                              zeros if amsgrad else None)

    def update(grads: Any, state: TorchAdamState, params: Any = None
               ) -> tuple[Any, TorchAdamState]:
        if wd:
            if params is None:
                raise ValueError("torch_adam with weight_decay > 0 needs params in update()")
            grads = jax.tree.map(lambda g, p: g + wd * p, grads, params)
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else None
        t = count.astype(jnp.float32)
        step = lr / (1 - b1**t)
        root_bc2 = jnp.sqrt(1 - b2**t)
        second = nu_max if amsgrad else nu
        updates = jax.tree.map(lambda m, v: -step * m / (jnp.sqrt(v) / root_bc2 + eps), mu,
                               second)
        return updates, TorchAdamState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)
