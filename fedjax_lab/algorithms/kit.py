"""The authoring kit: the public pieces every built-in algorithm is written with.

A federated algorithm is an :class:`~fedjax_lab.core.types.Algorithm` (``init``,
``client_init``, ``client_update``, ``aggregate``, ``server_update``). Most of one is the same
from paper to paper, and this module holds that part, as pure functions over pytrees:

* **Local training** (:func:`local_training`): masked minibatch steps of an optax optimizer on
  a masked-mean objective, as the ``start``/``step`` of a
  :class:`~fedjax_lab.core.local.LocalUpdate`, so that the result pads exactly (a fully masked
  step changes nothing) and packs (backends run clients back to back). An algorithm changes it
  with an *objective transform* (e.g. FedProx's :func:`proximal` term) or a *gradient transform*
  (e.g. SCAFFOLD's control-variate correction), both of which see the server state and the
  client's step context. The optimizer's hyperparameters may be functions of the round
  (:func:`per_round`), read from the server state, so a schedule spans rounds without
  recompiling.
* **Uplink** (:func:`upload`): non-finite rejection, compression with the algorithm's
  compressor, its exact bit count and the standard client metrics, in one call.
* **Aggregation and server step** (:func:`weighted_aggregate`, :func:`mean_update`,
  :func:`server_step`, :func:`round_metrics`): the additive weighted sum, the NaN-safe mean and
  the standard round metrics.
* **Metric names** (constants below): the names the runner, the experiment summary and
  :func:`~fedjax_lab.algorithms.testing.check_algorithm` read. An algorithm that reports other
  names still runs, but e.g. its summary's examples per second is 0; the checker refuses it.

Writing an algorithm with these pieces and checking it with
:func:`fedjax_lab.algorithms.testing.check_algorithm` is the tutorial of the docs
(``docs/tutorial.rst``; ``examples/feddyn.py`` and ``examples/fedcm.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.local import LocalUpdate, no_context
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.rng import local_step_key, local_steps_key
from fedjax_lab.core.tree import tree_all_finite, tree_where
from fedjax_lab.core.types import (
    Aggregate,
    ClientOutput,
    DataSpec,
    Metrics,
    Params,
    PyTree,
    ServerState,
)

__all__ = [
    "CLIENTS",
    "CLIENT_METRICS",
    "LOCAL_STEPS",
    "REJECTED",
    "ROUND_METRICS",
    "TRAIN_EXAMPLES",
    "TRAIN_LOSS",
    "TRAIN_LOSS_SUM",
    "UPDATE_NORM",
    "UPLOAD_BITS",
    "ClientOptimizer",
    "GradTransform",
    "KeyedObjective",
    "LocalState",
    "LocalTraining",
    "LocalUpdate",
    "Objective",
    "ObjectiveTransform",
    "Weighting",
    "at_round",
    "check_number",
    "check_weighting",
    "client_optimizer",
    "data_spec",
    "dense_bits",
    "local_training",
    "mean_update",
    "model_objective",
    "per_round",
    "proximal",
    "round_metrics",
    "server_init",
    "server_step",
    "tree_vdot",
    "upload",
    "weighted_aggregate",
]

# ------------------------------------------------------------------------------ metric names
#: Client metric: sum over the client's steps of (batch loss x real examples in the batch), of
#: accepted clients only (a rejected client's loss is not a training loss).
TRAIN_LOSS_SUM = "train_loss_sum"
#: Client and round metric: real examples visited by accepted clients, counting repeats across
#: epochs (the runner's examples per second and the summary read it).
TRAIN_EXAMPLES = "train_examples"
#: Client metric: local steps that saw at least one real example; round metric: their mean over
#: real clients.
LOCAL_STEPS = "local_steps"
#: Client and round metric: real (not padded) client slots, accepted or rejected.
CLIENTS = "clients"
#: Client and round metric: real clients whose update was non-finite and was not applied.
REJECTED = "rejected"
#: Client and round metric: exact uplink bits of accepted clients (the runner's
#: ``cum_uplink_bits`` adds them up).
UPLOAD_BITS = "upload_bits"
#: Round metric: ``TRAIN_LOSS_SUM / TRAIN_EXAMPLES``; NaN when no client contributed.
TRAIN_LOSS = "train_loss"
#: Round metric: L2 norm of the weighted mean client update; NaN when no client contributed.
UPDATE_NORM = "update_norm"

#: Every client's ``ClientOutput.metrics`` holds these (each already multiplied by nothing but
#: its own client: sums over clients are the round's totals, so they psum/allreduce).
CLIENT_METRICS = (TRAIN_LOSS_SUM, TRAIN_EXAMPLES, LOCAL_STEPS, CLIENTS, REJECTED, UPLOAD_BITS)
#: Every round's metrics (``server_update``'s second output) hold these.
ROUND_METRICS = (TRAIN_LOSS, TRAIN_EXAMPLES, CLIENTS, REJECTED, UPLOAD_BITS, LOCAL_STEPS,
                 UPDATE_NORM)

Weighting = Literal["examples", "uniform"]

# ---------------------------------------------------------------------------- local training
#: ``objective(params, arrays, mask) -> scalar``: masked-mean loss over one batch's real
#: examples (``arrays`` is ``{"x": [B, ...], "y": [B, ...]}``, ``mask`` is ``[B]``).
Objective = Callable[[Params, dict[str, jax.Array], jax.Array], jax.Array]
#: ``transform(objective, server_state, context) -> objective`` (e.g. :func:`proximal`).
ObjectiveTransform = Callable[[Objective, ServerState, PyTree], Objective]
#: ``transform(grads, params, server_state, context) -> grads`` (e.g. SCAFFOLD's ``g + c - c_i``).
GradTransform = Callable[[PyTree, Params, ServerState, PyTree], PyTree]


class KeyedObjective(NamedTuple):
    """An :data:`Objective` with randomness (dropout): ``fn(params, arrays, mask, *, key)``.

    :func:`local_training` gives each local step its own key (``core.rng.local_step_key`` of
    the client key and the number of real steps taken so far, so padded and packed execution
    draw the same) and then treats ``partial(fn, key=step_key)`` as a plain objective: the
    objective and gradient transforms see a deterministic objective, unchanged.

    Attributes:
      fn: ``(params, arrays, mask, *, key) -> scalar``.
    """

    fn: Callable[..., jax.Array]

    def __call__(self, params: Params, arrays: dict[str, jax.Array], mask: jax.Array, *,
                 key: jax.Array) -> jax.Array:
        return self.fn(params, arrays, mask, key=key)


class LocalState(NamedTuple):
    """The carry of one client's local training (what ``finish`` receives).

    Attributes:
      params: the client's current model.
      opt_state: the client optimizer's state.
      loss_sum: sum over steps of (batch loss x real examples in the batch).
      num_examples: real examples visited (counting repeats across epochs).
      num_steps: steps with at least one real example.
    """

    params: Params
    opt_state: PyTree
    loss_sum: jax.Array
    num_examples: jax.Array
    num_steps: jax.Array


class ClientOptimizer(NamedTuple):
    """An optax optimizer whose state is created at a round (see :func:`per_round`).

    Attributes:
      init: ``(params, round) -> state``; ``round`` is the server's int32 round counter.
      update: optax's ``(grads, state, params) -> (updates, state)``.
    """

    init: Callable[[Params, jax.Array], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]


def client_optimizer(optimizer: optax.GradientTransformation | ClientOptimizer) -> ClientOptimizer:
    """A :class:`ClientOptimizer` from an optax transformation (re-initialised every round) or
    from :func:`per_round`; anything else is a TypeError naming the argument."""
    if isinstance(optimizer, ClientOptimizer):
        return optimizer
    if isinstance(optimizer, optax.GradientTransformation):
        return ClientOptimizer(lambda params, round_idx: optimizer.init(params), optimizer.update)
    raise TypeError(
        "client_optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)) or "
        f"kit.per_round(optax.sgd, learning_rate=lambda r: ...), got {type(optimizer).__name__}"
    )


def at_round(value: Any, round_idx: jax.Array) -> Any:
    """``value(round_idx)`` for a schedule (a callable), else ``value`` itself."""
    return value(round_idx) if callable(value) else value


def per_round(
    factory: Callable[..., optax.GradientTransformation], **hyperparams: Any
) -> ClientOptimizer:
    """A client optimizer whose hyperparameters are functions of the round index.

    ``per_round(optax.sgd, learning_rate=lambda r: 0.1 / (1 + r / 50))`` gives round ``r``'s
    clients ``optax.sgd(0.1 / (1 + r / 50))``. The round comes from the server state that
    ``LocalUpdate.start`` receives, as a traced value, and the hyperparameters live in the
    optimizer state (``optax.inject_hyperparams``), so the run compiles once. Hyperparameters
    that are not callables are constants; callables must be jnp-traceable functions of an int32
    scalar.

    Args:
      factory: an optax optimizer factory such as ``optax.sgd`` or ``optax.adam``.
      **hyperparams: its keyword arguments, each a constant or ``round -> value``.
    """
    if not callable(factory):
        raise TypeError(f"factory must be an optax optimizer factory, got {factory!r}")
    injected = optax.inject_hyperparams(factory)
    schedules = {k: v for k, v in hyperparams.items() if callable(v)}
    if not schedules:
        raise ValueError(
            "per_round needs at least one hyperparameter given as a function of the round, "
            "e.g. learning_rate=lambda r: 0.1 / (1 + r); for constants pass factory(...) itself"
        )

    def init(params: Params, round_idx: jax.Array) -> PyTree:
        values = {k: jnp.asarray(at_round(v, round_idx), jnp.float32)
                  for k, v in hyperparams.items()}
        return injected(**values).init(params)

    def update(grads: PyTree, state: PyTree, params: Params = None):
        # inject_hyperparams' update reads every numeric hyperparameter from the state; the
        # values given here only fix which arguments are hyperparameters.
        placeholders = {k: 0.0 if callable(v) else v for k, v in hyperparams.items()}
        return injected(**placeholders).update(grads, state, params)

    return ClientOptimizer(init, update)


class LocalTraining(NamedTuple):
    """The ``start`` and ``step`` of a :class:`~fedjax_lab.core.local.LocalUpdate`.

    Attributes:
      start: ``server_state -> LocalState``: the global model, a fresh optimizer state created
        at the server's round, zero counters.
      step: ``(server_state, context, carry, arrays, mask) -> carry``: one masked step; a
        fully masked step returns the carry unchanged.
      keyed: the objective is a :class:`KeyedObjective`: the step's context is
        ``(context, local_steps_key(client_key))`` and the update is ``keyed``.
    """

    start: Callable[[ServerState], LocalState]
    step: Callable[..., LocalState]
    keyed: bool = False

    def update(self, finish: Callable[..., Any], context: Callable[..., Any] = no_context
               ) -> LocalUpdate:
        """The :class:`LocalUpdate` of this training with ``finish`` (and ``context``).

        ``context`` is always ``(server_state, client_state) -> context``; with a keyed
        objective the update's context adds the client's local-steps key to it, and the
        transforms still see ``context`` alone.
        """
        if not self.keyed:
            return LocalUpdate(self.start, self.step, finish, context)

        def keyed_context(server_state: ServerState, client_state: PyTree, key: jax.Array):
            return context(server_state, client_state), local_steps_key(key)

        return LocalUpdate(self.start, self.step, finish, keyed_context, keyed=True)


def model_objective(
    model: Any,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Objective:
    """Masked-mean loss of ``model.apply`` (or an ``apply`` function) over one batch.

    Padded positions are zeroed before the model: they hold some other example (row 0 of a
    device table), and a non-finite value there would otherwise leak into this client's loss
    or gradient (a 0 mask times NaN is NaN, forward and backward).

    A model with training randomness (``model.apply_train`` is not None, e.g. dropout) gives a
    :class:`KeyedObjective` on ``apply_train(params, x, key=key)`` (train mode); evaluation
    uses ``model.apply`` (no dropout) elsewhere.
    """
    apply_train = getattr(model, "apply_train", None)
    apply_fn = model.apply if hasattr(model, "apply") else model
    if not callable(apply_fn):
        raise TypeError(f"model must have an apply(params, x) function, got {model!r}")

    def masked_mean(forward, params, arrays, mask):
        x = arrays["x"]
        x = jnp.where((mask > 0).reshape(mask.shape + (1,) * (x.ndim - 1)), x,
                      jnp.zeros((), x.dtype))
        losses = per_example_loss(forward(params, x), arrays["y"])
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    if apply_train is not None:
        def keyed(params: Params, arrays: dict[str, jax.Array], mask: jax.Array, *,
                  key: jax.Array) -> jax.Array:
            return masked_mean(lambda p, x: apply_train(p, x, key=key), params, arrays, mask)

        return KeyedObjective(keyed)

    def objective(params: Params, arrays: dict[str, jax.Array], mask: jax.Array) -> jax.Array:
        return masked_mean(apply_fn, params, arrays, mask)

    return objective


def proximal(mu: Any) -> ObjectiveTransform:
    """FedProx's proximal term (Li et al. 2020): ``h(w) = F(w) + (mu/2) ||w - w^t||^2``.

    ``w^t`` is the round's global model. ``mu`` is a float, a traced scalar (a sweep) or a
    function of the round (a schedule).
    """

    def transform(objective: Objective, server_state: ServerState, context: PyTree) -> Objective:
        del context
        global_params = server_state.params
        mu_t = at_round(mu, server_state.round)

        def with_prox(p, arrays, mask):
            prox = sum(
                jnp.sum(jnp.square(a - g))
                for a, g in zip(jax.tree.leaves(p), jax.tree.leaves(global_params), strict=True)
            )
            return objective(p, arrays, mask) + 0.5 * mu_t * prox

        return with_prox

    return transform


def local_training(
    objective: Objective | KeyedObjective,
    optimizer: optax.GradientTransformation | ClientOptimizer,
    *,
    objective_transform: ObjectiveTransform | None = None,
    grad_transform: GradTransform | None = None,
) -> LocalTraining:
    """Masked minibatch training of ``optimizer`` on ``objective`` from the global model.

    Each step computes the gradient of the round's objective (``objective_transform(objective,
    server_state, context)`` if given) at the client's current model, passes it through
    ``grad_transform(grads, params, server_state, context)`` if given, and applies one
    optimizer update. A step whose mask is all zero leaves the carry exactly unchanged
    (``jnp.where``), so padding is a no-op and packed clients equal padded ones.

    A :class:`KeyedObjective` (a model with dropout) gets the key
    ``local_step_key(local_steps_key(client_key), i)`` at the client's ``i``-th real step
    (``i`` = ``carry.num_steps``), the same in padded and packed execution.

    Args:
      objective: e.g. :func:`model_objective` ``(model)``; a plain or a keyed objective.
      optimizer: an optax transformation (fresh state every round) or :func:`per_round`.
      objective_transform: changes the local objective (FedProx: :func:`proximal`).
      grad_transform: changes each step's gradient (SCAFFOLD: ``g + c - c_i``).
    """
    opt = client_optimizer(optimizer)
    keyed = isinstance(objective, KeyedObjective)

    def start(server_state: ServerState) -> LocalState:
        params = server_state.params
        zero = jnp.zeros((), jnp.float32)
        return LocalState(params, opt.init(params, server_state.round), zero, zero, zero)

    def step(
        server_state: ServerState, context: PyTree, carry: LocalState,
        arrays: dict[str, jax.Array], mask: jax.Array,
    ) -> LocalState:
        p, opt_state = carry.params, carry.opt_state
        n = jnp.sum(mask)
        step_objective = objective
        if keyed:
            context, steps_key = context
            # num_steps counts real steps only (exact in float32 below 2**24).
            step_key = local_step_key(steps_key, carry.num_steps.astype(jnp.int32))

            def step_objective(params, arrays, mask):
                return objective(params, arrays, mask, key=step_key)

        round_objective = (step_objective if objective_transform is None
                           else objective_transform(step_objective, server_state, context))
        loss, grads = jax.value_and_grad(round_objective)(p, arrays, mask)
        if grad_transform is not None:
            grads = grad_transform(grads, p, server_state, context)
        updates, new_opt_state = opt.update(grads, opt_state, p)
        new_p = optax.apply_updates(p, updates)
        active = n > 0
        return LocalState(
            tree_where(active, new_p, p),
            tree_where(active, new_opt_state, opt_state),
            carry.loss_sum + jnp.where(active, loss * n, 0.0),
            carry.num_examples + n,
            carry.num_steps + active.astype(jnp.float32),
        )

    return LocalTraining(start, step, keyed)


def data_spec(batch_size: Any, local_epochs: Any = 1, num_steps: Any = None) -> DataSpec:
    """The local data layout, checked before anything is compiled (give exactly one of
    ``local_epochs`` and ``num_steps``)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if (local_epochs is None) == (num_steps is None):
        raise ValueError(
            "give exactly one of local_epochs (passes over the data) or num_steps (fixed steps)"
        )
    for name, value in (("local_epochs", local_epochs), ("num_steps", num_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return DataSpec(batch_size, local_epochs, num_steps)


# ---------------------------------------------------------------------------------- uplink
def dense_bits(tree: PyTree) -> jax.Array:
    """Wire size of an uncompressed float32 tree (32 bits per coordinate), as float32."""
    return jnp.asarray(32.0 * sum(x.size for x in jax.tree.leaves(tree)), jnp.float32)


def check_weighting(weighting: Any) -> Weighting:
    """``weighting`` if it is ``"examples"`` or ``"uniform"``, else a ValueError."""
    if weighting not in ("examples", "uniform"):
        raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
    return weighting


def upload(
    compressor: Any,
    delta: PyTree,
    compressor_state: PyTree,
    local: LocalState,
    client_weight: jax.Array,
    *,
    key: jax.Array,
    weighting: Weighting = "examples",
    extra: PyTree = (),
    extra_bits: jax.Array | float = 0.0,
    require: jax.Array | None = None,
) -> tuple[ClientOutput, PyTree]:
    """One client's message: rejection of non-finite updates, compression, bits, metrics.

    The client *sends* (is accepted) when it is real (``client_weight > 0``), ``delta`` and
    ``extra`` are finite, and ``require`` (e.g. "took a step") holds. A client that does not
    send gets weight 0, adds nothing to the loss and example metrics, keeps its compressor state
    (error-feedback residuals must not advance) and, when it was real but non-finite, is counted
    in ``rejected`` (DESIGN.md "Errors"). A non-finite ``delta`` is replaced by zeros before
    encoding, and ``extra`` of a client that does not send by zeros.

    Args:
      compressor: the algorithm's uplink ``Compressor``, or None (raw float32 delta).
      delta: the client's model update.
      compressor_state: the client's compressor state (``()`` without a compressor).
      local: the carry of its local training (loss, examples, steps).
      client_weight: its number of real examples (0 for a padded or dropped slot).
      key: the client's PRNG key (the compressor's randomness).
      weighting: ``"examples"`` (weight = examples) or ``"uniform"`` (weight 1).
      extra: further additive terms sent uncompressed (``ClientOutput.extra``).
      extra_bits: their wire size, added to ``upload_bits``.
      require: a further scalar bool condition for sending.

    Returns:
      ``(ClientOutput, new compressor state)``; ``ClientOutput.weight > 0`` iff it sends.
    """
    real = client_weight > 0
    finite = tree_all_finite(delta)
    if jax.tree.leaves(extra):
        finite = jnp.logical_and(finite, tree_all_finite(extra))
    ok = jnp.logical_and(real, finite)
    if require is not None:
        ok = jnp.logical_and(ok, require)
    zeros = jax.tree.map(jnp.zeros_like, delta)
    delta = tree_where(finite, delta, zeros)
    if compressor is None:
        payload, new_state, bits = delta, compressor_state, dense_bits(delta)
    else:
        payload, new_state = compressor.encode(delta, compressor_state, key=key)
        new_state = tree_where(ok, new_state, compressor_state)
        bits = compressor.bits(payload).astype(jnp.float32)
    if jax.tree.leaves(extra):
        extra = tree_where(ok, extra, jax.tree.map(jnp.zeros_like, extra))
        bits = bits + extra_bits
    weight = client_weight if weighting == "examples" else jnp.ones_like(client_weight)
    metrics = {
        TRAIN_LOSS_SUM: jnp.where(ok, local.loss_sum, 0.0),
        TRAIN_EXAMPLES: jnp.where(ok, local.num_examples, 0.0),
        LOCAL_STEPS: local.num_steps,
        CLIENTS: real.astype(jnp.float32),
        REJECTED: jnp.logical_and(real, ~finite).astype(jnp.float32),
        UPLOAD_BITS: jnp.where(ok, bits, 0.0),
    }
    return ClientOutput(payload, jnp.where(ok, weight, 0.0), metrics, extra), new_state


# ----------------------------------------------------------------------------- aggregation
def weighted_aggregate(compressor: Any) -> Callable[[ClientOutput], Aggregate]:
    """The additive aggregate: ``Σ w_i decode(update_i)``, ``Σ w_i``, metric and extra sums.

    Sums over a stacked leading client axis, so partial aggregates of shards, devices and MPI
    ranks add up to the whole cohort's (``Algorithm.additive``).
    """

    def aggregate(outputs: ClientOutput) -> Aggregate:
        decoded = (jax.vmap(compressor.decode)(outputs.update) if compressor is not None
                   else outputs.update)
        update_sum = jax.tree.map(
            lambda d: jnp.tensordot(outputs.weight, d, axes=(0, 0)).astype(d.dtype), decoded
        )
        return Aggregate(
            update_sum=update_sum,
            weight_sum=jnp.sum(outputs.weight),
            metric_sums={k: jnp.sum(v) for k, v in outputs.metrics.items()},
            extra=jax.tree.map(lambda e: jnp.sum(e, axis=0), outputs.extra),
        )

    return aggregate


def mean_update(agg: Aggregate) -> PyTree:
    """``update_sum / weight_sum`` (zeros, not NaN, when no client contributed)."""
    total = agg.weight_sum
    return jax.tree.map(lambda s: s / jnp.maximum(total, 1e-30).astype(s.dtype), agg.update_sum)


def server_init(server_optimizer: optax.GradientTransformation) -> Callable[[Params], ServerState]:
    """``init``: the model, the server optimizer's state, round 0, no extra state."""

    def init(params: Params) -> ServerState:
        return ServerState(params=params, opt_state=server_optimizer.init(params),
                           round=jnp.zeros((), jnp.int32))

    return init


def server_step(
    server_optimizer: optax.GradientTransformation, state: ServerState, mean: PyTree,
    any_client: jax.Array,
) -> ServerState:
    """The server optimizer on the pseudo-gradient ``-mean`` (Reddi et al. 2021); the round
    counter advances. A round no client contributed to leaves model and optimizer unchanged."""
    pseudo_grad = jax.tree.map(jnp.negative, mean)
    updates, new_opt = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    return ServerState(
        params=tree_where(any_client, new_params, state.params),
        opt_state=tree_where(any_client, new_opt, state.opt_state),
        round=state.round + 1,
        extra=state.extra,
    )


def round_metrics(agg: Aggregate, mean: PyTree) -> Metrics:
    """The :data:`ROUND_METRICS` of a round from its aggregate and mean update.

    Means over no contributing client are NaN, never 0.0 (which would make a round whose every
    client was rejected look like a perfect one).
    """
    m = agg.metric_sums
    any_client = agg.weight_sum > 0
    nan = jnp.float32(jnp.nan)
    return {
        TRAIN_LOSS: jnp.where(
            m[TRAIN_EXAMPLES] > 0, m[TRAIN_LOSS_SUM] / jnp.maximum(m[TRAIN_EXAMPLES], 1.0), nan,
        ),
        TRAIN_EXAMPLES: m[TRAIN_EXAMPLES],
        CLIENTS: m[CLIENTS],
        REJECTED: m[REJECTED],
        UPLOAD_BITS: m[UPLOAD_BITS],
        LOCAL_STEPS: m[LOCAL_STEPS] / jnp.maximum(m[CLIENTS], 1.0),
        UPDATE_NORM: jnp.where(
            any_client, jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(mean))), nan,
        ),
    }


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """``<a, b>``: the inner product of two trees of the same structure (a float32 scalar)."""
    return sum((jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                strict=True)), jnp.zeros((), jnp.float32))


def check_number(name: str, value: Any, *, lo: float = 0.0, hi: float = math.inf,
                 lo_open: bool = True, schedule: bool = False) -> Any:
    """``value`` as a float if it is a finite real number in the interval from ``lo`` to
    ``hi`` (``lo`` excluded with ``lo_open``); with ``schedule``, a function of the round or a
    traced scalar (a sweep) passes as is. Anything else is a ValueError/TypeError naming
    ``name``, raised before anything is compiled."""
    if schedule and (callable(value) or (isinstance(value, jax.Array) and value.shape == ())):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not ((lo < value if lo_open else lo <= value) and value < hi):  # also rejects NaN
        if hi == math.inf:
            raise ValueError(
                f"{name} must be a finite float {'>' if lo_open else '>='} {lo:g}, got {value}"
            )
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}), got {value}")
    return float(value)
