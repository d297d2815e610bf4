"""The multi-device backend: the cohort's client axis is sharded over a mesh of devices.

One round is one jitted program: ``shard_map`` gives every device a contiguous block of client
slots, each device runs the vmapped client updates of its block (the same code as
``VmapBackend``), the partial aggregates are ``psum``-reduced over the mesh axis (exact, because
``Algorithm.aggregate`` is additive), and the server update runs replicated on every device.
Client keys are ``split(round_key, C)`` for the whole cohort BEFORE sharding, so the result does
not depend on the number of devices.

The cohort size must be a multiple of the device count (times ``chunk_size``): the backend
exposes it as ``cohort_multiple`` and ``fedjax_lab.runner.run`` pads the cohort with weight-0
client slots. Non-additive algorithms (robust aggregators) are rejected.

Device placement is explicit (device disparity is a classic source of memory bugs): the server
state and the round key are replicated over the mesh, client states and per-client cohort
arrays are sharded along their client axis, and a device-resident example table is replicated
once and reused while the same table is passed. Arrays that are *committed* to a device outside
the mesh are rejected with an error naming the argument (``on_foreign_device="raise"``, the
default) or moved onto the mesh (``on_foreign_device="move"``); they are never mixed silently.

Multi-host use (``jax.distributed``): start one process per host (or per accelerator) with the
same command and configuration, and initialise JAX's distributed runtime before anything else
touches JAX::

    import jax
    jax.distributed.initialize(coordinator_address="host0:1234", num_processes=2,
                               process_id=int(os.environ["RANK"]))  # no arguments on SLURM/TPU
    from fedjax_lab.backends.sharded import ShardedBackend
    backend = ShardedBackend()            # mesh over jax.devices(): every device of every host
    result = fedjax_lab.runner.run(algorithm, backend, data, params, rounds=..., seed=...)

Every process samples and builds the same cohort from the same seed, so host values are turned
into global arrays by letting each process contribute the shards its own devices hold
(``jax.make_array_from_callback``); new client states are all-gathered to every process
(``multihost_utils.process_allgather``) so each host's ``ClientStateStore`` stays complete, and
the server state stays a replicated global array (fetch it on the host with
``jax.experimental.multihost_utils.process_allgather`` before evaluating it with host-local
data). Only ``jax.process_index() == 0`` should write outputs. The test suite runs the
single-process path on 1, 2 and 4 forced host devices and the multi-process path with two CPU
processes of two devices each (``jax.distributed`` with its CPU collectives).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_lab.backends import _shard, packed
from fedjax_lab.backends._checks import require_additive
from fedjax_lab.backends.base import SingleProcessBackend
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
from fedjax_lab.data.packing import PackedLayout, split_layout

ForeignPolicy = Literal["raise", "move"]


class ShardedBackend(SingleProcessBackend):
    """Runs a round with the client axis sharded over ``devices`` (DESIGN.md ``Backend``).

    Args:
      devices: the devices of the 1-D mesh (default: ``jax.devices()``, i.e. every device of
        every process).
      plan: ``vmap`` (vmap over the shard's clients), ``unrolled`` (a traced loop over them with
        unrolled local steps, faster for conv models on CPU) or ``auto`` (as ``VmapBackend``,
        judged on one shard).
      chunk_size: process each shard's clients ``chunk_size`` at a time (``vmap`` plan), which
        bounds per-device memory; the cohort must then be a multiple of devices x chunk.
      unroll_limit: ``auto`` picks ``unrolled`` for conv models on CPU up to this many
        (shard clients x local steps).
      on_foreign_device: what to do with an input array committed to a device outside the mesh:
        ``"raise"`` a ValueError naming it, or ``"move"`` it onto the mesh.
      axis_name: name of the mesh axis the clients are sharded over.
      packing: as ``VmapBackend``'s: each device packs its block of the cohort into its own
        slots (all devices run the same number of segment steps).
    """

    name = "sharded"

    def __init__(
        self,
        devices: Sequence[jax.Device] | None = None,
        *,
        plan: str = "auto",
        chunk_size: int | None = None,
        unroll_limit: int = 128,
        on_foreign_device: ForeignPolicy = "raise",
        axis_name: str = "clients",
        packing: str | packed.PackingPolicy = "auto",
    ) -> None:
        super().__init__()
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise ValueError("devices is empty; pass at least one jax.Device (or None for all)")
        if not all(isinstance(d, jax.Device) for d in devices):
            raise TypeError(
                "devices must be jax.Device objects (e.g. jax.devices()[:2]), got "
                f"{[type(d).__name__ for d in devices]}"
            )
        if len({d.id for d in devices}) != len(devices):
            raise ValueError(f"devices must be distinct, got ids {[d.id for d in devices]}")
        if len({d.platform for d in devices}) != 1:
            raise ValueError(
                f"devices must share one platform, got {sorted({d.platform for d in devices})}"
            )
        _shard.check_plan(plan, chunk_size, self.name)
        if on_foreign_device not in ("raise", "move"):
            raise ValueError(
                f"on_foreign_device must be 'raise' or 'move', got {on_foreign_device!r}"
            )
        self.mesh = Mesh(np.array(devices), (axis_name,))
        self.axis_name = axis_name
        self.plan = plan
        self.chunk_size = chunk_size
        self.unroll_limit = unroll_limit
        self.on_foreign_device = on_foreign_device
        self.replicated = NamedSharding(self.mesh, P())
        self.client_sharded = NamedSharding(self.mesh, P(axis_name))
        self._device_set = frozenset(devices)
        self._vmap = VmapBackend("vmap", chunk_size=chunk_size, packing=packing,
                                 programs=self.programs)
        self._table: tuple[list[Any], Any] | None = None
        self.time_sharded = NamedSharding(self.mesh, P(None, axis_name))

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def packing(self) -> packed.PackingPolicy:
        return self._vmap.packing

    def plan_rounds(self, schedule: list[np.ndarray], padded_steps: list[int]) -> None:
        """Fixes one packed layout for the coming rounds (see ``VmapBackend.plan_rounds``)."""
        self._vmap.plan_rounds(schedule, padded_steps)

    @property
    def cohort_multiple(self) -> int:
        """The runner pads cohorts to a multiple of this (devices x chunk)."""
        return self.num_devices * (self.chunk_size or 1)

    # ------------------------------------------------------------------------------ planning
    def resolve_plan(self, algorithm: Algorithm, server_state: ServerState, cohort: Cohort) -> str:
        """The concrete plan ``auto`` stands for, judged on one device's shard."""
        del algorithm
        c, s = cohort.mask.shape[:2]
        # No 'loop' here: a host loop of per-client jits has no one program to shard.
        return resolve_plan(self.plan, self.chunk_size, self.unroll_limit, server_state.params,
                            c // self.num_devices, s, large_conv_plan="vmap")

    # ------------------------------------------------------------------------------- running
    def run_round(
        self,
        algorithm: Algorithm,
        server_state: ServerState,
        client_states: Any,
        cohort: Cohort,
        key: jax.Array,
    ) -> tuple[ServerState, Any, dict[str, jax.Array]]:
        """Runs one round. ``key`` is the round key; client keys are split before sharding."""
        require_additive(algorithm, self.name)
        validate_round_inputs(algorithm, cohort, None)
        c = cohort.mask.shape[0]
        if c % self.cohort_multiple:
            raise ValueError(
                f"cohort size {c} is not a multiple of {self.cohort_multiple} "
                f"({self.num_devices} devices x chunk_size {self.chunk_size or 1}); build it with "
                "padded_cohort_size(clients_per_round, chunk_size, backend.cohort_multiple) "
                "(fedjax_lab.runner.run does this)"
            )
        server_state = self._place(server_state, self.replicated, "server_state")
        client_states = self._place(client_states, self.client_sharded, "client_states")
        key = self._place(key, self.replicated, "key")
        plan = self.resolve_plan(algorithm, server_state, cohort)
        layout = self._vmap.layout(
            algorithm, server_state, client_states, cohort, plan, groups=self.num_devices
        )
        if layout is None:
            stats = padded_stats(cohort)
            new_server, new_states, metrics = self._compiled(algorithm, plan)(
                server_state, client_states, self._place_cohort(cohort), key
            )
        else:
            # The packed round reads the cohort's index and mask on the host; arrays committed
            # outside the mesh are refused there too, as by the padded program's placement.
            for path, leaf in jax.tree_util.tree_flatten_with_path(cohort)[0]:
                self._check_foreign(leaf, "cohort" + jax.tree_util.keystr(path))
            stats = packed_stats(layout)
            new_server, new_states, metrics = self._compiled(
                algorithm, "packed-" + packing_mode(plan)
            )(server_state, client_states, cohort, key, layout)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            new_states = multihost_utils.process_allgather(new_states, tiled=True)
        return new_server, new_states, {**metrics, **stats}

    def _compiled(self, algorithm: Algorithm, plan: str):
        if plan.startswith("packed-"):
            return self.programs.get(algorithm, "sharded-" + plan, lambda: self._packed(
                algorithm, plan.removeprefix("packed-")))
        return self.programs.get(algorithm, "sharded-" + plan,
                                 lambda: self._build(algorithm, plan))

    def _packed(self, algorithm: Algorithm, mode: str):
        """The packed round: each device runs its block's slots, then finishes its clients."""
        ax, local, counted = self.axis_name, algorithm.client_update, self.programs.counted
        init_fns: dict[int, Any] = {}
        sharded = (self.client_sharded,) * 3
        segment = jax.jit(
            counted("packed_segment", jax.shard_map(
                packed.segment_fn(local, mode, self._vmap.step_unroll),
                mesh=self.mesh,
                in_specs=(P(), P(ax), P(ax), P(ax), P(), *(P(None, ax),) * 5),
                out_specs=(P(ax), P(ax)),
                check_vma=False,  # as in _build: local carries start from replicated values
            )),
            donate_argnums=(2, 3),
        )

        def shard_finish(server_state, client_states, buffer, weight, keys):
            outputs, new_states = packed.finish_clients(
                local, server_state, client_states, buffer, weight, keys
            )
            return jax.lax.psum(algorithm.aggregate(outputs), ax), new_states

        finish_sharded = jax.shard_map(
            shard_finish, mesh=self.mesh, in_specs=(P(), P(ax), P(ax), P(ax), P(ax)),
            out_specs=(P(), P(ax)), check_vma=False,
        )

        def finish_fn(server_state, client_states, buffer, weight, key):
            # The keys of ALL slots, split before sharding: device-count independent.
            keys = client_keys(key, weight.shape[0])
            agg, new_states = finish_sharded(server_state, client_states, buffer, weight, keys)
            new_server, metrics = algorithm.server_update(server_state, agg)
            return new_server, new_states, metrics

        finish = jax.jit(
            counted("packed_finish", finish_fn),
            out_shardings=(self.replicated, self.client_sharded, self.replicated),
        )

        def init(slots):
            if slots not in init_fns:
                fresh = packed.init_fn(local, slots)

                def init_round(server_state, client_states, weight, key):
                    # finish's keys (all slots, split before sharding): step randomness.
                    return fresh(server_state, client_states, weight,
                                 client_keys(key, weight.shape[0]))

                init_fns[slots] = jax.jit(counted("packed_init", init_round),
                                          out_shardings=sharded)
            return init_fns[slots]

        warmed: set[tuple[int, int]] = set()
        devices = self.num_devices

        def warm(server_state, client_states, weight, key, table, layout):
            # As VmapBackend.packed_round: compile every planned layout's segments up front.
            planned = [d for d in self.packing.layouts or () if d.slots] or [
                packed.Decision(layout.slots // devices, layout.segment)
            ]
            for d in planned:
                if (d.slots, d.segment) in warmed:
                    continue
                warmed.add((d.slots, d.segment))
                for length in packed.warm_lengths(d.segment):
                    carry, buffer, ctx = init(d.slots * devices)(
                        server_state, client_states, weight, key)
                    idle = self._place(packed.idle_inputs(
                        layout, d.slots * devices, length, weight.shape[0] // devices),
                        self.time_sharded, "packed segment")
                    segment(server_state, ctx, carry, buffer, table, *idle)

        def round_fn(server_state, client_states, cohort, key, layout: PackedLayout):
            weight = self._place(np.asarray(cohort.weight, np.float32), self.client_sharded,
                                 "cohort.weight")
            table = None if cohort.index is None else self._place_table(cohort.arrays)
            warm(server_state, client_states, weight, key, table, layout)
            carry, buffer, ctx = init(layout.slots)(server_state, client_states, weight, key)
            for piece in split_layout(layout):
                inputs = self._place(packed.segment_inputs(piece), self.time_sharded,
                                     "packed segment")
                carry, buffer = segment(server_state, ctx, carry, buffer, table, *inputs)
            return finish(server_state, client_states, buffer, weight, key)

        return round_fn

    def _build(self, algorithm: Algorithm, plan: str):
        ax, vmap = self.axis_name, self._vmap

        def shard_fn(server_state, client_states, per_client, table, mask, weight, ids, keys):
            indexed = table is not None
            shard = Cohort(
                arrays=table if indexed else per_client,
                index=per_client if indexed else None,
                mask=mask, weight=weight, client_ids=ids,
            )
            agg, new_states = _shard.partial_aggregate(
                vmap, plan, algorithm, server_state, client_states, shard, keys
            )
            return jax.lax.psum(agg, ax), new_states

        sharded_round = jax.shard_map(
            shard_fn,
            mesh=self.mesh,
            in_specs=(P(), P(ax), P(ax), P(), P(ax), P(ax), P(ax), P(ax)),
            out_specs=(P(), P(ax)),
            # Algorithms never see devices: their local loops start from replicated values and
            # carry per-shard ones, which the varying-axis type check would reject. The psum
            # output is replicated by construction.
            check_vma=False,
        )

        def round_fn(server_state, client_states, cohort, key):
            # The keys of ALL slots, split before sharding: device-count independent.
            keys = client_keys(key, cohort.mask.shape[0])
            table = cohort.arrays if cohort.index is not None else None
            per_client = cohort.index if cohort.index is not None else cohort.arrays
            agg, new_states = sharded_round(
                server_state, client_states, per_client, table, cohort.mask, cohort.weight,
                cohort.client_ids, keys,
            )
            new_server, metrics = algorithm.server_update(server_state, agg)
            return new_server, new_states, metrics

        return jax.jit(
            self.programs.counted("padded_round", round_fn),
            out_shardings=(self.replicated, self.client_sharded, self.replicated),
        )

    # ----------------------------------------------------------------------------- placement
    def _place_cohort(self, cohort: Cohort) -> Cohort:
        if cohort.index is not None:
            arrays = self._place_table(cohort.arrays)
            index = self._place(cohort.index, self.client_sharded, "cohort.index")
        else:
            arrays = self._place(cohort.arrays, self.client_sharded, "cohort.arrays")
            index = None
        return Cohort(
            arrays=arrays,
            index=index,
            mask=self._place(cohort.mask, self.client_sharded, "cohort.mask"),
            weight=self._place(cohort.weight, self.client_sharded, "cohort.weight"),
            client_ids=self._place(cohort.client_ids, self.client_sharded, "cohort.client_ids"),
        )

    def _place_table(self, table: Any) -> Any:
        """Replicates the example table once and reuses it while the same arrays come back."""
        leaves = jax.tree.leaves(table)
        if self._table is not None and len(self._table[0]) == len(leaves) and all(
            a is b for a, b in zip(self._table[0], leaves, strict=True)
        ):
            return self._table[1]
        placed = self._place(table, self.replicated, "cohort.arrays")
        self._table = (leaves, placed)
        return placed

    def _place(self, tree: Any, sharding: NamedSharding, what: str) -> Any:
        """Puts every leaf of ``tree`` on the mesh with ``sharding``; see ``on_foreign_device``."""
        paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        placed = [
            self._place_leaf(leaf, sharding, what + jax.tree_util.keystr(path))
            for path, leaf in paths
        ]
        return jax.tree_util.tree_unflatten(treedef, placed)

    def _check_foreign(self, x: Any, what: str) -> None:
        """Raises for an array committed outside the mesh (``on_foreign_device="raise"``)."""
        if (
            isinstance(x, jax.Array) and x.committed
            and not x.sharding.device_set <= self._device_set
            and self.on_foreign_device == "raise"
        ):
            raise ValueError(
                f"{what} is committed to device(s) "
                f"{sorted(d.id for d in x.sharding.device_set)} but this ShardedBackend's "
                f"mesh is devices {sorted(d.id for d in self._device_set)}; move it with "
                "jax.device_put(x, backend.replicated) (or backend.client_sharded for "
                "per-client arrays), or build the backend with on_foreign_device='move'"
            )

    def _place_leaf(self, x: Any, sharding: NamedSharding, what: str) -> jax.Array:
        self._check_foreign(x, what)
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if sharding.is_fully_addressable:
                return jax.device_put(x, sharding)
            if not x.is_fully_addressable:
                raise ValueError(
                    f"{what} is a global array sharded as {x.sharding}, which does not match "
                    f"the backend's {sharding}; reshard it with jax.device_put before the round"
                )
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                data = _global_from_host(np.asarray(jax.random.key_data(x)), sharding)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            return _global_from_host(np.asarray(x), sharding)
        if sharding.is_fully_addressable:
            return jax.device_put(np.asarray(x), sharding)
        return _global_from_host(np.asarray(x), sharding)


def _global_from_host(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value that every process holds identically (multi-process):
    each process contributes the shards its own devices hold."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
