"""Aggregation rules applied to the decoded per-client updates, and ``with_aggregator``.

An ``Aggregator`` maps the stacked updates of a round's client slots, flattened to ``[C, D]``,
to one ``[D]`` estimate; a ``Transform`` (e.g. norm clipping) maps ``[C, D]`` to ``[C, D]``
client by client before the rule. ``with_aggregator`` plugs them into any ``Algorithm`` whose
``aggregate`` is the weighted sum ``update_sum = sum_i weight_i * u_i`` of per-client
contributions ``u_i`` (every FedAvg-family algorithm): ``u_i`` is recovered by calling the
algorithm's own ``aggregate`` on client ``i`` alone with weight 1, so compressor payloads are
decoded exactly as the algorithm decodes them.

Validity: a slot with weight 0 (padded slot or rejected client) is excluded from every
statistic with masks, never by Python filtering, so the round compiles once for any number of
real clients.

Backends: a robust rule needs every client's update in one place, so its aggregate is not
additive (``Algorithm.additive=False``). Supported: the ``vmap`` backend without
``chunk_size`` (all plans). Rejected with a clear error: chunking (``VmapBackend``
``chunk_size``) and every backend that reduces partial aggregates with psum/allreduce
(sharded, MPI), which call ``fedjax_lab.backends._checks.require_additive``. Transforms alone
(with the additive ``mean`` rule) keep the aggregate additive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.robust import detection
from fedjax_lab.attacks.model_poisoning import MALICIOUS_METRIC
from fedjax_lab.core.types import Aggregate, Algorithm, ClientOutput, PyTree

# (updates [C, D], weights [C], valid [C] bool) -> (estimate [D], metrics)
EstimateFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
# (updates [C, D], valid [C] bool) -> (updates [C, D], metrics)
TransformFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class Aggregator(NamedTuple):
    """A rule turning stacked client updates into one estimate.

    Attributes:
      name: short name used in the algorithm's name (e.g. ``"median"``).
      estimate: ``(updates [C, D], weights [C], valid [C]) -> (estimate [D], metrics)``; must
        ignore invalid rows whatever they contain.
      additive: whether ``estimate * sum(weights)`` is a sum over clients (only ``mean``).
      min_slots: fewest client slots a cohort must have (checked when the round is traced).
      metric_names: the keys of ``metrics``, passed through to the round metrics.
      selects: whether the rule keeps some valid slots and drops the others (Krum, Bulyan);
        its ``metrics`` then hold :data:`~fedjax_lab.algorithms.robust.detection.SELECTED`
        (``[C]`` bool), which ``with_aggregator`` turns into exclusion and detection metrics
        (:mod:`fedjax_lab.algorithms.robust.detection`).
    """

    name: str
    estimate: EstimateFn
    additive: bool = False
    min_slots: int = 1
    metric_names: tuple[str, ...] = ()
    selects: bool = False


class Transform(NamedTuple):
    """A per-client map applied to the updates before the aggregation rule.

    Attributes:
      name: short name (e.g. ``"clip1.0"``).
      apply: ``(updates [C, D], valid [C]) -> (updates [C, D], metrics)``; client by client.
      metric_names: the keys of ``metrics`` (counts over valid clients, additive).
    """

    name: str
    apply: TransformFn
    metric_names: tuple[str, ...] = ()


def ravel_clients(tree: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flattens a pytree with a leading client axis to ``[C, D]`` (float32 or wider).

    Returns the matrix and ``unravel([D]) -> tree`` restoring the per-client leaf shapes and
    dtypes. Leaves of size 0 are allowed (they contribute 0 columns).
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        raise ValueError("the client updates are an empty pytree; there is nothing to aggregate")
    c = leaves[0].shape[0]
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    shapes = [x.shape[1:] for x in leaves]
    sizes = [math.prod(shape) for shape in shapes]
    flat = jnp.concatenate([x.reshape(c, -1).astype(dtype) for x in leaves], axis=1)

    def unravel(vector: jax.Array) -> PyTree:
        out, start = [], 0
        for leaf, shape, size in zip(leaves, shapes, sizes, strict=True):
            out.append(vector[start : start + size].reshape(shape).astype(leaf.dtype))
            start += size
        return jax.tree.unflatten(treedef, out)

    return flat, unravel


def client_contributions(algorithm: Algorithm, outputs: ClientOutput) -> PyTree:
    """Each slot's decoded contribution ``u_i`` (stacked), via the algorithm's own aggregate.

    ``aggregate`` of one client with weight 1 is ``u_i`` for any aggregate of the form
    ``sum_i weight_i * u_i``; this decodes compressor payloads without knowing the compressor.
    """

    def one(single: ClientOutput) -> PyTree:
        batch = jax.tree.map(lambda x: x[None], single)
        batch = batch._replace(weight=jnp.ones_like(batch.weight))
        return algorithm.aggregate(batch).update_sum

    return jax.vmap(one)(outputs)


def with_aggregator(
    algorithm: Algorithm, aggregator: Aggregator, *, transforms: Sequence[Transform] = ()
) -> Algorithm:
    """Returns ``algorithm`` with its aggregation replaced by ``transforms`` then ``aggregator``.

    The returned ``aggregate`` decodes every slot's update, applies the transforms client by
    client, applies the rule over the VALID slots (weight > 0; padded and rejected slots are
    masked out) and returns an ``Aggregate`` whose ``update_sum = estimate * weight_sum`` so the
    algorithm's own ``server_update`` (which divides by ``weight_sum``) applies the estimate.
    Metric sums and extras are the algorithm's own; the rule's and transforms' metrics are added
    to the round metrics, and a selecting rule's exclusions (and their precision/recall against
    the simulation's malicious flags, when an attack wrapper reports them) as described in
    :mod:`fedjax_lab.algorithms.robust.detection`. Robust rules are unweighted over valid
    clients (a Byzantine client could otherwise claim a huge example count); ``mean`` keeps the
    algorithm's weights, and ``geometric_median`` uses them as RFA's ``alpha_i`` (Pillutla et
    al. 2022).

    Args:
      algorithm: an additive ``Algorithm`` whose aggregate is ``sum_i weight_i * u_i``.
      aggregator: e.g. ``median()``, ``trimmed_mean(0.1)``, ``krum(2)``, ``bulyan(1)``,
        ``geometric_median()``, ``centered_clipping(1.0)``, ``mean()``.
      transforms: per-client transforms applied first, e.g. ``(clip_norm(10.0),)``.

    Returns:
      An ``Algorithm`` with ``additive = aggregator.additive`` (see the module docstring for
      which backends accept non-additive algorithms).
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"aggregator must be an Aggregator such as median() or krum(f), got {type(aggregator)}"
        )
    transforms = tuple(transforms)
    for t in transforms:
        if not isinstance(t, Transform):
            raise TypeError(
                f"transforms must be Transform objects such as clip_norm(1.0), got {type(t)}"
            )
    if not algorithm.additive:
        raise ValueError(
            f"{algorithm.name} already has a non-additive aggregate; apply with_aggregator to "
            "the plain algorithm (its aggregate must be a weighted sum over clients)"
        )
    metric_names = tuple(n for t in transforms for n in t.metric_names) + aggregator.metric_names

    def aggregate(outputs: ClientOutput) -> Aggregate:
        slots = outputs.weight.shape[0]
        if slots < aggregator.min_slots:
            raise ValueError(
                f"{aggregator.name} needs at least {aggregator.min_slots} client slots per "
                f"round, got a cohort of {slots}; raise clients_per_round"
            )
        base = algorithm.aggregate(outputs)
        flat, unravel = ravel_clients(client_contributions(algorithm, outputs))
        valid = outputs.weight > 0
        metrics: dict[str, jax.Array] = {}
        for t in transforms:
            flat, m = t.apply(flat, valid)
            metrics.update(m)
        estimate, m = aggregator.estimate(flat, outputs.weight.astype(flat.dtype), valid)
        if aggregator.selects:
            # The simulation's malicious flags (when an attack wrapper reports them) score the
            # rule's selection here, after the rule ran without them.
            m = dict(m)
            metrics.update(detection.exclusion_sums(m.pop(detection.SELECTED), valid,
                                                    outputs.metrics.get(MALICIOUS_METRIC)))
        metrics.update(m)
        update_sum = unravel(estimate * base.weight_sum.astype(estimate.dtype))
        return base._replace(update_sum=update_sum, metric_sums={**base.metric_sums, **metrics})

    def server_update(state, agg: Aggregate):
        new_state, round_metrics = algorithm.server_update(state, agg)
        round_metrics = {**round_metrics, **{k: agg.metric_sums[k] for k in metric_names}}
        if aggregator.selects:
            round_metrics.update(detection.detection_metrics(agg.metric_sums))
        return new_state, round_metrics

    name = "+".join([algorithm.name, *(t.name for t in transforms), aggregator.name])
    return algorithm._replace(
        aggregate=aggregate,
        server_update=server_update,
        name=name,
        additive=aggregator.additive,
    )


def num_valid(valid: jax.Array) -> jax.Array:
    """Number of valid client slots (int32 scalar)."""
    return jnp.sum(valid.astype(jnp.int32))


def sorted_valid(updates: jax.Array, valid: jax.Array) -> jax.Array:
    """Each coordinate sorted over clients with the invalid rows pushed to the end (+inf)."""
    return jnp.sort(jnp.where(valid[:, None], updates, jnp.inf), axis=0)
