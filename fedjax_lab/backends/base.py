"""The ``Backend`` protocol: everything the runner, the experiments and checkpoints ask of one.

A backend runs an algorithm's rounds (``run_round``) and answers a few questions about the
process it runs in: which client slots it trains (MPI ranks train a block), which process writes
outputs, how to agree with the other processes, how failures end the job. Every one of those
hooks is declared here, so callers call them instead of probing attributes; single-process
backends inherit the trivial answers from :class:`SingleProcessBackend`.

``ProgramCache`` is the one compile cache of the backends (by algorithm and plan) and counts
every program they trace, which runs report (``RunResult.compiles``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.types import Algorithm, Cohort, ServerState


class ClientStateStore:
    """Per-client state of a stateful algorithm (EF residuals, SCAFFOLD controls), host-side.

    Only clients that have participated are stored; the others implicitly hold the initial
    state. ``gather``/``scatter`` move a cohort's states to and from the stacked ``[C, ...]``
    layout the backends use. Padded slots (client id -1) read the initial state and are never
    written back.
    """

    def __init__(self, initial_state: Any) -> None:
        self.initial = jax.device_get(initial_state)
        self.stateless = not jax.tree.leaves(initial_state)
        self.states: dict[int, Any] = {}

    def gather(self, client_ids: Sequence[int]) -> Any:
        if self.stateless:
            return ()
        trees = [self.states.get(int(c), self.initial) for c in client_ids]
        return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *trees)

    def scatter(self, client_ids: Sequence[int], stacked: Any) -> None:
        if self.stateless:
            return
        host = jax.device_get(stacked)
        for slot, cid in enumerate(client_ids):
            if cid >= 0:
                self.states[int(cid)] = jax.tree.map(lambda x, s=slot: np.array(x[s]), host)

    def snapshot(self) -> ClientStateStore | None:
        """A store holding every client's state, on the process that writes checkpoints.

        Single-process stores return themselves. Stores split over processes (MPI ranks) gather
        to the primary and return None elsewhere; every process must call it (collective).
        """
        return self

    def load(self, full: ClientStateStore | None) -> None:
        """Replaces the states with those of ``full`` (a :meth:`snapshot`, e.g. restored).

        Stores split over processes take ``full`` on the primary (None elsewhere) and keep the
        states each process owns; every process must call it (collective).
        """
        if full is None:
            raise ValueError("load() of a single-process store needs the full store, got None")
        self.states = dict(full.states)


@runtime_checkable
class Backend(Protocol):
    """What a backend provides (DESIGN.md "Core contracts").

    Attributes:
      name: short name used in messages (``"vmap"``, ``"sharded"``, ``"mpi"``, ``"edge"``).
      cohort_multiple: the runner pads every cohort to a multiple of this (devices, ranks,
        chunk size).
      device_table: whether a population that fits may live on the device as one example table
        (False for MPI ranks, which gather only their own clients' examples).
      is_primary: whether this process writes outputs (rank 0 of an MPI job).
      compiles: programs traced so far, by kind (reported as ``RunResult.compiles``).
    """

    name: str
    cohort_multiple: int
    device_table: bool
    is_primary: bool
    compiles: Mapping[str, int]

    def run_round(
        self, algorithm: Algorithm, server_state: ServerState, client_states: Any,
        cohort: Cohort, key: jax.Array,
    ) -> tuple[ServerState, Any, dict[str, Any]]:
        """One round: ``(new server state, new client states, round metrics)``."""
        ...

    def plan_rounds(self, schedule: list[np.ndarray], padded_steps: list[int]) -> None:
        """Every coming round's real client steps and padded ``S``, before the first round."""
        ...

    def owned_slots(self, cohort_size: int) -> np.ndarray:
        """The sorted client slots of a cohort that this process trains."""
        ...

    def client_store(self, initial_state: Any) -> ClientStateStore:
        """The store of per-client states this process keeps."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """The primary's ``obj`` on every process (collective)."""
        ...

    def failure_guard(self) -> contextlib.AbstractContextManager[None]:
        """A context in which an exception ends every process of the job, not just this one."""
        ...

    def close(self) -> None:
        """Releases processes, threads and sockets (idempotent)."""
        ...


class ProgramCache:
    """The compiled programs of a backend by ``(algorithm, kind)``, and a count of traces.

    An entry holds its algorithm, so an algorithm that was freed and whose ``id`` was reused
    never gets another's program.
    """

    def __init__(self) -> None:
        self.compiles: Counter[str] = Counter()
        self._programs: dict[tuple[int, str], tuple[Algorithm, Any]] = {}

    def get(self, algorithm: Algorithm, kind: str, build: Callable[[], Any]) -> Any:
        """The cached program of ``(algorithm, kind)``, built by ``build()`` on first use."""
        key = (id(algorithm), kind)
        hit = self._programs.get(key)
        if hit is not None and hit[0] is algorithm:
            return hit[1]
        program = build()
        self._programs[key] = (algorithm, program)
        return program

    def counted(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` that adds one to ``compiles[kind]`` each time it is traced (compiled)."""

        def traced(*args, **kwargs):
            self.compiles[kind] += 1
            return fn(*args, **kwargs)

        return traced


class SingleProcessBackend:
    """The hooks of a backend that runs in one process (every slot, no collectives)."""

    name = "backend"
    cohort_multiple = 1
    device_table = True
    is_primary = True

    def __init__(self) -> None:
        self.programs = ProgramCache()

    @property
    def compiles(self) -> Counter[str]:
        """Programs traced so far, by kind."""
        return self.programs.compiles

    def plan_rounds(self, schedule: list[np.ndarray], padded_steps: list[int]) -> None:
        """Nothing to plan by default."""
        del schedule, padded_steps

    def owned_slots(self, cohort_size: int) -> np.ndarray:
        """Every slot: one process trains the whole cohort."""
        return np.arange(cohort_size)

    def client_store(self, initial_state: Any) -> ClientStateStore:
        """One store of every client's state."""
        return ClientStateStore(initial_state)

    def broadcast(self, obj: Any) -> Any:
        """One process: ``obj`` itself."""
        return obj

    @contextlib.contextmanager
    def failure_guard(self) -> Iterator[None]:
        """One process: an exception propagates as usual."""
        yield

    def close(self) -> None:
        """Nothing to release by default."""


def check_backend(backend: Any) -> Backend:
    """``backend`` if it provides every hook of :class:`Backend`, else a TypeError naming the
    missing ones (subclass :class:`SingleProcessBackend` for the single-process defaults)."""
    if isinstance(backend, Backend):
        return backend
    hooks = [name for name in ("name", "cohort_multiple", "device_table", "is_primary",
                               "compiles", "run_round", "plan_rounds", "owned_slots",
                               "client_store", "broadcast", "failure_guard", "close")
             if not hasattr(backend, name)]
    raise TypeError(
        f"backend must implement fedjax_lab.backends.Backend; {type(backend).__name__} lacks "
        f"{hooks}. Subclass fedjax_lab.backends.SingleProcessBackend for the one-process "
        "defaults."
    )
