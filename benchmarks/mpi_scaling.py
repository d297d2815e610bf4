"""Strong scaling of the MPI backend: rounds/s with 1 and 2 ranks on W2.

W2 = FEMNIST CNN (fedjax_lab.models.femnist_cnn, 62 classes) on synthetic 28x28 data, 20 clients
per round out of 40, 200 examples per client, batch 20, 1 local epoch, lr 0.1 (the workload of
benchmarks/round_throughput.py with 20 clients per round). The same run goes through
``fedjax_lab.runner.run`` under ``mpirun -n K`` for each K; rank 0 reports the median of the
per-round wall times after the compiling round. Efficiency = rps(2) / (2 x rps(1)).

    python benchmarks/mpi_scaling.py --json mpi_scaling.json

The numbers are only as good as the machine: the JSON records the CPU count, the load average
before and after, and the XLA threading setting, because ranks compete for cores with each other
(and with anything else running); XLA:CPU already spreads one rank's convolutions over the
cores, so on a 2-core machine 2 ranks cannot approach 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS, PER_CLIENT, BATCH, LR, CPR = 40, 200, 20, 0.1, 20


def worker(args: argparse.Namespace) -> None:
    """One rank of ``mpirun -n K``: runs the W2 rounds and (rank 0) writes the timings."""
    import jax
    import numpy as np
    import optax

    from fedjax_lab.algorithms.fedavg import fedavg
    from fedjax_lab.backends.mpi import MpiBackend
    from fedjax_lab.data.federated import FederatedData
    from fedjax_lab.models import femnist_cnn
    from fedjax_lab.runner import run

    model = femnist_cnn((28, 28, 1), 62)
    rng = np.random.default_rng(0)
    n = CLIENTS * PER_CLIENT
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 62, n).astype(np.int32)
    data = FederatedData.from_partition({"x": x, "y": y},
                                        list(np.arange(n).reshape(CLIENTS, PER_CLIENT)))
    alg = fedavg(model, optax.sgd(LR), batch_size=BATCH, local_epochs=1)
    backend = MpiBackend(plan=args.plan)
    result = run(alg, backend, data, model.init(jax.random.key(0)), rounds=args.rounds + 1,
                 clients_per_round=CPR, seed=0)
    if backend.is_primary:
        seconds = [h["round_seconds"] for h in result.history]
        with open(args.worker_json, "w") as f:
            json.dump({"ranks": backend.size, "first_round_seconds": seconds[0],
                       "seconds_per_round": statistics.median(seconds[1:]),
                       "round_seconds": seconds[1:],
                       "final_train_loss": result.history[-1]["train_loss"]}, f)


def launch(ranks: int, args: argparse.Namespace, out: str) -> dict:
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or "mpirun"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    if args.single_thread:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    cmd = [mpirun, "--oversubscribe", "--bind-to", "none", "-n", str(ranks), sys.executable,
           os.path.abspath(__file__), "--worker-json", out, "--rounds", str(args.rounds),
           "--plan", args.plan]
    subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="output JSON path (launcher)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (median)")
    parser.add_argument("--plan", default="loop", choices=("loop", "vmap", "unrolled", "auto"),
                        help="execution plan of every rank (fixed, so that 1 and 2 ranks run "
                        "the same program shape)")
    parser.add_argument("--single-thread", action="store_true",
                        help="one XLA thread per rank (isolates rank-level parallelism)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_json:
        worker(args)
        return
    if not args.json:
        parser.error("--json OUT is required")
    load_before = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2):
            runs[ranks] = launch(ranks, args, os.path.join(tmp, f"ranks{ranks}.json"))
            runs[ranks]["rounds_per_second"] = 1.0 / runs[ranks]["seconds_per_round"]
    efficiency = runs[2]["rounds_per_second"] / (2 * runs[1]["rounds_per_second"])
    results = {
        "workload": {"name": "W2 femnist_cnn", "clients_per_round": CPR, "population": CLIENTS,
                     "examples_per_client": PER_CLIENT, "batch_size": BATCH, "local_epochs": 1,
                     "lr": LR, "data": "synthetic", "plan": args.plan},
        "ranks": {str(k): v for k, v in runs.items()},
        "rounds_per_second_1_rank": runs[1]["rounds_per_second"],
        "rounds_per_second_2_ranks": runs[2]["rounds_per_second"],
        "efficiency": efficiency,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "xla_single_thread_per_rank": args.single_thread},
    }
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: results[k] for k in ("rounds_per_second_1_rank",
                                              "rounds_per_second_2_ranks", "efficiency")},
                     indent=2))


if __name__ == "__main__":
    main()
