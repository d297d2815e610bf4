"""Checkpoint/resume: exact round trips, refusals, and killed runs resumed bit-identically."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd, with_error_feedback
from fedjax_lab.core.types import ServerState
from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.io.checkpoint import Checkpointer, RunCheckpointing
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.runner import ClientStateStore, run
from fedjax_lab.train import FedAvgConfig
from tests.helpers import (
    CKPT_FLAGS as FLAGS,
)
from tests.helpers import (
    KILL_AFTER,
    LinearModel,
    experiment_server_state,
    make_population,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIME_FIELDS = ("round_seconds", "wall_time")


def _server_state():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "empty": jnp.zeros((0, 4)),
              "b": jnp.float32(-2.5)}
    opt = optax.adam(1e-3)
    return ServerState(params, opt.init(params), jnp.int32(7), extra=(jnp.int32(3),))


def _store():
    initial = {"residual": np.zeros((2, 3), np.float32), "none": np.zeros((0,), np.float32),
               "count": np.int32(0)}
    store = ClientStateStore(initial)
    for cid in (5, 0, 12):
        store.states[cid] = {"residual": np.full((2, 3), cid + 0.5, np.float32),
                             "none": np.zeros((0,), np.float32), "count": np.int32(cid)}
    return store


def test_round_trip_is_exact(tmp_path):
    state, store = _server_state(), _store()
    history = [{"round": 1, "train_loss": 0.5}, {"round": 2, "train_loss": float("nan")}]
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(2, state, store, history, {"seed": 1})
    fresh = ClientStateStore(store.initial)
    template = jax.tree.map(jnp.zeros_like, state)
    restored = ckpt.restore(template, fresh)
    ckpt.close()
    assert restored.rounds_done == 2 and restored.config == {"seed": 1}
    assert restored.history == [history[0], {"round": 2, "train_loss": "nan"}]  # as in jsonl
    chex.assert_trees_all_equal(restored.server_state, jax.device_get(state))
    assert jax.tree.map(lambda x: x.dtype, restored.server_state) == jax.tree.map(
        lambda x: x.dtype, jax.device_get(state))
    assert sorted(fresh.states) == [0, 5, 12]
    for cid in store.states:
        chex.assert_trees_all_equal(fresh.states[cid], store.states[cid])


def test_stateless_store_and_retention(tmp_path):
    state = _server_state()
    store = ClientStateStore(())
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    for k in (1, 2, 3):
        ckpt.save(k, jax.tree.map(lambda x, k=k: x + k, state), store, [{"round": k}])
    assert ckpt.latest_round() == 3
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 3]
    older = ckpt.restore(state, store, rounds_done=2)
    ckpt.close()
    chex.assert_trees_all_equal(older.server_state.params["w"], np.asarray(state.params["w"] + 2))
    assert store.states == {}


def test_refuses_another_model_and_missing_checkpoints(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore(_server_state(), _store())
    ckpt.save(1, _server_state(), _store(), [])
    other = _server_state()._replace(params={"w": jnp.zeros((3, 3)), "empty": jnp.zeros((0, 4)),
                                             "b": jnp.float32(0)})
    with pytest.raises(ValueError, match="server state does not match this run"):
        ckpt.restore(other, _store())
    bigger = ClientStateStore({"residual": np.zeros((2, 4), np.float32),
                               "none": np.zeros((0,), np.float32), "count": np.int32(0)})
    with pytest.raises(ValueError, match="client states do not match"):
        ckpt.restore(_server_state(), bigger)
    with pytest.raises(ValueError, match="rounds_done must be >= 1"):
        ckpt.save(0, _server_state(), _store(), [])
    ckpt.close()


def test_resume_with_error_feedback_states_is_bit_identical(tmp_path):
    model = LinearModel(dim=5, classes=3)
    data = make_population([4, 9, 2, 7, 5, 11, 3, 6], seed=2)
    alg = fedavg(model, optax.sgd(0.3), batch_size=3, local_epochs=1,
                 compressor=with_error_feedback(qsgd(num_levels=2)))
    params = model.init(jax.random.key(0))
    common = dict(clients_per_round=4, seed=9)
    backend = VmapBackend("vmap")  # one instance: the round compiles once for all runs
    full_store = ClientStateStore(alg.client_init(params))
    full = run(alg, backend, data, params, rounds=5, client_store=full_store,
               **common)

    first = RunCheckpointing(str(tmp_path), every=2, resume=False, config={}, total_rounds=5)
    run(alg, backend, data, params, rounds=3, callbacks=[first.record],
        state_callbacks=[first.save_state], **common)  # the process "dies" after round 3
    first.close()
    again = RunCheckpointing(str(tmp_path), every=2, resume=True, config={}, total_rounds=5)
    store = ClientStateStore(alg.client_init(params))
    state, start = again.restore(alg.init(params), store)
    assert start == 2 and len(store.states) > 0  # residuals of the clients seen so far
    rest = run(alg, backend, data, params, rounds=3, server_state=state,
               start_round=start, client_store=store, callbacks=[again.record], **common)
    again.close()
    chex.assert_trees_all_equal(rest.server_state.params, full.server_state.params)
    assert sorted(store.states) == sorted(full_store.states)
    for cid, tree in full_store.states.items():
        chex.assert_trees_all_equal(store.states[cid], tree)
    strip = [{k: v for k, v in h.items() if k not in TIME_FIELDS} for h in full.history]
    assert [{k: v for k, v in h.items() if k not in TIME_FIELDS} for h in again.history] == strip


# The sharded kill/resume (19 s) is in `make test-slow`; the sharded backend equals vmap in
# tests/backends/test_sharded.py, and the vmap kill/resume stays in `make test`.
@pytest.mark.parametrize("backend", ["vmap", pytest.param("sharded", marks=pytest.mark.slow)])
def test_killed_run_resumes_bit_identically(tmp_path, backend):
    # The subprocess inherits conftest's 4 forced CPU devices, so sharded runs on the same mesh.
    flags = [*FLAGS, "--backend", backend]
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    assert main(FedAvgConfig, run_fedavg_experiment, [*flags, "--out", str(ref_out)]) == 0
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, *flags, "--out", str(out)], cwd=ROOT, timeout=120,
        env={**os.environ, "KILL_AFTER_ROUND": "3", "PYTHONPATH": ROOT},
        capture_output=True, text=True,
    )
    assert killed.returncode == 17, killed.stderr
    assert [h["round"] for h in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2, 3]
    assert main(FedAvgConfig, run_fedavg_experiment,
                [*flags, "--out", str(out), "--resume", "true"]) == 0
    chex.assert_trees_all_equal(experiment_server_state(out, flags),  # incl. the Adam state
                                experiment_server_state(ref_out, flags))
    ref, got = read_jsonl(str(ref_out / "metrics.jsonl")), read_jsonl(str(out / "metrics.jsonl"))
    assert [h["round"] for h in got] == [1, 2, 3, 4, 5]  # the killed run's round 3 was redone
    strip = [{k: v for k, v in h.items() if k not in TIME_FIELDS} for h in ref]
    assert [{k: v for k, v in h.items() if k not in TIME_FIELDS} for h in got] == strip
    a = json.loads((ref_out / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert b["final_test_accuracy"] == a["final_test_accuracy"]
    assert b["uplink_bits"] == a["uplink_bits"] and b["rounds"] == 5
    # Round 0 is recomputed on resume, not checkpointed: the same numbers as uninterrupted.
    assert b["initial_evaluation"] == a["initial_evaluation"]
    assert b["initial_evaluation"]["round"] == 0


def test_resume_refuses_a_different_experiment(tmp_path, capsys):
    out = ["--out", str(tmp_path), "--rounds", "2"]
    assert main(FedAvgConfig, run_fedavg_experiment, [*FLAGS, *out]) == 0
    code = main(FedAvgConfig, run_fedavg_experiment,
                [*FLAGS, *out, "--seed", "5", "--resume", "true"])
    assert code == 2
    assert "different settings for ['seed']" in capsys.readouterr().err
    code = main(FedAvgConfig, run_fedavg_experiment, [*FLAGS, *out, "--rounds", "1",
                                                      "--resume", "true"])
    assert code == 2
    assert "--rounds=1 is below the 2 rounds already done" in capsys.readouterr().err
    code = main(FedAvgConfig, run_fedavg_experiment, [*FLAGS, "--checkpoint-every", "-1"])
    assert code == 2
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err
