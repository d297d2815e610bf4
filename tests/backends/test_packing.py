"""Packed rounds: clients back to back in slots equal the padded program, for every algorithm.

The padded ``[C, S, B]`` program (``packing="off"``) is the reference: the packed layout must give
the same server state, metrics and client states (to 1e-5: only float summation order differs)
with clients of very different sizes, several clients per slot, segments that cut clients, and
every kind of algorithm (stateless, optimizer state, stateful clients, per-step context,
non-additive aggregation, stochastic compression).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import (
    dp_fedavg,
    fedavg,
    fednova,
    fedopt,
    fedpaq,
    fedprox,
    scaffold,
)
from fedjax_lab.algorithms.robust import median, with_aggregator
from fedjax_lab.backends import packed
from fedjax_lab.backends.packed import CostModel, PackingPolicy
from fedjax_lab.backends.sharded import ShardedBackend
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd, top_k, with_error_feedback
from fedjax_lab.core.local import LocalUpdate, is_local_update
from fedjax_lab.core.types import Cohort
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.packing import (
    assign_slots,
    makespan,
    pack,
    padded_length,
    segment_lengths,
    split_layout,
)
from fedjax_lab.runner import ClientStateStore, run
from fedjax_lab.systems.availability import Availability
from tests.helpers import LinearModel, make_population, persistent_compilation_cache

MODEL = LinearModel(dim=5, classes=3)
# One example next to a thousand (batch 8: 1 step next to 125), several clients per slot.
SIZES = [1, 1000, 3, 37, 9, 120, 2, 64]


def _algorithms():
    sgd = optax.sgd(0.05)
    return {
        "fedavg": fedavg(MODEL, sgd, batch_size=8),
        "fedavg_momentum_2_epochs": fedavg(MODEL, optax.sgd(0.05, momentum=0.9), batch_size=8,
                                           local_epochs=2),
        "fedprox": fedprox(MODEL, sgd, mu=0.5, batch_size=8),
        "fedadam": fedopt(MODEL, sgd, optax.adam(0.01), batch_size=8),
        "fedpaq_steps": fedpaq(MODEL, sgd, num_steps=6, batch_size=8,
                               compressor=qsgd(num_levels=2)),
        "fednova": fednova(MODEL, 0.05, batch_size=8, client_momentum=0.5),
        "scaffold_topk": scaffold(MODEL, 0.05, num_clients=len(SIZES), batch_size=8,
                                  compressor=top_k(k=4)),
        "ef_qsgd": fedavg(MODEL, sgd, batch_size=8,
                          compressor=with_error_feedback(qsgd(num_levels=2))),
        "dp_fedavg": dp_fedavg(MODEL, sgd, batch_size=8, clip_norm=0.5, noise_multiplier=0.3,
                               clients_per_round=5, key=jax.random.key(7)),
        "median": with_aggregator(fedavg(MODEL, sgd, batch_size=8), median()),
    }


ALGORITHMS = _algorithms()
# Steps that cost only their compute (no per-step or per-call overhead): for this cost model the
# cheapest layout is the one that wastes least. The platform's model, for the tiny test model,
# rightly finds overheads dominant and may prefer wider, less full layouts.
COMPUTE_BOUND = CostModel(1e10, 1e10, step_seconds=0.0, call_seconds=0.0, compile_seconds=2.0)


def _run(alg, backend, *, rounds=3, availability=None, sizes=SIZES, cpr=5, **kw):
    params = MODEL.init(jax.random.key(0))
    store = ClientStateStore(alg.client_init(params))
    result = run(alg, backend, make_population(sizes, seed=1), params, rounds=rounds,
                 clients_per_round=cpr, seed=2, client_store=store, availability=availability,
                 **kw)
    return result, store


def _assert_same_run(ref, got):
    (ref_result, ref_store), (got_result, got_store) = ref, got
    chex.assert_trees_all_close(got_result.server_state, ref_result.server_state, rtol=1e-5,
                                atol=1e-5)
    skip = {"round_seconds", "computed_steps", "packed_slots"}
    for a, b in zip(ref_result.history, got_result.history, strict=True):
        assert set(a) == set(b)
        for k in set(a) - skip:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k
    assert set(got_store.states) == set(ref_store.states)
    for cid, state in ref_store.states.items():
        chex.assert_trees_all_close(got_store.states[cid], state, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """Identical programs compiled again in this module (the padded reference rounds rebuilt by
    new backends, the same packed layouts under both cost models) load from a persistent XLA
    cache instead of compiling: speed only, every comparison and trace count is unchanged."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


@pytest.fixture(scope="module")
def padded_runs():
    return {name: _run(alg, VmapBackend("vmap", packing="off"))
            for name, alg in ALGORITHMS.items()}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_packed_equals_padded_for_every_algorithm(padded_runs, name):
    alg = ALGORITHMS[name]
    assert is_local_update(alg.client_update)
    backend = VmapBackend("vmap", packing=PackingPolicy(slots=2, segment_steps=5))
    got = _run(alg, backend)
    _assert_same_run(padded_runs[name], got)
    assert all(h["packed_slots"] == 2 for h in got[0].history)
    if alg.data_spec.num_steps is None:  # fixed-step clients all take the same steps
        # 5 clients in 2 slots: slots held several clients (far fewer slot-steps than padding).
        assert got[0].computed_steps < 0.6 * padded_runs[name][0].computed_steps


@pytest.mark.parametrize("name", ["fedavg_momentum_2_epochs", "scaffold_topk", "ef_qsgd"])
def test_unrolled_packing_equals_padded(padded_runs, name):
    backend = VmapBackend("loop", packing=PackingPolicy(slots=1, segment_steps=4))
    _assert_same_run(padded_runs[name], _run(ALGORITHMS[name], backend))


@pytest.mark.parametrize("name", ["fedavg", "scaffold_topk", "fednova"])
def test_packing_with_dropouts_and_stragglers_equals_padded(name):
    avail = Availability(dropout=0.2, straggler_fraction=0.5, straggler_policy="partial")
    alg = ALGORITHMS[name]
    ref = _run(alg, VmapBackend("vmap", packing="off"), rounds=4, availability=avail)
    got = _run(alg, VmapBackend("vmap", packing=PackingPolicy(slots=3, segment_steps=3)),
               rounds=4, availability=avail)
    _assert_same_run(ref, got)
    assert sum(h["stragglers"] for h in got[0].history) > 0
    assert sum(h["dropped"] for h in got[0].history) > 0


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("name", ["ef_qsgd", "scaffold_topk"])
def test_sharded_packing_equals_padded_vmap(padded_runs, devices, name):
    backend = ShardedBackend(jax.devices()[:devices],
                             packing=PackingPolicy(slots=1, segment_steps=4))
    got = _run(ALGORITHMS[name], backend)
    _assert_same_run(padded_runs[name], got)
    assert all(h["packed_slots"] == devices for h in got[0].history)


def test_auto_fixes_one_layout_and_packs_a_skewed_run():
    # Six rounds of a tiny model save less than one compile: make compiles free here.
    cost = dataclasses.replace(COMPUTE_BOUND, compile_seconds=0.0)
    backend = VmapBackend("vmap", packing=PackingPolicy(cost=cost, max_layouts=1))
    result, _ = _run(ALGORITHMS["fedavg"], backend, rounds=6)
    slots = {h["packed_slots"] for h in result.history}
    assert len(slots) == 1 and slots.pop() >= 1  # one packed layout for the whole run
    assert result.padding_efficiency > 0.85
    # finish + init + the segment lengths used (full, half, quarter)
    assert result.compiles["packed_finish"] == result.compiles["packed_init"] == 1
    assert 1 <= result.compiles["packed_segment"] <= 3
    # The padded program would have computed ~C x S_round: far more.
    padded, _ = _run(ALGORITHMS["fedavg"], VmapBackend("vmap", packing="off"), rounds=6)
    assert padded.padding_efficiency < 0.5


def test_auto_keeps_the_padded_program_for_equal_clients():
    backend = VmapBackend("vmap")
    result, _ = _run(ALGORITHMS["fedavg"], backend, sizes=[40] * 8)
    assert {h["packed_slots"] for h in result.history} == {0.0}
    assert result.padding_efficiency == 1.0
    assert dict(backend.compiles) == {"padded_round": 1}


@pytest.fixture(scope="module")
def heavy_tailed():
    """A heavy-tailed population and its padded 100-round run, the reference for both cost
    models below (the same run either way: computed once)."""
    sizes = np.random.default_rng(3).lognormal(3.0, 1.8, 300).astype(int) + 1
    data = make_population(list(sizes), seed=4)
    assert sizes.max() > 100 * np.median(sizes)  # heavy-tailed
    params = MODEL.init(jax.random.key(0))
    alg = fedavg(MODEL, optax.sgd(0.05), batch_size=8)
    padded = run(alg, VmapBackend("vmap", packing="off"), data, params, rounds=100,
                 clients_per_round=10, seed=0)
    return data, params, alg, padded


@pytest.mark.parametrize("cost", [None, COMPUTE_BOUND], ids=["platform-cost", "compute-bound"])
def test_heavy_tailed_100_round_run_compiles_a_bounded_number_of_programs(cost, heavy_tailed):
    data, params, alg, padded = heavy_tailed
    traced = alg._replace(client_update=LocalUpdate(
        alg.client_update.start, chex.assert_max_traces(alg.client_update.step, n=8),
        alg.client_update.finish))
    backend = VmapBackend("vmap", packing=PackingPolicy(cost=cost))
    result = run(traced, backend, data, params, rounds=100, clients_per_round=10, seed=0)
    assert sum(result.compiles.values()) <= 8
    assert result.computed_steps < 0.7 * padded.computed_steps  # the ladder alone wastes more
    if cost is COMPUTE_BOUND:
        assert result.padding_efficiency >= 0.85


def test_memory_is_bounded_by_slots_not_by_the_largest_client():
    """The packed programs' shapes (hence their compiled memory) do not depend on how large the
    largest client is; the padded program's inputs grow with it."""

    def programs(sizes):
        data = make_population(sizes, seed=0)
        table = sum(v.nbytes for v in data.arrays.values())
        alg = ALGORITHMS["ef_qsgd"]
        params = MODEL.init(jax.random.key(0))
        state = alg.init(params)
        states = ClientStateStore(alg.client_init(params)).gather(list(range(len(sizes))))
        cohort = CohortBuilder(data, batch_size=8, local_epochs=1, cohort_size=len(sizes),
                               seed=0).build(0, np.arange(len(sizes)))
        layout = pack(cohort, 2, 4)
        local = alg.client_update
        keys = jax.random.split(jax.random.key(0), len(sizes))
        init = jax.jit(packed.init_fn(local, 2)).lower(state, states, cohort.weight,
                                                       keys).compile()
        carry, buffer, ctx = jax.eval_shape(packed.init_fn(local, 2), state, states,
                                            cohort.weight, keys)
        seg = jax.jit(packed.segment_fn(local, "vmap")).lower(
            state, ctx, carry, buffer, cohort.arrays,
            *packed.segment_inputs(split_layout(layout)[0])).compile()
        padded = VmapBackend("vmap", packing="off")._compiled(alg, "vmap").lower(
            state, states, cohort, jax.random.key(0)).compile()

        def total(c, with_table):
            m = c.memory_analysis()
            return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                    - (table if with_table else 0))

        return total(init, False) + total(seg, True), total(padded, True)

    # The same 4,018 examples: four similar clients, or one of 4,000 among tiny ones. Compiled
    # here, not loaded from the module's XLA cache: the memory analysis of fresh compilations.
    with persistent_compilation_cache(None):
        small_packed, small_padded = programs([1000, 1006, 1006, 1006])
        large_packed, large_padded = programs([4, 4000, 5, 9])
    assert large_packed == small_packed
    assert large_padded > 3 * small_padded


# ---------------------------------------------------------------------------- host packing
def test_assign_slots_is_longest_first_and_deterministic():
    steps = np.array([3, 10, 1, 7, 7, 0, 2])
    slots = assign_slots(steps, 3)
    assert slots == [[1, 0], [3, 2, 6], [4]] or slots == assign_slots(steps, 3)
    assert slots[0][0] == 1  # the longest client goes first
    assert sorted(c for s in slots for c in s) == [0, 1, 2, 3, 4, 6]  # 0-step client 5 is out
    loads = sorted(int(steps[s].sum()) for s in slots)
    assert loads == sorted(loads) and max(loads) == makespan(steps, 3) == 10
    assert assign_slots(steps, 3) == slots


def test_pack_runs_each_clients_real_steps_in_order():
    data = make_population([5, 30, 2, 9], seed=0)
    builder = CohortBuilder(data, batch_size=4, local_epochs=2, cohort_size=5, seed=1,
                            device_table=True)
    cohort = builder.build(3, [0, 1, 2, 3])
    cohort = cohort._replace(mask=cohort.mask.copy())
    cohort.mask[0, 1:] = 0  # a straggler cut after one step: its later steps are not packed
    layout = pack(cohort, 2, 5)
    assert layout.slots == 2 and layout.length == sum(segment_lengths(layout.length, 5))
    np.testing.assert_array_equal(layout.client_steps, [1, 16, 2, 6, 0])
    for c in range(4):
        where = np.argwhere(layout.position == c)
        t, s = where[:, 0], where[:, 1]
        assert len(set(s)) == 1  # one client never changes slot
        assert np.all(np.diff(t) == 1)  # its steps are consecutive
        assert layout.first[t[0], s[0]] and layout.last[t[-1], s[0]]
        assert layout.first[t, s].sum() == 1 and layout.last[t, s].sum() == 1
        real = np.flatnonzero(cohort.mask[c].sum(axis=1) > 0)
        np.testing.assert_array_equal(layout.index[t, s], cohort.index[c, real])
        np.testing.assert_array_equal(layout.mask[t, s], cohort.mask[c, real])
    idle = layout.position == 5
    assert not layout.mask[idle].any() and not layout.first[idle].any()
    assert layout.real_steps == 25 and layout.computed_steps == 2 * layout.length


def test_pack_groups_keep_positions_within_each_block():
    data = make_population([5, 30, 2, 9], seed=0)
    cohort = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=4, seed=1,
                           device_table=False).build(0, [0, 1, 2, 3])
    layout = pack(cohort, 1, 2, groups=2)
    # steps 2, 8 | 1, 3: block 0's slot runs 10 steps, block 1's 4, then idles.
    assert layout.slots == 2 and layout.length == 10
    np.testing.assert_array_equal(layout.position[:, 1], [1] * 3 + [0] + [2] * 6)
    assert set(np.unique(layout.position[:, 0])) <= {0, 1, 2}
    assert set(np.unique(layout.position[:, 1])) <= {0, 1, 2}
    with pytest.raises(ValueError, match="groups must be a positive divisor"):
        pack(cohort, 1, 2, groups=3)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"packing": "sometimes"}, "packing must be one of"),
        ({"slots": 0}, "slots must be a positive integer"),
        ({"segment_steps": -1}, "segment_steps must be a positive integer"),
        ({"packing": "off", "slots": 2}, "contradict packing='off'"),
        ({"cost": "fast"}, "cost must be a CostModel"),
    ],
    ids=["mode", "slots0", "segment-1", "off+slots", "cost"],
)
def test_policy_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PackingPolicy(**kwargs)


def test_cost_model_rejects_non_finite_numbers():
    with pytest.raises(ValueError, match="call_seconds must be a finite number"):
        CostModel(1e10, 1e10, 1e-6, float("nan"), 1.0)


def test_more_slots_than_clients_is_refused_before_compiling():
    backend = VmapBackend("vmap", packing=PackingPolicy(slots=9))
    with pytest.raises(ValueError, match="slots=9 is more than the 5 client slots"):
        _run(ALGORITHMS["fedavg"], backend)
    assert not backend.compiles


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_examples_per_client": 0}, "max_examples_per_client must be a positive integer"),
        ({"max_local_steps": -2}, "max_local_steps must be a positive integer"),
        ({"max_local_steps": 1.5}, "max_local_steps must be a positive integer"),
        ({"step_ladder": 1.0}, "ladder must be a finite ratio > 1"),
    ],
    ids=["examples0", "steps-2", "steps-float", "ladder1"],
)
def test_run_rejects_bad_caps_before_compiling(kwargs, match):
    backend = VmapBackend("vmap")
    with pytest.raises(ValueError, match=match):
        _run(ALGORITHMS["fedavg"], backend, **kwargs)
    assert not backend.compiles


def test_a_layout_that_cannot_hold_a_client_is_refused():
    builder = CohortBuilder(make_population([3, 40]), batch_size=4, local_epochs=1,
                            cohort_size=2, seed=0)
    with pytest.raises(ValueError, match="client 1 takes 10 local steps; 4 cannot hold them"):
        builder.client_index(1, 0, steps=4)
    cohort = builder.build(0, [0, 1])
    with pytest.raises(ValueError, match=r"length 8 must be a multiple of 1 \(segment 4\) that "
                                         "holds 11 steps"):
        pack(cohort, 1, 4, length=8)


def test_step_is_a_no_op_on_a_fully_masked_batch():
    for name, alg in ALGORITHMS.items():
        local = alg.client_update
        params = MODEL.init(jax.random.key(1))
        state = alg.init(params)
        client_state = alg.client_init(params)
        carry = local.start(state)
        ctx = local.client_context(state, client_state, jax.random.key(2))
        arrays = {"x": jnp.ones((8, 5)), "y": jnp.zeros(8, jnp.int32)}
        after = local.step(state, ctx, carry, arrays, jnp.zeros(8))
        chex.assert_trees_all_equal(after, carry, custom_message=name)


def test_a_wrapped_client_update_falls_back_to_the_padded_program(padded_runs):
    alg = ALGORITHMS["fedavg"]
    opaque = alg._replace(client_update=lambda *a, **k: alg.client_update(*a, **k))
    backend = VmapBackend("vmap", packing="on")
    result, _ = _run(opaque, backend)
    assert {h["packed_slots"] for h in result.history} == {0.0}
    ref, _ = padded_runs["fedavg"]  # the same padded fedavg run (_run's defaults)
    chex.assert_trees_all_close(result.server_state, ref.server_state, rtol=1e-6)


def test_cohort_type_is_unchanged_for_callers():
    cohort = CohortBuilder(make_population([4, 6]), batch_size=2, local_epochs=1, cohort_size=2,
                           seed=0).build(0, [0, 1])
    assert isinstance(cohort, Cohort) and cohort.index.shape == (2, 3, 2)


@pytest.mark.parametrize("packing", ["off", "on"])
def test_a_non_finite_example_rejects_only_its_own_client(packing):
    """Padded positions read table row 0; a NaN there must not reject the other clients."""
    data = make_population([3, 9, 14, 5], seed=0)
    data.arrays["x"][0, 0] = np.nan  # client 0's first example
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=4)
    result = run(alg, VmapBackend("vmap", packing=packing), data, MODEL.init(jax.random.key(0)),
                 rounds=1, clients_per_round=4, seed=0)
    assert result.history[0]["rejected"] == 1.0
    assert np.isfinite(result.history[0]["train_loss"])


def test_a_rounds_last_call_is_a_half_or_quarter_segment():
    assert segment_lengths(64, 16) == [16] * 4
    assert segment_lengths(60, 16) == [16, 16, 16, 8, 4]
    assert segment_lengths(12, 16) == [8, 4]
    assert segment_lengths(7, 4) == [4, 2, 1]
    assert padded_length(61, 16) == 64 and padded_length(57, 16) == 60
    assert padded_length(0, 16) == 4  # a round with no real step still runs one small call
    for need in range(1, 200):
        length = padded_length(need, 32)
        assert need <= length < need + 8 and sum(segment_lengths(length, 32)) == length
    with pytest.raises(ValueError, match="not a multiple of 4"):
        segment_lengths(10, 16)
