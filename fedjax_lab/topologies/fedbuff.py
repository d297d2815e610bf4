"""Asynchronous buffered aggregation: FedBuff on a simulated clock.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba (2022), "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS (FedBuff, Algorithm 1). ``concurrency`` clients train at
the same time, each from the server model of the moment it started; the server keeps their
updates in a buffer and takes a step whenever ``K`` of them have arrived, so a slow client
never holds a step back, at the price of *stale* updates (computed on an older model).

Server step (Algorithm 1, with the staleness scaling of its experiments, as FedAsync's):
the ``K`` buffered updates ``Δ_i = y_i - w^{t_i}`` (client model after local training minus
the model it started from, at version ``t_i``) give

    w ← w + η_g · Σ_i s(τ_i) · p_i · Δ_i / Σ_i p_i,        τ_i = t - t_i,

where ``t`` is the server version when the buffer is applied, ``s`` the staleness weight
(:func:`polynomial_staleness`, ``s(τ) = (1 + τ)^-1/2`` by default; :func:`constant_staleness`)
and ``p_i`` the algorithm's client weight. With ``weighting="uniform"`` (``p_i = 1``) this is
the paper's ``Δ̄ / K`` exactly; ``"examples"`` weighs by example counts as FedAvg does (FLSim
multiplies example and staleness weights the same way). The normaliser is the *unscaled*
``Σ p_i`` (``K``), so stale updates shrink the step rather than being renormalised away. A
client whose update is non-finite is rejected (weight 0) as in every algorithm here and is not
counted in ``Σ p_i``. The step itself is the algorithm's ``server_update``: with
``fedavg(..., server_optimizer=optax.sgd(η_g))`` it is the line above; a server optimizer
such as Adam gives the FedAdam variant of FLSim's buffered aggregator.

The loop is event driven, on the host: a heap of finish times. A client's duration is drawn
when it starts (:class:`ClientTimes`: the FedPAQ computation/communication model of
:class:`fedjax_lab.systems.TimeModel` per client, times a heavy-tailed per-device slowdown).
Clients that finish at the same instant are processed together in start order: each joins the
buffer (the server steps as soon as it holds ``K``), and then all of them are replaced at once
by newly sampled clients that start on the server model of that moment. Sampling rule:
uniform without replacement over the clients that are neither training nor waiting in the
buffer (a client contributes at most once to a buffer, as with secure aggregation in the
paper), so the population must hold at least ``concurrency + K - 1`` clients.

Local training is deferred to the step that consumes it (it depends only on the start model,
the client's batches and key): the ``K`` clients of a step train vmapped in one compiled
program, each from its own start model (the start server states are stacked; versions that no
client in flight or in the buffer refers to are dropped), then the algorithm's ``aggregate``
and ``server_update`` run in the same program. Any additive algorithm whose clients send no
``extra`` terms works (FedAvg, FedProx, FedPAQ with its compressor, FedOpt): its own
``client_update`` trains, its compressor encodes, per-client compressor state lives in a
:class:`~fedjax_lab.backends.ClientStateStore`.

Randomness, all from the seed: the ``d``-th sampling draw uses
``host_rng(seed, SAMPLING_STREAM, d)``; its clients' batches are the cohort builder's for round
``d`` (``host_rng(seed, SHUFFLE_STREAM, d, client)``), their keys
``client_keys(round_key(key(seed), d), m)`` (``m`` clients in the draw, in sorted order) and
their durations ``host_rng(seed, SYSTEM_STREAM, d, DURATION_SUBSTREAM)``. With ``K =
concurrency`` and zero durations every draw is a whole cohort and FedBuff *is* the synchronous
runner's FedAvg (same clients, batches and keys; tested to 1e-5).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.backends.base import ClientStateStore, ProgramCache
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.local import call_client_update
from fedjax_lab.core.types import Algorithm, Batches, ServerState
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData, sample_clients
from fedjax_lab.systems.time_model import TimeModel

__all__ = [
    "STALENESS_WEIGHTS",
    "ClientTimes",
    "FedBuffResult",
    "constant_staleness",
    "polynomial_staleness",
    "run_fedbuff",
    "staleness_weight",
]

#: Sub-streams of ``SYSTEM_STREAM`` (availability uses 0, the time model 1).
DURATION_SUBSTREAM = 2
SLOWDOWN_SUBSTREAM = 3
#: Names accepted by :func:`staleness_weight`.
STALENESS_WEIGHTS = ("constant", "polynomial")

#: ``s(tau) -> weights``: the staleness weight of an int array of staleness values.
StalenessWeight = Callable[[np.ndarray], np.ndarray]
#: ``delays(clients, work, rng) -> durations``: seconds (simulated) from start to report of each
#: client of one draw; ``work`` is the examples each processes.
Delays = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def constant_staleness() -> StalenessWeight:
    """``s(τ) = 1``: every buffered update counts fully (plain buffered averaging)."""

    def weight(tau: np.ndarray) -> np.ndarray:
        return np.ones(np.shape(tau), np.float64)

    return weight


def polynomial_staleness(exponent: float = 0.5) -> StalenessWeight:
    """``s(τ) = (1 + τ)^-a`` (Xie et al. 2019, FedAsync; FedBuff uses ``a = 1/2``).

    Args:
      exponent: ``a``, a finite float >= 0 (0 is the constant weight).
    """
    if isinstance(exponent, bool) or not isinstance(exponent, int | float) or not (
        0.0 <= exponent < math.inf
    ):
        raise ValueError(f"staleness exponent must be a finite float >= 0, got {exponent!r}")
    a = float(exponent)

    def weight(tau: np.ndarray) -> np.ndarray:
        return (1.0 + np.asarray(tau, np.float64)) ** -a

    return weight


def staleness_weight(name: str, exponent: float = 0.5) -> StalenessWeight:
    """A staleness weight by name: ``"constant"`` or ``"polynomial"`` (with ``exponent``)."""
    if name == "constant":
        return constant_staleness()
    if name == "polynomial":
        return polynomial_staleness(exponent)
    raise ValueError(f"staleness weighting must be one of {STALENESS_WEIGHTS}, got {name!r}")


@dataclass(frozen=True)
class ClientTimes:
    """Per-client durations: FedPAQ's time model per client, with heavy-tailed device speeds.

    A client ``c`` that processes ``w`` examples and uploads ``upload_bits`` takes

        ``v_c · (w·shift + E·w/scale) + upload_bits / bandwidth``,   ``E ~ Exp(1)``

    (``shift``, ``scale`` and ``bandwidth`` from ``time_model``, Reisizadeh et al. 2020, §5,
    applied per client instead of to a round's maximum; each client has its own link). ``v_c
    = exp(σ·z_c)``, ``z_c ~ N(0, 1)``, is a fixed lognormal slowdown per device drawn once from
    ``host_rng(seed, SYSTEM_STREAM, 0, SLOWDOWN_SUBSTREAM)``: ``σ = 0`` gives equal devices,
    ``σ >= 1`` the heavy tail of real fleets (a few devices 10x slower). The upload is the
    given size (a compressor's exact bits are known only after training; the dense size
    ``32·p`` is the usual choice).

    Attributes:
      time_model: the computation/communication constants.
      num_clients: population size (the slowdowns are drawn for all of it).
      upload_bits: bits each client uploads (>= 0).
      slowdown_sigma: ``σ`` (>= 0).
      seed: run seed.
    """

    time_model: TimeModel
    num_clients: int
    upload_bits: float
    slowdown_sigma: float = 0.0
    seed: int = 0
    slowdown: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.time_model, TimeModel):
            raise TypeError(f"time_model must be a fedjax_lab.systems.TimeModel, got "
                            f"{self.time_model!r}")
        if isinstance(self.num_clients, bool) or not isinstance(
            self.num_clients, int | np.integer
        ) or self.num_clients < 1:
            raise ValueError(f"num_clients must be a positive integer, got {self.num_clients!r}")
        for name in ("upload_bits", "slowdown_sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                0.0 <= value < math.inf
            ):
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
        rng = rng_lib.host_rng(self.seed, rng_lib.SYSTEM_STREAM, 0, SLOWDOWN_SUBSTREAM)
        z = rng.standard_normal(int(self.num_clients))
        object.__setattr__(self, "slowdown", np.exp(float(self.slowdown_sigma) * z))

    def __call__(self, clients: np.ndarray, work: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        tm = self.time_model
        work = np.asarray(work, np.float64)
        e = rng.standard_exponential(len(work))
        slowdown = self.slowdown[np.asarray(clients, np.int64)]
        comp = slowdown * (work * tm.shift + e * work / tm.scale)
        return comp + tm.comm_time(float(self.upload_bits))


def draw_durations(delays: Delays, clients: np.ndarray, work: np.ndarray, *, seed: int,
                   draw: int) -> np.ndarray:
    """The checked durations of draw ``draw`` (finite, >= 0, one per client)."""
    rng = rng_lib.host_rng(seed, rng_lib.SYSTEM_STREAM, draw, DURATION_SUBSTREAM)
    out = np.asarray(delays(np.asarray(clients), np.asarray(work), rng), np.float64)
    if out.shape != (len(clients),):
        raise ValueError(f"delays must return one duration per client ({len(clients)}), got "
                         f"shape {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"delays returned non-finite durations {out.tolist()} for clients "
                         f"{np.asarray(clients).tolist()}; every duration must be finite")
    if np.any(out < 0):
        raise ValueError(f"delays returned negative durations {out.tolist()}; durations "
                         "must be >= 0")
    return out


@dataclass
class FedBuffResult:
    """What a FedBuff run produced.

    Attributes:
      server_state: the final server state.
      history: one record per server step: ``step``, ``sim_time`` (simulated time of the
        step), the algorithm's round metrics (``train_loss``, ...), ``staleness_mean`` and
        ``staleness_max`` of its ``K`` updates, and the evaluation (``test_accuracy``, ...)
        every ``eval_every`` steps and at the last step.
      staleness_histogram: ``{τ: number of applied updates with staleness τ}`` over the run.
      staleness_mean: mean staleness of the applied updates (NaN when none was applied).
      staleness_max: largest staleness applied (-1 when none was).
      sim_time: simulated time of the last step (0 when none was taken).
      clients_started: clients sampled over the run.
      max_versions_held: most server model versions held after a step (the current one and
        those that a client in flight or in the buffer started from: at most
        ``concurrency + K``).
      compiles: programs traced (one per padded step count ``S`` of the ladder).
    """

    server_state: ServerState
    history: list[dict[str, float]] = field(default_factory=list)
    staleness_histogram: dict[int, int] = field(default_factory=dict)
    staleness_mean: float = float("nan")
    staleness_max: int = -1
    sim_time: float = 0.0
    clients_started: int = 0
    max_versions_held: int = 1
    compiles: int = 0


@dataclass
class _Job:
    client: int
    version: int
    draw: int
    index: np.ndarray  # [S_max, B] example rows, -1 for padding
    weight: float
    key: jax.Array


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def validate_fedbuff_args(
    algorithm: Algorithm, data: FederatedData, *, concurrency: int, buffer_size: int,
    server_steps: int | None, time_budget: float | None, eval_every: int,
) -> None:
    """Every argument check of :func:`run_fedbuff` (ValueError naming the argument and fix)."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    if not algorithm.additive:
        raise ValueError(
            f"FedBuff scales each buffered update by its staleness weight inside an additive "
            f"sum; {algorithm.name} is not additive (a robust aggregator): use an additive one"
        )
    concurrency = _positive_int(concurrency, "concurrency")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int | np.integer) or (
        buffer_size < 1
    ):
        raise ValueError(f"buffer_size (K) must be a positive integer, got {buffer_size!r}")
    if buffer_size > concurrency:
        raise ValueError(
            f"buffer_size K={buffer_size} > concurrency={concurrency}: the buffer could never "
            "fill; choose K <= concurrency"
        )
    need = concurrency + int(buffer_size) - 1
    if data.num_clients < need:
        raise ValueError(
            f"a population of {data.num_clients} clients cannot keep concurrency={concurrency} "
            f"clients training while up to K-1={buffer_size - 1} wait in the buffer (a client "
            f"is sampled only when neither): it needs >= {need} clients; lower --concurrency "
            "or --buffer-size, or raise --population"
        )
    if data.is_lazy:
        raise ValueError("FedBuff keeps the population on the device (an example table); "
                         "load the dataset eagerly (lazy=False)")
    if server_steps is None and time_budget is None:
        raise ValueError("give server_steps (number of server updates) or time_budget "
                         "(simulated time), or both")
    if server_steps is not None and (
        isinstance(server_steps, bool) or not isinstance(server_steps, int | np.integer)
        or server_steps < 0
    ):
        raise ValueError(f"server_steps must be an integer >= 0, got {server_steps!r}")
    if time_budget is not None and (
        isinstance(time_budget, bool) or not isinstance(time_budget, int | float)
        or not 0.0 < time_budget < math.inf
    ):
        raise ValueError(f"time_budget must be a finite float > 0, got {time_budget!r}")
    _positive_int(eval_every, "eval_every")


def _step_program(algorithm: Algorithm, programs: ProgramCache):
    """The compiled server step: K clients from stacked start states, aggregate, update."""

    def step(server_state, starts, client_states, table, index, mask, weight, keys, stale_w):
        def one(start, state, idx, m, w, key):
            batches = Batches(None, m, w, index=idx, table=table)
            return call_client_update(algorithm.client_update, start, state, batches, key=key)

        outputs, new_states = jax.vmap(one)(starts, client_states, index, mask, weight, keys)
        if jax.tree.leaves(outputs.extra):
            raise ValueError(
                f"{algorithm.name} sends extra terms besides its update (control variates, "
                "step norms); FedBuff weighs only the update by staleness. Use an algorithm "
                "without them (fedavg, fedprox, fedpaq, fedopt)"
            )
        scaled = outputs._replace(weight=outputs.weight * stale_w.astype(outputs.weight.dtype))
        agg = algorithm.aggregate(scaled)
        # Normalise by the unscaled weights (K for uniform weighting): stale updates make the
        # step shorter, as s(τ)Δ/K in the paper, instead of being renormalised away.
        agg = agg._replace(weight_sum=jnp.sum(outputs.weight))
        new_server, metrics = algorithm.server_update(server_state, agg)
        return new_server, new_states, metrics

    return programs.get(algorithm, "fedbuff_step",
                        lambda: jax.jit(programs.counted("fedbuff_step", step)))


def run_fedbuff(
    algorithm: Algorithm,
    data: FederatedData,
    init_params: Any,
    *,
    concurrency: int,
    buffer_size: int,
    seed: int,
    delays: Delays,
    server_steps: int | None = None,
    time_budget: float | None = None,
    staleness: StalenessWeight | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 1,
    step_ladder: float | None = 2.0,
    programs: ProgramCache | None = None,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> FedBuffResult:
    """Runs FedBuff (see the module docstring) until a step or simulated-time budget.

    Args:
      algorithm: an additive algorithm whose clients send no extra terms, e.g.
        ``fedavg(model, optax.sgd(η_l), batch_size=B, local_epochs=E,
        server_optimizer=optax.sgd(η_g), weighting="uniform")``; its server optimizer applies
        the buffered mean (η_g is the server learning rate).
      data: the population (in memory).
      init_params: the initial model.
      concurrency: clients training at any time (``C`` in the paper).
      buffer_size: ``K``, updates per server step (``1 <= K <= concurrency``).
      seed: run seed; the same seed gives the same run.
      delays: ``(clients, work, rng) -> durations``, e.g. a :class:`ClientTimes`; must return
        finite durations >= 0.
      server_steps: stop after this many server steps.
      time_budget: stop before the first step later than this simulated time (with only a
        budget, durations must be > 0, else the clock never advances).
      staleness: ``s(τ)`` (default :func:`polynomial_staleness` ``(0.5)``).
      evaluate: ``params -> metrics`` (e.g. ``make_evaluator``), every ``eval_every`` steps
        and at the last one.
      eval_every: evaluation period in server steps.
      step_ladder: the cohort builder's step ladder (programs compiled: one per rung used).
      programs: a compile cache to share between runs (default: a fresh one).
      callbacks: ``(step, record)`` after every server step.

    Raises:
      ValueError: bad arguments (before anything is compiled), or durations / staleness
        weights that are not finite and >= 0 (when drawn).
    """
    validate_fedbuff_args(algorithm, data, concurrency=concurrency, buffer_size=buffer_size,
                          server_steps=server_steps, time_budget=time_budget,
                          eval_every=eval_every)
    if not callable(delays):
        raise TypeError(f"delays must be a callable (clients, work, rng) -> durations, got "
                        f"{delays!r}")
    staleness = staleness if staleness is not None else polynomial_staleness(0.5)
    concurrency, k = int(concurrency), int(buffer_size)
    spec = algorithm.data_spec
    builder = CohortBuilder(
        data, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
        num_steps=spec.num_steps, cohort_size=k, seed=seed, device_table=True,
        ladder=step_ladder,
    )
    programs = programs if programs is not None else ProgramCache()
    before = sum(programs.compiles.values())
    step_fn = _step_program(algorithm, programs)
    root = jax.random.key(seed)
    store = ClientStateStore(algorithm.client_init(init_params))
    server_state = algorithm.init(init_params)
    version = 0
    models: dict[int, ServerState] = {0: server_state}
    refs: Counter[int] = Counter()
    heap: list[tuple[float, int, int]] = []  # (finish time, start sequence, client)
    in_flight: dict[int, _Job] = {}
    buffer: list[_Job] = []
    result = FedBuffResult(server_state)
    hist: Counter[int] = Counter()
    counters = {"draw": 0, "seq": 0, "evaluated": 0}
    budget_only = server_steps is None

    def start(m: int, now: float) -> None:
        busy = np.fromiter(list(in_flight) + [j.client for j in buffer], np.int64)
        available = np.setdiff1d(np.arange(data.num_clients), busy)
        d = counters["draw"]
        picks = available[sample_clients(
            len(available), m, rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, d))]
        keys = rng_lib.client_keys(rng_lib.round_key(root, d), m)
        index = [builder.client_index(int(c), d) for c in picks]
        work = np.array([np.count_nonzero(ix >= 0) for ix in index], np.float64)
        durations = draw_durations(delays, picks, work, seed=seed, draw=d)
        if budget_only and np.any(durations <= 0):
            raise ValueError("with only a time_budget every duration must be > 0 (zero "
                             "durations never advance the clock); give server_steps too")
        for j, c in enumerate(picks):
            c = int(c)
            in_flight[c] = _Job(c, version, d, index[j], builder.client_weight(c, index[j]),
                                keys[j])
            heapq.heappush(heap, (now + float(durations[j]), counters["seq"], c))
            counters["seq"] += 1
        refs[version] += m
        counters["draw"] += 1
        result.clients_started += m

    def apply_buffer(now: float) -> None:
        nonlocal server_state, version
        jobs = buffer[:k]
        del buffer[:k]
        clients = [j.client for j in jobs]
        tau = np.array([version - j.version for j in jobs], np.int64)
        w = np.asarray(staleness(tau), np.float64)
        if w.shape != tau.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"staleness weights must be finite and >= 0, one per update; got "
                             f"{w.tolist()} for staleness {tau.tolist()}")
        s = builder.round_steps(clients)
        index = np.stack([j.index[:s] for j in jobs])
        starts = jax.tree.map(lambda *xs: jnp.stack(xs), *[models[j.version] for j in jobs])
        server_state, new_states, metrics = step_fn(
            server_state, starts, store.gather(clients), builder.table,
            np.where(index >= 0, index, 0).astype(np.int32), (index >= 0).astype(np.float32),
            np.array([j.weight for j in jobs], np.float32), jnp.stack([j.key for j in jobs]),
            w.astype(np.float32),
        )
        store.scatter(clients, new_states)
        for j in jobs:
            refs[j.version] -= 1
        version += 1
        models[version] = server_state
        for v in [v for v in models if v != version and refs[v] <= 0]:
            del models[v]  # no client in flight or in the buffer started from it
            refs.pop(v, None)
        result.max_versions_held = max(result.max_versions_held, len(models))
        hist.update(tau.tolist())
        record = {k_: float(v) for k_, v in jax.device_get(metrics).items()}
        record.update(step=version, sim_time=now, staleness_mean=float(tau.mean()),
                      staleness_max=float(tau.max()))
        if evaluate is not None and (version % eval_every == 0 or version == server_steps):
            record.update(evaluate(server_state.params))
            counters["evaluated"] = version
        result.history.append(record)
        result.sim_time = now
        for cb in callbacks:
            cb(version, record)

    def finished() -> bool:
        return server_steps is not None and version >= server_steps

    start(concurrency, 0.0)
    while not finished():
        now = heap[0][0]
        if time_budget is not None and now > time_budget:
            break
        group = []
        while heap and heap[0][0] == now:
            group.append(heapq.heappop(heap)[2])
        for c in group:
            buffer.append(in_flight.pop(c))
            if len(buffer) == k:
                apply_buffer(now)
                if finished():
                    break
        if finished():
            break
        start(len(group), now)

    if evaluate is not None and result.history and counters["evaluated"] != version:
        # A time budget's last step is known only once the next event lies beyond it.
        result.history[-1].update(evaluate(server_state.params))
    result.server_state = server_state
    result.staleness_histogram = dict(sorted(hist.items()))
    total = sum(hist.values())
    if total:
        result.staleness_mean = sum(t * n for t, n in hist.items()) / total
        result.staleness_max = max(hist)
    result.compiles = sum(programs.compiles.values()) - before
    return result
