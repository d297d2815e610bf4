"""Evaluation strategies XLA:CPU does not pick itself: compute once, loop over a batch.

:func:`computed_once` evaluates a per-coordinate computation once into memory, however many
fusions read it; :func:`looped_under_vmap` runs a function once per element of a vmapped batch.

XLA:CPU fuses an element-wise producer into every consumer fusion that reads it (duplicating
the work) unless the producer contains an op it deems expensive; integer hashing is not. A
quantizer's levels are read by the payload output, by ``decode`` (one fusion per leaf) and by
``bits`` (packed-word reductions) of the same jitted round trip, so the threefry hash behind
the stochastic rounding (~140 integer ops per coordinate) ran 4+ times, and inside the
reductions as a scalar loop: ~300 ms per 10M coordinates instead of ~20.

:func:`computed_once` evaluates ``fn(*args)`` as the branch of a ``lax.cond`` whose two
branches are both ``fn``: the result is ``fn(*args)`` whichever way the predicate goes, and a
conditional's branches are separate computations, so the result is one buffer that the
consumers read. The predicate must be a traced value XLA cannot fold (a constant predicate
lets it inline the branch, and the duplication comes back).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def computed_once(pred: jax.Array, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (bit for bit), materialised once; ``pred``: any traced boolean scalar.

    Under ``jax.vmap`` a batched predicate would turn the conditional into a select of both
    branches (twice the work), so the batching rule reduces it to one unbatched scalar and
    runs the vmapped ``fn`` in the same kind of conditional (recursively, for nested vmaps).
    """

    @jax.custom_batching.custom_vmap
    def run(pred, args):
        return jax.lax.cond(pred, lambda a: fn(*a), lambda a: fn(*a), args)

    @run.def_vmap
    def batched(axis_size, in_batched, pred, args):
        pred_batched, args_batched = in_batched
        if pred_batched:
            pred = jnp.any(pred)
        in_axes = jax.tree.map(lambda b: 0 if b else None, args_batched)
        vmapped = jax.vmap(lambda *a: fn(*a), in_axes=tuple(in_axes), axis_size=axis_size)
        out = computed_once(pred, vmapped, *args)
        return out, jax.tree.map(lambda _: True, out)

    return run(pred, args)


# Updates of at least this many coordinates are worth a loop over a vmapped batch: below it
# a loop's per-iteration cost outweighs what batching loses (the statistical tests vmap 10^4
# draws of small vectors).
LOOP_MIN_SIZE = 1 << 16


def looped_under_vmap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(*args)``, whose ``jax.vmap`` runs ``fn`` once per batch element (``lax.map``).

    For work on one large update that XLA:CPU runs slower batched than one element at a time
    (gathers and scatters with batched indices, prefix sums, slice updates of a batched
    buffer; measured in ``_select.top_k_parts`` and ``TreeLayout.flatten``). Unbatched
    arguments are broadcast along the batch; nested vmaps nest the loops. The values are
    ``fn``'s whichever way it runs.
    """
    run = jax.custom_batching.custom_vmap(fn)

    @run.def_vmap
    def batched(axis_size, in_batched, *args):
        args = jax.tree.map(
            lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *jnp.shape(x))),
            args,
            tuple(in_batched),
        )
        out = jax.lax.map(lambda a: run(*a), args)
        return out, jax.tree.map(lambda _: True, out)

    return run


def vmapped_as(fn: Callable[..., Any], batched_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(*args)``, whose ``jax.vmap`` is ``jax.vmap(batched_fn)`` instead.

    For two formulations with the same values where the faster one depends on batching on
    XLA:CPU (e.g. leaf by leaf for one update, a flat vector for a vmapped batch of them).
    Unbatched arguments stay unbatched (``in_axes=None``); nested vmaps nest the rule.
    """
    run = jax.custom_batching.custom_vmap(fn)

    @run.def_vmap
    def batched(axis_size, in_batched, *args):
        in_axes = tuple(jax.tree.map(lambda b: 0 if b else None, tuple(in_batched)))
        out = jax.vmap(batched_fn, in_axes=in_axes, axis_size=axis_size)(*args)
        return out, jax.tree.map(lambda _: True, out)

    return run
