"""FedProx: FedAvg with a proximal term in the local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith (2020), "Federated Optimization in Heterogeneous
Networks", MLSys. Written as a composition: :func:`~fedjax_lab.algorithms.fedavg` with the
objective transform :func:`fedjax_lab.algorithms.kit.proximal`.
"""

from __future__ import annotations

from typing import Any

import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core.types import Algorithm


def fedprox(
    model: Any,
    client_optimizer: optax.GradientTransformation | kit.ClientOptimizer,
    *,
    mu: Any,
    batch_size: int,
    **fedavg_kwargs: Any,
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
      client_optimizer: local solver (the paper uses SGD); may be ``kit.per_round(...)``.
      mu: proximal coefficient: a float >= 0, a traced scalar (a sweep over mu) or a function
        of the round index (a schedule).
      batch_size: local minibatch size.
      **fedavg_kwargs: every other argument of :func:`~fedjax_lab.algorithms.fedavg`
        (``local_epochs``, ``num_steps``, ``server_optimizer``, ``compressor``, ``weighting``,
        ``per_example_loss``).
    """
    mu = kit.check_number("mu", mu, lo_open=False, schedule=True)
    if isinstance(mu, float) and mu == 0.0:  # exactly FedAvg: no proximal term is traced
        return fedavg(model, client_optimizer, batch_size=batch_size,
                      **fedavg_kwargs)._replace(name="fedprox")
    return fedavg(model, client_optimizer, batch_size=batch_size,
                  objective_transform=kit.proximal(mu), **fedavg_kwargs)._replace(name="fedprox")
