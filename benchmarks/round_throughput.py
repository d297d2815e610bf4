"""Round throughput of the vmap backend vs centralized SGD and a per-client loop.

Workloads (issue: the core): W1 = logistic regression 784->10, W2 = FEMNIST CNN (62 classes);
10 clients x 200 examples per round, batch 20, 1 local epoch, lr 0.1. For each workload, in ONE
run (median of --rounds timed rounds after warm-up):
  (a) fedjax_lab rounds with each execution plan, and the plan ``auto`` picks;
  (b) the limit: centralized SGD on the same 2,000 examples with batch 200 (10 steps), as a jit
      per step, as one scanned program, and as one unrolled program;
  (c) a per-client Python loop calling a jitted client update (how most FL simulators run).
Writes JSON with examples_per_second for each and ratio_to_centralized = auto / best (b).

    python benchmarks/round_throughput.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms._local import local_train, masked_mean_objective
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.plan import unrolled_local_steps
from fedjax_lab.core.rng import round_key
from fedjax_lab.core.types import Batches
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.models import femnist_cnn, logistic_regression

CLIENTS, PER_CLIENT, BATCH, LR = 10, 200, 20, 0.1


def _median_seconds(fn, rounds: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(0))
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(i + 1))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _population(model, num_classes: int, seed: int = 0) -> FederatedData:
    rng = np.random.default_rng(seed)
    n = CLIENTS * PER_CLIENT
    x = rng.random((n, *model.input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    parts = np.arange(n).reshape(CLIENTS, PER_CLIENT)
    return FederatedData.from_partition({"x": x, "y": y}, list(parts))


def bench_workload(
    name: str, model, num_classes: int, rounds: int, plans, other_rounds: int,
    central_forms: tuple[str, ...] = ("jit_per_step", "scan", "scan_unrolled"),
) -> dict:
    data = _population(model, num_classes)
    params = model.init(jax.random.key(0))
    alg = fedavg(model, optax.sgd(LR), batch_size=BATCH, local_epochs=1)
    builder = CohortBuilder(data, batch_size=BATCH, local_epochs=1, cohort_size=CLIENTS, seed=0)
    cohorts = [builder.build(r, np.arange(CLIENTS)) for r in range(4)]
    examples = CLIENTS * PER_CLIENT
    out: dict = {"examples_per_round": examples, "plans": {}}
    root = jax.random.key(0)

    auto = VmapBackend("auto")
    out["auto_plan"] = auto.resolve_plan(alg, alg.init(params), cohorts[0])
    for plan in dict.fromkeys((out["auto_plan"], *plans)):
        backend = VmapBackend(plan)
        state = {"s": alg.init(params)}

        def one_round(i, backend=backend, state=state):
            s, _, m = backend.run_round(alg, state["s"], (), cohorts[i % 4], round_key(root, i))
            state["s"] = s
            return m

        t0 = time.perf_counter()
        jax.block_until_ready(one_round(0))
        compile_s = time.perf_counter() - t0
        # The auto plan gets the full --rounds; the others (e.g. vmap+scan of a CNN on CPU,
        # ~25 s/round) get --other-plan-rounds so one run stays within minutes.
        n = rounds if plan == out["auto_plan"] else min(rounds, other_rounds)
        sec = _median_seconds(one_round, n, warmup=1)
        out["plans"][plan] = {"seconds_per_round": sec, "examples_per_second": examples / sec,
                              "first_round_seconds": compile_s, "timed_rounds": n}
        print(f"  {name} plan {plan}: {sec * 1e3:.1f} ms/round (first round {compile_s:.1f} s)",
              flush=True)

    # (b) centralized SGD, batch = CLIENTS * BATCH, same examples, 10 steps per "round".
    objective = masked_mean_objective(model.apply, softmax_cross_entropy)
    opt = optax.sgd(LR)
    x = jnp.asarray(data.arrays["x"]).reshape(PER_CLIENT // BATCH, CLIENTS * BATCH,
                                                *model.input_shape)
    y = jnp.asarray(data.arrays["y"]).reshape(PER_CLIENT // BATCH, CLIENTS * BATCH)
    ones = jnp.ones(y.shape[1], jnp.float32)

    @jax.jit
    def step(p, xb, yb):
        g = jax.grad(objective)(p, {"x": xb, "y": yb}, ones)
        return optax.apply_updates(p, opt.update(g, opt.init(p), p)[0])

    def scanned(unroll):
        @jax.jit
        def run_all(p):
            def body(p, xy):
                return step(p, *xy), None
            return jax.lax.scan(body, p, (x, y), unroll=unroll)[0]
        return run_all

    central = {}
    p_holder = {"p": params}

    def per_step(i):
        p = p_holder["p"]
        for s in range(x.shape[0]):
            p = step(p, x[s], y[s])
        p_holder["p"] = p
        return p

    # Screen every variant with few rounds (a scanned CNN is ~10 s/round on CPU), then time
    # the fastest with the full --rounds.
    variants = {"jit_per_step": per_step}
    for label, unroll in (("scan", 1), ("scan_unrolled", True)):
        fn = scanned(unroll)
        variants[label] = lambda i, fn=fn: fn(params)
    variants = {k: v for k, v in variants.items() if k in central_forms}
    for label, fn in variants.items():
        central[label] = _median_seconds(fn, min(rounds, other_rounds))
    best = min(central, key=central.get)
    central[best] = _median_seconds(variants[best], rounds)
    out["centralized"] = {k: {"seconds_per_round": v, "examples_per_second": examples / v}
                          for k, v in central.items()}
    best_central = min(central.values())

    # (c) per-client loop of a jitted client update (FedML/Flower-style simulation); its local
    # steps are unrolled, the fastest form of this design on CPU.
    @jax.jit
    def client_update(p, xb, yb, mask):
        with unrolled_local_steps(True):
            res = local_train(objective, opt, p, Batches({"x": xb, "y": yb}, mask,
                                                         jnp.float32(1)))
        return jax.tree.map(jnp.subtract, res.params, p)

    xc = jnp.asarray(data.arrays["x"]).reshape(CLIENTS, PER_CLIENT // BATCH, BATCH,
                                                 *model.input_shape)
    yc = jnp.asarray(data.arrays["y"]).reshape(CLIENTS, PER_CLIENT // BATCH, BATCH)
    mask = jnp.ones((PER_CLIENT // BATCH, BATCH), jnp.float32)
    loop_state = {"p": params}

    def loop_round(i):
        p = loop_state["p"]
        deltas = [client_update(p, xc[c], yc[c], mask) for c in range(CLIENTS)]
        mean = jax.tree.map(lambda *d: sum(d) / CLIENTS, *deltas)
        loop_state["p"] = jax.tree.map(jnp.add, p, mean)
        return loop_state["p"]

    loop_s = _median_seconds(loop_round, rounds)
    out["per_client_loop"] = {"seconds_per_round": loop_s, "examples_per_second": examples / loop_s}
    auto_s = out["plans"][out["auto_plan"]]["seconds_per_round"]
    out["seconds_per_round_auto"] = auto_s
    out["examples_per_second_auto"] = examples / auto_s
    out["ratio_to_centralized"] = best_central / auto_s
    out["speedup_vs_per_client_loop"] = loop_s / auto_s
    print(f"{name}: auto={out['auto_plan']} {auto_s * 1e3:.2f} ms/round, centralized best "
          f"{best_central * 1e3:.2f} ms, ratio {out['ratio_to_centralized']:.2f}, loop "
          f"{loop_s * 1e3:.2f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output JSON path")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (median)")
    parser.add_argument("--other-plan-rounds", type=int, default=5,
                        help="timed rounds for the plans auto does not pick")
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--w2-central", default="jit_per_step,scan_unrolled",
                        help="centralized forms timed for W2 (a scanned CNN is ~10x slower "
                             "on CPU and takes minutes; add 'scan' to include it)")
    parser.add_argument("--plans", default="vmap,unrolled,loop",
                        help="plans to time besides the one auto picks (comma list)")
    args = parser.parse_args()
    plans = tuple(p for p in args.plans.split(",") if p)  # "" = only the plan auto picks
    results = {"jax": jax.__version__, "platform": jax.default_backend(),
               "machine": platform.machine(), "cpu_count": __import__("os").cpu_count(),
               "config": {"clients": CLIENTS, "examples_per_client": PER_CLIENT,
                          "batch_size": BATCH, "local_epochs": 1, "lr": LR}, "workloads": {}}
    wl = set(args.workloads.split(","))
    if "W1" in wl:
        results["workloads"]["W1"] = bench_workload(
            "W1 logreg", logistic_regression((28, 28, 1), 10), 10, args.rounds,
            plans, args.other_plan_rounds)
    if "W2" in wl:
        results["workloads"]["W2"] = bench_workload(
            "W2 femnist_cnn", femnist_cnn((28, 28, 1), 62), 62, args.rounds,
            plans, args.other_plan_rounds,
            tuple(args.w2_central.split(",")))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: {"ratio_to_centralized": v["ratio_to_centralized"],
                          "seconds_per_round_auto": v["seconds_per_round_auto"]}
                      for k, v in results["workloads"].items()}, indent=2))


if __name__ == "__main__":
    main()
