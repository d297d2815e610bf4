"""Jit-accelerated hyperparameter sweeps: whole training runs vmapped over a grid.

A sweep compiles ONE program that trains every (seed, grid point) pair: ``jax.vmap`` over seeds
of ``jax.vmap`` over grid points of a ``lax.scan`` over rounds of the vmap backend's round
(client updates vmapped over the cohort, aggregate, server update). Hyperparameters enter as
traced float32 scalars: ``make_algorithm`` builds the algorithm inside the traced function, e.g.
``lambda h: fedavg(model, optax.sgd(h["client_lr"]), batch_size=20,
server_optimizer=optax.sgd(h["server_lr"]))`` or ``lambda h: fedprox(model, opt, mu=h["mu"],
...)``; a factory that checks a swept value in Python (``if lr > 0``) cannot be swept and gets a
clear error.

Every run is the run ``fedjax_lab.runner.run`` would do with the same seed: the host draws
each round's client sample and local batches exactly as the runner does (``sample_clients`` with
``host_rng(seed, SAMPLING, r)``, ``CohortBuilder(seed=seed)``) for all rounds up front, the data
stays on the device as one table indexed by ``[R, C, S, B]`` int32 indices, round keys are
``fold_in(key(seed), r)``, and client states of stateful algorithms (error feedback) live in a
device-side population table gathered/scattered by client id like ``ClientStateStore``. The
tests check a grid point against ``runner.run`` to 1e-5.

Executions (``execution=``, all computing the same runs; :func:`resolve_execution`):

* ``vmap``: the program above, every grid point vmapped;
* ``map``: the same program with the points in groups of ``points_per_batch`` (``lax.map``);
* ``host``: no scan at all: ONE compiled round per distinct local-step count (the
  hyperparameters are arguments, so one compilation serves every point; each round keeps its
  own steps instead of the sweep's longest) called from Python for every (seed, point, round),
  dispatched asynchronously; its clients follow the round's own plan rule
  (``backends.vmap.resolve_plan``: vmapped, or for conv models on CPU a traced loop with
  unrolled local steps). Or, with ``packing``, each round packed like the vmap backend packs
  it (``backends.packed``: clients back to back in slots, a segment of steps per call; the
  runner's cost model picks at most two layouts for the whole sweep, so a few programs are
  compiled once). It is 16 sequential runs' execution with one compilation instead of 16 and
  without the runner's per-round host work;
* ``auto`` (default): on CPU ``host`` for conv models, ``vmap`` for small dense models
  (``host`` where skewed client sizes make padding to the longest round cost > 2x the steps;
  its rounds packed where padding to each round's longest client costs > 2x) and ``host``
  with packed rounds for larger ones; ``vmap`` off CPU.

Scope: float hyperparameters only (integer ones change shapes), the vmap round without
chunking, no availability/time model; only the ``host`` execution packs. Memory of ``vmap``
grows with seeds x points (every run's cohort computation is batched), which suits the
small/medium models sweeps are used for; ``host`` and ``map`` with one point hold one run's
working set.

Speed (``benchmarks/sweep_speedup.py`` and ``benchmarks/sweep_breakdown.py``, numbers in
docs/design.md "Sweep executions"): every execution saves the N-1 extra compilations; once
compiled, vmapping the points pays off when dispatch/loop overhead dominates (logistic
regression) but not for compute-bound models: XLA:CPU's dots batched over points x clients
run slower per FLOP than the same dots batched over clients only (the MLP), and a
convolution inside a while loop (a scan over rounds, a ``lax.map`` over points) or vmapped
over per-point weights runs many times slower than in the straight-line ``unrolled`` round
(the FEMNIST CNN).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.backends import packed
from fedjax_lab.backends.vmap import (
    VmapBackend,
    has_conv,
    packing_mode,
    resolve_plan,
    unrolled_clients,
)
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.local import is_local_update
from fedjax_lab.core.types import Algorithm, Cohort, Params
from fedjax_lab.data.budget import check_cohort_memory
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData, sample_clients
from fedjax_lab.data.packing import PackedLayout, active_steps, split_layout
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.io.writers import write_json

MakeAlgorithm = Callable[[dict[str, jax.Array]], Algorithm]

EXECUTIONS = ("auto", "vmap", "map", "host")
CLIENT_PLANS = ("auto", "vmap", "unrolled")
# The backends' unrolled-plan limit (clients x local steps), for the host execution's clients.
UNROLL_LIMIT = 128
# "auto" on CPU vmaps the points of dense models up to this many parameters per run and runs
# larger ones on the host execution; set between the two measured models (logistic regression
# 650, the MLP 55,210 parameters), not located more precisely (see resolve_execution).
VMAP_PARAMETER_LIMIT = 8192


# "auto" leaves the one-scan executions when padding rounds to the longest one costs more than
# this factor in local steps (see resolve_execution).
PADDING_LIMIT = 2.0
# The host execution packs its rounds (packing="auto") when their clients padded to each
# round's longest one cost more than this factor in local steps (see resolve_execution).
PACKING_LIMIT = 2.0


def resolve_execution(
    execution: str, points_per_batch: int | None, client_plan: str, params: Params,
    clients: int, steps: int, num_points: int, padding: float = 1.0, *, packable: bool = False,
) -> tuple[str, int | None, str]:
    """The concrete ``(execution, points_per_batch, client_plan)`` a sweep runs.

    The rule (measured with ``benchmarks/sweep_speedup.py``, 16 learning rates, FedAvg on
    digits, 10 clients per round, 2-core CPU; numbers in docs/design.md "Sweep executions"):

    * not CPU: ``vmap`` (accelerators want the widest batch; not measured on one);
    * CPU, conv kernels in the model: ``host``. XLA:CPU runs a convolution ~10x slower inside a
      while loop (a scan over rounds or a ``lax.map`` over points is one) and vmap over
      per-point conv weights lowers to grouped convolutions, so the fast program is the
      round's ``unrolled`` plan, compiled once with the hyperparameters as arguments;
    * CPU, dense models up to ``VMAP_PARAMETER_LIMIT`` parameters: ``vmap`` (dispatch and
      loop overhead dominate, so batching every point wins: logistic regression), unless
      padding every round to the sweep's longest round more than doubles the local steps
      (``padding > PADDING_LIMIT``, skewed client sizes): then ``host``, whose rounds keep
      their own step counts, and are packed (:func:`resolve_packing`) when the clients
      padded to each round's longest one still cost more than ``PACKING_LIMIT`` x the real
      steps and the runner's cost model finds packing cheaper. FedProx Synthetic(1,1)'s
      natural partition (1000 clients, median 76 and max 20148 examples) pads 6.2x to the
      longest round and 7.3x within rounds: logistic regression's sweep of 16 points
      without compile took 1.2-1.3x the 16 sequential runs vmapped, 0.65x on the host with
      padded rounds and 0.29x with packed ones; the digits population pads 1.3x and 1.6x,
      where packed host rounds took 1.31x (dispatch per segment call dominates a small
      model; ~0.25x padded on the host, 0.16x vmapped);
    * CPU, larger dense models: ``host`` with packed rounds when the client update can be
      packed (``packable``; on CPU the cost model packs one slot: the clients back to back,
      unbatched dots, no padding), else with the clients unrolled (up to ``UNROLL_LIMIT``
      clients x local steps). XLA:CPU's dots batched over points x clients, and even over
      clients alone, run slower per FLOP than separate per-client dots (the MLP), so the
      fastest program is one point's round compiled once with its clients one at a time.
      The MLP's 16-point sweep without compile: on Synthetic(1,1) 0.74x the sequential runs
      packed vs 5.8x with padded vmapped clients; on digits 0.81x packed vs 0.95x unrolled
      (interleaved: run 1.14 vs 1.37 s, compile 2.9 vs 7.9 s).

    The client plan (``client_plan="auto"``) is the round's own rule
    (``backends.vmap.resolve_plan``), except for the larger dense models just named.

    Args:
      execution: one of :data:`EXECUTIONS`.
      points_per_batch: the user's group size (selects ``map`` under ``auto``), or None.
      client_plan: one of :data:`CLIENT_PLANS`.
      params: one run's parameters (or their shapes).
      clients: client slots per round; steps: padded local steps per round.
      num_points: grid points.
      padding: the sweep's padded local steps over the rounds' own (``rounds x steps /
        sum of each round's steps``, >= 1).
      packable: the host execution will pack the rounds (a ``LocalUpdate`` and packing not
        ``"off"``): larger dense models then keep their clients vmapped, to be packed.

    Returns:
      ``(execution, points_per_batch, client_plan)``; ``points_per_batch`` is None unless
      the execution is ``map``; ``client_plan`` is ``"vmap"`` or ``"unrolled"``.
    """
    del num_points  # the measured rule does not need it (yet)
    # The round's own rule (vmap, or unrolled for conv models on CPU); above the unroll limit
    # still unrolled: one compilation serves the whole sweep, where the backend would switch
    # to its per-client ``loop`` plan.
    rule_plan = resolve_plan("auto", None, UNROLL_LIMIT, params, clients, steps,
                             large_conv_plan="unrolled")
    plan = rule_plan if client_plan == "auto" else client_plan
    if execution == "map":
        return "map", points_per_batch or 1, plan
    if execution != "auto":
        return execution, None, plan
    if points_per_batch is not None:
        return "map", points_per_batch, plan
    if jax.default_backend() != "cpu":
        return "vmap", None, plan
    if has_conv(params):
        return "host", None, plan
    if model_size(params) <= VMAP_PARAMETER_LIMIT:
        return ("vmap" if padding <= PADDING_LIMIT else "host"), None, plan
    if client_plan == "auto" and clients * steps <= UNROLL_LIMIT and not packable:
        plan = "unrolled"  # XLA:CPU: C small dots beat one dot batched over C (the MLP)
    return "host", None, plan


def model_size(params: Params) -> int:
    """Parameters of one run (``params`` may be shapes)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def resolve_packing(packing: str, execution: str, params: Params, round_padding: float) -> str:
    """The packing policy mode (``"on"``, ``"auto"`` or ``"off"``) of a sweep's rounds.

    Only the ``host`` execution packs (the scanned executions need one shape for every round).
    Under ``packing="auto"`` (the rule of :func:`resolve_execution`, measured there): on CPU,
    dense models above ``VMAP_PARAMETER_LIMIT`` parameters are always packed (``"on"``: the
    cost model picks the layout, one slot on CPU), other models when their rounds padded to
    each round's longest client compute more than ``PACKING_LIMIT`` x the real steps
    (``"auto"``: the cost model may still keep the padded rounds).

    Args:
      packing: the user's ``"auto"``, ``"on"`` or ``"off"``.
      execution: the resolved execution.
      params: one run's parameters (or their shapes).
      round_padding: clients x each round's own local steps over the real local steps (>= 1).
    """
    if execution != "host" or packing == "off":
        return "off"
    if packing == "on":
        return "on"
    if (jax.default_backend() == "cpu" and not has_conv(params)
            and model_size(params) > VMAP_PARAMETER_LIMIT):
        return "on"
    return "auto" if round_padding > PACKING_LIMIT else "off"


def _round_inputs(cohort_arrays, round_steps, s: int, r: int) -> tuple:
    """Round ``r`` of seed ``s`` with its own local steps (the sweep-wide padding cut off)."""
    index, mask, weight, client_ids = (x[s, r] for x in cohort_arrays)
    steps = int(round_steps[s, r])
    return jnp.int32(r), index[:, :steps], mask[:, :steps], weight, client_ids


def client_steps(cohorts: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[seeds, rounds, C]`` real local steps of every client slot of :func:`prepare_cohorts`."""
    mask = cohorts["mask"]
    return active_steps(mask.reshape(-1, *mask.shape[3:])).sum(axis=1).reshape(mask.shape[:3])


class HostRound(NamedTuple):
    """One round of the ``host`` execution, its device inputs shared by every grid point.

    Attributes:
      xs: padded round: ``(r, index [C, S, B], mask, weight, client_ids)`` with the round's own
        ``S``; packed round: ``(r, weight, client_ids)``.
      slots: the packed layout's slot count ``P``, 0 for the padded round.
      pieces: the packed layout's segment calls (``backends.packed.segment_inputs`` of each
        ``data.packing.split_layout`` piece); empty for the padded round.
    """

    xs: tuple
    slots: int = 0
    pieces: tuple = ()


def plan_packed_rounds(
    probe: Algorithm, policy: packed.PackingPolicy, client_plan: str, params: Params,
    table: Any, cohorts: Mapping[str, np.ndarray], num_points: int,
) -> list[list[PackedLayout | None]]:
    """Per seed and round, the packed layout the ``host`` execution runs (None: padded).

    The runner's own machinery decides: ``VmapBackend.plan_rounds`` with every round's client
    steps (the cost model of ``backends.packed.PackingPolicy`` picks at most two layouts, or
    the padded rounds), then ``VmapBackend.layout`` packs each round. A layout's compilation
    is paid once per sweep but its steps by every grid point's run, so the policy plans with
    its cost model's compile seconds divided by ``num_points`` (a copy: ``policy`` itself is
    left as given). Whether to pack at all is :func:`resolve_packing`'s rule.

    Args:
      probe: the algorithm built for one grid point (its client update and shapes).
      policy: the packing policy (``"auto"``, ``"on"`` or ``"off"``, fixed slots...); its
        planned layouts are set by this call.
      client_plan: ``"vmap"`` or ``"unrolled"`` (the packed step order follows it).
      params: one run's parameters (or their shapes).
      table: the device example table.
      cohorts: :func:`prepare_cohorts`' host arrays.
      num_points: grid points.
    """
    mask = cohorts["mask"]
    num_seeds, rounds, clients = mask.shape[:3]
    layouts: list[list[PackedLayout | None]] = [[None] * rounds for _ in range(num_seeds)]
    if policy.packing == "off" or not is_local_update(probe.client_update):
        return layouts
    real = client_steps(cohorts)
    own = cohorts["steps"]
    cost = policy.cost_model()
    backend = VmapBackend("vmap", packing=packed.PackingPolicy(
        policy.packing, slots=policy.slots, segment_steps=policy.segment_steps,
        cost=dataclasses.replace(cost, compile_seconds=cost.compile_seconds / num_points),
        max_layouts=policy.max_layouts))
    pairs = [(s, r) for s in range(num_seeds) for r in range(rounds)]
    backend.plan_rounds([real[s, r] for s, r in pairs], [int(own[s, r]) for s, r in pairs])
    server_state = jax.eval_shape(probe.init, params)
    initial = jax.eval_shape(probe.client_init, params)
    states = jax.tree.map(lambda x: jax.ShapeDtypeStruct((clients, *x.shape), x.dtype), initial)
    for s, r in pairs:
        steps = int(own[s, r])
        cohort = Cohort(arrays=table, index=cohorts["index"][s, r, :, :steps],
                        mask=mask[s, r, :, :steps], weight=cohorts["weight"][s, r],
                        client_ids=cohorts["client_ids"][s, r])
        layouts[s][r] = backend.layout(probe, server_state, states, cohort, client_plan)
    return layouts


def _host_runs(programs, hvals, params0, roots, seed_rounds, table, eval_arrays):
    """The ``host`` execution: every (seed, point) run as calls of the programs compiled for
    each round's shape, dispatched asynchronously (no host sync until the end).

    ``programs``: ``init``, ``padded[steps]`` (a whole padded round), and for packed rounds
    ``packed_init[P]``, ``segment[P, length]`` and ``finish``; ``seed_rounds``: per seed, its
    :class:`HostRound` list.
    """
    num_points = next(iter(hvals.values())).shape[0]
    per_seed_metrics, per_seed_params = [], []
    for s, per_round in enumerate(seed_rounds):
        params, root = jax.tree.map(lambda x, s=s: x[s], params0), roots[s]
        point_metrics, point_params = [], []
        for g in range(num_points):
            h = {n: v[g] for n, v in hvals.items()}
            carry = programs["init"](h, params)
            history = []
            for rnd in per_round:
                if not rnd.slots:
                    steps = rnd.xs[2].shape[1]  # the round's own local steps
                    carry, metrics = programs["padded"][steps](h, carry, rnd.xs, root, table,
                                                               eval_arrays)
                else:
                    slot, buffer, ctx = programs["packed_init"][rnd.slots](h, carry, rnd.xs,
                                                                           root)
                    for piece in rnd.pieces:
                        slot, buffer = programs["segment"][rnd.slots, piece[1].shape[0]](
                            h, carry[0], ctx, slot, buffer, table, *piece)
                    carry, metrics = programs["finish"](h, carry, buffer, rnd.xs, root,
                                                        eval_arrays)
                history.append(metrics)
            point_metrics.append(jax.tree.map(lambda *v: jnp.stack(v), *history))
            point_params.append(carry[0].params)
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        per_seed_metrics.append(jax.tree.map(stack, *point_metrics))
        per_seed_params.append(jax.tree.map(stack, *point_params))
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    return jax.tree.map(stack, *per_seed_metrics), jax.tree.map(stack, *per_seed_params)


def _compile_host_programs(seed_rounds, hvals, params0, roots, table, eval_arrays, *, init,
                           padded, packed_init, segment, finish) -> dict[str, Any]:
    """Compiles, before any run, every program the ``host`` execution calls (one per shape
    that its rounds use; the hyperparameters are arguments, so one compilation serves every
    grid point). The functions are those of :func:`sweep`; see :func:`_host_runs`."""
    h0 = {n: v[0] for n, v in hvals.items()}
    p0 = jax.tree.map(lambda x: x[0], params0)
    init_jit = jax.jit(init)
    carry0 = jax.eval_shape(init_jit, h0, p0)
    programs: dict[str, Any] = {"init": init_jit.lower(h0, p0).compile(), "padded": {},
                                "packed_init": {}, "segment": {}, "finish": None}
    padded_jit = jax.jit(padded, donate_argnums=(1,))
    segment_jit = jax.jit(segment, donate_argnums=(3, 4))  # the slots' carries and the buffer
    finish_jit = jax.jit(finish, donate_argnums=(1,))
    packed_shapes = {}
    for rnd in (rnd for per_seed in seed_rounds for rnd in per_seed):
        if not rnd.slots:
            steps = rnd.xs[2].shape[1]
            if steps not in programs["padded"]:
                programs["padded"][steps] = padded_jit.lower(
                    h0, carry0, rnd.xs, roots[0], table, eval_arrays).compile()
            continue
        if rnd.slots not in programs["packed_init"]:
            init_p = jax.jit(functools.partial(packed_init, rnd.slots))
            programs["packed_init"][rnd.slots] = init_p.lower(h0, carry0, rnd.xs,
                                                              roots[0]).compile()
            packed_shapes[rnd.slots] = jax.eval_shape(init_p, h0, carry0, rnd.xs, roots[0])
        slot, buffer, ctx = packed_shapes[rnd.slots]
        for piece in rnd.pieces:
            key = (rnd.slots, piece[1].shape[0])
            if key not in programs["segment"]:
                programs["segment"][key] = segment_jit.lower(
                    h0, carry0[0], ctx, slot, buffer, table, *piece).compile()
        if programs["finish"] is None:
            programs["finish"] = finish_jit.lower(h0, carry0, buffer, rnd.xs, roots[0],
                                                  eval_arrays).compile()
    return programs


@dataclass
class SweepResult:
    """Outcome of a sweep over ``len(seeds)`` seeds x ``len(points)`` grid points.

    Attributes:
      names: swept hyperparameter names, in grid order.
      points: the grid points (``{name: value}``), cartesian product in grid order.
      seeds: run seeds.
      history: round metric name -> ``[num_seeds, num_points, rounds]`` array.
      final: evaluation metric name -> ``[num_seeds, num_points]`` (from ``evaluate``).
      params: final parameters with leading ``[num_seeds, num_points]`` axes (or None).
      prepare_seconds: host time to draw every round's cohort.
      compile_seconds: tracing + XLA compilation of the sweep program.
      run_seconds: execution of the compiled program.
      eval_seconds: host evaluation of the final parameters.
      execution: the execution that ran (``"vmap"``, ``"map"`` or ``"host"``, see
        :func:`resolve_execution`); points_per_batch: its group size (``map`` only);
        client_plan: how its rounds ran their clients (``"vmap"`` or ``"unrolled"``).
      real_steps: local steps with a real example, summed over every run and round.
      computed_steps: client slot-steps the programs computed, summed likewise (a padded
        round costs clients x its steps, a packed one slots x its length).
      packed_layouts: the ``(slots, segment)`` layouts of the packed rounds (empty: none).
    """

    names: tuple[str, ...]
    points: list[dict[str, float]]
    seeds: tuple[int, ...]
    history: dict[str, np.ndarray]
    final: dict[str, np.ndarray] = field(default_factory=dict)
    params: Any = None
    prepare_seconds: float = 0.0
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    eval_seconds: float = 0.0
    execution: str = ""
    points_per_batch: int | None = None
    client_plan: str = ""
    real_steps: int = 0
    computed_steps: int = 0
    packed_layouts: tuple[tuple[int, int], ...] = ()

    def rows(self) -> list[dict[str, float]]:
        """One row per (seed, grid point): hyperparameters, seed, final metrics."""
        out = []
        for s, seed in enumerate(self.seeds):
            for g, point in enumerate(self.points):
                row: dict[str, float] = {**point, "seed": seed}
                for k, v in self.history.items():
                    row[f"final_{k}"] = float(v[s, g, -1])
                row.update({k: float(v[s, g]) for k, v in self.final.items()})
                out.append(row)
        return out

    def summary_rows(self) -> list[dict[str, float]]:
        """One row per grid point: mean and std over seeds of every final metric."""
        rows = self.rows()
        metrics = [k for k in rows[0] if k not in self.names and k != "seed"]
        out = []
        for g, point in enumerate(self.points):
            mine = rows[g :: len(self.points)]
            row: dict[str, float] = dict(point)
            for k in metrics:
                vals = np.asarray([r[k] for r in mine], np.float64)
                row[f"{k}_mean"] = float(vals.mean())
                row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            out.append(row)
        return out

    def grid_values(self, metric: str, x: str, y: str) -> tuple[list, list, np.ndarray]:
        """``metric`` on an ``x`` by ``y`` grid (either may be ``"seed"``), averaged over the
        remaining axes. Returns ``(x values, y values, [len(y), len(x)] array)``."""
        rows = self.rows()
        if metric not in rows[0]:
            raise ValueError(f"unknown metric {metric!r}; available: {sorted(rows[0])}")
        for axis in (x, y):
            if axis != "seed" and axis not in self.names:
                raise ValueError(f"axis {axis!r} must be 'seed' or one of {self.names}")
        if x == y:
            raise ValueError(f"x and y must differ, got {x!r} twice")
        xs = sorted({r[x] for r in rows})
        ys = sorted({r[y] for r in rows})
        total = np.zeros((len(ys), len(xs)))
        count = np.zeros((len(ys), len(xs)))
        for r in rows:
            i, j = ys.index(r[y]), xs.index(r[x])
            total[i, j] += r[metric]
            count[i, j] += 1
        return xs, ys, total / np.maximum(count, 1)

    def write_csv(self, path: str, summary: bool = False) -> None:
        rows = self.summary_rows() if summary else self.rows()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def plot_heatmap(self, path: str, metric: str, x: str, y: str) -> None:
        """Saves a heatmap PNG of ``metric`` over ``x`` (columns) and ``y`` (rows)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs, ys, values = self.grid_values(metric, x, y)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(xs) + 2), max(3.0, 0.5 * len(ys) + 2)))
        image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(xs)), [f"{v:.3g}" for v in xs], rotation=60)
        ax.set_yticks(range(len(ys)), [f"{v:.3g}" if y != "seed" else str(v) for v in ys])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        middle = 0.5 * (np.nanmin(values) + np.nanmax(values))
        for i in range(len(ys)):
            for j in range(len(xs)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="k" if values[i, j] > middle else "w")
        fig.colorbar(image, ax=ax, label=metric)
        ax.set_title(f"{metric} (mean over the other axes)")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _validate(grid: Mapping[str, Sequence[float]], seeds: Sequence[int], rounds: int,
              clients_per_round: int, data: FederatedData) -> tuple[tuple[str, ...], list]:
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError("grid must be a non-empty {name: [values]} mapping, e.g. "
                         "{'client_lr': [0.01, 0.1]}")
    names = tuple(grid)
    for name, values in grid.items():
        if not isinstance(name, str) or name == "seed":
            raise ValueError(f"grid names must be strings other than 'seed', got {name!r}")
        values = list(values) if isinstance(values, Sequence | np.ndarray) else None
        if not values:
            raise ValueError(f"grid[{name!r}] must be a non-empty list of numbers")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not (
                    math.isfinite(float(v))):
                raise ValueError(f"grid[{name!r}] must hold finite numbers, got {v!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must be a non-empty list of run seeds, e.g. [0, 1, 2, 3]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0:
            raise ValueError(f"seeds must be integers >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not 1 <= clients_per_round <= data.num_clients:
        raise ValueError(
            f"clients_per_round must be in [1, num_clients={data.num_clients}], got "
            f"{clients_per_round}"
        )
    return names, [int(s) for s in seeds]


def _build_algorithm(make_algorithm: MakeAlgorithm, hvals: dict[str, jax.Array]) -> Algorithm:
    try:
        algorithm = make_algorithm(hvals)
    except (jax.errors.ConcretizationTypeError, TypeError, ValueError) as e:
        raise ValueError(
            f"make_algorithm must accept jax scalars for the swept hyperparameters "
            f"{sorted(hvals)}; it raised {type(e).__name__}: {e}. Factories that validate a "
            "value in Python (e.g. isinstance/`if mu > 0`) cannot be swept in one program."
        ) from e
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"make_algorithm must return an Algorithm, got {type(algorithm)}")
    return algorithm


def prepare_cohorts(
    data: FederatedData, spec: Any, seeds: Sequence[int], rounds: int, clients_per_round: int
) -> tuple[dict[str, jax.Array], dict[str, np.ndarray]]:
    """Every round's cohort of every seed, drawn exactly as ``runner.run`` draws them.

    Returns the device table and ``{"index", "mask", "weight", "client_ids"}`` stacked as
    ``[num_seeds, rounds, C, ...]`` (local steps padded to the longest round), plus
    ``"steps"``: each round's own local steps, ``[num_seeds, rounds]``.
    """
    table = None
    stacks: dict[str, list] = {"index": [], "mask": [], "weight": [], "client_ids": []}
    for seed in seeds:
        builder = CohortBuilder(
            data, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
            num_steps=spec.num_steps, cohort_size=clients_per_round, seed=seed,
            device_table=True,
        )
        table = table if table is not None else builder.table
        per_round: dict[str, list] = {k: [] for k in stacks}
        for r in range(rounds):
            clients = sample_clients(data.num_clients, clients_per_round,
                                     rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, r))
            cohort = builder.build(r, clients)
            for k in stacks:
                per_round[k].append(np.asarray(getattr(cohort, k)))
        for k in stacks:
            stacks[k].append(per_round[k])
    # Every round's steps follow its clients (CohortBuilder's ladder); the scan over rounds needs
    # one shape, so rounds are padded to the longest round of the sweep (padding is a no-op),
    # not to the population's largest client.
    round_steps = np.asarray([[m.shape[1] for m in per_seed] for per_seed in stacks["mask"]])
    steps = int(round_steps.max())

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, [(0, 0), (0, steps - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    for k in ("index", "mask"):
        stacks[k] = [[pad(x) for x in per_seed] for per_seed in stacks[k]]
    return table, {**{k: np.stack([np.stack(per_seed) for per_seed in v])
                      for k, v in stacks.items()}, "steps": round_steps}


def sweep(
    make_algorithm: MakeAlgorithm,
    grid: Mapping[str, Sequence[float]],
    data: FederatedData,
    init_params: Params | Callable[[int], Params],
    *,
    seeds: Sequence[int],
    rounds: int,
    clients_per_round: int,
    evaluate: Callable[[Params], Mapping[str, float]] | None = None,
    keep_params: bool = True,
    points_per_batch: int | None = None,
    execution: str = "auto",
    client_plan: str = "auto",
    round_eval: Callable[[Params, Any, jax.Array], Mapping[str, jax.Array]] | None = None,
    round_eval_data: Any = None,
    packing: str | packed.PackingPolicy = "auto",
) -> SweepResult:
    """Trains one run per (seed, grid point) in a single compiled program.

    Args:
      make_algorithm: ``{name: float32 scalar} -> Algorithm``; called with traced values.
      grid: ``{name: [values]}``; the sweep covers the cartesian product.
      data: the client population (its examples go to the device once).
      init_params: initial parameters, or ``seed -> params`` (e.g. ``model.init(key(seed))``).
      seeds: run seeds (client sampling, local shuffling, PRNG keys, and ``init_params(seed)``).
      rounds: rounds per run.
      clients_per_round: clients sampled per round.
      evaluate: optional host evaluator ``params -> {metric: float}`` applied to every run's
        final parameters (e.g. ``fedjax_lab.metrics.evaluation.make_evaluator``).
      keep_params: keep the final parameters of every run in the result.
      points_per_batch: vmap this many grid points at a time and loop over the groups inside
        the program (``lax.map``); None vmaps all of them. Smaller groups keep the batched
        working set in cache (see ``benchmarks/sweep_speedup.py``); every choice computes the
        same numbers. With ``execution="auto"``, giving it selects ``"map"``.
      execution: how the runs are laid out (:data:`EXECUTIONS`, see
        :func:`resolve_execution`): ``"vmap"`` (every point vmapped in one scan over rounds),
        ``"map"`` (groups of ``points_per_batch`` points, default 1, one after another in that
        program), ``"host"`` (one compiled round, hyperparameters as arguments, called per
        point and round from Python; its clients follow the round's own plan rule, or the
        round is packed, see ``packing``) or
        ``"auto"`` (a rule measured on this machine). Every execution computes the same runs.
      client_plan: how each round runs its clients, in every execution (:data:`CLIENT_PLANS`):
        ``"vmap"`` (vmapped, local steps a scan), ``"unrolled"`` (a traced loop with unrolled
        local steps, the round's ``unrolled`` plan: no while loop, no vmap over per-client
        weights; compile time grows with clients x steps) or ``"auto"``.
      round_eval: optional ``(params, round_eval_data, round) -> {metric: scalar}``, traced
        inside the compiled round after the server update (``round`` is the 0-based round
        just done); its metrics join ``history`` (e.g. the global training loss of every round
        of every grid point, FedPAQ's Figure 1). It may skip rounds with ``lax.cond`` on
        ``round`` (unbatched).
      round_eval_data: a pytree of arrays for ``round_eval``, passed to the program as an
        argument (closed-over arrays would be embedded in the program as constants: slow to
        compile for a dataset).
      packing: whether the ``host`` execution packs each round's clients into slots like the
        vmap backend (``backends.packed.PACKING``): ``"auto"`` (:func:`resolve_packing`; the
        runner's cost model picks the layouts), ``"on"`` (pack every round; only with the
        ``host`` execution, which ``execution="auto"`` then selects) or ``"off"``; or a
        ``backends.packed.PackingPolicy`` used as given by the ``host`` execution (e.g. fixed
        slots and segment length). Same runs either way; ``SweepResult.computed_steps``
        says what was computed.

    Returns:
      A :class:`SweepResult` with per-round metrics ``[seeds, points, rounds]``.
    """
    names, seeds = _validate(grid, seeds, rounds, clients_per_round, data)
    if points_per_batch is not None and (
        isinstance(points_per_batch, bool) or not isinstance(points_per_batch, int)
        or points_per_batch < 1
    ):
        raise ValueError(f"points_per_batch must be a positive integer or None, got "
                         f"{points_per_batch!r}")
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if client_plan not in CLIENT_PLANS:
        raise ValueError(f"client_plan must be one of {CLIENT_PLANS}, got {client_plan!r}")
    if not isinstance(packing, packed.PackingPolicy) and packing not in packed.PACKING:
        raise ValueError(f"packing must be one of {packed.PACKING} or a PackingPolicy, got "
                         f"{packing!r}")
    if points_per_batch is not None and execution in ("vmap", "host"):
        raise ValueError(f"points_per_batch groups points for execution='map' (or 'auto'); "
                         f"drop it or use execution='map', got execution={execution!r}")
    points = [dict(zip(names, (float(v) for v in combo), strict=True))
              for combo in itertools.product(*(list(grid[n]) for n in names))]
    hvals = {n: jnp.asarray([p[n] for p in points], jnp.float32) for n in names}
    probe = _build_algorithm(make_algorithm, {n: v[0] for n, v in hvals.items()})
    spec = probe.data_spec

    # Every round of every seed is built up front: refuse before allocating what cannot fit.
    check_cohort_memory(data, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
                        num_steps=spec.num_steps, with_examples=False,
                        cohort_size=clients_per_round * rounds * len(seeds))
    t0 = time.perf_counter()
    table, cohorts = prepare_cohorts(data, spec, seeds, rounds, clients_per_round)
    if callable(init_params):
        per_seed = [init_params(s) for s in seeds]
        params0 = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *per_seed)
    else:
        params0 = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * len(seeds)), init_params)
    roots = jnp.stack([jax.random.key(s) for s in seeds])
    prepare_seconds = time.perf_counter() - t0

    num_clients = data.num_clients
    slots = clients_per_round
    steps = int(cohorts["mask"].shape[3])
    one_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params0)
    padding = cohorts["steps"].size * steps / cohorts["steps"].sum()
    given = packing if isinstance(packing, packed.PackingPolicy) else None
    wants_packing = packing == "on" or (given is not None and (given.packing == "on"
                                                               or bool(given.slots)))
    if execution == "auto" and points_per_batch is None and wants_packing:
        execution = "host"  # the only execution that packs: asking to pack selects it
    packable = is_local_update(probe.client_update) and (
        given.packing if given is not None else packing) != "off"
    execution, points_per_batch, client_plan = resolve_execution(
        execution, points_per_batch, client_plan, one_params, slots, steps, len(points),
        padding, packable=packable)
    if wants_packing and execution != "host":
        raise ValueError(f"packing='on' packs the rounds of execution='host' (the scanned "
                         f"executions need one shape for every round); got {execution!r}")
    round_padding = slots * cohorts["steps"].sum() / max(int(client_steps(cohorts).sum()), 1)
    # A given policy is the host execution's as it is; a mode goes through the measured rule.
    policy = given if given is not None and execution == "host" else packed.PackingPolicy(
        resolve_packing("off" if given is not None else packing, execution, one_params,
                        round_padding))
    backend = VmapBackend("vmap")
    t0 = time.perf_counter()
    layouts = (plan_packed_rounds(probe, policy, client_plan, one_params, table, cohorts,
                                  len(points))
               if execution == "host" else [[None] * rounds for _ in seeds])
    prepare_seconds += time.perf_counter() - t0
    real_steps = int(client_steps(cohorts).sum()) * len(points)
    computed_steps = len(points) * sum(
        (layout.computed_steps if layout is not None
         else slots * int(cohorts["steps"][s, r] if execution == "host" else steps))
        for s, per_seed in enumerate(layouts) for r, layout in enumerate(per_seed))
    packed_layouts = tuple(sorted({(layout.slots, layout.segment) for per_seed in layouts
                                   for layout in per_seed if layout is not None}))

    def build(h):
        algorithm = _build_algorithm(make_algorithm, h)
        if algorithm.data_spec != spec:
            raise ValueError(
                f"make_algorithm must not change the data layout across the grid: got "
                f"{algorithm.data_spec}, expected {spec}"
            )
        return algorithm

    def init_carry(algorithm, params):
        initial = algorithm.client_init(params)
        population = (
            jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)), initial)
            if jax.tree.leaves(initial) else ()
        )
        return algorithm.init(params), population

    def gather_states(population, ids):
        if not jax.tree.leaves(population):
            return ()
        return jax.tree.map(lambda p: p[jnp.where(ids >= 0, ids, 0)], population)

    def round_client_keys(root, r):
        return rng_lib.client_keys(rng_lib.round_key(root, r), slots)

    def close_round(algorithm, carry, outputs, new_states, r, ids, eval_data):
        """Aggregate, server update, round evaluation, client states back to the table."""
        server_state, population = carry
        server_state, metrics = algorithm.server_update(server_state,
                                                        algorithm.aggregate(outputs))
        if round_eval is not None:
            metrics = {**metrics, **round_eval(server_state.params, eval_data, r)}
        if jax.tree.leaves(population):  # padded slots (id -1) point past the table: dropped
            target = jnp.where(ids >= 0, ids, num_clients)
            population = jax.tree.map(
                lambda p, s: p.at[target].set(s, mode="drop"), population, new_states
            )
        return (server_state, population), metrics

    def round_step(algorithm, carry, xs, root, table, eval_data):
        r, idx, m, w, ids = xs
        cohort = Cohort(arrays=table, index=idx, mask=m, weight=w, client_ids=ids)
        keys = round_client_keys(root, r)
        states = gather_states(carry[1], ids)
        if client_plan == "vmap":
            outputs, new_states = backend.client_outputs(
                algorithm, carry[0], states, cohort, keys)
        else:
            outputs, new_states = unrolled_clients(algorithm, carry[0], states, cohort, keys)
        return close_round(algorithm, carry, outputs, new_states, r, ids, eval_data)

    def one_run(h, params, root, index, mask, weight, client_ids, table, eval_data):
        algorithm = build(h)
        xs = (jnp.arange(rounds, dtype=jnp.int32), index, mask, weight, client_ids)
        (final_state, _), metrics = jax.lax.scan(
            lambda carry, x: round_step(algorithm, carry, x, root, table, eval_data),
            init_carry(algorithm, params), xs,
        )
        return metrics, final_state.params

    def over_points(h, *shared):
        if execution == "vmap":
            return jax.vmap(lambda hp: one_run(hp, *shared))(h)
        # Groups of points vmapped, groups one after another: bounds the working set.
        return jax.lax.map(lambda hp: one_run(hp, *shared), h, batch_size=points_per_batch)

    # The packed round as the vmap backend runs it (``VmapBackend.packed_round``: init, one
    # call per segment, finish), each program taking the hyperparameters as arguments.
    def packed_init(num_slots, h, carry, xs, root):
        local = build(h).client_update
        r, w, ids = xs
        return packed.init_fn(local, num_slots)(carry[0], gather_states(carry[1], ids), w,
                                                round_client_keys(root, r))

    def packed_segment(h, server_state, ctx, slot_carry, buffer, table, *inputs):
        local = build(h).client_update
        return packed.segment_fn(local, packing_mode(client_plan), backend.step_unroll)(
            server_state, ctx, slot_carry, buffer, table, *inputs)

    def packed_finish(h, carry, buffer, xs, root, eval_data):
        algorithm = build(h)
        r, w, ids = xs
        outputs, new_states = packed.finish_clients(
            algorithm.client_update, carry[0], gather_states(carry[1], ids), buffer, w,
            round_client_keys(root, r))
        return close_round(algorithm, carry, outputs, new_states, r, ids, eval_data)

    eval_arrays = jax.tree.map(jnp.asarray, round_eval_data)
    cohort_arrays = (jnp.asarray(cohorts["index"], jnp.int32), jnp.asarray(cohorts["mask"]),
                     jnp.asarray(cohorts["weight"]), jnp.asarray(cohorts["client_ids"]))
    t0 = time.perf_counter()
    if execution == "host":
        seed_rounds = []
        for s, per_seed in enumerate(layouts):
            per_round = []
            for r, layout in enumerate(per_seed):
                if layout is None:
                    per_round.append(HostRound(_round_inputs(cohort_arrays, cohorts["steps"],
                                                             s, r)))
                    continue
                per_round.append(HostRound(
                    (jnp.int32(r), jnp.asarray(cohorts["weight"][s, r]),
                     jnp.asarray(cohorts["client_ids"][s, r])),
                    layout.slots,
                    tuple(jax.tree.map(jnp.asarray, packed.segment_inputs(piece))
                          for piece in split_layout(layout))))
            seed_rounds.append(per_round)
    prepare_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        if execution == "host":
            programs = _compile_host_programs(
                seed_rounds, hvals, params0, roots, table, eval_arrays,
                init=lambda h, params: init_carry(build(h), params),
                padded=lambda h, carry, xs, root, table, eval_data: round_step(
                    build(h), carry, xs, root, table, eval_data),
                packed_init=packed_init, segment=packed_segment, finish=packed_finish)
        else:
            over_seeds = jax.vmap(over_points, in_axes=(None, 0, 0, 0, 0, 0, 0, None, None))
            args = (hvals, params0, roots, *cohort_arrays, table, eval_arrays)
            compiled = jax.jit(over_seeds).lower(*args).compile()
    except jax.errors.ConcretizationTypeError as e:
        raise ValueError(
            f"the algorithm built by make_algorithm uses a swept hyperparameter {list(names)} "
            f"in Python control flow, so it cannot be swept in one program: {e}"
        ) from e
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    if execution == "host":
        metrics, final_params = _host_runs(programs, hvals, params0, roots, seed_rounds, table,
                                           eval_arrays)
    else:
        metrics, final_params = compiled(*args)
    metrics, final_params = jax.block_until_ready((metrics, final_params))
    run_seconds = time.perf_counter() - t0

    history = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    final: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    if evaluate is not None:
        host_params = jax.device_get(final_params)
        for s in range(len(seeds)):
            for g in range(len(points)):
                scores = evaluate(jax.tree.map(lambda x, s=s, g=g: x[s, g], host_params))
                for k, v in scores.items():
                    final.setdefault(k, np.zeros((len(seeds), len(points))))[s, g] = v
    eval_seconds = time.perf_counter() - t0
    return SweepResult(
        names=names, points=points, seeds=tuple(seeds), history=history, final=final,
        params=final_params if keep_params else None, prepare_seconds=prepare_seconds,
        compile_seconds=compile_seconds, run_seconds=run_seconds, eval_seconds=eval_seconds,
        execution=execution, points_per_batch=points_per_batch, client_plan=client_plan,
        real_steps=real_steps, computed_steps=computed_steps, packed_layouts=packed_layouts,
    )


# ------------------------------------------------------------------------------ experiment
def parse_values(text: str) -> list[float]:
    """``"0.1,0.3,1"`` or ``"geom:LO:HI:N"`` (N log-spaced values from LO to HI inclusive)."""
    text = text.strip()
    if text.startswith("geom:"):
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError(f"expected geom:LO:HI:N, got {text!r}")
        lo, hi, n = float(parts[1]), float(parts[2]), int(parts[3])
        if not (0 < lo <= hi and n >= 1):
            raise ValueError(f"geom:LO:HI:N needs 0 < LO <= HI and N >= 1, got {text!r}")
        return [float(v) for v in np.geomspace(lo, hi, n)] if n > 1 else [lo]
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"expected comma-separated numbers or geom:LO:HI:N, got {text!r}") from e
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"expected finite comma-separated numbers, got {text!r}")
    return values


@dataclass
class SweepConfig:
    """A FedAvg learning-rate sweep; every field is a ``--flag-name`` CLI flag.

    ``client_lrs``/``server_lrs`` are comma lists or ``geom:LO:HI:N``; runs use seeds
    ``seed, seed+1, ..., seed+seeds-1`` (the partition uses ``seed``). ``points_per_batch``,
    ``execution`` (``auto``, ``vmap``, ``map``, ``host``) and ``packing`` (``auto``, ``on``,
    ``off``; ``on`` selects the ``host`` execution under ``auto``): see :func:`sweep`.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    partition: str = "dirichlet_per_class"
    alpha: float = 0.5
    num_clients: int = 50
    clients_per_round: int = 10
    rounds: int = 50
    local_epochs: int = 1
    batch_size: int = 20
    model: str = "logreg"
    client_lrs: str = "geom:0.01:10.0:16"
    server_lrs: str = "1.0"
    seeds: int = 4
    seed: int = 0
    points_per_batch: int | None = None
    execution: str = "auto"
    packing: str = "auto"
    out: str = "runs/sweep"

    def validate(self) -> None:
        from fedjax_lab.experiment import MAX_SEED, check_data_dir

        for name in ("num_clients", "clients_per_round", "rounds", "local_epochs",
                     "batch_size", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"--clients-per-round={self.clients_per_round} > --num-clients="
                             f"{self.num_clients}")
        if self.points_per_batch is not None and self.points_per_batch < 1:
            raise ValueError(f"--points-per-batch must be >= 1 or none, got "
                             f"{self.points_per_batch}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"--execution must be one of {', '.join(EXECUTIONS)}, got "
                             f"{self.execution!r}")
        if self.points_per_batch is not None and self.execution in ("vmap", "host"):
            raise ValueError(f"--points-per-batch groups points for --execution map (or auto); "
                             f"drop it or use --execution map, got --execution {self.execution}")
        if self.packing not in packed.PACKING:
            raise ValueError(f"--packing must be one of {', '.join(packed.PACKING)}, got "
                             f"{self.packing!r}")
        if self.packing == "on" and (self.execution in ("vmap", "map")
                                     or self.points_per_batch is not None):
            raise ValueError("--packing on packs the rounds of --execution host (or auto, "
                             "which it then selects); the scanned executions need one shape "
                             "for every round: drop --packing or use --execution host")
        if self.seed < 0 or self.seed + self.seeds - 1 > MAX_SEED:
            raise ValueError(
                f"--seed must be >= 0 and --seed + --seeds - 1 <= 2**32 - 1, got --seed "
                f"{self.seed} --seeds {self.seeds}"
            )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--alpha must be a finite number > 0, got {self.alpha}")
        check_data_dir(self.dataset, self.data_dir)
        from fedjax_lab.data.datasets import TARGET_KIND_OF

        if self.dataset in TARGET_KIND_OF:  # sweeps score class accuracy with softmax CE
            raise ValueError(f"--dataset {self.dataset} (per-token or multi-hot targets) is not "
                             "supported by sweeps; run experiments/train.py per setting")
        for flag in ("client_lrs", "server_lrs"):
            values = parse_values(getattr(self, flag))
            if min(values) <= 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {values}")


def run_sweep_experiment(cfg: SweepConfig) -> dict[str, Any]:
    """Sweeps FedAvg's client x server learning rate over seeds; writes CSV/JSON/heatmap."""
    start = time.perf_counter()
    # Locked for this sweep, and found writable before anything runs (results are replaced).
    with RunFolder(cfg.out, overwrite=True, results=()):
        return _run_sweep_experiment(cfg, start)


def _run_sweep_experiment(cfg: SweepConfig, start: float) -> dict[str, Any]:
    import optax

    from fedjax_lab.algorithms.fedavg import fedavg
    from fedjax_lab.experiment import build_problem

    _, train, model, evaluate, _ = build_problem(cfg)
    client_lrs, server_lrs = parse_values(cfg.client_lrs), parse_values(cfg.server_lrs)

    def make_algorithm(h):
        return fedavg(model, optax.sgd(h["client_lr"]), batch_size=cfg.batch_size,
                      local_epochs=cfg.local_epochs, server_optimizer=optax.sgd(h["server_lr"]))

    result = sweep(
        make_algorithm, {"client_lr": client_lrs, "server_lr": server_lrs}, train,
        lambda s: model.init(jax.random.key(s)),
        seeds=[cfg.seed + i for i in range(cfg.seeds)], rounds=cfg.rounds,
        clients_per_round=cfg.clients_per_round, evaluate=evaluate, keep_params=False,
        points_per_batch=cfg.points_per_batch, execution=cfg.execution, packing=cfg.packing,
    )
    os.makedirs(cfg.out, exist_ok=True)
    result.write_csv(os.path.join(cfg.out, "results.csv"))
    result.write_csv(os.path.join(cfg.out, "summary.csv"), summary=True)
    y_axis = "server_lr" if len(server_lrs) > 1 else "seed"
    result.plot_heatmap(os.path.join(cfg.out, "heatmap.png"), "test_accuracy", "client_lr",
                        y_axis)
    summary_rows = result.summary_rows()
    best = max(summary_rows, key=lambda r: r["test_accuracy_mean"])
    summary = {
        "config": dataclasses.asdict(cfg),
        "runs": len(result.rows()),
        "grid_points": len(result.points),
        "execution": result.execution,
        "points_per_batch": result.points_per_batch,
        "packed_layouts": [list(layout) for layout in result.packed_layouts],
        "real_steps": result.real_steps,
        "computed_steps": result.computed_steps,
        "seeds": list(result.seeds),
        "best": best,
        "prepare_seconds": result.prepare_seconds,
        "compile_seconds": result.compile_seconds,
        "run_seconds": result.run_seconds,
        "eval_seconds": result.eval_seconds,
        "wall_seconds": time.perf_counter() - start,
        "jax_backend": jax.default_backend(),
        "summary": summary_rows,
    }
    write_json(os.path.join(cfg.out, "results.json"), {**summary, "rows": result.rows()})
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse flags (exit 2 on bad ones), run the sweep, print the best point."""
    from fedjax_lab.experiment import parse_config

    try:
        cfg = parse_config(SweepConfig, argv, prog="sweep.py")
        summary = run_sweep_experiment(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = summary["best"]
    # The host execution calls one compiled round per point and round (see resolve_execution).
    how = "with one compiled round" if summary["execution"] == "host" else "in one program"
    if summary["packed_layouts"]:
        how += (f", rounds packed ({summary['computed_steps']} slot-steps computed for "
                f"{summary['real_steps']} real)")
    print(
        f"{summary['runs']} runs ({summary['grid_points']} points x {len(summary['seeds'])} "
        f"seeds) {how} ({summary['execution']} execution): compile "
        f"{summary['compile_seconds']:.1f} s, run "
        f"{summary['run_seconds']:.1f} s\nbest: client_lr={best['client_lr']:.4g} "
        f"server_lr={best['server_lr']:.4g} test accuracy "
        f"{best['test_accuracy_mean']:.4f} +- {best['test_accuracy_std']:.4f}\n"
        f"outputs: {cfg.out}/results.csv, summary.csv, results.json, heatmap.png"
    )
    return 0
