"""Packed rounds: clients run back to back in client slots, a segment of steps per call.

The device side of ``fedjax_lab.data.packing``. A round whose algorithm has a stepwise client
update (``fedjax_lab.core.local.LocalUpdate``) runs as

1. ``init``: every slot's carry, a buffer with one start carry per client of the cohort, and
   each client's step context (e.g. SCAFFOLD's ``c - c_i``);
2. ``segment`` (called ``length / segment`` times): ``segment`` time steps of every slot. Before
   a step that starts a client the slot's carry is reset to the start carry; after a step that
   ends a client the carry is written to that client's row of the buffer (a scatter whose other
   rows are dropped, so it costs only the real writes);
3. ``finish``: every client's ``LocalUpdate.finish`` on its buffered carry (vmapped over the
   cohort, so keys, client states and per-client payloads are exactly those of the padded
   path), the aggregate and the server update.

A segment's length is fixed per run, so the programs compiled are one ``segment`` and one
``init`` per slot count ``P`` and one ``finish``, however long the clients are. Memory is
``P`` carries plus one carry per cohort client and one segment of example indices: it does not
grow with the largest client.

Two step orders compute the same numbers: ``vmap`` (a ``lax.scan`` over time of a vmap over
slots; accelerators and dense models) and ``unrolled`` (time and slots as straight-line code,
no while loop and no vmap over per-slot weights; conv models on CPU, where XLA:CPU runs
convolutions ~10x slower inside loops).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.local import LocalUpdate
from fedjax_lab.core.tree import tree_where
from fedjax_lab.core.types import ClientOutput, PyTree, ServerState
from fedjax_lab.data.packing import (
    PackedLayout,
    group_makespan,
    padded_length,
    segment_lengths,
    tail_unit,
)

MODES = ("vmap", "unrolled")


def segment_inputs(layout: PackedLayout) -> tuple[Any, ...]:
    """The per-call arrays of one segment, in the order ``segment_fn`` takes them."""
    examples = layout.index if layout.index is not None else layout.arrays
    return (examples, layout.mask, layout.position, layout.first, layout.last)


def _take(tree: PyTree, i: Any) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def _step_arrays(table: Any, examples: Any) -> dict[str, jax.Array]:
    """One step's examples: gathered from the device ``table`` by row, or given."""
    if table is None:
        return examples
    return {k: t[examples] for k, t in table.items()}


def init_fn(local: LocalUpdate, slots: int) -> Callable[..., tuple[PyTree, PyTree, PyTree]]:
    """``(server_state, client_states, weight, keys) -> (carries [P], buffer [C], contexts [C])``.

    Every buffer row starts as the start carry, which is what a client with no real step (a
    dropped or padded slot) finishes from. ``keys`` are the cohort's client keys (those
    ``finish`` gets); a ``keyed`` update's contexts are derived from them.
    """

    def init(server_state: ServerState, client_states: PyTree, weight: jax.Array,
             keys: jax.Array):
        fresh = local.start(server_state)

        def tile(n):
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), fresh)

        num_clients = weight.shape[0]
        ctx = jax.vmap(local.client_context, in_axes=(None, 0, 0), axis_size=num_clients)(
            server_state, client_states, keys
        )
        return tile(slots), tile(num_clients), ctx

    return init


def segment_fn(local: LocalUpdate, mode: str, unroll: int = 2) -> Callable[..., Any]:
    """``(server_state, ctx, carry, buffer, table, *segment_inputs) -> (carry, buffer)``.

    A single slot is never vmapped: on CPU a vmap of width 1 still emits batched dots (measured
    +45 us per W3 step, 206 vs 162), and its reset and store are real branches (``lax.cond``)
    that cost nothing at the steps where no client starts or ends, where a vmap would turn them
    into selects over the whole carry.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def one_slot(server_state, fresh, ctx, carry, examples, mask, pos, first, table, batched):
        num_clients = jax.tree.leaves(ctx)[0].shape[0] if jax.tree.leaves(ctx) else 1
        if batched:
            carry = tree_where(first, fresh, carry)
        else:
            carry = jax.lax.cond(first, lambda c: fresh, lambda c: c, carry)
        client_ctx = _take(ctx, jnp.minimum(pos, num_clients - 1))
        return local.step(server_state, client_ctx, carry, _step_arrays(table, examples), mask)

    def store(buffer, carry, rows):
        # Rows of clients that did not end at this step are out of range and dropped, so the
        # scatter writes only finished clients' carries.
        return jax.tree.map(lambda b, x: b.at[rows].set(x, mode="drop"), buffer, carry)

    def store_one(buffer, carry, row):
        num_clients = jax.tree.leaves(buffer)[0].shape[0]

        def write(b):
            return jax.tree.map(lambda bb, x: bb.at[row].set(x), b, carry)

        return jax.lax.cond(row < num_clients, write, lambda b: b, buffer)

    def segment(server_state, ctx, carry, buffer, table, examples, mask, position, first, last):
        fresh = local.start(server_state)
        num_clients = jax.tree.leaves(buffer)[0].shape[0]
        rows = jnp.where(last, position, num_clients)
        slots = mask.shape[1]
        if mode == "vmap":
            def body(state, xs):
                carry, buffer = state
                ex, m, pos, fst, row = xs
                if slots == 1:
                    one = one_slot(server_state, fresh, ctx, _take(carry, 0), _take(ex, 0),
                                   m[0], pos[0], fst[0], table, False)
                    return (jax.tree.map(lambda x: x[None], one),
                            store_one(buffer, one, row[0])), None
                carry = jax.vmap(
                    one_slot, in_axes=(None, None, None, 0, 0, 0, 0, 0, None, None)
                )(server_state, fresh, ctx, carry, ex, m, pos, fst, table, True)
                return (carry, store(buffer, carry, row)), None

            (carry, buffer), _ = jax.lax.scan(
                body, (carry, buffer), (examples, mask, position, first, rows), unroll=unroll
            )
            return carry, buffer
        per_slot = [_take(carry, p) for p in range(slots)]
        for t in range(mask.shape[0]):
            for p in range(slots):
                per_slot[p] = one_slot(
                    server_state, fresh, ctx, per_slot[p], _take(examples, (t, p)), mask[t, p],
                    position[t, p], first[t, p], table, False,
                )
                buffer = store_one(buffer, per_slot[p], rows[t, p])
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_slot), buffer

    return segment


def warm_lengths(segment: int) -> list[int]:
    """Every call length a layout with this segment can run (full, half, quarter)."""
    return sorted({segment, *(n for n in (segment // 2, tail_unit(segment)) if n)}, reverse=True)


def idle_inputs(layout: PackedLayout, slots: int, length: int, clients: int) -> tuple:
    """Segment inputs of ``length`` idle steps in ``slots`` slots (compiles, changes nothing).

    Shapes and dtypes follow ``layout``; ``clients`` is the position that means "no client" (the
    buffer's row count, per device for a sharded layout).
    """
    batch = layout.mask.shape[2]
    if layout.index is not None:
        examples = np.zeros((length, slots, batch), layout.index.dtype)
    else:
        examples = {k: np.zeros((length, slots, batch, *v.shape[3:]), v.dtype)
                    for k, v in layout.arrays.items()}
    return (examples, np.zeros((length, slots, batch), np.float32),
            np.full((length, slots), clients, np.int32), np.zeros((length, slots), bool),
            np.zeros((length, slots), bool))


def finish_clients(
    local: LocalUpdate, server_state: ServerState, client_states: PyTree, buffer: PyTree,
    weight: jax.Array, keys: jax.Array,
) -> tuple[ClientOutput, PyTree]:
    """Every client's ``finish`` on its buffered carry, vmapped over the cohort."""

    def one(state, carry, w, key):
        return local.finish(server_state, state, carry, w, key=key)

    return jax.vmap(one)(client_states, buffer, weight, keys)


PACKING = ("auto", "on", "off")


def _check_positive_int(value: Any, name: str) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
    ):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _check_seconds(value: Any, name: str) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds a round's programs take, estimated without running them (deterministic).

    One slot's local step takes ``max(flops / flops_per_second, bytes / bytes_per_second)``
    (a roofline over XLA's cost analysis of the step); a packed step adds ``boundary`` of that
    for the reset and the buffer write when slots are vmapped (selects and a scatter over the
    whole carry), ``branch_boundary`` when a slot runs alone (real branches); every time step
    of a ``vmap`` program costs ``step_seconds`` more (loop trip, kernel launches) whatever the
    number of slots; every segment call ``call_seconds``; every program compiled
    ``compile_seconds``. Straight-line (``unrolled``) slots are independent chains of ops that
    run concurrently on up to ``cores`` cores. :meth:`for_platform` gives defaults measured on
    a 2-core CPU (jax 0.10.2) and rough accelerator values; they only rank layouts, so they
    need to be right within a small factor, not exactly.
    """

    flops_per_second: float
    bytes_per_second: float
    step_seconds: float
    call_seconds: float
    compile_seconds: float
    boundary: float = 0.2
    branch_boundary: float = 0.05
    cores: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_seconds(getattr(self, f.name), f.name)
        if not self.flops_per_second > 0 or not self.bytes_per_second > 0:
            raise ValueError("flops_per_second and bytes_per_second must be > 0")
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ValueError(f"cores must be a positive integer, got {self.cores!r}")

    @classmethod
    def for_platform(cls, platform: str) -> CostModel:
        if platform == "cpu":
            return cls(2e10, 1e10, 3e-6, 1e-4, 2.0, cores=len(os.sched_getaffinity(0)))
        return cls(5e13, 2e12, 1e-5, 2e-5, 2.0)

    def slot_seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_per_second, nbytes / self.bytes_per_second, 1e-9)


class Decision(NamedTuple):
    """A round layout: ``slots == 0`` is the padded ``[C, S, B]`` program."""

    slots: int
    segment: int


PADDED = Decision(0, 0)
_SEGMENTS = {"vmap": (8, 16, 32, 64, 128), "unrolled": (2, 4, 8)}


class PackingPolicy:
    """Whether rounds are packed, into how many slots, and the segment length.

    The choice minimises the :class:`CostModel` time, with no timing involved, so the same seed
    gives the same layouts and the same numbers run after run. With :meth:`plan` (the runner
    calls it with every round's client step counts before the first round) the run gets a small
    set of layouts, at most ``max_layouts``, chosen together with the compile time each costs:
    each further slot count or padded shape is another compiled program, which pays off only
    when enough rounds are cheaper with it (a population whose rounds sometimes hold one giant
    client: those rounds run best in one slot, the others in several). Each round then runs the
    planned layout that is cheapest for it. Without a plan, each round is judged on its own.

    Costs of a round (``t`` = one slot's step, ``o`` = ``step_seconds``, ``d`` = call, ``k`` =
    ``cores``, ``b``/``b1`` = ``boundary``/``branch_boundary``):
      * padded ``[C, S, B]``: ``S (C t + o)`` in ``vmap`` mode, ``S ceil(C/k) t`` unrolled;
      * packed into ``P`` slots, ``n`` segments of ``L`` steps: ``n (L w + d)`` with the step
        ``w = P t (1 + b) + o`` (vmapped slots), ``t (1 + b1) + o`` (one slot) or
        ``ceil(P/k) t (1 + b1)`` (unrolled),
    plus ``compile_seconds`` per program: one padded program per distinct ``S``; for packed
    layouts one finish, one init per ``P`` and up to three segment programs per ``(P, L)``
    (a round's last call runs a half and/or quarter segment, ``data.packing.segment_lengths``).
    ``P`` ranges over powers of two below the cohort size and ``L`` over 8..128 (``vmap``) or
    2..8 (``unrolled``: every step is compiled code).

    Args:
      packing: ``"auto"`` (cost model), ``"on"`` (always pack) or ``"off"`` (always pad).
      slots: pack into exactly this many slots (implies packing).
      segment_steps: steps per segment call (default: chosen by the cost model).
      cost: the :class:`CostModel` (default: ``CostModel.for_platform`` of the default backend).
      max_layouts: most packed layouts a planned run may use (>= 1).
    """

    def __init__(
        self,
        packing: str = "auto",
        *,
        slots: int | None = None,
        segment_steps: int | None = None,
        cost: CostModel | None = None,
        max_layouts: int = 2,
    ) -> None:
        if packing not in PACKING:
            raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
        _check_positive_int(slots, "slots")
        _check_positive_int(segment_steps, "segment_steps")
        _check_positive_int(max_layouts, "max_layouts")
        if packing == "off" and (slots is not None or segment_steps is not None):
            raise ValueError(
                "slots/segment_steps shape packed rounds; they contradict packing='off'"
            )
        if cost is not None and not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
        self.packing = packing
        self.slots = slots
        self.segment_steps = segment_steps
        self.cost = cost
        self.max_layouts = max_layouts
        self.layouts: tuple[Decision, ...] | None = None

    def cost_model(self) -> CostModel:
        return self.cost or CostModel.for_platform(jax.default_backend())

    def _candidates(self, clients: int, mode: str) -> list[Decision]:
        if self.slots is not None and self.slots > clients:
            raise ValueError(
                f"slots={self.slots} is more than the {clients} client slots of a round "
                f"(per device/process); use slots <= {clients}"
            )
        slots = [self.slots] if self.slots is not None else [
            p for p in (2**k for k in range(max(clients, 1).bit_length())) if p < clients
        ] or [1]
        segments = [self.segment_steps] if self.segment_steps is not None else _SEGMENTS[mode]
        return [Decision(p, s) for p in slots for s in segments]

    def _costs(
        self, schedule: list[np.ndarray], padded_steps: list[int], mode: str, slot_seconds: float,
        groups: int,
    ) -> tuple[list[Decision], np.ndarray, float | None]:
        """Candidate layouts, their ``[rounds, candidates]`` seconds, and the padded run's."""
        cm = self.cost_model()
        overhead = cm.step_seconds if mode == "vmap" else 0.0
        clients = max((len(s) for s in schedule), default=groups) // groups
        candidates = self._candidates(clients, mode)
        spans = {p: [group_makespan(s, p, groups) for s in schedule]
                 for p in {d.slots for d in candidates}}
        costs = np.zeros((len(schedule), len(candidates)))
        for j, d in enumerate(candidates):
            pieces = [segment_lengths(padded_length(span, d.segment), d.segment)
                      for span in spans[d.slots]]
            calls = np.array([len(p) for p in pieces])
            length = np.array([sum(p) for p in pieces])
            if mode == "unrolled":
                per_step = math.ceil(d.slots / cm.cores) * slot_seconds * (1 + cm.branch_boundary)
            elif d.slots == 1:
                per_step = slot_seconds * (1 + cm.branch_boundary) + overhead
            else:
                per_step = d.slots * slot_seconds * (1 + cm.boundary) + overhead
            costs[:, j] = length * per_step + calls * cm.call_seconds
        padded = None
        if self.packing == "auto" and self.slots is None:
            width = math.ceil(clients / cm.cores) if mode == "unrolled" else clients
            padded = cm.compile_seconds * len(set(padded_steps)) + sum(
                p * (width * slot_seconds + overhead) for p in padded_steps
            )
        return candidates, costs, padded

    def _compile_seconds(self, layouts: tuple[Decision, ...]) -> float:
        # finish, an init per slot count, and up to three segment lengths per layout
        programs = 1 + len({d.slots for d in layouts}) + 3 * len(set(layouts))
        return programs * self.cost_model().compile_seconds

    def plan(
        self, schedule: list[np.ndarray], padded_steps: list[int], mode: str,
        slot_seconds: float, groups: int = 1,
    ) -> tuple[Decision, ...]:
        """Fixes the run's layouts from every round's real client steps (see the class doc).

        Args:
          schedule: per round, ``[C]`` real local steps of each client slot.
          padded_steps: per round, ``S`` of its padded cohort.
          mode: ``"vmap"`` or ``"unrolled"``.
          slot_seconds: estimated seconds of one slot's local step.
          groups: the cohort runs as this many contiguous blocks in parallel (devices), each
            packed alone.

        Returns:
          The planned layouts (``(PADDED,)`` for the padded program).
        """
        if self.packing == "off" or not schedule:
            self.layouts = (PADDED,)
            return self.layouts
        candidates, costs, padded = self._costs(
            [np.asarray(s, np.int64) for s in schedule], list(padded_steps), mode,
            slot_seconds, groups,
        )
        options: dict[tuple[Decision, ...], float] = {}
        if padded is not None:
            options[(PADDED,)] = padded
        for size in range(1, min(self.max_layouts, len(candidates)) + 1):
            for picked in itertools.combinations(range(len(candidates)), size):
                layouts = tuple(candidates[j] for j in picked)
                options[layouts] = (costs[:, list(picked)].min(axis=1).sum()
                                    + self._compile_seconds(layouts))
        self.layouts = min(options, key=options.get)
        return self.layouts

    def choose(
        self, steps: np.ndarray, padded_steps: int, mode: str, slot_seconds: float,
        groups: int = 1,
    ) -> Decision:
        """The layout of one round: the cheapest planned one, else the cheapest of all."""
        if self.packing == "off" or self.layouts == (PADDED,):
            return PADDED
        steps = np.asarray(steps, np.int64)
        candidates, costs, padded = self._costs(
            [steps], [padded_steps], mode, slot_seconds, groups
        )
        if self.layouts is not None:
            allowed = [j for j, d in enumerate(candidates) if d in self.layouts]
            return candidates[min(allowed, key=lambda j: costs[0, j])]
        best = int(np.argmin(costs[0]))
        if padded is not None and padded <= costs[0, best]:
            return PADDED
        return candidates[best]


def slot_step_seconds(
    local: LocalUpdate, server_state: ServerState, client_states: PyTree,
    example_spec: dict[str, jax.ShapeDtypeStruct], cost: CostModel,
) -> float:
    """The :class:`CostModel` seconds of one slot's local step (XLA cost analysis, no compile).

    Args:
      local: the client update.
      server_state: the server state (or its shapes).
      client_states: stacked ``[C, ...]`` client states (or their shapes).
      example_spec: one batch's arrays, ``{name: ShapeDtypeStruct([B, ...])}``.
      cost: the cost model.
    """
    one_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), client_states
    )
    ctx = jax.eval_shape(local.client_context, server_state, one_state, jax.random.key(0))
    carry = jax.eval_shape(local.start, server_state)
    batch = next(iter(example_spec.values())).shape[0]
    mask = jax.ShapeDtypeStruct((batch,), jnp.float32)
    analysis = jax.jit(local.step).lower(server_state, ctx, carry, example_spec, mask)
    info = analysis.cost_analysis() or {}
    return cost.slot_seconds(float(info.get("flops", 0.0)), float(info.get("bytes accessed", 0.0)))
