"""The single-device simulation backend: a whole round is one compiled program.

Execution plans compute the same numbers in different program shapes (DESIGN.md "Backends"):

* ``vmap``: ``vmap`` over clients of a ``lax.scan`` over local steps, then aggregate and server
  update, all in one jit. Best for dense models and for accelerators. With ``chunk_size`` the
  clients are processed ``chunk_size`` at a time by a scan over chunks that accumulates the
  additive aggregate, so peak memory is bounded by the chunk, not the cohort.
* ``unrolled``: one jit in which the clients are a Python loop and the local steps are fully
  unrolled, so there is no while loop at all. XLA:CPU runs convolutions ~10x slower inside while
  loops and vmap over per-client conv weights costs another 2-5x (FEMNIST CNN, jax 0.10.2), so
  this is the fast plan for small conv cohorts on CPU; its compile time grows with C x S.
* ``loop``: a jitted single-client update (steps unrolled) called once per client from Python,
  then one jitted aggregate + server update. Same speed class as ``unrolled`` with a compile
  time that does not grow with the cohort.
* ``auto``: ``vmap`` unless the platform is CPU and the model has conv kernels (4-D leaves), then
  ``unrolled`` for small cohorts (C x S <= ``unroll_limit``) and ``loop`` otherwise.

Packing (``fedjax_lab.backends.packed``): when the algorithm's client update is a
``LocalUpdate`` and the clients of a round differ in size, the round can instead run its clients
back to back in ``P`` slots, a segment of steps per call, so that it costs about its real steps
rather than ``C x`` its largest client. A deterministic cost model picks, each round, between the
padded program above and a packed layout (``PackingPolicy``); the ``vmap`` plan packs with a
scan over time of a vmap over slots, ``unrolled`` and ``loop`` with straight-line steps. Both
compute the numbers of the padded program (same batches, keys and client order). Every program
the backend traces is counted in ``compiles`` (by kind), so a run can report how many it built.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.backends import packed
from fedjax_lab.backends.base import ProgramCache, SingleProcessBackend
from fedjax_lab.core.local import call_client_update, is_local_update
from fedjax_lab.core.rng import client_keys
from fedjax_lab.core.types import Aggregate, Algorithm, Batches, Cohort, ServerState
from fedjax_lab.data.packing import PackedLayout, active_steps, pack, split_layout

Plan = Literal["auto", "vmap", "unrolled", "loop"]
PLANS = ("auto", "vmap", "unrolled", "loop")


def client_batches(table: Any, per_client: Any, mask: jax.Array, weight: jax.Array) -> Batches:
    """One client's ``Batches``; with a device ``table``, ``per_client`` is its ``[S, B]`` index."""
    if table is not None:
        return Batches(None, mask, weight, index=per_client, table=table)
    return Batches(per_client, mask, weight)


def device_table(cohort: Cohort) -> Any:
    """The device-resident example table of an indexed cohort, else None."""
    return cohort.arrays if cohort.index is not None else None


def per_client_inputs(cohort: Cohort) -> Any:
    """The part of the cohort that carries a leading client axis (index or example arrays)."""
    return cohort.index if cohort.index is not None else cohort.arrays


def has_conv(params: Any) -> bool:
    """Whether any leaf is a conv kernel (rank-4, HWIO), which changes the best CPU plan."""
    return any(getattr(x, "ndim", 0) == 4 for x in jax.tree.leaves(params))


def resolve_plan(
    plan: str, chunk_size: int | None, unroll_limit: int, params: Any, clients: int, steps: int,
    large_conv_plan: str = "loop",
) -> str:
    """The concrete plan ``auto`` stands for (every backend's rule, judged on the clients one
    program runs: the cohort, a device's shard or a rank's block).

    ``vmap`` unless chunked; conv models on CPU get ``unrolled`` up to ``unroll_limit``
    (clients x local steps) and ``large_conv_plan`` above it (``loop`` where the backend has
    it).
    """
    if plan != "auto":
        return plan
    if chunk_size is not None:
        return "vmap"
    if jax.default_backend() == "cpu" and has_conv(params):
        return "unrolled" if clients * steps <= unroll_limit else large_conv_plan
    return "vmap"


def unrolled_clients(
    algorithm: Algorithm, server_state: ServerState, client_states: Any, cohort: Cohort,
    keys: jax.Array,
) -> tuple[Any, Any]:
    """``(stacked ClientOutput, stacked new states)`` of a cohort whose clients are a traced
    Python loop with fully unrolled local steps: no while loop, no vmap over per-client
    weights (the ``unrolled`` plan of every backend)."""
    per_client = per_client_inputs(cohort)
    table = device_table(cohort)
    outs, states = [], []
    for i in range(cohort.mask.shape[0]):
        batches = client_batches(table, jax.tree.map(lambda x, i=i: x[i], per_client),
                                 cohort.mask[i], cohort.weight[i])
        out, st = call_client_update(
            algorithm.client_update, server_state,
            jax.tree.map(lambda x, i=i: x[i], client_states), batches, key=keys[i], unroll=True,
        )
        outs.append(out)
        states.append(st)
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    return jax.tree.map(stack, *outs), jax.tree.map(stack, *states)


def add_aggregates(a: Aggregate, b: Aggregate) -> Aggregate:
    """Sum of two partial aggregates (the additivity contract)."""
    return jax.tree.map(jnp.add, a, b)


def packing_mode(plan: str) -> str:
    """The packed step order of a plan: ``vmap`` scans, ``unrolled``/``loop`` unroll."""
    return "vmap" if plan == "vmap" else "unrolled"


def host_cohort(cohort: Cohort) -> Cohort:
    """The cohort with its per-client arrays on the host (a device table stays on device)."""
    get = lambda x: np.asarray(jax.device_get(x))  # noqa: E731
    return cohort._replace(
        arrays=cohort.arrays if cohort.index is not None
        else {k: get(v) for k, v in cohort.arrays.items()},
        index=None if cohort.index is None else get(cohort.index),
        mask=get(cohort.mask),
        weight=get(cohort.weight),
        client_ids=get(cohort.client_ids),
    )


def padded_stats(cohort: Cohort) -> dict[str, float]:
    """Real and computed local steps of a padded ``[C, S, B]`` round."""
    mask = np.asarray(jax.device_get(cohort.mask))
    return {
        "real_steps": float(active_steps(mask).sum()),
        "computed_steps": float(mask.shape[0] * mask.shape[1]),
        "packed_slots": 0.0,
    }


def packed_stats(layout: PackedLayout) -> dict[str, float]:
    """Real and computed local steps of a packed round."""
    return {
        "real_steps": float(layout.real_steps),
        "computed_steps": float(layout.computed_steps),
        "packed_slots": float(layout.slots),
    }


def validate_round_inputs(algorithm: Algorithm, cohort: Cohort, chunk_size: int | None) -> None:
    """Shape checks that must fail before compilation, with a message naming the fix."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    if cohort.mask.ndim != 3:
        raise ValueError(f"cohort.mask must be [C, S, B], got shape {cohort.mask.shape}")
    c = cohort.mask.shape[0]
    if c == 0:
        raise ValueError("the cohort has 0 client slots; sample at least one client")
    if cohort.weight.shape != (c,):
        raise ValueError(f"cohort.weight must be [C]={c}, got {cohort.weight.shape}")
    if chunk_size is not None:
        if not algorithm.additive:
            raise ValueError(
                f"chunk_size needs an additive aggregate; {algorithm.name} is not additive "
                "(robust aggregators gather all clients). Use chunk_size=None."
            )
        if c % chunk_size:
            raise ValueError(
                f"cohort size {c} is not a multiple of chunk_size={chunk_size}; build the cohort "
                "with padded_cohort_size(clients_per_round, chunk_size)"
            )


class VmapBackend(SingleProcessBackend):
    """Simulates a round of many clients on one device (DESIGN.md ``Backend`` protocol).

    Args:
      plan: one of ``PLANS`` (see module docstring).
      chunk_size: process clients in chunks of this many (``vmap`` plan only); bounds memory.
      unroll_limit: ``auto`` uses ``unrolled`` for conv models on CPU up to C x S unrolled steps.
      step_unroll: ``lax.scan`` unroll factor of the local steps in the ``vmap`` plan.
      packing: ``"auto"``, ``"on"`` or ``"off"``, or a ``PackingPolicy`` (slots, segment
        length, cost model); see ``fedjax_lab.backends.packed``. Rounds are packed only for
        algorithms whose client update is a ``LocalUpdate`` and without ``chunk_size``.
      programs: the compile cache to use (the sharded and MPI backends share theirs with the
        ``VmapBackend`` that runs their per-device/per-rank code).
    """

    name = "vmap"

    def __init__(
        self,
        plan: Plan = "auto",
        chunk_size: int | None = None,
        unroll_limit: int = 128,
        step_unroll: int = 2,
        packing: str | packed.PackingPolicy = "auto",
        programs: ProgramCache | None = None,
    ) -> None:
        super().__init__()
        if programs is not None:
            self.programs = programs
        if plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if chunk_size is not None and plan not in ("auto", "vmap"):
            raise ValueError(f"chunk_size only applies to the 'vmap' plan, not {plan!r}")
        self.plan = plan
        self.chunk_size = chunk_size
        self.unroll_limit = unroll_limit
        if not isinstance(step_unroll, int) or step_unroll < 1:
            raise ValueError(f"step_unroll must be a positive integer, got {step_unroll!r}")
        self.step_unroll = step_unroll
        self.packing = (
            packing if isinstance(packing, packed.PackingPolicy) else packed.PackingPolicy(packing)
        )
        if chunk_size is not None and self.packing.slots is not None:
            raise ValueError("slots (packing) and chunk_size exclude each other; drop one")
        self._slot_seconds: dict[int, tuple[Algorithm, float]] = {}
        self._pending_plan: tuple[list[np.ndarray], list[int]] | None = None

    @property
    def cohort_multiple(self) -> int:
        """The runner pads cohorts to a multiple of the chunk size."""
        return self.chunk_size or 1

    # ------------------------------------------------------------------------------ planning
    def resolve_plan(self, algorithm: Algorithm, server_state: ServerState, cohort: Cohort) -> str:
        """The concrete plan ``auto`` stands for on this platform, model and cohort."""
        del algorithm
        c, s = cohort.mask.shape[:2]
        return resolve_plan(self.plan, self.chunk_size, self.unroll_limit, server_state.params,
                            c, s)

    def plan_rounds(self, schedule: list[np.ndarray], padded_steps: list[int]) -> None:
        """Lets the packing policy fix one layout for the coming rounds (the runner calls it).

        The layout is fixed at the next round, once the model's step cost is known.

        Args:
          schedule: per round, ``[C]`` real local steps of each client slot this process runs.
          padded_steps: per round, ``S`` of its padded cohort.
        """
        self._pending_plan = (list(schedule), list(padded_steps))
        self.packing.layouts = None

    def slot_seconds(self, algorithm: Algorithm, server_state, client_states, cohort) -> float:
        """Cost-model seconds of one slot's local step (cached per algorithm)."""
        hit = self._slot_seconds.get(id(algorithm))
        if hit is not None and hit[0] is algorithm:
            return hit[1]
        batch = cohort.mask.shape[2]
        if cohort.index is not None:
            spec = {k: jax.ShapeDtypeStruct((batch, *v.shape[1:]), v.dtype)
                    for k, v in cohort.arrays.items()}
        else:
            spec = {k: jax.ShapeDtypeStruct((batch, *np.shape(v)[3:]), v.dtype)
                    for k, v in cohort.arrays.items()}
        seconds = packed.slot_step_seconds(
            algorithm.client_update, server_state, client_states, spec,
            self.packing.cost_model(),
        )
        self._slot_seconds[id(algorithm)] = (algorithm, seconds)
        return seconds

    def layout(
        self, algorithm: Algorithm, server_state, client_states, cohort: Cohort, plan: str,
        groups: int = 1,
    ) -> PackedLayout | None:
        """The packed layout of this round, or None to run the padded ``[C, S, B]`` program.

        ``groups``: the cohort runs as that many contiguous blocks (devices), each packed alone.
        """
        if (
            not is_local_update(algorithm.client_update) or self.chunk_size is not None
            or self.packing.packing == "off" or self.packing.layouts == (packed.PADDED,)
        ):
            return None
        mode = packing_mode(plan)
        seconds = self.slot_seconds(algorithm, server_state, client_states, cohort)
        if self._pending_plan is not None:
            self.packing.plan(*self._pending_plan, mode, seconds, groups)
            self._pending_plan = None
        mask = np.asarray(jax.device_get(cohort.mask))
        steps = active_steps(mask).sum(axis=1)
        decision = self.packing.choose(steps, mask.shape[1], mode, seconds, groups)
        if not decision.slots:
            return None
        return pack(host_cohort(cohort), decision.slots, decision.segment, groups=groups)

    # ------------------------------------------------------------------------------- running
    def run_round(
        self,
        algorithm: Algorithm,
        server_state: ServerState,
        client_states: Any,
        cohort: Cohort,
        key: jax.Array,
    ) -> tuple[ServerState, Any, dict[str, Any]]:
        """Runs one round. ``key`` is the round key; client keys are split from it.

        Besides the algorithm's metrics, returns ``real_steps`` (local steps with a real
        example), ``computed_steps`` (slot-steps the program ran) and ``packed_slots`` (0 for
        the padded program) of the round.
        """
        validate_round_inputs(algorithm, cohort, self.chunk_size)
        plan = self.resolve_plan(algorithm, server_state, cohort)
        layout = self.layout(algorithm, server_state, client_states, cohort, plan)
        if layout is None:
            fn = self._compiled(algorithm, plan)
            out = fn(server_state, client_states, cohort, key)
            return (*out[:2], {**out[2], **padded_stats(cohort)})
        fn = self._compiled(algorithm, "packed-" + packing_mode(plan))
        return fn(server_state, client_states, cohort, key, layout)

    def _compiled(self, algorithm: Algorithm, plan: str):
        if plan.startswith("packed-"):
            return self.programs.get(algorithm, plan, lambda: self.packed_round(
                algorithm, plan.removeprefix("packed-")))
        builder = {"vmap": self._vmap_round, "unrolled": self._unrolled_round,
                   "loop": self.loop_round}[plan]
        return self.programs.get(algorithm, plan, lambda: builder(algorithm))

    def packed_round(
        self,
        algorithm: Algorithm,
        mode: str,
        keys_fn: Any = client_keys,
        reduce: Any = None,
    ):
        """The packed round (see ``fedjax_lab.backends.packed``) as a host function.

        ``keys_fn(round_key, c)`` gives this process's client keys and ``reduce(aggregate)``
        combines partial aggregates across processes (the MPI backend reuses both).
        """
        local = algorithm.client_update
        init_fns: dict[int, Any] = {}
        segment = jax.jit(
            self.programs.counted("packed_segment",
                                  packed.segment_fn(local, mode, self.step_unroll)),
            donate_argnums=(2, 3),
        )

        def finish_fn(server_state, client_states, buffer, weight, key):
            keys = keys_fn(key, weight.shape[0])
            outputs, new_states = packed.finish_clients(
                local, server_state, client_states, buffer, weight, keys
            )
            agg = algorithm.aggregate(outputs)
            if reduce is not None:
                agg = reduce(agg)
            new_server, metrics = algorithm.server_update(server_state, agg)
            return new_server, new_states, metrics

        finish = jax.jit(self.programs.counted("packed_finish", finish_fn))

        def init(slots):
            if slots not in init_fns:
                fresh = packed.init_fn(local, slots)

                def init_round(server_state, client_states, weight, key):
                    # The same client keys as finish's: a keyed update's step randomness.
                    return fresh(server_state, client_states, weight,
                                 keys_fn(key, weight.shape[0]))

                init_fns[slots] = jax.jit(self.programs.counted("packed_init", init_round))
            return init_fns[slots]

        warmed: set[tuple[int, int]] = set()

        def warm(server_state, client_states, weight, key, table, layout):
            # Every program of the run's planned layouts is compiled at its first round, on idle
            # steps, so that no later round stops to compile a half or quarter segment.
            planned = [d for d in self.packing.layouts or () if d.slots] or [
                packed.Decision(layout.slots, layout.segment)
            ]
            for d in planned:
                if (d.slots, d.segment) in warmed:
                    continue
                warmed.add((d.slots, d.segment))
                for length in packed.warm_lengths(d.segment):
                    carry, buffer, ctx = init(d.slots)(server_state, client_states, weight, key)
                    segment(server_state, ctx, carry, buffer, table, *packed.idle_inputs(
                        layout, d.slots, length, weight.shape[0]))

        def round_fn(server_state, client_states, cohort, key, layout: PackedLayout):
            weight = jnp.asarray(cohort.weight, jnp.float32)
            table = device_table(cohort)
            warm(server_state, client_states, weight, key, table, layout)
            carry, buffer, ctx = init(layout.slots)(server_state, client_states, weight, key)
            for piece in split_layout(layout):
                carry, buffer = segment(
                    server_state, ctx, carry, buffer, table, *packed.segment_inputs(piece)
                )
            new_server, new_states, metrics = finish(
                server_state, client_states, buffer, weight, key
            )
            return new_server, new_states, {**metrics, **packed_stats(layout)}

        return round_fn

    def client_outputs(self, algorithm: Algorithm, server_state, client_states, cohort, keys,
                       unroll: int | bool = 1):
        """vmapped client updates of a whole cohort (or chunk): ``(ClientOutput, states)``;
        ``unroll`` unrolls the local steps of a ``LocalUpdate`` (never changes the numbers)."""

        def one(state, per_client, mask, weight, key):
            batches = client_batches(table, per_client, mask, weight)
            return call_client_update(algorithm.client_update, server_state, state, batches,
                                      key=key, unroll=unroll)

        table = device_table(cohort)
        return jax.vmap(one)(
            client_states, per_client_inputs(cohort), cohort.mask, cohort.weight, keys
        )

    def _vmap_round(self, algorithm: Algorithm):
        chunk = self.chunk_size
        # Unrolling local steps by 2 halves the while-loop trips, whose per-iteration cost on
        # XLA:CPU is significant for small dense models (W1: 4.0 -> 3.2-3.8 ms per round).
        unroll = self.step_unroll

        def round_fn(server_state, client_states, cohort, key):
            c = cohort.mask.shape[0]
            keys = client_keys(key, c)
            if chunk is None or chunk >= c:
                outputs, new_states = self.client_outputs(
                    algorithm, server_state, client_states, cohort, keys, unroll
                )
                agg = algorithm.aggregate(outputs)
            else:
                agg, new_states = self.chunked_aggregate(
                    algorithm, server_state, client_states, cohort, keys, chunk, unroll
                )
            new_server, metrics = algorithm.server_update(server_state, agg)
            return new_server, new_states, metrics

        return jax.jit(self.programs.counted("padded_round", round_fn))

    def chunked_aggregate(self, algorithm, server_state, client_states, cohort, keys, chunk,
                          unroll: int | bool = 1):
        """``(aggregate, new client states)`` of a cohort processed ``chunk`` clients at a time.

        A scan over chunks, each vmapped, summing the additive aggregates: peak memory is that of
        one chunk. Also the per-device body of the sharded and MPI ``vmap`` plans.
        """
        c = cohort.mask.shape[0]
        n = c // chunk

        def split(x):
            return x.reshape((n, chunk, *x.shape[1:]))

        per_chunk = (
            jax.tree.map(split, client_states),
            jax.tree.map(split, per_client_inputs(cohort)),
            split(cohort.mask),
            split(cohort.weight),
            split(keys),
        )

        def chunk_aggregate(xs):
            states, per_client, mask, weight, ks = xs
            sub = cohort._replace(
                arrays=per_client if cohort.index is None else cohort.arrays,
                index=per_client if cohort.index is not None else None,
                mask=mask,
                weight=weight,
            )
            outputs, new_states = self.client_outputs(algorithm, server_state, states, sub, ks,
                                                      unroll)
            return algorithm.aggregate(outputs), new_states

        first = jax.tree.map(lambda x: x[0], per_chunk)
        agg_shape = jax.eval_shape(lambda xs: chunk_aggregate(xs)[0], first)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), agg_shape)

        def body(acc, xs):
            agg, new_states = chunk_aggregate(xs)
            return add_aggregates(acc, agg), new_states

        agg, new_states = jax.lax.scan(body, zero, per_chunk)
        new_states = jax.tree.map(lambda x: x.reshape((c, *x.shape[2:])), new_states)
        return agg, new_states

    def _unrolled_round(self, algorithm: Algorithm):
        def round_fn(server_state, client_states, cohort, key):
            keys = client_keys(key, cohort.mask.shape[0])
            outputs, new_states = unrolled_clients(
                algorithm, server_state, client_states, cohort, keys
            )
            agg = algorithm.aggregate(outputs)
            new_server, metrics = algorithm.server_update(server_state, agg)
            return new_server, new_states, metrics

        return jax.jit(self.programs.counted("padded_round", round_fn))

    def loop_round(
        self,
        algorithm: Algorithm,
        keys_fn: Any = client_keys,
        reduce: Any = None,
    ):
        """The ``loop`` plan. ``keys_fn(round_key, c)`` gives this process's client keys and
        ``reduce(aggregate)`` combines partial aggregates across processes (MPI reuses both)."""

        def one_client(server_state, state, per_client, mask, weight, key, table):
            batches = client_batches(table, per_client, mask, weight)
            return call_client_update(algorithm.client_update, server_state, state, batches,
                                      key=key, unroll=True)

        client_fn = jax.jit(self.programs.counted("loop_client", one_client))

        def finish_fn(server_state, outputs):
            agg = algorithm.aggregate(outputs)
            if reduce is not None:
                agg = reduce(agg)
            return algorithm.server_update(server_state, agg)

        finish = jax.jit(self.programs.counted("loop_finish", finish_fn))

        def round_fn(server_state, client_states, cohort, key):
            c = cohort.mask.shape[0]
            keys = keys_fn(key, c)
            per_client = per_client_inputs(cohort)
            table = device_table(cohort)
            outs, states = [], []
            for i in range(c):
                out, st = client_fn(
                    server_state,
                    jax.tree.map(lambda x, i=i: x[i], client_states),
                    jax.tree.map(lambda x, i=i: x[i], per_client),
                    cohort.mask[i], cohort.weight[i], keys[i], table,
                )
                outs.append(out)
                states.append(st)
            outputs = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
            new_states = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
            new_server, metrics = finish(server_state, outputs)
            return new_server, new_states, metrics

        return round_fn


def to_host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """One device->host transfer of a round's scalar metrics."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

