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
rank and exits non-zero; a rank that dies is detected by ``mpirun``, which does the same. A
rank that is alive but stuck (stopped, swapped out, hung in I/O) is caught by the
:class:`RoundWatchdog` (``round_timeout``): a host thread per rank exchanges heartbeats with the
other ranks and, when a collective step of this rank (a round, a client-state exchange, a
broadcast) has waited longer than ``round_timeout``, prints which rank stopped responding or did
not arrive, and aborts the job. It runs outside the compiled round (the round only gets a
``block_until_ready`` inside the deadline, which the runner's metrics read did anyway).

Requires ``mpi4py`` and ``mpi4jax`` (CPU build). Non-additive algorithms are rejected.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import mpi4jax
import numpy as np
from mpi4py import MPI

from fedjax_lab.backends import _shard, packed
from fedjax_lab.backends._checks import require_additive
from fedjax_lab.backends.base import ClientStateStore, ProgramCache
from fedjax_lab.backends.vmap import (
    VmapBackend,
    packed_stats,
    packing_mode,
    padded_stats,
    resolve_plan,
    validate_round_inputs,
)
from fedjax_lab.core.rng import client_keys
from fedjax_lab.core.types import Algorithm, Cohort, ServerState

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


def check_timeout(timeout: Any) -> float:
    """``timeout`` as a float, or a ValueError naming ``round_timeout``."""
    ok = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not (ok and math.isfinite(timeout) and timeout > 0):
        raise ValueError(
            f"round_timeout must be a finite number of seconds > 0 (or None), got {timeout!r}"
        )
    return float(timeout)


class RoundWatchdog:
    """Aborts the job when a collective step waits longer than ``timeout`` for another rank.

    Every rank runs one daemon thread that, every ``interval`` seconds, sends its status
    (rounds done, current step, whether it is inside a collective step) to the other ranks on
    a dedicated communicator and reads theirs (non-blocking ``isend``/``iprobe``). While this
    rank is inside a step marked with :meth:`step` for more than ``timeout`` seconds, the
    thread names the ranks to blame: those whose heartbeats stopped (stopped, swapped out, dead
    without ``mpirun`` noticing) or that are alive but have not reached the step. It then
    prints that and calls ``MPI_Abort`` on ``COMM_WORLD``. Requires ``MPI_THREAD_MULTIPLE``
    (mpi4py's default).

    Args:
      comm: a communicator for the heartbeats only (e.g. a ``Dup``); collective to create.
      timeout: seconds a step may wait (includes the first round's compilation).
      interval: seconds between heartbeats (default ``timeout / 10`` within [0.05, 5]).
      abort: called with the message instead of printing it and aborting (tests).
    """

    _TAG = 7

    def __init__(self, comm: MPI.Comm, timeout: float, *, interval: float | None = None,
                 abort: Callable[[str], None] | None = None) -> None:
        check_timeout(timeout)
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "the MPI round watchdog needs MPI_THREAD_MULTIPLE (mpi4py.rc.thread_level = "
                "'multiple', the default); pass round_timeout=None to run without it"
            )
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout = float(timeout)
        self.interval = float(interval) if interval else min(5.0, max(0.05, timeout / 10))
        # A peer is silent when it missed several heartbeats in a row.
        self.silent_after = max(3 * self.interval, 1.0)
        self._abort = abort or self._print_and_abort
        self._lock = threading.Lock()
        self._rounds_done = 0
        self._what = "starting"
        self._since: float | None = None  # when the current collective step began
        now = time.monotonic()
        self._peers = {r: {"rounds_done": 0, "what": "starting", "busy": False, "seen": now}
                       for r in range(self.size) if r != self.rank}
        self._sends: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedjax_lab-mpi-watchdog",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)  # before mpi4py finalizes MPI: no MPI call after that

    @contextlib.contextmanager
    def step(self, what: str, round_done: bool = False) -> Iterator[None]:
        """Marks a collective step; ``round_done`` counts a finished round when it ends."""
        with self._lock:
            self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._since = None
                self._rounds_done += round_done
                self._what = f"after {what}"

    def _status(self) -> tuple[int, str, bool]:
        with self._lock:
            return self._rounds_done, self._what, self._since is not None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()
            self._receive()
            self._check()

    def _beat(self) -> None:
        status = self._status()
        self._sends = [r for r in self._sends if not r.Test()]
        for peer in self._peers:
            self._sends.append(self.comm.isend(status, dest=peer, tag=self._TAG))

    def _receive(self) -> None:
        info = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=self._TAG, status=info):
            source = info.Get_source()
            rounds_done, what, busy = self.comm.recv(source=source, tag=self._TAG)
            self._peers[source] = {"rounds_done": rounds_done, "what": what, "busy": busy,
                                   "seen": time.monotonic()}

    def _check(self) -> None:
        with self._lock:
            since, rounds_done, what = self._since, self._rounds_done, self._what
        if since is None:
            return
        now = time.monotonic()
        waited = now - since
        if waited < self.timeout:
            return
        blame = []
        for peer, st in sorted(self._peers.items()):
            last = f"round {st['rounds_done'] + 1}, {st['what']}"
            if now - st["seen"] > self.silent_after:
                blame.append(
                    f"rank {peer} stopped responding: no heartbeat for {now - st['seen']:.1f} s "
                    f"(last seen in {last}); it is stopped, swapped out or hung"
                )
            elif st["rounds_done"] < rounds_done or not st["busy"]:
                blame.append(f"rank {peer} did not arrive: it is alive but still in {last}")
        if not blame:
            blame.append("every rank is alive and in this step: it is slower than the timeout; "
                         "raise it if rounds legitimately take this long")
        self._abort(
            f"rank {self.rank}/{self.size}: round {rounds_done + 1} ({what}) waited "
            f"{waited:.1f} s for the other ranks, more than round_timeout="
            f"{self.timeout:g} s (--mpi-round-timeout). " + "; ".join(blame) + "."
        )
        self._stop.set()

    def _print_and_abort(self, message: str) -> None:
        sys.stderr.write(
            f"\nfedjax_lab.backends.mpi watchdog: {message}\nAborting all {self.size} ranks "
            "(MPI_Abort).\n"
        )
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)

    def close(self) -> None:
        """Stops the thread (idempotent); heartbeats still in flight are left to MPI."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


class MpiClientStateStore(ClientStateStore):
    """Client states kept by their owning rank ``client_id % size``; see the module docstring.

    ``gather``/``scatter`` take the client ids of THIS rank's slots and are collective: every
    rank calls them once per round (the runner does), exchanging only the states needed.
    """

    def __init__(self, initial_state: Any, comm: MPI.Comm,
                 watchdog: RoundWatchdog | None = None) -> None:
        super().__init__(initial_state)
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.watchdog = watchdog

    def _step(self, what: str) -> contextlib.AbstractContextManager:
        return self.watchdog.step(what) if self.watchdog else contextlib.nullcontext()

    def owner(self, client_id: int) -> int:
        return int(client_id) % self.size

    def gather(self, client_ids: Any) -> Any:
        if self.stateless:
            return ()
        local = [int(c) for c in client_ids]
        with self._step("gathering client states"):
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
        with self._step("returning client states"):
            parts = self.comm.alltoall(outgoing)
        for part in parts:
            self.states.update(part)

    def snapshot(self) -> ClientStateStore | None:
        """Every rank's states gathered on rank 0 (None on the others); collective."""
        with self._step("gathering client states for a checkpoint"):
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
        with self._step("restoring client states"):
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
      round_timeout: seconds a round (or another collective step: client-state exchange,
        broadcast) may wait for the other ranks before a :class:`RoundWatchdog` aborts the job,
        naming the rank that is stuck; it includes the first round's compilation. None: no
        watchdog (a stopped rank then blocks the job until an outer timeout).
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
        round_timeout: float | None = 300.0,
    ) -> None:
        _shard.check_plan(plan, chunk_size, self.name, PLANS)
        if round_timeout is not None:
            check_timeout(round_timeout)
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
        self.programs = ProgramCache()
        self._vmap = VmapBackend("vmap", chunk_size=chunk_size, packing=packing,
                                 programs=self.programs)
        if abort_on_error:
            install_abort_on_uncaught(self.rank, self.size)
        # Its own communicator: heartbeats never match the rounds' collectives (collective).
        self.watchdog = (
            RoundWatchdog(base.Dup(), round_timeout) if round_timeout is not None else None
        )

    def _step(self, what: str, round_done: bool = False) -> contextlib.AbstractContextManager:
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.step(what, round_done)

    def close(self) -> None:
        """Stops the watchdog thread (the communicators are left to MPI_Finalize)."""
        if self.watchdog is not None:
            self.watchdog.close()

    @property
    def cohort_multiple(self) -> int:
        """The runner pads cohorts to a multiple of this (ranks x chunk)."""
        return self.size * (self.chunk_size or 1)

    @property
    def compiles(self):
        """Programs this rank traced so far, by kind."""
        return self.programs.compiles

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
        return MpiClientStateStore(initial_state, self.comm, self.watchdog)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (checkpoint restore); collective."""
        with self._step("a broadcast from rank 0"):
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
        return resolve_plan(self.plan, self.chunk_size, self.unroll_limit, server_state.params,
                            c, s)

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
        with self._step("the round's allreduce", round_done=True):
            # Waited for inside the deadline: the allreduce is where a stuck rank blocks us.
            if layout is None:
                stats = padded_stats(cohort)
                out = self._compiled(algorithm, plan)(server_state, client_states, cohort, key)
            else:
                stats = packed_stats(layout)
                out = self._compiled(algorithm, "packed-" + packing_mode(plan))(
                    server_state, client_states, cohort, key, layout
                )
            out = jax.block_until_ready(out)
            # The round's steps over every rank (a host collective of two numbers).
            for k in ("real_steps", "computed_steps"):
                stats[k] = float(self.comm.allreduce(stats[k], op=MPI.SUM))
        return out[0], out[1], {**out[2], **stats}

    def _compiled(self, algorithm: Algorithm, plan: str):
        return self.programs.get(algorithm, "mpi-" + plan, lambda: self._build(algorithm, plan))

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

        return jax.jit(self.programs.counted("padded_round", round_fn))

    def _loop_round(self, algorithm: Algorithm):
        """``VmapBackend``'s ``loop`` plan on the shard, with the allreduce in the finish jit."""
        comm = self.comm
        return self._vmap.loop_round(
            algorithm,
            keys_fn=jax.jit(self._shard_keys, static_argnums=1),
            reduce=lambda agg: allreduce_sum(agg, comm),
        )
