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
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import Algorithm, ServerState
from fedjax_lab.data.cohort import CohortBuilder, padded_cohort_size
from fedjax_lab.data.federated import FederatedData, sample_clients

RoundCallback = Callable[[int, dict[str, float]], None]


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


@dataclass
class RunResult:
    """What a run produced: final server state, per-round history, totals."""

    server_state: ServerState
    history: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    train_examples: float = 0.0


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
    backend: Any,
    data: FederatedData,
    init_params: Any,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 1,
    chunk_size: int | None = None,
    device_table: bool = True,
    callbacks: Sequence[RoundCallback] = (),
    server_state: ServerState | None = None,
    start_round: int = 0,
    client_store: ClientStateStore | None = None,
) -> RunResult:
    """Runs ``rounds`` federated rounds and returns the final state and the history.

    Round ``r`` samples ``clients_per_round`` clients with ``host_rng(seed, SAMPLING, r)`` and
    uses the round key ``fold_in(PRNGKey(seed), r)``; nothing depends on earlier rounds' host
    randomness, so ``start_round`` + ``server_state`` resume a run exactly.
    """
    validate_run_args(data, clients_per_round, rounds)
    spec = algorithm.data_spec
    multiple = getattr(backend, "cohort_multiple", 1)
    cohort_size = padded_cohort_size(clients_per_round, chunk_size, multiple)
    builder = CohortBuilder(
        data,
        batch_size=spec.batch_size,
        local_epochs=spec.local_epochs,
        num_steps=spec.num_steps,
        cohort_size=cohort_size,
        seed=seed,
        device_table=device_table,
    )
    if server_state is None:
        server_state = algorithm.init(init_params)
    store = client_store or ClientStateStore(algorithm.client_init(init_params))
    root = jax.random.key(seed)
    result = RunResult(server_state)
    start = time.perf_counter()
    for r in range(start_round, start_round + rounds):
        t0 = time.perf_counter()
        clients = sample_clients(
            data.num_clients, clients_per_round,
            rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, r),
        )
        cohort = builder.build(r, clients)
        ids = np.full(cohort_size, -1, np.int64)
        ids[: len(clients)] = clients
        states = store.gather(ids)
        server_state, states, metrics = backend.run_round(
            algorithm, server_state, states, cohort, rng_lib.round_key(root, r)
        )
        store.scatter(ids, states)
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record["round"] = r + 1
        record["round_seconds"] = time.perf_counter() - t0
        result.train_seconds += record["round_seconds"]
        result.train_examples += record.get("train_examples", 0.0)
        if evaluate is not None and eval_every > 0 and (
            (r + 1 - start_round) % eval_every == 0 or r == start_round + rounds - 1
        ):
            record.update(evaluate(server_state.params))
        result.history.append(record)
        for cb in callbacks:
            cb(r, record)
    result.server_state = server_state
    result.wall_seconds = time.perf_counter() - start
    return result
