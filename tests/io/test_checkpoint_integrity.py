"""Damaged checkpoints are detected and never resumed from; a resume falls back to an intact one.

Before checksums a flipped bit in the newest checkpoint resumed with silently different
metrics, a hand-edited ``rounds_done`` duplicated a round in metrics.jsonl, a missing item was a
KeyError, and a truncated checkpoint ended in an orbax "Event loop is closed" traceback.
"""

import glob
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.core.types import ServerState
from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.io.checkpoint import (
    CHECKSUM_FILE,
    CheckpointCorrupt,
    Checkpointer,
    RunCheckpoint,
    RunCheckpointing,
    check_consistent,
    seal_step,
)
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.runner import ClientStateStore
from fedjax_lab.train import FedAvgConfig
from tests.helpers import CKPT_FLAGS, experiment_server_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# CKPT_FLAGS run 5 rounds and keep the checkpoints of rounds 4 and 5; resumed runs go on to 7.
MORE = ["--rounds", "7", "--resume", "true"]
TIMINGS = ("round_seconds", "wall_time")


def _strip(records, drop=()):
    return [{k: v for k, v in r.items() if k not in (*TIMINGS, *drop)} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished 5-round run (checkpoints of rounds 4 and 5) and that run resumed to 7 rounds."""
    base = tmp_path_factory.mktemp("ckpt_ref")
    done, resumed = base / "done", base / "resumed"
    assert main(FedAvgConfig, run_fedavg_experiment, [*CKPT_FLAGS, "--out", str(done)]) == 0
    assert sorted(os.listdir(done / "checkpoints")) == ["4", "5"]
    shutil.copytree(done, resumed)
    assert main(FedAvgConfig, run_fedavg_experiment,
                [*CKPT_FLAGS, "--out", str(resumed), *MORE]) == 0
    return done, resumed


def _copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def _largest_array_file(step):
    return max(glob.glob(str(step / "arrays" / "ocdbt.process_0" / "d" / "*")),
               key=os.path.getsize)


def _resume_and_compare(out, reference, capsys):
    """Resumes ``out`` to 7 rounds; it must have fallen back to round 4 and equal ``reference``."""
    assert main(FedAvgConfig, run_fedavg_experiment, [*CKPT_FLAGS, "--out", str(out), *MORE]) == 0
    err = capsys.readouterr().err
    assert "checkpoint of round 5" in err and "damaged" in err, err
    assert "resuming from the checkpoint of round 4, the newest intact one" in err, err
    got, want = read_jsonl(str(out / "metrics.jsonl")), read_jsonl(
        str(reference[1] / "metrics.jsonl"))
    assert [h["round"] for h in got] == [1, 2, 3, 4, 5, 6, 7]
    # Round 5 was recomputed (the 5-round run had also evaluated it as its last round).
    assert _strip(got, ("test_accuracy", "test_loss")) == _strip(
        want, ("test_accuracy", "test_loss"))
    assert _strip(got[5:]) == _strip(want[5:])
    flags = [*CKPT_FLAGS, "--rounds", "7"]
    chex.assert_trees_all_equal(experiment_server_state(out, flags),
                                experiment_server_state(reference[1], flags))
    assert os.listdir(out / "checkpoints.damaged")  # the damaged step was kept, aside
    return err


def test_flipped_bit_in_newest_checkpoint_falls_back(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    path = pathlib.Path(_largest_array_file(out / "checkpoints" / "5"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit of one stored float
    path.write_bytes(bytes(data))
    err = _resume_and_compare(out, reference, capsys)
    assert "1 file(s) changed" in err


def test_edited_rounds_done_does_not_duplicate_a_round(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    meta = out / "checkpoints" / "5" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"rounds_done": 5', '"rounds_done": 4'))
    _resume_and_compare(out, reference, capsys)


def test_missing_item_falls_back(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "5" / "meta")
    err = _resume_and_compare(out, reference, capsys)
    assert "missing (e.g. meta/" in err


def _tree_digest(path):
    digest = hashlib.sha256()
    for name in sorted(glob.glob(str(path / "**"), recursive=True)):
        digest.update(name.encode())
        if os.path.isfile(name):
            digest.update(pathlib.Path(name).read_bytes())
    return digest.hexdigest()


def test_truncated_checkpoints_exit_2_with_one_clean_message(reference, tmp_path):
    out = _copy(reference, tmp_path)
    for path in glob.glob(str(out / "checkpoints" / "*" / "arrays" / "**" / "d" / "*"),
                          recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    before = _tree_digest(out)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "fedavg.py"), *CKPT_FLAGS,
         "--out", str(out), *MORE], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --resume: no intact checkpoint"), lines
    assert "round 4: " in lines[0] and "round 5: " in lines[0] and "--overwrite" in lines[0]
    assert _tree_digest(out) == before  # a refused resume changes nothing


# ------------------------------------------------------------------------- library level
def _state(round_, w=1.0):
    params = {"w": jnp.full((2, 3), w)}
    return ServerState(params, optax.sgd(0.1).init(params), jnp.int32(round_))


def test_steps_are_sealed_and_verified(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(2, _state(2), ClientStateStore(()), [{"round": 1}, {"round": 2}])
    assert os.path.isfile(tmp_path / "2" / CHECKSUM_FILE) and ckpt.verify(2) is None
    meta = tmp_path / "2" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"rounds_done": 2', '"rounds_done": 3'))
    assert "1 file(s) changed (e.g. meta/metadata)" in ckpt.verify(2)
    seal_step(str(tmp_path / "2"))  # an edit that also rewrites the checksum...
    with pytest.raises(CheckpointCorrupt, match="says rounds_done=3, not 2"):
        ckpt.restore(_state(0), ClientStateStore(()))  # ...is still inconsistent
    (tmp_path / "2" / "stray").write_text("x")
    assert "1 file(s) unexpected (e.g. stray)" in ckpt.verify(2)
    ckpt.close()


def test_non_finite_state_is_not_restored(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, _state(1), ClientStateStore(()), [{"round": 1}])
    ckpt.save(2, _state(2, w=np.nan), ClientStateStore(()), [{"round": 1}, {"round": 2}])
    with pytest.raises(CheckpointCorrupt, match="server state leaf 0 holds 6 non-finite"):
        ckpt.restore(_state(0), ClientStateStore(()))
    ckpt.close()
    resumed = RunCheckpointing(str(tmp_path), every=1, resume=True, config={}, total_rounds=4)
    state, start = resumed.restore(_state(0), ClientStateStore(()))
    resumed.close()
    assert start == 1 and float(state.params["w"][0, 0]) == 1.0
    assert sorted(os.listdir(tmp_path)) == ["1"]
    assert len(os.listdir(str(tmp_path) + ".damaged")) == 1


def test_consistency_of_round_counter_and_history():
    history = [{"round": 1}, {"round": 2}, {"round": 3}]
    check_consistent(RunCheckpoint(3, _state(3), history, {}), 3)
    with pytest.raises(CheckpointCorrupt, match="server state has counted 2 rounds"):
        check_consistent(RunCheckpoint(3, _state(2), history, {}), 3)
    with pytest.raises(CheckpointCorrupt, match=r"holds rounds \[1, 2, 2\] instead of 1..3"):
        check_consistent(RunCheckpoint(3, _state(3), [*history[:2], {"round": 2}], {}), 3)


def test_fresh_run_refuses_existing_checkpoints_unless_overwrite(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, _state(1), ClientStateStore(()), [{"round": 1}])
    ckpt.close()
    with pytest.raises(ValueError, match=r"holds the checkpoints of an earlier run \(rounds"):
        RunCheckpointing(str(tmp_path), every=1, resume=False, config={}, total_rounds=2)
    assert os.listdir(tmp_path) == ["1"]
    fresh = RunCheckpointing(str(tmp_path), every=1, resume=False, config={}, total_rounds=2,
                             overwrite=True)
    assert os.listdir(tmp_path) == ["1"]  # nothing deleted before the first save
    fresh.save_state(0, _state(1, w=5.0), ClientStateStore(()))
    fresh.close()
    restored = Checkpointer(str(tmp_path)).restore(_state(0), ClientStateStore(()))
    assert float(restored.server_state.params["w"][0, 0]) == 5.0
    assert json.loads((tmp_path / "1" / CHECKSUM_FILE).read_text())["files"]
