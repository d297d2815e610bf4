"""Wall time of a vmapped sweep (one program) vs the same runs done one after another.

Workload: FedAvg on the embedded digits data (Dirichlet-per-class partition, alpha 0.5, 50
clients, 10 per round, batch 20, 1 local epoch), N client learning rates log-spaced in
[0.01, 10], one seed, R rounds. For each model:

* sequential: N calls of ``runner.run`` (vmap backend), each with its own algorithm, i.e. what a
  loop over learning rates does. ``with_compile`` is the first call (trace + compile + rounds);
  ``without_compile`` repeats each call with the compiled round cached.
* sweep: ``fedjax_lab.sweep.sweep`` over the same N learning rates, once with all points
  vmapped and once with ``points_per_batch=1`` (points looped inside the one program).
  ``with_compile`` = host cohort preparation + compile + execution; ``without_compile`` =
  preparation + execution.

Both sides include their host-side cohort construction and exclude evaluation. Reports the
ratio sweep / sequential for both (target <= 0.5 for N = 16) and, per learning rate, the max
abs difference between the sweep's and the sequential run's final parameters (float32 round-off
is amplified by large learning rates and ReLU kinks over many rounds; the unit tests check
equality to 1e-5 on a convex problem).

    python benchmarks/sweep_speedup.py --json runs/bench/sweep_speedup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import optax

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from fedjax_lab.sweep import sweep

CLIENTS, PER_ROUND, BATCH, EPOCHS = 50, 10, 20, 1


def bench_model(model_name: str, n: int, rounds: int, seed: int) -> dict:
    dataset = load_dataset("digits")
    data = federate(dataset, "dirichlet_per_class", CLIENTS, seed=seed, alpha=0.5)
    model = get_model(model_name, dataset.input_shape, dataset.num_classes)
    params = model.init(jax.random.key(seed))
    lrs = [float(v) for v in np.geomspace(0.01, 10.0, n)]

    def make(lr):
        return fedavg(model, optax.sgd(lr), batch_size=BATCH, local_epochs=EPOCHS)

    seq_first, seq_again, seq_params = [], [], []
    for lr in lrs:
        algorithm, backend = make(lr), VmapBackend("vmap")
        kwargs = {"rounds": rounds, "clients_per_round": PER_ROUND, "seed": seed}
        t0 = time.perf_counter()
        result = run(algorithm, backend, data, params, **kwargs)
        jax.block_until_ready(result.server_state.params)
        seq_first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        again = run(algorithm, backend, data, params, **kwargs)
        jax.block_until_ready(again.server_state.params)
        seq_again.append(time.perf_counter() - t0)
        seq_params.append(jax.device_get(result.server_state.params))

    seq_with, seq_without = float(sum(seq_first)), float(sum(seq_again))
    out = {
        "model": model_name,
        "runs": n,
        "rounds": rounds,
        "learning_rates": lrs,
        "sequential": {
            "with_compile_seconds": seq_with,
            "without_compile_seconds": seq_without,
            "per_run_with_compile_seconds": seq_first,
            "per_run_without_compile_seconds": seq_again,
        },
        "sweeps": {},
        "target_ratio": 0.5,
    }
    for label, per_batch in (("vmap_all_points", None), ("points_per_batch_1", 1)):
        res = sweep(lambda h: fedavg(model, optax.sgd(h["client_lr"]), batch_size=BATCH,
                                     local_epochs=EPOCHS),
                    {"client_lr": lrs}, data, params, seeds=[seed], rounds=rounds,
                    clients_per_round=PER_ROUND, points_per_batch=per_batch)
        # Same runs: final parameters of each learning rate vs its sequential run.
        diffs = [
            max(float(np.max(np.abs(np.asarray(a)[0, g] - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(seq_params[g]),
                                strict=True))
            for g in range(n)
        ]
        sweep_with = res.prepare_seconds + res.compile_seconds + res.run_seconds
        sweep_without = res.prepare_seconds + res.run_seconds
        out["sweeps"][label] = {
            "points_per_batch": per_batch,
            "with_compile_seconds": sweep_with,
            "without_compile_seconds": sweep_without,
            "prepare_seconds": res.prepare_seconds,
            "compile_seconds": res.compile_seconds,
            "run_seconds": res.run_seconds,
            "ratio_with_compile": sweep_with / seq_with,
            "ratio_without_compile": sweep_without / seq_without,
            "per_run_max_abs_param_difference": diffs,
            "runs_equal_to_1e-5": int(sum(d <= 1e-5 for d in diffs)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=16, help="learning rates (N)")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--models", default="logreg,mlp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 1:
        parser.error("--runs and --rounds must be >= 1")
    out = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "workloads": [bench_model(m.strip(), args.runs, args.rounds, args.seed)
                      for m in args.models.split(",") if m.strip()],
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
