"""The MPI backend: equals vmap under ``mpirun -n 2``, keeps client state on its owner rank,
and aborts the whole job (never hangs) when a rank fails."""

import os
import shutil
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.base import SingleProcessBackend
from fedjax_lab.backends.mpi import MpiBackend, RoundWatchdog, allreduce_sum
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core.rng import SAMPLING_STREAM, host_rng
from fedjax_lab.data.cohort import padded_cohort_size
from fedjax_lab.data.federated import sample_clients
from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.io.checkpoint import Checkpointer
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.runner import ClientStateStore, owned_slots, run
from fedjax_lab.systems.availability import Availability
from fedjax_lab.train import FedAvgConfig
from tests.backends import mpi_job
from tests.helpers import (
    CKPT_FLAGS,
    KILL_AFTER,
    LAYOUT_FIELDS,
    LinearModel,
    experiment_server_state,
    lazy_population,
    make_population,
)

# mpirun jobs (2 ranks each) with watchdog timeouts: run alone (scripts/run_tests.sh).
pytestmark = pytest.mark.serial

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
MPIRUN = shutil.which("mpirun", path=BIN) or shutil.which("mpirun")
TIMINGS = {"round_seconds", "wall_time"} | LAYOUT_FIELDS
# The CLI flags of the equivalence test: 3 of 8 clients per round -> 4 slots over 2 ranks, so
# rank 1 trains one real client and one weight-0 padding slot.
CLI = ["--rounds", "3", "--num-clients", "8", "--clients-per-round", "3", "--eval-every", "2",
       "--model", "logreg", "--progress", "false", "--local-epochs", "1", "--seed", "3"]


def _mpirun(args, cwd, timeout=100, env=None):
    """Runs ``mpirun -n 2 python ARGS``; a hang fails the test (TimeoutExpired)."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", **(env or {})}
    return subprocess.run([MPIRUN, "-n", "2", sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_cli_two_ranks_equal_vmap_and_only_rank0_writes(tmp_path):
    ref_out, mpi_out = tmp_path / "vmap", tmp_path / "mpi"
    assert main(FedAvgConfig, run_fedavg_experiment, [*CLI, "--out", str(ref_out)]) == 0
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # --plan loop: the per-client jits + jitted allreduce/finish plan (vmap and unrolled are
    # covered by the stateful job below and the single-rank tests).
    proc = _mpirun([os.path.join(ROOT, "experiments", "fedavg.py"), *CLI, "--backend", "mpi",
                    "--plan", "loop", "--out", str(mpi_out)], cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref, got = _strip(read_jsonl(str(ref_out / "metrics.jsonl"))), _strip(
        read_jsonl(str(mpi_out / "metrics.jsonl")))
    assert [r["round"] for r in got] == [1, 2, 3]
    assert [sorted(r) for r in got] == [sorted(r) for r in ref]
    for a, b in zip(ref, got, strict=True):
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-5), (a["round"], k)
    # Rank 0 wrote the outputs once (and held the folder's lock); rank 1 wrote and printed
    # nothing.
    written = sorted("events" if f.startswith("events.out.tfevents.") else f
                     for f in os.listdir(mpi_out))  # TensorBoard names its file by time/host
    assert written == [".fedjax_lab.lock", "accuracy.png", "config.yaml", "curves.png", "events",
                       "metrics.csv", "metrics.jsonl", "summary.json"]
    assert os.listdir(cwd) == []
    assert proc.stdout.count("final test accuracy") == 1


@pytest.fixture(scope="module")
def vmap_reference():
    """name -> (RunResult, ClientStateStore) of the stateful job's algorithms on vmap."""
    model = LinearModel(dim=5, classes=3)
    params = model.init(jax.random.key(0))
    out = {}
    for name, alg in mpi_job.stateful_algorithms(model).items():
        store = ClientStateStore(alg.client_init(params))
        # The padded program: the MPI job packs, so this also checks packed == padded.
        result = run(alg, VmapBackend("vmap", packing="off"),
                     make_population(mpi_job.SKEWED_SIZES, seed=2), params, rounds=3,
                     clients_per_round=mpi_job.CPR, seed=0, client_store=store)
        out[name] = (result, store)
    return out


@pytest.fixture(scope="module")
def mpi_stateful_job(tmp_path_factory):
    """One ``mpirun -n 2`` of the stateful algorithms (EF-QSGD FedAvg, SCAFFOLD)."""
    out = tmp_path_factory.mktemp("mpi_stateful")
    proc = _mpirun([os.path.join(ROOT, "tests", "backends", "mpi_job.py"), "stateful",
                    str(out)], cwd=out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("name", ["ef_qsgd", "scaffold"])
def test_stateful_clients_equal_vmap_and_stay_on_their_owner(mpi_stateful_job, vmap_reference,
                                                             name):
    ref, ref_store = vmap_reference[name]
    owned = []
    for rank in (0, 1):
        got = np.load(mpi_stateful_job / f"rank{rank}_{name}.npz")
        np.testing.assert_allclose(got["server_state"], mpi_job.flat(ref.server_state),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["train_loss"], [h["train_loss"] for h in ref.history],
                                   rtol=1e-5)
        np.testing.assert_array_equal(got["clients"], [mpi_job.CPR] * 3)
        ids = got["store_ids"].tolist()
        assert ids and all(c % 2 == rank for c in ids)  # the owner rank keeps the state
        for cid, state in zip(ids, got["states"], strict=True):
            np.testing.assert_allclose(state, mpi_job.flat(ref_store.states[cid]), rtol=1e-5,
                                       atol=1e-5)
        owned += ids
    assert sorted(owned) == sorted(ref_store.states)


@pytest.mark.parametrize(
    ("mode", "message"),
    [("uncaught", "rank 1/2 failed with RuntimeError: injected failure on rank 1 after round 1"),
     ("caught", "rank 1/2 failed with RuntimeError: injected failure on rank 1 after round 1"),
     ("killed", "rank 1 with PID"),
     # SIGSTOP: rank 1 stays alive for mpirun; only rank 0's watchdog can end the job.
     ("stopped", "rank 1 stopped responding: no heartbeat for")],
    ids=["uncaught-exception", "exception-caught-by-caller", "rank-killed", "rank-stopped"],
)
def test_a_failing_rank_aborts_the_job_instead_of_hanging(tmp_path, mode, message):
    proc = _mpirun([os.path.join(ROOT, "tests", "backends", "mpi_job.py"), mode,
                    str(tmp_path)], cwd=tmp_path, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert message in output, output
    assert not (tmp_path / "finished").exists()  # rank 0 never completed the run


# ------------------------------------------------------------------ in-process (one rank)
def test_single_rank_loop_plan_equals_vmap(vmap_reference):
    from mpi4py import MPI

    model = LinearModel(dim=5, classes=3)
    alg = mpi_job.stateful_algorithms(model)["ef_qsgd"]
    params = model.init(jax.random.key(0))
    backend = MpiBackend(MPI.COMM_SELF, plan="loop", abort_on_error=False)
    assert backend.is_primary and backend.cohort_multiple == 1
    store = backend.client_store(alg.client_init(params))
    got = run(alg, backend, make_population(mpi_job.SKEWED_SIZES, seed=2), params, rounds=3,
              clients_per_round=mpi_job.CPR, seed=0, client_store=store)
    ref, ref_store = vmap_reference["ef_qsgd"]
    chex.assert_trees_all_close(got.server_state.params, ref.server_state.params, atol=1e-5)
    assert sorted(store.states) == sorted(ref_store.states)


def test_watchdog_fires_only_when_a_step_outlasts_the_timeout():
    from mpi4py import MPI

    fired = []
    dog = RoundWatchdog(MPI.COMM_SELF.Dup(), 0.3, interval=0.05, abort=fired.append)
    try:
        with dog.step("a quick step", round_done=True):
            pass
        time.sleep(0.5)  # idle between steps: not waiting for anyone
        assert fired == []
        with dog.step("the round's allreduce"):
            deadline = time.monotonic() + 10
            while not fired and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        dog.close()
    assert len(fired) == 1, fired
    assert fired[0].startswith("rank 0/1: round 2 (the round's allreduce) waited")
    assert "round_timeout=0.3 s (--mpi-round-timeout)" in fired[0]
    assert "every rank is alive and in this step" in fired[0]  # one rank: nobody to blame
    with pytest.raises(ValueError, match="round_timeout must be a finite number"):
        MpiBackend(MPI.COMM_SELF, round_timeout=float("nan"), abort_on_error=False)


def test_allreduce_sum_of_one_rank_is_the_identity_and_rejects_non_numeric_leaves():
    from mpi4py import MPI

    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros((0,)), "n": jnp.int32(7),
            "s": jnp.float32(2.5)}
    out = jax.jit(lambda t: allreduce_sum(t, MPI.COMM_SELF))(tree)
    chex.assert_trees_all_equal(out, tree)
    with pytest.raises(TypeError, match="dtype bool; only numeric leaves can be summed"):
        jax.jit(lambda t: allreduce_sum(t, MPI.COMM_SELF))({"flag": jnp.array([True])})


def test_owned_slots_and_bad_arguments():
    from mpi4py import MPI

    backend = MpiBackend(MPI.COMM_SELF, plan="vmap", chunk_size=2, abort_on_error=False)
    np.testing.assert_array_equal(backend.owned_slots(4), np.arange(4))
    with pytest.raises(ValueError, match=r"cohort_size 3 must be a positive multiple of 2 "
                       r"\(1 ranks x chunk_size 2\)"):
        backend.owned_slots(3)
    with pytest.raises(ValueError, match=r"plan must be one of .* for the mpi backend"):
        MpiBackend(MPI.COMM_SELF, plan="fastest", abort_on_error=False)
    with pytest.raises(ValueError, match="chunk_size only applies to the 'vmap' plan"):
        MpiBackend(MPI.COMM_SELF, plan="loop", chunk_size=2, abort_on_error=False)
    with pytest.raises(TypeError, match="comm must be an mpi4py Intracomm"):
        MpiBackend("world", abort_on_error=False)
    model = LinearModel(dim=5, classes=3)
    median = fedavg(model, optax.sgd(0.1), batch_size=3)._replace(additive=False, name="median")
    with pytest.raises(ValueError, match=r"'median' has a non-additive aggregate"):
        run(median, MpiBackend(MPI.COMM_SELF, abort_on_error=False), make_population([3, 4]),
            model.init(jax.random.key(0)), rounds=1, clients_per_round=2, seed=0)


class _Slots(SingleProcessBackend):
    """A backend stand-in that owns the given slots (the runner's hook)."""

    name = "fake"

    def __init__(self, slots):
        super().__init__()
        self.slots = slots

    def owned_slots(self, cohort_size):
        del cohort_size
        return self.slots

    def run_round(self, *args):
        raise AssertionError("refused before the first round")


@pytest.mark.parametrize(
    "slots", [np.array([], np.int64), np.array([1, 0]), np.array([0, 4]), np.array([0.0, 1.0]),
              np.array([[0, 1]])],
    ids=["empty", "unsorted", "out-of-range", "float", "2-d"],
)
def test_runner_rejects_bad_owned_slots(slots):
    with pytest.raises(ValueError, match=r"backend.owned_slots\(4\) must return a non-empty, "
                       "strictly increasing"):
        owned_slots(_Slots(slots), 4)


def test_runner_rejects_system_models_when_a_backend_owns_part_of_the_cohort():
    model = LinearModel(dim=5, classes=3)
    alg = fedavg(model, optax.sgd(0.1), batch_size=3)
    with pytest.raises(ValueError, match="draw over all 4 client slots, but the fake backend "
                       "trains only 2"):
        run(alg, _Slots(np.array([0, 1])), make_population([3, 4, 5, 6]),
            model.init(jax.random.key(0)), rounds=1, clients_per_round=4, seed=0,
            availability=Availability(dropout=0.5))


# ------------------------------------------------------------------ checkpoint / resume
def test_cli_job_killed_on_rank0_resumes_bit_identically_and_on_vmap(tmp_path):
    """mpirun killed after round 3 (checkpoint at 2), resumed with mpirun and with vmap."""
    script = os.path.join(ROOT, "experiments", "fedavg.py")
    mpi = [*CKPT_FLAGS, "--backend", "mpi", "--plan", "vmap"]
    ref_out, out, vmap_out = tmp_path / "ref", tmp_path / "run", tmp_path / "vmap"
    proc = _mpirun([script, *mpi, "--out", str(ref_out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    killed = _mpirun(["-c", KILL_AFTER, *mpi, "--out", str(out)], cwd=tmp_path,
                     env={"KILL_AFTER_ROUND": "3"})
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert [h["round"] for h in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2, 3]
    shutil.copytree(out, vmap_out)
    proc = _mpirun([script, *mpi, "--out", str(out), "--resume", "true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref = _strip(read_jsonl(str(ref_out / "metrics.jsonl")))
    assert _strip(read_jsonl(str(out / "metrics.jsonl"))) == ref  # rounds 3..5 redone exactly
    chex.assert_trees_all_equal(experiment_server_state(out, CKPT_FLAGS),
                                experiment_server_state(ref_out, CKPT_FLAGS))
    # A checkpoint of another experiment is refused on every rank alike (no rank left waiting).
    proc = _mpirun([script, *mpi, "--out", str(out), "--resume", "true", "--seed", "5"],
                   cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("different settings for ['seed']") == 2, proc.stderr
    # The checkpoint is backend-neutral: vmap continues the MPI run to 1e-5.
    assert main(FedAvgConfig, run_fedavg_experiment,
                [*CKPT_FLAGS, "--out", str(vmap_out), "--resume", "true"]) == 0
    got = _strip(read_jsonl(str(vmap_out / "metrics.jsonl")))
    assert [r["round"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(ref, got, strict=True):
        assert sorted(a) == sorted(b)
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-5), (a["round"], k)


@pytest.mark.slow
def test_stateful_job_killed_on_rank1_resumes_bit_identically(tmp_path):
    """EF residuals and SCAFFOLD controls live on two ranks; both come back from one save."""
    job = os.path.join(ROOT, "tests", "backends", "mpi_job.py")
    names = ("ef_qsgd", "scaffold")
    proc = _mpirun([job, "ckpt_full", str(tmp_path), ",".join(names)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model = LinearModel(dim=5, classes=3)
    params = model.init(jax.random.key(0))
    for name in names:
        killed = _mpirun([job, "ckpt_killed", str(tmp_path), name], cwd=tmp_path)
        assert killed.returncode != 0, killed.stdout + killed.stderr
        alg = mpi_job.stateful_algorithms(model)[name]
        ckpt = Checkpointer(str(tmp_path / f"ckpt_{name}"))
        assert ckpt.latest_round() == 2
        store = ClientStateStore(alg.client_init(params))
        ckpt.restore(alg.init(params), store)
        ckpt.close()
        assert {c % 2 for c in store.states} == {0, 1}  # gathered from both owner ranks
    proc = _mpirun([job, "ckpt_resume", str(tmp_path), ",".join(names)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in names:
        for rank in (0, 1):
            full = np.load(tmp_path / f"ckpt_full_rank{rank}_{name}.npz")
            got = np.load(tmp_path / f"ckpt_resume_rank{rank}_{name}.npz")
            assert sorted(got.files) == sorted(full.files)
            for key in full.files:
                np.testing.assert_array_equal(got[key], full[key], err_msg=f"{name} {key}")
            assert all(c % 2 == rank for c in got["store_ids"])


# ------------------------------------------------------------------ data read per rank
def test_each_rank_reads_only_its_clients_examples(tmp_path):
    proc = _mpirun([os.path.join(ROOT, "tests", "backends", "mpi_job.py"), "lazy",
                    str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data, _ = lazy_population(mpi_job.SIZES, seed=2)  # same population and disk layout
    model = LinearModel(dim=5, classes=3)
    ref = run(fedavg(model, optax.sgd(0.3), batch_size=3), VmapBackend("vmap"),
              make_population(mpi_job.SIZES, seed=2), model.init(jax.random.key(0)), rounds=3,
              clients_per_round=mpi_job.CPR, seed=0)
    slots = padded_cohort_size(mpi_job.CPR, None, 2)
    for rank in (0, 1):
        got = np.load(tmp_path / f"lazy_rank{rank}.npz")
        np.testing.assert_allclose(got["server_state"], mpi_job.flat(ref.server_state),
                                   rtol=1e-5, atol=1e-5)
        reads = np.split(got["reads"], np.cumsum(got["lengths"])[:-1])
        assert len(reads) == 3  # one read per round
        for r, disk_rows in enumerate(reads):
            ids = np.full(slots, -1)
            ids[:mpi_job.CPR] = sample_clients(len(mpi_job.SIZES), mpi_job.CPR,
                                               host_rng(0, SAMPLING_STREAM, r))
            mine = [c for c in ids[rank * slots // 2:(rank + 1) * slots // 2] if c >= 0]
            rows = np.concatenate([np.arange(data.offsets[c], data.offsets[c + 1])
                                   for c in mine])
            np.testing.assert_array_equal(disk_rows, np.sort(data.arrays.order[rows]))
