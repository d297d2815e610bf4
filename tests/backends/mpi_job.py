"""An MPI job for tests/backends/test_mpi.py: ``mpirun -n K python mpi_job.py MODE OUT [ALGS]``.

Modes:
  stateful  error-feedback QSGD FedAvg (stochastic, stateful clients) and SCAFFOLD (control
            variates) on a small size-skewed population (1 to 200 examples), each rank packing
            its clients into 2 slots run 2 steps per call; every rank saves its view of each
            run to OUT/rank<r>_<name>.npz.
  uncaught  rank 1 raises after round 1 and nothing catches it (the excepthook must abort).
  caught    rank 1 raises after round 1 inside ``backend.failure_guard()`` while the caller
            catches the exception (as experiment.main does with ValueError): the guard must abort.
  killed    rank 1 is SIGKILLed after round 1 (mpirun must tear the job down).
  stopped   rank 1 SIGSTOPs itself after round 1 (alive to mpirun, but never arrives): rank 0's
            round watchdog (round_timeout STUCK_TIMEOUT s) must name rank 1 and abort the job.
  ckpt_full ALGS     the stateful algorithms (comma-separated names) for CKPT_ROUNDS rounds,
                     uninterrupted; every rank saves OUT/<phase>_rank<r>_<name>.npz.
  ckpt_killed ALGS   the same, checkpointing to OUT/ckpt_<name> every 2 rounds; rank 1 dies
                     (os._exit, no cleanup) right after round 3.
  ckpt_resume ALGS   resumes from OUT/ckpt_<name> and finishes the CKPT_ROUNDS rounds.
  lazy      FedAvg on a population read on demand; every rank saves the rows it read per round
            and its final server state to OUT/lazy_rank<r>.npz.
In the failure modes rank 0 is then blocked in round 2's allreduce inside the compiled round.
They use stateless FedAvg (cheaper to compile). Rank 0 writes OUT/finished when its run
returns, which a failed job must never reach.
"""

import os
import signal
import sys

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedjax_lab.algorithms.fedavg import fedavg  # noqa: E402
from fedjax_lab.algorithms.scaffold import scaffold  # noqa: E402
from fedjax_lab.backends.mpi import MpiBackend  # noqa: E402
from fedjax_lab.backends.packed import PackingPolicy  # noqa: E402
from fedjax_lab.compressors import qsgd, with_error_feedback  # noqa: E402
from fedjax_lab.io.checkpoint import RunCheckpointing  # noqa: E402
from fedjax_lab.runner import run  # noqa: E402
from tests.helpers import LinearModel, lazy_population, make_population  # noqa: E402

SIZES = [4, 9, 2, 7, 5, 11, 3, 6]
SKEWED_SIZES = [1, 60, 2, 30, 5, 11, 3, 200]
CPR = 5
CKPT_ROUNDS = 5
STUCK_TIMEOUT = 10.0  # generous: a loaded 2-core machine can take seconds for a real round
MODES = ("stateful", "uncaught", "caught", "killed", "stopped", "ckpt_full", "ckpt_killed",
         "ckpt_resume", "lazy")


def stateful_algorithms(model):
    """The stateful algorithms of the equivalence test, by name."""
    return {
        "ef_qsgd": fedavg(model, optax.sgd(0.3, momentum=0.5), batch_size=3, local_epochs=1,
                          compressor=with_error_feedback(qsgd(num_levels=2))),
        "scaffold": scaffold(model, 0.1, num_clients=len(SIZES), batch_size=3),
    }


def flat(tree) -> np.ndarray:
    """All leaves of a pytree as one float64 vector (for saving and comparing)."""
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def save_run(path: str, result, store) -> None:
    """One rank's view of a run: server state, losses, and the client states it owns."""
    ids = sorted(store.states)
    np.savez(path, server_state=flat(result.server_state),
             train_loss=np.array([h["train_loss"] for h in result.history]),
             clients=np.array([h["clients"] for h in result.history]),
             store_ids=np.array(ids, dtype=np.int64),
             states=np.stack([flat(store.states[c]) for c in ids]))


def checkpointed(phase: str, names: str, out: str, backend, model) -> None:
    """The ckpt_* modes: run, die after round 3, or resume (see the module docstring)."""
    params = model.init(jax.random.key(0))
    data = make_population(SIZES, seed=2)
    algorithms = stateful_algorithms(model)
    for name in names.split(","):
        alg = algorithms[name]
        ckpt = RunCheckpointing(
            os.path.join(out, f"ckpt_{name}"), every=0 if phase == "ckpt_full" else 2,
            resume=phase == "ckpt_resume", config={"algorithm": name},
            total_rounds=CKPT_ROUNDS, process=backend,
        )

        def die(r, record):
            del record
            if phase == "ckpt_killed" and backend.rank == 1 and r == 2:
                os._exit(17)

        store = backend.client_store(alg.client_init(params))
        state, start = ckpt.restore(alg.init(params), store)
        result = run(alg, backend, data, params, rounds=CKPT_ROUNDS - start,
                     clients_per_round=CPR, seed=0, server_state=state, start_round=start,
                     client_store=store, callbacks=[ckpt.record, die],
                     state_callbacks=[ckpt.save_state])
        ckpt.close()
        result.history = ckpt.history
        save_run(os.path.join(out, f"{phase}_rank{backend.rank}_{name}.npz"), result, store)


def main(mode: str, out: str, algorithms: str = "") -> None:
    if mode not in MODES:
        raise SystemExit(f"MODE must be one of {MODES}, got {mode!r}")
    model = LinearModel(dim=5, classes=3)
    packing = PackingPolicy(slots=2, segment_steps=2) if mode == "stateful" else "auto"
    backend = MpiBackend(plan="vmap", packing=packing,
                         round_timeout=STUCK_TIMEOUT if mode == "stopped" else 300)
    rank = backend.rank
    if mode.startswith("ckpt_"):
        checkpointed(mode, algorithms, out, backend, model)
        return
    if mode == "lazy":
        data, source = lazy_population(SIZES, seed=2)
        result = run(fedavg(model, optax.sgd(0.3), batch_size=3), backend, data,
                     model.init(jax.random.key(0)), rounds=3, clients_per_round=CPR, seed=0)
        np.savez(os.path.join(out, f"lazy_rank{rank}.npz"), server_state=flat(result.server_state),
                 reads=np.concatenate(source.reads), lengths=[len(r) for r in source.reads])
        return

    def inject(r, record):
        del record
        if rank == 1 and r == 0:
            if mode == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "stopped":
                os.kill(os.getpid(), signal.SIGSTOP)
            if mode in ("uncaught", "caught"):
                raise RuntimeError("injected failure on rank 1 after round 1")

    params = model.init(jax.random.key(0))
    data = make_population(SIZES, seed=2)
    kwargs = dict(rounds=3, clients_per_round=CPR, seed=0, callbacks=[inject])
    if mode == "stateful":
        for name, alg in stateful_algorithms(model).items():
            store = backend.client_store(alg.client_init(params))
            result = run(alg, backend, make_population(SKEWED_SIZES, seed=2), params,
                         client_store=store, **kwargs)
            save_run(os.path.join(out, f"rank{rank}_{name}.npz"), result, store)
    elif mode == "caught":
        alg = fedavg(model, optax.sgd(0.3), batch_size=3)
        try:
            with backend.failure_guard():
                run(alg, backend, data, params, **kwargs)
        except RuntimeError:
            pass  # never reached: the guard aborts the job first
    else:
        run(fedavg(model, optax.sgd(0.3), batch_size=3), backend, data, params, **kwargs)
    if rank == 0:
        open(os.path.join(out, "finished"), "w").close()


if __name__ == "__main__":
    main(*sys.argv[1:])
