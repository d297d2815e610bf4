"""The sharded backend equals vmap on 1, 2 and 4 devices and never mixes devices silently."""

import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.backends.sharded import ShardedBackend
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd, with_error_feedback
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.experiment import build_backend, main, run_fedavg_experiment
from fedjax_lab.runner import ClientStateStore, run
from fedjax_lab.train import FedAvgConfig
from tests.helpers import LAYOUT_FIELDS, LinearModel, make_population

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = LinearModel(dim=5, classes=3)
SIZES = (4, 9, 2, 7, 5, 11, 3, 6)
CPR = 5  # not a multiple of 2 or 4: the runner pads with weight-0 slots
TIMINGS = {"round_seconds", "wall_time"} | LAYOUT_FIELDS


def _stateful_stochastic():
    # QSGD draws from the client keys and error feedback keeps a per-client residual, so this
    # checks both the key split before sharding and the client-state layout.
    return fedavg(MODEL, optax.sgd(0.3, momentum=0.5), batch_size=3, local_epochs=1,
                  compressor=with_error_feedback(qsgd(num_levels=2)))


def _run(alg, backend, chunk=None, device_table=True, rounds=3):
    params = MODEL.init(jax.random.key(0))
    store = ClientStateStore(alg.client_init(params))
    result = run(alg, backend, make_population(list(SIZES), seed=2), params, rounds=rounds,
                 clients_per_round=CPR, seed=0, device_table=device_table,
                 client_store=store)
    return result, store


@pytest.fixture(scope="module")
def reference():
    return _run(_stateful_stochastic(), VmapBackend("vmap"))


def _assert_same_run(ref, got):
    (ref_res, ref_store), (res, store) = ref, got
    chex.assert_trees_all_close(ref_res.server_state.params, res.server_state.params, atol=1e-5)
    assert len(ref_res.history) == len(res.history)
    for a, b in zip(ref_res.history, res.history, strict=True):
        for k in a.keys() - TIMINGS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k
    assert sorted(ref_store.states) == sorted(store.states)
    for cid, state in ref_store.states.items():
        chex.assert_trees_all_close(state, store.states[cid], atol=1e-5)


@pytest.mark.parametrize(
    ("num_devices", "plan", "device_table"),
    [(1, "vmap", True), (2, "vmap", True), (4, "vmap", False), (2, "unrolled", True)],
    ids=["1dev", "2dev", "4dev-host-arrays", "2dev-unrolled"],
)
def test_equals_vmap_for_any_device_count(reference, num_devices, plan, device_table):
    backend = ShardedBackend(jax.devices()[:num_devices], plan=plan)
    assert backend.cohort_multiple == num_devices
    got = _run(_stateful_stochastic(), backend, device_table=device_table)
    _assert_same_run(reference, got)
    assert all(h["clients"] == CPR for h in got[0].history)  # padded slots are not clients


def test_chunked_shards_equal_vmap(reference):
    backend = ShardedBackend(jax.devices()[:2], plan="vmap", chunk_size=2)
    assert backend.cohort_multiple == 4
    _assert_same_run(reference, _run(_stateful_stochastic(), backend, chunk=2))


def _one_round(alg, backend, cohort_size, place=None):
    data = make_population(list(SIZES), seed=2)
    params = MODEL.init(jax.random.key(0))
    state = alg.init(params)
    cohort = CohortBuilder(data, batch_size=3, local_epochs=1, cohort_size=cohort_size,
                           seed=0).build(0, [1, 2, 3])
    init = alg.client_init(params)
    client_states = jax.tree.map(lambda x: np.stack([np.asarray(x)] * cohort_size), init)
    if place is not None:
        state, client_states, cohort = place(state, client_states, cohort)
    return backend.run_round(alg, state, client_states, cohort, jax.random.key(7))


MESH = jax.devices()[:2]
FOREIGN = jax.devices()[3]


@pytest.fixture(scope="module")
def one_round():
    """One algorithm object and backends shared by the placement tests (one compile each).

    The padded program: these tests place every input of it (packed rounds read the cohort's
    index and mask on the host; test_packed_round_rejects_foreign_arrays covers them).
    """
    alg = _stateful_stochastic()
    ref = _computed(_one_round(alg, VmapBackend("vmap", packing="off"), 4))
    return alg, ref, ShardedBackend(MESH, plan="vmap", packing="off"), ShardedBackend(
        MESH, plan="vmap", on_foreign_device="move", packing="off")


def _computed(out):
    """A round's outputs on the host, without the layout fields of its metrics."""
    state, states, metrics = jax.device_get(out)
    return state, states, {k: v for k, v in metrics.items() if k not in LAYOUT_FIELDS}


def test_outputs_live_on_the_mesh_with_the_documented_shardings(one_round):
    alg, ref, backend, _ = one_round
    out = _one_round(alg, backend, 4)
    chex.assert_trees_all_close(_computed(out), ref, atol=1e-5)
    state, states, metrics = out
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.device_set == set(MESH)
        assert leaf.sharding.is_fully_replicated
    for leaf in jax.tree.leaves(states):
        assert leaf.sharding.device_set == set(MESH)
        assert [s.data.shape[0] for s in leaf.addressable_shards] == [2, 2]  # 4 slots / 2 devs
    assert all(m.sharding.is_fully_replicated for m in metrics.values()
               if isinstance(m, jax.Array))  # (layout counts are host floats)


@pytest.mark.parametrize("packing", ["off", "on"])
def test_bounded_compiles_per_run(packing):
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=3)
    backend = ShardedBackend(MESH, plan="vmap", packing=packing)
    result = run(alg, backend, make_population([1, 12, 4, 9, 2], seed=3),
                 MODEL.init(jax.random.key(0)), rounds=4, clients_per_round=3, seed=1)
    assert len({h["train_examples"] for h in result.history}) > 1
    # padded: one program per ladder rung (S_max = 4: rungs 4, 2, 1); packed: one finish, an
    # init per slot count and up to three segment lengths per layout of the run.
    if packing == "off":
        assert sum(backend.compiles.values()) <= 3
    else:
        layouts = backend.packing.layouts
        assert backend.compiles["packed_finish"] == 1
        assert backend.compiles["packed_init"] <= len({d.slots for d in layouts})
        assert backend.compiles["packed_segment"] <= 3 * len(layouts)


def test_empty_and_scalar_parameter_leaves():
    # A size-0 leaf and a scalar leaf ride along (zero gradient) through placement, shard_map
    # and the psum exactly as on vmap.
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=3)
    params = {**MODEL.init(jax.random.key(0)), "empty": np.zeros((0, 3), np.float32),
              "scalar": np.float32(1.5)}
    data = make_population(list(SIZES), seed=2)
    ref = run(alg, VmapBackend("vmap"), data, params, rounds=1, clients_per_round=CPR, seed=0)
    got = run(alg, ShardedBackend(MESH, plan="vmap"), data, params, rounds=1,
              clients_per_round=CPR, seed=0)
    chex.assert_trees_all_close(got.server_state, ref.server_state, atol=1e-5)
    assert got.server_state.params["empty"].shape == (0, 3)
    assert got.server_state.params["scalar"].shape == ()


def _server_on_foreign(state, states, cohort):
    return jax.device_put(state, FOREIGN), states, cohort


def _states_on_foreign(state, states, cohort):
    return state, jax.device_put(states, FOREIGN), cohort


def _mask_on_foreign(state, states, cohort):
    return state, states, cohort._replace(mask=jax.device_put(cohort.mask, FOREIGN))


def _table_on_foreign(state, states, cohort):
    return state, states, cohort._replace(arrays=jax.device_put(cohort.arrays, FOREIGN))


@pytest.mark.parametrize(
    ("place", "name"),
    [(_server_on_foreign, r"server_state\.params\['b'\]"),
     (_states_on_foreign, r"client_states\.residual\['b'\]"),
     (_mask_on_foreign, r"cohort\.mask"),
     (_table_on_foreign, r"cohort\.arrays\['x'\]")],
    ids=["server-state", "client-states", "cohort-mask", "cohort-table"],
)
def test_arrays_on_devices_outside_the_mesh_are_rejected_or_moved(one_round, place, name):
    alg, ref, raising, moving = one_round
    with pytest.raises(ValueError, match=name + r" is committed to device\(s\) \[3\] but this "
                       r"ShardedBackend's mesh is devices \[0, 1\]"):
        _one_round(alg, raising, 4, place)
    moved = _one_round(alg, moving, 4, place)
    chex.assert_trees_all_close(_computed(moved), ref, atol=1e-5)
    for leaf in jax.tree.leaves(moved):
        if isinstance(leaf, jax.Array):  # (layout counts are host floats)
            assert leaf.sharding.device_set == set(MESH)


@pytest.mark.parametrize(
    ("place", "name"),
    [(_server_on_foreign, r"server_state\.params\['b'\]"),
     (_mask_on_foreign, r"cohort\.mask"),
     (_table_on_foreign, r"cohort\.arrays\['x'\]")],
    ids=["server-state", "cohort-mask", "cohort-table"],
)
def test_packed_round_rejects_foreign_arrays(place, name):
    alg = _stateful_stochastic()
    backend = ShardedBackend(MESH, plan="vmap", packing=PackingPolicy(slots=1))
    with pytest.raises(ValueError, match=name + r" is committed to device\(s\) \[3\]"):
        _one_round(alg, backend, 4, place)
    assert not backend.compiles


def test_arrays_committed_inside_the_mesh_are_resharded_not_rejected(one_round):
    alg, ref, raising, _ = one_round

    def inside_mesh(state, states, cohort):
        return jax.device_put(state, MESH[1]), jax.device_put(states, MESH[0]), cohort

    got = _one_round(alg, raising, 4, inside_mesh)
    chex.assert_trees_all_close(_computed(got), ref, atol=1e-5)


def test_non_additive_algorithm_is_rejected_before_compiling():
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=3)._replace(additive=False, name="median")
    with pytest.raises(ValueError, match=r"'median' has a non-additive aggregate"):
        _one_round(alg, ShardedBackend(MESH), 4)


def test_cohort_not_a_multiple_of_the_device_count_is_rejected():
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=3)
    with pytest.raises(ValueError, match=r"cohort size 3 is not a multiple of 2 \(2 devices"):
        _one_round(alg, ShardedBackend(MESH), 3)
    with pytest.raises(ValueError, match=r"cohort size 4 is not a multiple of 6 \(2 devices x "
                       r"chunk_size 3\)"):
        _one_round(alg, ShardedBackend(MESH, plan="vmap", chunk_size=3), 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [({"devices": []}, ValueError, "devices is empty"),
     ({"devices": [0, 1]}, TypeError, "devices must be jax.Device objects"),
     ({"devices": "dup"}, ValueError, r"devices must be distinct, got ids \[0, 0\]"),
     ({"plan": "loop"}, ValueError, "plan must be one of .*'loop' runs clients from a host loop"),
     ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer"),
     ({"plan": "unrolled", "chunk_size": 2}, ValueError, "chunk_size only applies to the 'vmap'"),
     ({"on_foreign_device": "ignore"}, ValueError, "on_foreign_device must be 'raise' or 'move'")],
    ids=["empty", "not-devices", "duplicates", "loop-plan", "chunk0", "chunk-unrolled",
         "policy"],
)
def test_bad_constructor_arguments(kwargs, error, message):
    if kwargs.get("devices") == "dup":
        kwargs = {"devices": [jax.devices()[0]] * 2}
    with pytest.raises(error, match=message):
        ShardedBackend(**kwargs)


def test_auto_plan_is_judged_on_one_shard():
    conv = {"k": np.zeros((3, 3, 1, 4), np.float32)}
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=3)
    state = alg.init(conv)
    cohort = CohortBuilder(make_population([6] * 8), batch_size=3, local_epochs=1,
                           cohort_size=8, seed=0).build(0, range(8))  # 8 clients x 2 steps
    assert ShardedBackend(jax.devices()[:1], unroll_limit=8).resolve_plan(alg, state, cohort) \
        == "vmap"
    assert ShardedBackend(jax.devices()[:2], unroll_limit=8).resolve_plan(alg, state, cohort) \
        == "unrolled"
    dense = alg.init(MODEL.init(jax.random.key(0)))
    assert ShardedBackend(jax.devices()[:2], unroll_limit=8).resolve_plan(alg, dense, cohort) \
        == "vmap"


# Two processes that must meet at a coordinator within a timeout: run alone.
@pytest.mark.serial
def test_two_processes_with_jax_distributed_equal_vmap(reference, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    script = os.path.join(ROOT, "tests", "backends", "sharded_multiprocess_job.py")
    procs = [subprocess.Popen([sys.executable, script, str(pid), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in (0, 1)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    ref_res, ref_store = reference
    for pid in (0, 1):
        got = dict(np.load(tmp_path / f"process{pid}.npz"))
        chex.assert_trees_all_close(got["w"], ref_res.server_state.params["w"], atol=1e-5)
        chex.assert_trees_all_close(got["b"], ref_res.server_state.params["b"], atol=1e-5)
        np.testing.assert_allclose(got["train_loss"],
                                   [h["train_loss"] for h in ref_res.history], rtol=1e-5)
        assert sorted(got["store_ids"].tolist()) == sorted(ref_store.states)


def test_cli_builds_the_sharded_backend_and_rejects_the_loop_plan(capsys, tmp_path):
    backend = build_backend(FedAvgConfig(backend="sharded", plan="vmap", chunk_size=2))
    assert isinstance(backend, ShardedBackend)
    assert (backend.num_devices, backend.plan, backend.cohort_multiple) == (4, "vmap", 8)
    code = main(FedAvgConfig, run_fedavg_experiment,
                ["--backend", "sharded", "--plan", "loop", "--out", str(tmp_path)])
    assert code == 2
    assert "--plan loop runs clients from a host loop and cannot be sharded" in \
        capsys.readouterr().err
