"""The work of one shard of a cohort, shared by the sharded (devices) and MPI (ranks) backends.

A shard is a contiguous block of client slots. Its clients run exactly as in the single-device
``VmapBackend`` (same ``client_outputs``, same chunked scan, same unrolled local steps), and the
shard returns its *partial* aggregate; the backend then adds the partials of all shards (``psum``
over a mesh axis, ``allreduce`` over MPI ranks) and runs the server update on the total. This is
exact because ``Algorithm.aggregate`` is additive over clients (DESIGN.md "Core contracts").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lab.backends.vmap import (
    VmapBackend,
    client_batches,
    device_table,
    has_conv,
    per_client_inputs,
)
from fedjax_lab.core import plan as plan_lib
from fedjax_lab.core.types import Aggregate, Algorithm, Cohort, ServerState

# ``loop`` (a host loop of per-client jits) has no single traced program that shard_map could
# split over devices; an MPI rank can run it (its collective sits in the jitted finish step).
SHARD_PLANS = ("auto", "vmap", "unrolled")


def check_plan(
    plan: str, chunk_size: int | None, backend: str, plans: tuple[str, ...] = SHARD_PLANS
) -> None:
    """Constructor checks shared by the shard backends (before anything is compiled)."""
    if plan not in plans:
        raise ValueError(
            f"plan must be one of {plans} for the {backend} backend, got {plan!r}"
            + (" ('loop' runs clients from a host loop and cannot be sharded)"
               if plan == "loop" else "")
        )
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if chunk_size is not None and plan == "unrolled":
        raise ValueError("chunk_size only applies to the 'vmap' plan, not 'unrolled'")


def resolve_shard_plan(
    plan: str, chunk_size: int | None, unroll_limit: int, server_state: ServerState,
    shard_clients: int, steps: int, large_conv_plan: str = "vmap",
) -> str:
    """``auto`` as in ``VmapBackend.resolve_plan``, judged on the clients of ONE shard.

    Conv models on CPU get ``unrolled`` up to ``unroll_limit`` (shard clients x local steps) and
    ``large_conv_plan`` above it (``loop`` where the backend has it).
    """
    if plan != "auto":
        return plan
    if chunk_size is not None:
        return "vmap"
    if jax.default_backend() == "cpu" and has_conv(server_state.params):
        return "unrolled" if shard_clients * steps <= unroll_limit else large_conv_plan
    return "vmap"


def partial_aggregate(
    vmap: VmapBackend,
    plan: str,
    algorithm: Algorithm,
    server_state: ServerState,
    client_states: Any,
    cohort: Cohort,
    keys: jax.Array,
) -> tuple[Aggregate, Any]:
    """The shard's aggregate (not yet summed over shards) and its clients' new states.

    Traced inside the backend's jitted round. ``keys`` are the shard's slice of the round's
    client keys, split from the round key for the WHOLE cohort.
    """
    if plan == "vmap":
        chunk = vmap.chunk_size
        if chunk is None or chunk >= cohort.mask.shape[0]:
            outputs, new_states = vmap.client_outputs(
                algorithm, server_state, client_states, cohort, keys
            )
            return algorithm.aggregate(outputs), new_states
        return vmap.chunked_aggregate(algorithm, server_state, client_states, cohort, keys, chunk)
    per_client = per_client_inputs(cohort)
    outs, states = [], []
    with plan_lib.unrolled_local_steps(True):
        for i in range(cohort.mask.shape[0]):
            batches = client_batches(
                device_table(cohort), jax.tree.map(lambda x, i=i: x[i], per_client),
                cohort.mask[i], cohort.weight[i],
            )
            out, st = algorithm.client_update(
                server_state, jax.tree.map(lambda x, i=i: x[i], client_states), batches,
                key=keys[i],
            )
            outs.append(out)
            states.append(st)
    outputs = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    new_states = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return algorithm.aggregate(outputs), new_states
