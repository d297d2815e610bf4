"""Wall time of a vmapped sweep (one program) vs the same runs done one after another.

Workload: FedAvg on the embedded digits data (Dirichlet-per-class partition, alpha 0.5, 50
clients, 10 per round, batch 20, 1 local epoch), N client learning rates log-spaced in
[0.01, 10], one seed, R rounds (``--rounds`` for logistic regression and the MLP,
``--cnn-rounds`` for the FEMNIST CNN, whose digits input is 8x8 or resized by
``--cnn-image-size``). ``--population digits_heavy_tailed`` gives the same 50 clients
lognormal(0, 1.5) sizes (a few large clients, many of a handful of examples; labels mixed by
Dirichlet 0.5), the skewed case for every model including the CNN.
``--population synthetic_natural`` runs the dense models on FedProx's
Synthetic(1,1) instead: 1000 clients with their natural, heavy-tailed sizes (the skewed case
the runner packs; a sweep pads every round to the longest round of the sweep). For each model:

* sequential: N calls of ``runner.run`` (vmap backend, its default ``auto`` plan: ``vmap``, and
  ``unrolled`` for the CNN on CPU), each with its own
  algorithm, i.e. what a loop over learning rates does. ``with_compile`` is the first call
  (trace + compile + rounds); ``without_compile`` repeats each call with the compiled round
  cached.
* sweep: ``fedjax_lab.sweep.sweep`` over the same N learning rates with each execution of
  ``--executions``: ``vmap_all_points`` (the old default), ``points_per_batch_1`` (points
  looped inside the one program), ``host`` (one compiled round called per point and round;
  ``host_padded``/``host_packed`` with its rounds' packing forced off/on) and ``auto`` (the
  rule of ``fedjax_lab.sweep.resolve_execution``). ``with_compile`` = host
  cohort preparation + compile + execution; ``without_compile`` = preparation + execution.

Both sides include their host-side cohort construction and exclude evaluation. Reports the
ratio sweep / sequential for both (targets: <= 0.5 with compile, <= 1.0 without, N = 16), the
median of each over ``--repeats`` (the machine may be shared: ratios compare within one run),
and, per learning rate, the max abs difference between the sweep's and the sequential run's
final parameters (float32 round-off is amplified by large learning rates and ReLU kinks over
many rounds; the unit tests check equality to 1e-5 on a convex problem).

    python benchmarks/sweep_speedup.py --repeats 3 --json runs/bench/sweep_speedup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import optax

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.data.datasets.synthetic import synthetic
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.data.partition import dirichlet_label_mix
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from fedjax_lab.sweep import sweep

CLIENTS, PER_ROUND, BATCH, EPOCHS = 50, 10, 20, 1
SYNTHETIC_CLIENTS = 1000
POPULATIONS = ("digits_dirichlet", "digits_heavy_tailed", "synthetic_natural")
# digits_heavy_tailed: client sizes proportional to lognormal(0, HEAVY_TAIL_SIGMA) draws (at
# least one example each), labels mixed by Dirichlet(0.5) (dirichlet_label_mix with sizes).
HEAVY_TAIL_SIGMA = 1.5
# "before" = the executions the sweep had (all points vmapped was the default), "after" adds
# the host execution and the automatic choice.
EXECUTIONS = {
    "vmap_all_points": {"execution": "vmap"},
    "points_per_batch_1": {"execution": "map", "points_per_batch": 1},
    "host": {"execution": "host"},
    "host_padded": {"execution": "host", "packing": "off"},
    "host_packed": {"execution": "host", "packing": "on"},
    "host_unrolled": {"execution": "host", "client_plan": "unrolled"},
    "vmap_unrolled": {"execution": "vmap", "client_plan": "unrolled"},
    "auto": {"execution": "auto"},
}


def population(name: str, seed: int, image_size: int):
    """``(dataset, federated data)`` of a ``--population`` choice (see the module docstring)."""
    if name == "synthetic_natural":
        dataset = synthetic(1.0, 1.0, num_clients=SYNTHETIC_CLIENTS, seed=seed)
        return dataset, federate(dataset, "natural", None, seed=seed)
    dataset = (load_dataset("digits", resize=(image_size, image_size)) if image_size != 8
               else load_dataset("digits"))
    if name == "digits_heavy_tailed":
        rng = np.random.default_rng(seed)
        labels = np.asarray(dataset.train["y"])
        weights = rng.lognormal(0.0, HEAVY_TAIL_SIGMA, CLIENTS)
        sizes = 1 + np.floor(weights / weights.sum() * (labels.size - CLIENTS)).astype(int)
        sizes[np.argmax(sizes)] += labels.size - sizes.sum()  # every example assigned once
        parts = dirichlet_label_mix(labels, CLIENTS, 0.5, rng, sizes=sizes.tolist())
        return dataset, FederatedData.from_partition(dataset.train, parts,
                                                     num_classes=dataset.num_classes)
    return dataset, federate(dataset, "dirichlet_per_class", CLIENTS, seed=seed, alpha=0.5)


def bench_model(model_name: str, n: int, rounds: int, seed: int, executions: list[str],
                image_size: int, population_name: str = "digits_dirichlet") -> dict:
    dataset, data = population(population_name, seed, image_size)
    model = get_model(model_name, dataset.input_shape, dataset.num_classes)
    params = model.init(jax.random.key(seed))
    lrs = [float(v) for v in np.geomspace(0.01, 10.0, n)]

    def make(lr):
        return fedavg(model, optax.sgd(lr), batch_size=BATCH, local_epochs=EPOCHS)

    seq_first, seq_again, seq_params, seq_steps = [], [], [], []
    for lr in lrs:
        algorithm, backend = make(lr), VmapBackend()
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
        seq_steps.append((result.real_steps, result.computed_steps,
                          [list(d) for d in backend.packing.layouts or ()]))

    seq_with, seq_without = float(sum(seq_first)), float(sum(seq_again))
    sizes = np.asarray(data.sizes)
    out = {
        "model": model_name,
        "population": population_name,
        "client_sizes": {"clients": int(sizes.size), "median": float(np.median(sizes)),
                         "mean": float(sizes.mean()), "max": int(sizes.max())},
        "image_size": image_size,
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "runs": n,
        "rounds": rounds,
        "learning_rates": lrs,
        "sequential": {
            "plan": "auto",
            "with_compile_seconds": seq_with,
            "without_compile_seconds": seq_without,
            "per_run_with_compile_seconds": seq_first,
            "per_run_without_compile_seconds": seq_again,
            "real_steps": float(sum(r for r, _, _ in seq_steps)),
            "computed_steps": float(sum(c for _, c, _ in seq_steps)),
            "layouts_of_first_run": seq_steps[0][2],
        },
        "sweeps": {},
        "target_ratio_with_compile": 0.5,
        "target_ratio_without_compile": 1.0,
    }
    for label in executions:
        res = sweep(lambda h: fedavg(model, optax.sgd(h["client_lr"]), batch_size=BATCH,
                                     local_epochs=EPOCHS),
                    {"client_lr": lrs}, data, params, seeds=[seed], rounds=rounds,
                    clients_per_round=PER_ROUND, **EXECUTIONS[label])
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
            "execution": res.execution,
            "client_plan": res.client_plan,
            "points_per_batch": res.points_per_batch,
            "with_compile_seconds": sweep_with,
            "without_compile_seconds": sweep_without,
            "prepare_seconds": res.prepare_seconds,
            "compile_seconds": res.compile_seconds,
            "run_seconds": res.run_seconds,
            "real_steps": res.real_steps,
            "computed_steps": res.computed_steps,
            "packed_layouts": [list(d) for d in res.packed_layouts],
            "ratio_with_compile": sweep_with / seq_with,
            "ratio_without_compile": sweep_without / seq_without,
            "per_run_max_abs_param_difference": diffs,
            "runs_equal_to_1e-5": int(sum(d <= 1e-5 for d in diffs)),
        }
        print(f"{model_name}: {label} ({res.execution}) ratio with compile "
              f"{sweep_with / seq_with:.3f}, without {sweep_without / seq_without:.3f}",
              file=sys.stderr, flush=True)
    return out


def summarize(repeats: list[list[dict]]) -> dict:
    """Median over repeats of every (model, execution) ratio."""
    table: dict = {}
    for workloads in repeats:
        for w in workloads:
            for label, r in w["sweeps"].items():
                entry = table.setdefault(w["model"], {}).setdefault(
                    label, {"with_compile": [], "without_compile": [], "execution": []})
                entry["with_compile"].append(r["ratio_with_compile"])
                entry["without_compile"].append(r["ratio_without_compile"])
                entry["execution"].append(r["execution"])
    return {
        model: {label: {"median_ratio_with_compile": float(np.median(e["with_compile"])),
                        "median_ratio_without_compile": float(np.median(e["without_compile"])),
                        "ratios_with_compile": e["with_compile"],
                        "ratios_without_compile": e["without_compile"],
                        "execution": e["execution"][0]}
                for label, e in per.items()}
        for model, per in table.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=16, help="learning rates (N)")
    parser.add_argument("--rounds", type=int, default=50, help="rounds of the dense models")
    parser.add_argument("--cnn-rounds", type=int, default=2, help="rounds of the CNN")
    parser.add_argument("--cnn-image-size", type=int, default=28,
                        help="digits resized to this square size for the CNN (28: FEMNIST's, "
                             "8: native)")
    parser.add_argument("--models", default="logreg,mlp,cnn",
                        help="comma list of logreg, mlp, cnn (the FEMNIST CNN)")
    parser.add_argument("--executions", default=",".join(EXECUTIONS),
                        help=f"comma list of {', '.join(EXECUTIONS)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="repeat everything; the summary reports median ratios")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--population", default="digits_dirichlet", choices=POPULATIONS,
                        help="digits_dirichlet (50 clients, Dirichlet 0.5 per class), "
                             "digits_heavy_tailed (50 clients, lognormal(0, 1.5) sizes, "
                             "Dirichlet 0.5 label mix) or synthetic_natural (FedProx "
                             "Synthetic(1,1), 1000 clients, heavy-tailed natural sizes; dense "
                             "models only)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    executions = [e.strip() for e in args.executions.split(",") if e.strip()]
    if min(args.runs, args.rounds, args.cnn_rounds, args.repeats) < 1:
        parser.error("--runs, --rounds, --cnn-rounds and --repeats must be >= 1")
    if args.cnn_image_size < 4:
        parser.error("--cnn-image-size must be >= 4 (the CNN pools twice)")
    if args.population == "synthetic_natural" and "cnn" in models:
        parser.error("--population synthetic_natural has vector inputs: use --models logreg,mlp")
    if not models or set(models) - {"logreg", "mlp", "cnn"}:
        parser.error(f"--models must be a comma list of logreg, mlp, cnn, got {args.models!r}")
    if not executions or set(executions) - set(EXECUTIONS):
        parser.error(f"--executions must be a comma list of {', '.join(EXECUTIONS)}, got "
                     f"{args.executions!r}")
    load_at_start = list(os.getloadavg())
    repeats = []
    for _ in range(args.repeats):
        repeats.append([
            bench_model(m, args.runs, args.cnn_rounds if m == "cnn" else args.rounds,
                        args.seed, executions, args.cnn_image_size if m == "cnn" else 8,
                        args.population)
            for m in models
        ])
    out = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "summary": summarize(repeats),
        "repeats": repeats,
    }
    write_json(out, args.json)


def write_json(out: dict, path: str | None) -> None:
    """Prints `out` as JSON and writes it to `path` when given."""
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
