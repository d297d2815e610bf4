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

from fedjax_lab.backends.vmap import VmapBackend, unrolled_clients
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
    outputs, new_states = unrolled_clients(algorithm, server_state, client_states, cohort, keys)
    return algorithm.aggregate(outputs), new_states
