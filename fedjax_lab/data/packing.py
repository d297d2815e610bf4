"""Packing: several clients run back to back in one client slot (DESIGN.md "Data for vmap").

A padded cohort ``[C, S, B]`` costs ``C x S`` local steps whatever the clients' sizes: on a
heavy-tailed population nearly all of it is padding. A *packed* layout instead gives the round
``P`` slots and lays each slot's clients one after another along time, so the round costs
``P x L`` steps with ``L`` close to ``(real steps) / P``. At a client boundary the slot's carry is
reset to the client's start (``LocalUpdate.start``) and the carry after the client's last step is
stored for its ``finish``; see ``fedjax_lab.backends.packed``.

Everything here is host-side numpy and deterministic: clients are assigned to slots longest
first, each to the least loaded slot (LPT, Graham 1969: within 4/3 of the optimal makespan), ties
broken by position, so a round's layout depends only on the round's clients.

Only steps with at least one real example are packed. Fully masked steps are exact no-ops of
the local loop (padding, stragglers' cut-off steps, dropped clients), so leaving them out
changes no number; a client with no real step keeps its start carry.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fedjax_lab.core.types import Cohort


class PackedLayout(NamedTuple):
    """One round's clients laid out in ``P`` slots over ``L`` time steps (time-major).

    Attributes:
      index: ``[L, P, B]`` int32 rows of the device table (0 where masked), or None.
      arrays: ``{name: [L, P, B, ...]}`` examples (zeros where masked), or None with ``index``.
      mask: ``[L, P, B]`` float32 example mask.
      position: ``[L, P]`` int32, the client (its position in the cohort, ``0..C-1``) whose step
        this is, or ``C`` for an idle step at the end of a slot.
      first: ``[L, P]`` bool, the step starts its client (reset the slot's carry before it).
      last: ``[L, P]`` bool, the step ends its client (store the carry after it).
      client_steps: ``[C]`` int64 real local steps of each client.
      segment: the backend runs the layout this many steps per call (``L`` is a multiple).
    """

    index: np.ndarray | None
    arrays: dict[str, np.ndarray] | None
    mask: np.ndarray
    position: np.ndarray
    first: np.ndarray
    last: np.ndarray
    client_steps: np.ndarray
    segment: int

    @property
    def slots(self) -> int:
        return int(self.mask.shape[1])

    @property
    def length(self) -> int:
        return int(self.mask.shape[0])

    @property
    def real_steps(self) -> int:
        return int(self.client_steps.sum())

    @property
    def computed_steps(self) -> int:
        return self.slots * self.length


def active_steps(mask: np.ndarray) -> np.ndarray:
    """``[C, S]`` bool: the steps with at least one real example."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be [C, S, B], got shape {mask.shape}")
    return mask.sum(axis=2) > 0


def assign_slots(steps: np.ndarray, slots: int) -> list[list[int]]:
    """Longest-first assignment of clients (their step counts) to ``slots`` slots.

    Returns, for each slot, its clients' positions in the order they run. Clients with no step
    are left out (they never occupy a slot).
    """
    steps = np.asarray(steps, np.int64)
    if not isinstance(slots, int | np.integer) or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    load = np.zeros(slots, np.int64)
    out: list[list[int]] = [[] for _ in range(slots)]
    # Stable sort: equal sizes keep their cohort order, so the layout is deterministic.
    for c in np.argsort(-steps, kind="stable"):
        if steps[c] == 0:
            break
        s = int(np.argmin(load))  # the first least-loaded slot
        out[s].append(int(c))
        load[s] += steps[c]
    return out


def makespan(steps: np.ndarray, slots: int) -> int:
    """Length of the longest slot after :func:`assign_slots`."""
    steps = np.asarray(steps, np.int64)
    return max((int(steps[a].sum()) for a in assign_slots(steps, slots) if a), default=0)


def group_makespan(steps: np.ndarray, slots: int, groups: int = 1) -> int:
    """The longest slot when each of ``groups`` contiguous blocks of clients is packed alone."""
    blocks = np.asarray(steps, np.int64).reshape(groups, -1)
    return max(makespan(b, slots) for b in blocks)


def pack(
    cohort: Cohort, slots: int, segment: int, *, groups: int = 1, length: int | None = None
) -> PackedLayout:
    """Packs the host-side ``cohort`` into ``slots`` slots, length a multiple of ``segment``.

    Args:
      cohort: a cohort with host (numpy) ``mask`` and ``index`` or ``arrays``.
      slots: number of client slots ``P`` (per group).
      segment: the layout's length is rounded up to a multiple of this (the backend runs it
        ``segment`` steps per call); >= 1.
      groups: the cohort's clients are cut into this many contiguous blocks (devices of a
        sharded backend), each packed into its own ``slots`` slots: the layout has
        ``groups * slots`` slots, and a position is the client's index WITHIN its block.
      length: force this length (a multiple of ``segment`` that holds every slot).
    """
    if not isinstance(segment, int | np.integer) or segment < 1:
        raise ValueError(f"segment must be a positive integer, got {segment!r}")
    if not isinstance(groups, int | np.integer) or groups < 1 or cohort.mask.shape[0] % groups:
        raise ValueError(
            f"groups must be a positive divisor of the cohort size {cohort.mask.shape[0]}, "
            f"got {groups!r}"
        )
    if groups > 1:
        per = cohort.mask.shape[0] // groups

        def block(g):
            part = slice(g * per, (g + 1) * per)
            return cohort._replace(
                index=None if cohort.index is None else np.asarray(cohort.index)[part],
                arrays=cohort.arrays if cohort.index is not None
                else {k: np.asarray(v)[part] for k, v in cohort.arrays.items()},
                mask=np.asarray(cohort.mask)[part],
            )

        steps = active_steps(np.asarray(cohort.mask)).sum(axis=1)
        need = group_makespan(steps, slots, groups)
        length = padded_length(need, segment) if length is None else length
        parts = [pack(block(g), slots, segment, length=length) for g in range(groups)]

        def cat(name):
            xs = [getattr(p, name) for p in parts]
            return None if xs[0] is None else np.concatenate(xs, axis=1)

        return PackedLayout(
            cat("index"),
            None if parts[0].arrays is None else {
                k: np.concatenate([p.arrays[k] for p in parts], axis=1) for k in parts[0].arrays
            },
            cat("mask"), cat("position"), cat("first"), cat("last"), steps.astype(np.int64),
            int(segment),
        )
    mask = np.asarray(cohort.mask)
    active = active_steps(mask)
    c = mask.shape[0]
    steps = active.sum(axis=1)
    assignment = assign_slots(steps, slots)
    need = max((int(steps[a].sum()) for a in assignment if a), default=0)
    if length is None:
        length = padded_length(need, segment)
    elif length < need or length % tail_unit(segment):
        raise ValueError(
            f"length {length} must be a multiple of {tail_unit(segment)} (segment {segment}) "
            f"that holds {need} steps"
        )
    src_client = np.full((length, slots), -1, np.int64)
    src_step = np.zeros((length, slots), np.int64)
    position = np.full((length, slots), c, np.int32)
    first = np.zeros((length, slots), bool)
    last = np.zeros((length, slots), bool)
    for s, clients in enumerate(assignment):
        t = 0
        for client in clients:
            rows = np.flatnonzero(active[client])
            n = len(rows)
            src_client[t : t + n, s] = client
            src_step[t : t + n, s] = rows
            position[t : t + n, s] = client
            first[t, s] = True
            last[t + n - 1, s] = True
            t += n
    real = src_client >= 0
    sc, ss = np.where(real, src_client, 0), src_step
    out_mask = np.where(real[..., None], mask[sc, ss], 0.0).astype(np.float32)
    index = arrays = None
    if cohort.index is not None:
        index = np.where(out_mask > 0, np.asarray(cohort.index)[sc, ss], 0).astype(np.int32)
    else:
        arrays = {}
        for name, value in cohort.arrays.items():
            value = np.asarray(value)
            picked = value[sc, ss]
            keep = (out_mask > 0).reshape(*out_mask.shape, *([1] * (value.ndim - 3)))
            arrays[name] = np.where(keep, picked, np.zeros((), value.dtype))
    return PackedLayout(
        index, arrays, out_mask, position, first, last, steps.astype(np.int64), int(segment)
    )


def tail_unit(segment: int) -> int:
    """Granularity of a layout's last steps: a quarter segment (see :func:`segment_lengths`)."""
    return max(1, segment // 4)


def segment_lengths(length: int, segment: int) -> list[int]:
    """The calls that run ``length`` steps: full segments, then at most a half and a quarter.

    A round rarely ends on a segment boundary; rounding its last call down to half or quarter
    segments bounds the idle steps by a quarter segment instead of a whole one, for at most two
    more (small) compiled programs.
    """
    unit = tail_unit(segment)
    if length % unit:
        raise ValueError(f"length {length} is not a multiple of {unit}")
    out = [segment] * (length // segment)
    rest = length % segment
    for piece in (segment // 2, unit):
        if piece and rest >= piece:
            out.append(piece)
            rest -= piece
    if rest:
        raise ValueError(f"length {length} does not split into segments of {segment}")
    return out


def padded_length(need: int, segment: int) -> int:
    """The length of a layout holding ``need`` steps (at least one step)."""
    unit = tail_unit(segment)
    return max(1, math.ceil(need / unit)) * unit


def split_layout(layout: PackedLayout) -> list[PackedLayout]:
    """The pieces of ``layout`` that the backend runs one call each (:func:`segment_lengths`)."""
    starts = np.cumsum([0, *segment_lengths(layout.length, layout.segment)])

    def piece(x, i):
        return None if x is None else x[starts[i] : starts[i + 1]]

    return [
        layout._replace(
            index=piece(layout.index, i),
            arrays=None if layout.arrays is None
            else {k: piece(v, i) for k, v in layout.arrays.items()},
            mask=piece(layout.mask, i), position=piece(layout.position, i),
            first=piece(layout.first, i), last=piece(layout.last, i),
        )
        for i in range(len(starts) - 1)
    ]
