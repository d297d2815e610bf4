"""FedBN: federated learning with local batch normalisation.

Li, Jiang, Zhang, Kamp, Dou (2021), "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.core.local import LocalUpdate
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.tree import tree_where
from fedjax_lab.core.types import Algorithm, ClientOutput, PyTree, ServerState
from fedjax_lab.models.bn_mlp import BN


class FedBNCarry(NamedTuple):
    """The carry of FedBN's local training.

    Attributes:
      local: the kit's carry; ``local.params[BN]`` is the *offset* of the BatchNorm parameters
        from the client's own (``start`` sees the server state only, so what is client-specific
        comes from the context and the carry holds what changed).
      stats: the offset of the running statistics from the client's own.
    """

    local: kit.LocalState
    stats: PyTree


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, a, b)


def fedbn(
    model: Any,
    client_optimizer: optax.GradientTransformation | kit.ClientOptimizer,
    *,
    batch_size: int,
    local_epochs: int | None = 1,
    num_steps: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: kit.Weighting = "examples",
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """FedBN (Li et al. 2021, Algorithm 1): FedAvg whose BatchNorm layers never leave clients.

    Every client keeps its own BatchNorm affine parameters and running statistics (its client
    state, in the runner's client state store; a client that has not trained yet starts from
    the initial ones). Local training normalises with the statistics of each batch's real
    examples; only the other parameters' deltas are uploaded and averaged (weighted by
    examples, as FedAvg), so the server's BatchNorm entry stays at its initial value. A client
    whose delta is non-finite is rejected and keeps its state.

    Args:
      model: a model with BatchNorm state, e.g. ``fedjax_lab.models.BatchNormMLP``:
        ``init(key)``, ``init_state()`` and ``apply(params, state, x, *, train, mask) ->
        (logits, state)``, whose parameters and state hold the BatchNorm layer under ``"bn"``.
      client_optimizer: an optax transformation or ``kit.per_round(...)``.
      batch_size: local minibatch size.
      local_epochs: local passes per round (exclusive with ``num_steps``).
      num_steps: alternatively, a fixed number of local steps.
      server_optimizer: applied to the pseudo-gradient of the shared parameters (default
        ``optax.sgd(1.0)``: their weighted mean).
      weighting: ``"examples"`` or ``"uniform"``.
      per_example_loss: ``(logits, labels) -> [B]`` loss.
    """
    for name in ("init", "init_state", "apply"):
        if not callable(getattr(model, name, None)):
            raise TypeError(
                f"model must have init, init_state and apply(params, state, x, *, train, mask) "
                f"(a model with BatchNorm state, e.g. fedjax_lab.models.BatchNormMLP); {model!r} "
                f"lacks {name}"
            )
    spec = kit.data_spec(batch_size, local_epochs, num_steps)
    weighting = kit.check_weighting(weighting)
    server_optimizer = server_optimizer if server_optimizer is not None else optax.sgd(1.0)
    opt = kit.client_optimizer(client_optimizer)
    initial_stats = model.init_state()

    def client_init(params: PyTree) -> PyTree:
        if BN not in params or BN not in initial_stats:
            raise ValueError(f"FedBN needs the BatchNorm layer under {BN!r} in params and state")
        return {"params": params[BN], "stats": initial_stats}

    def start(server_state: ServerState) -> FedBNCarry:
        p = {**server_state.params, BN: jax.tree.map(jnp.zeros_like, server_state.params[BN])}
        zero = jnp.zeros((), jnp.float32)
        local = kit.LocalState(p, opt.init(p, server_state.round), zero, zero, zero)
        return FedBNCarry(local, jax.tree.map(jnp.zeros_like, initial_stats))

    def step(server_state: ServerState, own: PyTree, carry: FedBNCarry,
             arrays: dict[str, jax.Array], mask: jax.Array) -> FedBNCarry:
        local, n = carry.local, jnp.sum(mask)
        stats = _add(own["stats"], carry.stats)
        # Padded positions hold other examples: zeroed so a non-finite one cannot leak in.
        x = arrays["x"]
        x = jnp.where((mask > 0).reshape(mask.shape + (1,) * (x.ndim - 1)), x,
                      jnp.zeros((), x.dtype))

        def loss_fn(p):
            full = {**p, BN: _add(own["params"], p[BN])}
            logits, new_stats = model.apply(full, stats, x, train=True, mask=mask)
            losses = per_example_loss(logits, arrays["y"])
            return jnp.sum(losses * mask) / jnp.maximum(n, 1.0), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(local.params)
        updates, new_opt = opt.update(grads, local.opt_state, local.params)
        active = n > 0
        return FedBNCarry(
            kit.LocalState(
                tree_where(active, optax.apply_updates(local.params, updates), local.params),
                tree_where(active, new_opt, local.opt_state),
                local.loss_sum + jnp.where(active, loss * n, 0.0),
                local.num_examples + n,
                local.num_steps + active.astype(jnp.float32),
            ),
            tree_where(active, _sub(new_stats, own["stats"]), carry.stats),
        )

    def finish(server_state: ServerState, own: PyTree, carry: FedBNCarry,
               client_weight: jax.Array, *, key: jax.Array) -> tuple[ClientOutput, PyTree]:
        local = carry.local
        delta = {k: _sub(v, server_state.params[k]) for k, v in local.params.items() if k != BN}
        out, _ = kit.upload(None, delta, (), local, client_weight, key=key, weighting=weighting)
        new_own = {"params": _add(own["params"], local.params[BN]),
                   "stats": _add(own["stats"], carry.stats)}
        return out, tree_where(out.weight > 0, new_own, own)

    def server_update(state: ServerState, agg) -> tuple[ServerState, dict]:
        mean = kit.mean_update(agg)
        full = {**mean, BN: jax.tree.map(jnp.zeros_like, state.params[BN])}
        return kit.server_step(server_optimizer, state, full, agg.weight_sum > 0), \
            kit.round_metrics(agg, mean)

    return Algorithm(
        init=kit.server_init(server_optimizer),
        client_init=client_init,
        client_update=LocalUpdate(start, step, finish, context=lambda server, own: own),
        aggregate=kit.weighted_aggregate(None),
        server_update=server_update,
        data_spec=spec,
        name="fedbn",
    )
