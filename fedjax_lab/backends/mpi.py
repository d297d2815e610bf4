"""The MPI backend: ranks hold disjoint shards of each cohort; mpi4jax sums the aggregate.

Launch one process per rank with the same command::

    mpirun -n 4 python experiments/fedavg.py --backend mpi --rounds 100 ...

Every rank samples the same clients from the same seed (host randomness is a pure function of
``(seed, round)``), so every rank knows the whole round plan without communication. The cohort's
``C`` client slots (padded to a multiple of the rank count) are cut into contiguous blocks:
rank ``r`` owns slots ``[r*C/K, (r+1)*C/K)`` (``owned_slots``), and ``fedjax_lab.runner.run``
builds the cohort of those slots only, so a rank gathers and ships to its device only its own
clients' examples (``device_table = False``). With a population that reads examples on demand
(``FederatedData`` over a ``RowSource``, e.g. a TFDS loader's ``lazy=True``, which
``experiments/fedavg.py --backend mpi`` uses for the TFDS datasets) a rank also *reads* only
those rows each round; in-memory datasets (digits, synthetic, LEAF JSON) are built whole by
every rank. In one jitted round each rank runs the ``VmapBackend``
code on its block (client keys are the rank's slice of ``split(round_key, C)``, so the result
does not depend on the rank count), sums its partial aggregate with the other ranks' by
``mpi4jax.allreduce(op=MPI.SUM)`` inside the compiled program (no host round-trip), and applies
the server update, replicated, on every rank; with the ``loop`` plan the clients are jitted
calls from a host loop and the allreduce sits in the jitted aggregate + server step. Rank 0
writes the outputs (``is_primary``).

Stateful clients (error-feedback residuals, SCAFFOLD controls) are stored by their owning rank,
``client_id % K`` (:class:`MpiClientStateStore`); a state travels to the rank that trains the
client in a round and back, between trusted ranks of one MPI job, with mpi4py's collectives.

Checkpoints (``--checkpoint-every``/``--resume``, fedjax_lab.io.checkpoint) are written by rank 0
in the same format as every other backend: the client states are gathered to rank 0 for the
save, and on resume rank 0 reads the checkpoint, broadcasts the server state and round, and
sends each client state back to its owner. Rank 0 alone needs the checkpoint directory (no
shared filesystem), and a checkpoint can be resumed with another backend or rank count (equal
to 1e-5; bit-identical with the same backend and rank count).

Failures never hang the job: an exception that leaves a rank (uncaught, or caught by
``failure_guard``) prints the error and calls ``MPI_Abort``, so ``mpirun`` terminates every
rank and exits non-zero; a rank that dies is detected by ``mpirun``, which does the same.

Requires ``mpi4py`` and ``mpi4jax`` (CPU build). Non-additive algorithms are rejected.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import mpi4jax
import numpy as np
from mpi4py import MPI

from fedjax_lab.backends import _shard, packed
from fedjax_lab.backends._checks import require_additive
from fedjax_lab.backends.vmap import (
    VmapBackend,
    packed_stats,
    packing_mode,
    padded_stats,
    validate_round_inputs,
)
from fedjax_lab.core.rng import client_keys
from fedjax_lab.core.types import Algorithm, Cohort, ServerState
from fedjax_lab.runner import ClientStateStore

PLANS = ("auto", "vmap", "unrolled", "loop")


def allreduce_sum(tree: Any, comm: MPI.Comm) -> Any:
    """Sums every leaf of ``tree`` over the ranks of ``comm``, inside a traced program.

    Leaves are concatenated per dtype so that a round makes one MPI call per dtype instead of
    one per parameter tensor (latency, not bandwidth, dominates small models).
    """
    leaves, treedef = jax.tree.flatten(tree)
    out: list[Any] = [None] * len(leaves)
    by_dtype: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        leaf = jnp.asarray(leaf)
        if not (jnp.issubdtype(leaf.dtype, jnp.number)):
            raise TypeError(
                f"aggregate leaf {i} has dtype {leaf.dtype}; only numeric leaves can be summed "
                "across ranks (make the algorithm's Aggregate numeric)"
            )
        leaves[i] = leaf
        by_dtype.setdefault(leaf.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])
        if flat.size:
            flat = mpi4jax.allreduce(flat, op=MPI.SUM, comm=comm)
        offset = 0
        for i in idx:
            n = leaves[i].size
            out[i] = flat[offset : offset + n].reshape(leaves[i].shape)
            offset += n
    return jax.tree.unflatten(treedef, out)


def abort_job(rank: int, size: int, exc: BaseException, comm: MPI.Comm | None = None) -> None:
    """Prints why this rank fails and aborts every rank of the job (never returns)."""
    sys.stderr.write(
        f"\nfedjax_lab.backends.mpi: rank {rank}/{size} failed with "
        f"{type(exc).__name__}: {exc}\nAborting all {size} ranks (MPI_Abort) so that no rank "
        "waits forever in a collective.\n"
    )
    sys.stderr.flush()
    (comm or MPI.COMM_WORLD).Abort(1)


def install_abort_on_uncaught(rank: int, size: int) -> None:
    """Makes an uncaught exception abort the whole MPI job instead of leaving ranks hanging.

    Python would otherwise run ``MPI_Finalize`` at exit, which waits for the other ranks while
    they wait for this one in the next allreduce. Installed once per process (``sys.excepthook``
    is process-global by nature); the previous hook still prints the traceback first.
    """
    previous = sys.excepthook
    if getattr(previous, "_fedjax_lab_mpi_abort", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        abort_job(rank, size, exc)

    hook._fedjax_lab_mpi_abort = True
    sys.excepthook = hook


class MpiClientStateStore(ClientStateStore):
    """Client states kept by their owning rank ``client_id % size``; see the module docstring.

    ``gather``/``scatter`` take the client ids of THIS rank's slots and are collective: every
    rank calls them once per round (the runner does), exchanging only the states needed.
    """

    def __init__(self, initial_state: Any, comm: MPI.Comm) -> None:
        super().__init__(initial_state)
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def owner(self, client_id: int) -> int:
        return int(client_id) % self.size

    def gather(self, client_ids: Any) -> Any:
        if self.stateless:
            return ()
        local = [int(c) for c in client_ids]
        wanted = self.comm.allgather(local)
        # Only owned clients are ever stored here, so this sends each state from its owner.
        outgoing = [{c: self.states[c] for c in ids if c in self.states} for ids in wanted]
        received: dict[int, Any] = {}
        for part in self.comm.alltoall(outgoing):
            received.update(part)
        trees = [received.get(c, self.initial) for c in local]
        return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *trees)

    def scatter(self, client_ids: Any, stacked: Any) -> None:
        if self.stateless:
            return
        host = jax.device_get(stacked)
        outgoing: list[dict[int, Any]] = [{} for _ in range(self.size)]
        for slot, cid in enumerate(client_ids):
            if cid >= 0:
                outgoing[self.owner(cid)][int(cid)] = jax.tree.map(
                    lambda x, s=slot: np.array(x[s]), host
                )
        for part in self.comm.alltoall(outgoing):
            self.states.update(part)

    def snapshot(self) -> ClientStateStore | None:
        """Every rank's states gathered on rank 0 (None on the others); collective."""
        parts = self.comm.gather(self.states, root=0)
        if self.rank != 0:
            return None
        full = ClientStateStore(self.initial)
        for part in parts:
            full.states.update(part)
        return full

    def load(self, full: ClientStateStore | None) -> None:
        """Rank 0 sends each state in ``full`` to its owner rank; collective.

        ``full`` is read on rank 0 only (the other ranks pass None).
        """
        outgoing = None
        if self.rank == 0:
            if full is None:
                raise ValueError("rank 0 must pass the full store to load(), got None")
            outgoing = [{} for _ in range(self.size)]
            for cid, state in full.states.items():
                outgoing[self.owner(cid)][int(cid)] = state
        self.states = dict(self.comm.scatter(outgoing, root=0))


class MpiBackend:
    """Runs each rank's shard of a round and allreduces the aggregate (DESIGN.md ``Backend``).

    Args:
      comm: the communicator of the job (default ``MPI.COMM_WORLD``); the backend works on a
        duplicate so its collectives never match user messages. Collective: every rank must
        construct the backend.
      plan: ``vmap``, ``unrolled``, ``loop`` or ``auto``: the ``VmapBackend`` plans, run on this
        rank's shard; ``auto`` judges the shard. With ``loop`` the clients are jitted calls from
        a host loop and the allreduce sits in the jitted aggregate + server step.
      chunk_size: process the rank's clients ``chunk_size`` at a time (``vmap`` plan).
      unroll_limit: ``auto`` picks ``unrolled`` for conv models on CPU up to this many
        (shard clients x local steps).
      abort_on_error: install :func:`install_abort_on_uncaught` (recommended: without it an
        exception on one rank leaves the others blocked in the next collective).
      packing: as ``VmapBackend``'s, applied to this rank's clients: a rank packs its own slots
        and runs its own number of segments (no collective until the finish step).
    """

    name = "mpi"
    # Only this rank's clients' examples are gathered and sent to its device each round; a
    # device-resident table would hold the whole population on every rank.
    device_table = False

    def __init__(
        self,
        comm: MPI.Comm | None = None,
        *,
        plan: str = "auto",
        chunk_size: int | None = None,
        unroll_limit: int = 128,
        abort_on_error: bool = True,
        packing: str | packed.PackingPolicy = "auto",
    ) -> None:
        _shard.check_plan(plan, chunk_size, self.name, PLANS)
        if chunk_size is not None and plan == "loop":
            raise ValueError("chunk_size only applies to the 'vmap' plan, not 'loop'")
        base = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(base, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py Intracomm, got {type(base).__name__}")
        self.comm = base.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.plan = plan
        self.chunk_size = chunk_size
        self.unroll_limit = unroll_limit
        self._vmap = VmapBackend("vmap", chunk_size=chunk_size, packing=packing)
        self._cache: dict[tuple[int, str], tuple[Algorithm, Any]] = {}
        if abort_on_error:
            install_abort_on_uncaught(self.rank, self.size)

    @property
    def cohort_multiple(self) -> int:
        """The runner pads cohorts to a multiple of this (ranks x chunk)."""
        return self.size * (self.chunk_size or 1)

    @property
    def compiles(self):
        """Programs this rank traced so far, by kind."""
        return self._vmap.compiles

    @property
    def packing(self) -> packed.PackingPolicy:
        return self._vmap.packing

    def plan_rounds(self, schedule: list[np.ndarray], padded_steps: list[int]) -> None:
        """Fixes one packed layout for this rank's coming rounds (``VmapBackend.plan_rounds``)."""
        self._vmap.plan_rounds(schedule, padded_steps)

    @property
    def is_primary(self) -> bool:
        """Whether this rank writes outputs (rank 0)."""
        return self.rank == 0

    def owned_slots(self, cohort_size: int) -> np.ndarray:
        """The contiguous block of client slots this rank trains."""
        if cohort_size < 1 or cohort_size % self.cohort_multiple:
            raise ValueError(
                f"cohort_size {cohort_size} must be a positive multiple of "
                f"{self.cohort_multiple} ({self.size} ranks x chunk_size "
                f"{self.chunk_size or 1}); use padded_cohort_size(..., backend.cohort_multiple)"
            )
        per_rank = cohort_size // self.size
        return np.arange(self.rank * per_rank, (self.rank + 1) * per_rank)

    def client_store(self, initial_state: Any) -> MpiClientStateStore:
        """The per-rank store of stateful clients (used by ``fedjax_lab.runner.run``)."""
        return MpiClientStateStore(initial_state, self.comm)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (checkpoint restore); collective."""
        return self.comm.bcast(obj, root=0)

    @contextlib.contextmanager
    def failure_guard(self) -> Iterator[None]:
        """Aborts the job if the block raises, even if a caller would catch the exception."""
        try:
            yield
        except Exception as exc:
            traceback.print_exc()
            abort_job(self.rank, self.size, exc)

    # ------------------------------------------------------------------------------ planning
    def resolve_plan(self, algorithm: Algorithm, server_state: ServerState, cohort: Cohort) -> str:
        """The concrete plan ``auto`` stands for, judged on this rank's shard."""
        del algorithm
        c, s = cohort.mask.shape[:2]
        return _shard.resolve_shard_plan(
            self.plan, self.chunk_size, self.unroll_limit, server_state, c, s, "loop"
        )

    # ------------------------------------------------------------------------------- running
    def run_round(
        self,
        algorithm: Algorithm,
        server_state: ServerState,
        client_states: Any,
        cohort: Cohort,
        key: jax.Array,
    ) -> tuple[ServerState, Any, dict[str, jax.Array]]:
        """Runs one round on this rank's shard ``cohort`` (the slots of ``owned_slots``).

        ``key`` is the round key; the rank's client keys are its slice of the keys of all
        ``size x len(shard)`` slots. Collective: every rank calls it with its own shard.
        """
        require_additive(algorithm, self.name)
        validate_round_inputs(algorithm, cohort, self.chunk_size)
        plan = self.resolve_plan(algorithm, server_state, cohort)
        layout = self._vmap.layout(algorithm, server_state, client_states, cohort, plan)
        if layout is None:
            stats = padded_stats(cohort)
            out = self._compiled(algorithm, plan)(server_state, client_states, cohort, key)
        else:
            stats = packed_stats(layout)
            out = self._compiled(algorithm, "packed-" + packing_mode(plan))(
                server_state, client_states, cohort, key, layout
            )
        # The round's steps over every rank (a host collective of three numbers).
        for k in ("real_steps", "computed_steps"):
            stats[k] = float(self.comm.allreduce(stats[k], op=MPI.SUM))
        return out[0], out[1], {**out[2], **stats}

    def _compiled(self, algorithm: Algorithm, plan: str):
        cache_key = (id(algorithm), plan)
        hit = self._cache.get(cache_key)
        if hit is not None and hit[0] is algorithm:
            return hit[1]
        fn = self._build(algorithm, plan)
        self._cache[cache_key] = (algorithm, fn)
        return fn

    def _shard_keys(self, key: jax.Array, local: int) -> jax.Array:
        """This rank's slice of the keys of all ``size x local`` slots (split before sharding)."""
        return client_keys(key, local * self.size)[self.rank * local : (self.rank + 1) * local]

    def _build(self, algorithm: Algorithm, plan: str):
        if plan.startswith("packed-"):
            return self._vmap.packed_round(
                algorithm, plan.removeprefix("packed-"),
                keys_fn=jax.jit(self._shard_keys, static_argnums=1),
                reduce=lambda agg: allreduce_sum(agg, self.comm),
            )
        if plan == "loop":
            return self._loop_round(algorithm)
        comm, vmap = self.comm, self._vmap

        def round_fn(server_state, client_states, cohort, key):
            keys = self._shard_keys(key, cohort.mask.shape[0])
            agg, new_states = _shard.partial_aggregate(
                vmap, plan, algorithm, server_state, client_states, cohort, keys
            )
            agg = allreduce_sum(agg, comm)
            new_server, metrics = algorithm.server_update(server_state, agg)
            return new_server, new_states, metrics

        return jax.jit(self._vmap.counted("padded_round", round_fn))

    def _loop_round(self, algorithm: Algorithm):
        """``VmapBackend``'s ``loop`` plan on the shard, with the allreduce in the finish jit."""
        comm = self.comm
        return self._vmap.loop_round(
            algorithm,
            keys_fn=jax.jit(self._shard_keys, static_argnums=1),
            reduce=lambda agg: allreduce_sum(agg, comm),
        )
