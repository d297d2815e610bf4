"""FedProx: FedAvg with a proximal term in the local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith (2020), "Federated Optimization in Heterogeneous
Networks", MLSys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from fedjax_lab.algorithms.fedavg import Weighting, make_fedavg_family, validate_data_spec
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.types import Algorithm


def fedprox(
    model: Any,
    client_optimizer: optax.GradientTransformation,
    *,
    mu: float,
    batch_size: int,
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    compressor: Any = None,
    weighting: Weighting = "examples",
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """FedProx (Li et al. 2020, Algorithm 2).

    Each client approximately minimises ``h_k(w) = F_k(w) + (mu/2) ||w - w^t||^2`` with
    ``client_optimizer`` from the global model ``w^t``; the server averages the resulting
    models as FedAvg does. ``mu = 0`` is exactly FedAvg. FedProx's tolerance of *partial work*
    (a straggler returns whatever local steps it managed) is a property of the round, not of
    the update rule: express it with ``fedjax_lab.systems.Availability(straggler_policy=
    "partial")``, and FedAvg's dropping of stragglers with ``straggler_policy="drop"``.

    The paper samples clients with probability ``p_k = n_k/n`` and averages uniformly; this
    uses uniform sampling with ``n_k``-weighted averaging (``weighting="examples"``), which has
    the same expectation.

    Args:
      model: a ``fedjax_lab.models.Model`` (only ``apply`` is used).
      client_optimizer: local solver (the paper uses SGD).
      mu: proximal coefficient (>= 0).
      batch_size: local minibatch size.
      local_epochs: local passes over the data per round (exclusive with ``num_steps``).
      num_steps: alternatively, a fixed number of local steps.
      server_optimizer: optax server optimizer on ``-mean(delta)`` (default ``sgd(1.0)``).
      compressor: optional uplink ``Compressor``.
      weighting: ``"examples"`` or ``"uniform"``.
      per_example_loss: ``(logits, labels) -> [B]`` loss.
    """
    if isinstance(mu, jax.Array) and mu.shape == ():
        # A traced scalar (a sweep over mu): its values are checked where the grid is built.
        prox_mu = mu
    elif isinstance(mu, bool) or not isinstance(mu, int | float):
        raise TypeError(f"mu must be a float >= 0, got {mu!r}")
    elif not 0 <= mu < math.inf:  # also rejects NaN
        raise ValueError(f"mu must be a finite float >= 0 (0 is FedAvg), got {mu}")
    else:
        prox_mu = float(mu)
    spec = validate_data_spec(batch_size, local_epochs, num_steps)
    return make_fedavg_family(
        model,
        client_optimizer,
        server_optimizer=server_optimizer if server_optimizer is not None else optax.sgd(1.0),
        data_spec=spec,
        compressor=compressor,
        weighting=weighting,
        per_example_loss=per_example_loss,
        prox_mu=prox_mu,
        name="fedprox",
    )
