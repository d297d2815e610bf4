"""The host-side training loop: sample, build cohort, run the compiled round, log.

This is the only place that moves data between the host-side population and a backend: it is
shared by experiments, sweeps and tests so that they all run exactly the same rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from fedjax_lab.algorithms.kit import TRAIN_EXAMPLES, UPLOAD_BITS
from fedjax_lab.backends.base import Backend, ClientStateStore, check_backend
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import Algorithm, ServerState
from fedjax_lab.data.budget import check_cohort_memory
from fedjax_lab.data.cohort import CohortBuilder, padded_cohort_size
from fedjax_lab.data.federated import FederatedData, sample_clients
from fedjax_lab.systems.availability import Availability
from fedjax_lab.systems.time_model import SimulatedClock, TimeModel

RoundCallback = Callable[[int, dict[str, float]], None]
# (round index, server state after it, client state store) -> None
StateCallback = Callable[[int, ServerState, "ClientStateStore"], None]


class StopRun(Exception):
    """Raised by a round callback to end :func:`run` after the current round.

    The round's other callbacks and its state callbacks still run; the run returns normally
    with ``RunResult.stop_reason = str(exception)``.
    """


@dataclass
class RunResult:
    """What a run produced: final server state, per-round history, totals."""

    server_state: ServerState
    history: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    train_examples: float = 0.0
    real_steps: float = 0.0
    computed_steps: float = 0.0
    compiles: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None  # why a callback ended the run early (StopRun), else None

    @property
    def padding_efficiency(self) -> float:
        """Real local steps / computed slot-steps over the run (NaN if nothing was computed)."""
        return self.real_steps / self.computed_steps if self.computed_steps else float("nan")


def owned_slots(backend: Backend, cohort_size: int) -> np.ndarray:
    """The client slots this process trains: ``backend.owned_slots(cohort_size)``, checked.

    A backend that splits a cohort over processes (MPI ranks) owns a sorted subset; the runner
    then builds the cohort, and gathers client states, for those slots only.
    """
    owned = np.asarray(backend.owned_slots(cohort_size))
    if (
        owned.ndim != 1 or not len(owned) or not np.issubdtype(owned.dtype, np.integer)
        or owned[0] < 0 or owned[-1] >= cohort_size or np.any(np.diff(owned) <= 0)
    ):
        raise ValueError(
            f"backend.owned_slots({cohort_size}) must return a non-empty, strictly increasing "
            f"1-D integer array in [0, {cohort_size}), got {owned!r}"
        )
    return owned


def slot_ids(clients: np.ndarray, cohort_size: int, owned: np.ndarray) -> np.ndarray:
    """The client id of each slot this process trains (``-1`` for padded slots)."""
    ids = np.full(cohort_size, -1, np.int64)
    ids[: len(clients)] = clients
    return ids[owned]  # this process's slots: all of them unless the backend shards them


def round_clients(
    data: FederatedData, clients_per_round: int, seed: int, round_idx: int, cohort_size: int,
    owned: np.ndarray,
) -> np.ndarray:
    """The clients this process trains in ``round_idx`` (the runner's sampling, replayed)."""
    clients = sample_clients(
        data.num_clients, clients_per_round,
        rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, round_idx),
    )
    ids = slot_ids(clients, cohort_size, owned)
    return ids[ids >= 0]


def validate_run_args(data: FederatedData, clients_per_round: int, rounds: int) -> None:
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if clients_per_round < 1:
        raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
    if clients_per_round > data.num_clients:
        raise ValueError(
            f"clients_per_round={clients_per_round} > num_clients={data.num_clients}; lower "
            "--clients-per-round or partition into more clients"
        )


def run(
    algorithm: Algorithm,
    backend: Backend,
    data: FederatedData,
    init_params: Any,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 1,
    device_table: bool = True,
    callbacks: Sequence[RoundCallback] = (),
    server_state: ServerState | None = None,
    start_round: int = 0,
    client_store: ClientStateStore | None = None,
    availability: Availability | None = None,
    time_model: TimeModel | None = None,
    state_callbacks: Sequence[StateCallback] = (),
    max_examples_per_client: int | None = None,
    max_local_steps: int | None = None,
    step_ladder: float | None = 2.0,
    num_classes: int | None = None,
) -> RunResult:
    """Runs ``rounds`` federated rounds and returns the final state and the history.

    Round ``r`` samples ``clients_per_round`` clients with ``host_rng(seed, SAMPLING, r)`` and
    uses the round key ``fold_in(PRNGKey(seed), r)``; nothing depends on earlier rounds' host
    randomness, so ``start_round`` + ``server_state`` resume a run exactly.
    ``state_callbacks`` are called after each round with ``(r, server_state, client_store)``
    (checkpointing).

    Every round record has ``cum_uplink_bits`` (uplink bits so far). ``availability`` (a
    ``fedjax_lab.systems.Availability``) drops clients / cuts stragglers' local steps and adds
    ``dropped``/``stragglers`` counts; ``time_model`` (a ``fedjax_lab.systems.TimeModel``) adds
    the cumulative simulated ``sim_time``, ``sim_comm_time`` and ``sim_comp_time``, and
    ``wall_time`` (seconds since the call started; only with a time model, so that records
    without one stay deterministic). Both draw from
    ``host_rng(seed, SYSTEM_STREAM, round, ...)``; cumulative fields restart with each call.

    ``max_examples_per_client`` / ``max_local_steps`` cap each client's data / local steps
    (``CohortBuilder``) and add ``capped_clients`` / ``capped_steps`` to every record;
    ``step_ladder`` is the ratio of the per-round step ladder (``None``: the population's
    largest client every round). ``RunResult`` reports the run's real and computed local steps
    (``padding_efficiency``) and the programs the backend compiled (``compiles``, by kind, when
    the backend counts them).

    ``num_classes`` is the model's output size: the population's labels are checked against it
    (and against ``data.num_classes`` when set) before anything compiles, because JAX clamps
    out-of-range labels silently. A callback may raise :class:`StopRun` to end the run after
    the current round (``RunResult.stop_reason``), e.g. a ``DivergenceMonitor``.

    ``backend`` is a :class:`~fedjax_lab.backends.Backend`: the cohort is padded to its
    ``cohort_multiple`` (devices, ranks, chunk size), this process trains its ``owned_slots``,
    keeps client states in its ``client_store`` and may plan layouts (``plan_rounds``).
    """
    backend = check_backend(backend)
    validate_run_args(data, clients_per_round, rounds)
    if num_classes is not None:
        data = data.with_num_classes(num_classes)
    if availability is not None and not isinstance(availability, Availability):
        raise TypeError(
            f"availability must be a fedjax_lab.systems.Availability, got {availability!r}"
        )
    spec = algorithm.data_spec
    cohort_size = padded_cohort_size(clients_per_round, None, backend.cohort_multiple)
    owned = owned_slots(backend, cohort_size)
    if len(owned) < cohort_size and (availability is not None or time_model is not None):
        raise ValueError(
            f"availability/time_model draw over all {cohort_size} client slots, but the "
            f"{backend.name} backend trains only {len(owned)} of them in "
            "this process; run system simulations with --backend vmap or sharded"
        )
    # Refuse a cohort that cannot fit before allocating it (a ValueError, not a MemoryError
    # or the OOM killer mid-run).
    check_cohort_memory(
        data, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
        num_steps=spec.num_steps, cohort_size=len(owned),
        with_examples=data.is_lazy or not (device_table and backend.device_table),
        max_examples_per_client=max_examples_per_client, max_local_steps=max_local_steps,
    )
    builder = CohortBuilder(
        data,
        batch_size=spec.batch_size,
        local_epochs=spec.local_epochs,
        num_steps=spec.num_steps,
        cohort_size=len(owned),
        seed=seed,
        # A lazily read population stays off the device: each round reads its clients' rows.
        device_table=device_table and backend.device_table and not data.is_lazy,
        ladder=step_ladder,
        max_examples_per_client=max_examples_per_client,
        max_local_steps=max_local_steps,
    )
    capped = max_examples_per_client is not None or max_local_steps is not None
    if server_state is None:
        server_state = algorithm.init(init_params)
    store = client_store or backend.client_store(algorithm.client_init(init_params))
    if rounds > 0:
        # Every round's client sizes are known up front (sampling is a pure function of the
        # seed and round), so a packing backend can fix one layout for the whole run.
        schedule, padded = [], []
        for r in range(start_round, start_round + rounds):
            real = round_clients(data, clients_per_round, seed, r, cohort_size, owned)
            steps = np.zeros(len(owned), np.int64)
            steps[: len(real)] = builder.client_steps(real)
            schedule.append(steps)
            padded.append(builder.round_steps(real))
        backend.plan_rounds(schedule, padded)
    root = jax.random.key(seed)
    result = RunResult(server_state)
    clock = SimulatedClock(time_model) if time_model is not None else None
    uplink_bits = 0.0
    start = time.perf_counter()
    for r in range(start_round, start_round + rounds):
        t0 = time.perf_counter()
        clients = sample_clients(
            data.num_clients, clients_per_round,
            rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, r),
        )
        ids = slot_ids(clients, cohort_size, owned)
        cohort = builder.build(r, ids[ids >= 0])
        system_record = builder.cap_stats(clients) if capped else {}
        if availability is not None:
            cohort, drops = availability.apply(cohort, seed=seed, round_idx=r)
            system_record.update(drops)
        states = store.gather(ids)
        server_state, states, metrics = backend.run_round(
            algorithm, server_state, states, cohort, rng_lib.round_key(root, r)
        )
        store.scatter(ids, states)
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record["round"] = r + 1
        record.update(system_record)
        uplink_bits += record.get(UPLOAD_BITS, 0.0)
        record["cum_uplink_bits"] = uplink_bits
        if clock is not None:
            record.update(clock.tick(cohort, record.get(UPLOAD_BITS, 0.0), seed=seed,
                                     round_idx=r))
        record["round_seconds"] = time.perf_counter() - t0
        result.train_seconds += record["round_seconds"]
        result.train_examples += record.get(TRAIN_EXAMPLES, 0.0)
        result.real_steps += record.get("real_steps", 0.0)
        result.computed_steps += record.get("computed_steps", 0.0)
        if evaluate is not None and eval_every > 0 and (
            # Absolute rounds: a resumed run evaluates where an uninterrupted one does.
            (r + 1) % eval_every == 0 or r == start_round + rounds - 1
        ):
            record.update(evaluate(server_state.params))
        if clock is not None:  # wall time next to simulated time (non-deterministic field)
            record["wall_time"] = time.perf_counter() - start
        result.history.append(record)
        stop: StopRun | None = None
        for cb in callbacks:
            try:
                cb(r, record)
            except StopRun as stopped:  # the other callbacks still see this round
                stop = stop or stopped
        for state_cb in state_callbacks:  # e.g. checkpointing (fedjax_lab.io.checkpoint)
            state_cb(r, server_state, store)
        if stop is not None:
            result.stop_reason = str(stop)
            break
    result.server_state = server_state
    result.wall_seconds = time.perf_counter() - start
    result.compiles = dict(backend.compiles)
    return result
