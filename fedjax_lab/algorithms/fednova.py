"""FedNova: normalized averaging for heterogeneous numbers of local steps.

Wang, Liu, Liang, Joshi, Poor (2020), "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core.tree import tree_scale
from fedjax_lab.core.types import Aggregate, Algorithm, ClientOutput, ServerState

# The uplink carries each client's ||a_i||_1 next to its update: one float32.
_NORM_BITS = 32.0


def momentum_norm(num_steps: jax.Array, momentum: float) -> jax.Array:
    """``||a_i||_1`` of ``tau`` steps of heavy-ball SGD (Wang et al. 2020, §4 / Appendix).

    Plain SGD has ``a_i = [1, ..., 1]`` so ``||a_i||_1 = tau``. With momentum ``ρ``
    (``u ← ρ u + g``, ``x ← x - η u``, i.e. ``optax.sgd(η, momentum=ρ)``) the gradient of step
    ``j`` is counted ``(1 - ρ^{tau-j}) / (1 - ρ)`` times, summing to
    ``[tau - ρ (1 - ρ^tau) / (1 - ρ)] / (1 - ρ)``.
    """
    if momentum == 0.0:
        return num_steps
    rho = momentum
    return (num_steps - rho * (1.0 - rho**num_steps) / (1.0 - rho)) / (1.0 - rho)


def fednova(
    model: Any,
    client_lr: float,
    *,
    batch_size: int,
    client_momentum: float = 0.0,
    **fedavg_kwargs: Any,
) -> Algorithm:
    """FedNova (Wang et al. 2020, Algorithm 1 / eq. (7)) with an SGD local solver.

    Client ``i`` runs ``tau_i`` local steps of SGD (optionally heavy-ball momentum), which
    differ across clients (dataset sizes with ``local_epochs``, or stragglers' partial work),
    and sends its delta ``Δ_i`` and ``||a_i||_1`` (``= tau_i`` for plain SGD). The server
    averages *normalized* updates and rescales by the effective number of steps:

        x ← x + tau_eff · Σ_i p_i Δ_i / ||a_i||_1,   tau_eff = Σ_i p_i ||a_i||_1,

    with ``p_i`` the client weights of the round (``n_i / Σ n_j`` or uniform). Plain FedAvg
    instead computes ``Σ_i p_i Δ_i``, which over-weights clients that took more steps and
    converges to a different (inconsistent) objective. With equal ``tau_i`` FedNova is FedAvg.

    The aggregate is additive: it carries ``Σ w_i Δ_i/||a_i||_1``, ``Σ w_i`` and
    ``Σ w_i ||a_i||_1``; only ``server_update`` divides. The optional server optimizer acts on
    the pseudo-gradient ``-tau_eff Σ p_i Δ_i/||a_i||_1`` (``None``: ``sgd(1.0)``).

    Args:
      model: a ``fedjax_lab.models.Model``.
      client_lr: local SGD step size ``η`` (> 0). The local solver is fixed to (momentum) SGD
        because the normalisation ``a_i`` is specific to it.
      batch_size: local minibatch size.
      client_momentum: heavy-ball momentum ``ρ`` in ``[0, 1)`` of the local solver.
      **fedavg_kwargs: the other arguments of :func:`~fedjax_lab.algorithms.fedavg`
        (``local_epochs``, ``num_steps``, ``server_optimizer``, ``compressor`` applied to
        ``Δ_i`` (``||a_i||_1`` is sent as one float32 and counted in ``upload_bits``),
        ``weighting``: ``"examples"`` (``p_i ∝ n_i``) or ``"uniform"``, ``per_example_loss``).
    """
    lr = kit.check_number("client_lr", client_lr)
    rho = kit.check_number("client_momentum", client_momentum, hi=1.0, lo_open=False)
    base = fedavg(model, optax.sgd(lr, momentum=rho or None), batch_size=batch_size,
                  **fedavg_kwargs)._replace(name="fednova")

    def add_step_norm(finish):
        def finish_with_norm(server_state, client_state, carry, weight, *, key):
            out, new_state = finish(server_state, client_state, carry, weight, key=key)
            # local_steps counts the steps that saw at least one real example (masked padding
            # and cut-off straggler steps do not move the model, so they are not in a_i).
            a_norm = momentum_norm(out.metrics[kit.LOCAL_STEPS], rho)
            metrics = dict(out.metrics)
            metrics[kit.UPLOAD_BITS] = out.metrics[kit.UPLOAD_BITS] + jnp.where(
                out.weight > 0, _NORM_BITS, 0.0
            )
            return out._replace(metrics=metrics, extra=a_norm), new_state

        return finish_with_norm

    client_update = base.client_update.with_finish(add_step_norm)

    def aggregate(outputs: ClientOutput) -> Aggregate:
        a_norm = outputs.extra
        normalized = jnp.where(a_norm > 0, outputs.weight / jnp.maximum(a_norm, 1e-30), 0.0)
        agg = base.aggregate(outputs._replace(weight=normalized, extra=()))
        return agg._replace(
            weight_sum=jnp.sum(outputs.weight),
            extra=jnp.sum(outputs.weight * a_norm),
        )

    def server_update(state: ServerState, agg: Aggregate) -> tuple[ServerState, dict]:
        total = jnp.maximum(agg.weight_sum, 1e-30)
        tau_eff = agg.extra / total
        # base.server_update divides update_sum by weight_sum: pre-scaling by tau_eff gives
        # tau_eff * Σ p_i Δ_i / ||a_i||_1.
        scaled = agg._replace(update_sum=tree_scale(agg.update_sum, tau_eff), extra=())
        new_state, metrics = base.server_update(state, scaled)
        metrics = dict(metrics)
        # No contributing client: tau_eff is a mean over nobody (NaN, not 0).
        metrics["tau_eff"] = jnp.where(agg.weight_sum > 0, tau_eff, jnp.nan)
        return new_state, metrics

    return base._replace(
        client_update=client_update, aggregate=aggregate, server_update=server_update
    )
