"""Round throughput of the vmap backend vs centralized SGD and a per-client loop.

Equal-size workloads (W1, W2): W1 = logistic regression 784->10, W2 = FEMNIST CNN (62 classes);
10 clients x 200 examples per round, batch 20, 1 local epoch, lr 0.1. For each workload, in ONE
run (median of --rounds timed rounds after warm-up):
  (a) fedjax_lab rounds with each execution plan, and the plan ``auto`` picks;
  (b) the limit: centralized SGD on the same 2,000 examples with batch 200 (10 steps), as a jit
      per step, as one scanned program, and as one unrolled program;
  (c) a per-client Python loop calling a jitted client update (how most FL simulators run).
Writes JSON with examples_per_second for each and ratio_to_centralized = auto / best (b).

Skewed populations (W3, W4, W5): real federated client sizes are heavy-tailed, so the same data
is run as a size-skewed population and as an equal-size split of it:
  W3  FedProx Synthetic(1,1), 1000 clients (natural partition) vs the iid split of the same
      examples into 1000 clients; MLP (200, 200), batch 10, lr 0.05;
  W4  FEMNIST CNN on 200 clients with LEAF FEMNIST's sizes (normal, mean 227, sd 89, clipped to
      [10, 700]; synthetic 28x28 images), batch 20, lr 0.1, vs the equal split;
  W5  heavy-tail stress: 10,000 clients with StackOverflow-like lognormal sizes (median ~60,
      mean ~400, clipped to [1, 100,000]), logistic regression 32 -> 10, batch 16, lr 0.1;
all with 10 clients per round and 1 local epoch. For each: a ``runner.run`` of --skew-rounds
rounds with the default backend (packing ``auto``), its real examples per second over every
round after the first (compiles of later rounds included), padding efficiency (real local steps
/ computed slot-steps), programs compiled and the layout chosen; the same run without packing
on the population's largest shape (the behaviour before packing, a few rounds); and a
per-client loop on the same sizes: each client's real batches, one jitted step per batch fed
from host numpy (a FedML/PyTorch-style simulator), same sampled clients.

    python benchmarks/round_throughput.py --json bench.json
    python benchmarks/round_throughput.py --json skew.json --workloads W3,W4,W5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core.local import call_client_update
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.rng import SAMPLING_STREAM, SHUFFLE_STREAM, host_rng, round_key
from fedjax_lab.core.types import Batches
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.datasets import federate, synthetic
from fedjax_lab.data.federated import FederatedData, sample_clients
from fedjax_lab.models import femnist_cnn, logistic_regression, mlp
from fedjax_lab.runner import run

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


def _mean_loss(model):
    """Masked mean cross entropy of ``model`` on one batch (the centralized baselines' loss)."""

    def loss(p, x, y, mask):
        per_example = softmax_cross_entropy(model.apply(p, x), y)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss


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
    steps = [builder.client_steps(range(CLIENTS))] * 4
    for plan in dict.fromkeys((out["auto_plan"], *plans)):
        backend = VmapBackend(plan)
        # As runner.run does: the run's client sizes are known up front (equal here, so the
        # policy keeps the padded program).
        backend.plan_rounds(steps, [builder.steps] * 4)
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
    objective = _mean_loss(model)
    opt = optax.sgd(LR)
    x = jnp.asarray(data.arrays["x"]).reshape(PER_CLIENT // BATCH, CLIENTS * BATCH,
                                                *model.input_shape)
    y = jnp.asarray(data.arrays["y"]).reshape(PER_CLIENT // BATCH, CLIENTS * BATCH)
    ones = jnp.ones(y.shape[1], jnp.float32)

    @jax.jit
    def step(p, xb, yb):
        g = jax.grad(objective)(p, xb, yb, ones)
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
        out, _ = call_client_update(alg.client_update, alg.init(p), (),
                                    Batches({"x": xb, "y": yb}, mask, jnp.float32(1)),
                                    key=jax.random.key(0), unroll=True)
        return out.update

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


def per_client_loop(model, data: FederatedData, *, batch: int, lr: float, rounds: int,
                    clients_per_round: int, seed: int = 0) -> dict:
    """A FedML/PyTorch-style simulator on the same sampled clients: per client, per real batch,
    one jitted SGD step fed from host numpy (the last batch of an epoch is smaller and gets its
    own compiled shape, as a DataLoader's would); FedAvg weighted by client size. Times every
    round after the first."""
    loss = _mean_loss(model)

    @jax.jit
    def step(p, x, y):
        g = jax.grad(loss)(p, x, y, jnp.ones(y.shape[0], jnp.float32))
        return jax.tree.map(lambda a, b: a - lr * b, p, g)

    params = model.init(jax.random.key(0))
    x_all, y_all = data.arrays["x"], data.arrays["y"]
    seconds, examples = 0.0, 0
    for r in range(rounds):
        t0 = time.perf_counter()
        clients = sample_clients(data.num_clients, clients_per_round,
                                 host_rng(seed, SAMPLING_STREAM, r))
        total = float(data.sizes[clients].sum())
        new = jax.tree.map(jnp.zeros_like, params)
        for c in clients:
            lo, n = int(data.offsets[c]), int(data.sizes[c])
            rows = lo + host_rng(seed, SHUFFLE_STREAM, r, int(c)).permutation(n)
            p = params
            for i in range(0, n, batch):
                idx = rows[i:i + batch]
                p = step(p, x_all[idx], y_all[idx])
            new = jax.tree.map(lambda a, b, w=n / total: a + w * b, new, p)
        params = jax.block_until_ready(new)
        if r > 0:
            seconds += time.perf_counter() - t0
            examples += int(data.sizes[clients].sum())
    return {"examples_per_second": examples / seconds, "timed_rounds": rounds - 1}


def _run_population(model, data: FederatedData, *, batch: int, lr: float, rounds: int,
                    backend: VmapBackend, step_ladder: float | None = 2.0) -> dict:
    alg = fedavg(model, optax.sgd(lr), batch_size=batch, local_epochs=1)
    res = run(alg, backend, data, model.init(jax.random.key(0)), rounds=rounds,
              clients_per_round=CLIENTS, seed=0, step_ladder=step_ladder)
    later = res.history[1:]
    seconds = sum(r["round_seconds"] for r in later)
    layouts = backend.packing.layouts or ()
    return {
        "examples_per_second": sum(r["train_examples"] for r in later) / seconds,
        "first_round_seconds": res.history[0]["round_seconds"],
        "timed_rounds": len(later),
        "padding_efficiency": res.padding_efficiency,
        "real_steps": res.real_steps,
        "computed_steps": res.computed_steps,
        "compiles": res.compiles,
        "compiled_programs": sum(res.compiles.values()),
        "layouts": [{"slots": d.slots, "segment_steps": d.segment} if d.slots else "padded"
                    for d in layouts],
        "rounds_by_slots": {str(int(k)): v for k, v in sorted(Counter(
            r["packed_slots"] for r in res.history).items())},
    }


def bench_skewed(name: str, model, skewed: FederatedData, equal: FederatedData, *, batch: int,
                 lr: float, rounds: int, padded_rounds: int, loop_rounds: int) -> dict:
    """One skewed workload: the packed run, the equal-size run, the old padded run, the loop."""
    sizes = skewed.sizes
    out: dict = {"clients": skewed.num_clients, "examples": int(sizes.sum()),
                 "client_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                  "mean": float(sizes.mean()), "max": int(sizes.max())}}
    kw = {"batch": batch, "lr": lr}
    for label, data in (("skewed", skewed), ("equal", equal)):
        out[label] = _run_population(model, data, rounds=rounds, backend=VmapBackend(), **kw)
        out[label + "_per_client_loop"] = per_client_loop(
            model, data, rounds=loop_rounds, clients_per_round=CLIENTS, **kw)
        print(f"  {name} {label}: {out[label]['examples_per_second']:.0f} ex/s, padding "
              f"efficiency {out[label]['padding_efficiency']:.3f}, "
              f"{out[label]['compiled_programs']} programs, layouts {out[label]['layouts']} "
              f"{out[label]['rounds_by_slots']}; "
              f"per-client loop {out[label + '_per_client_loop']['examples_per_second']:.0f} "
              "ex/s", flush=True)
    if padded_rounds > 1:
        out["skewed_padded_to_largest"] = _run_population(
            model, skewed, rounds=padded_rounds, backend=VmapBackend(packing="off"),
            step_ladder=None, **kw)
        print(f"  {name} skewed, no packing, largest shape: "
              f"{out['skewed_padded_to_largest']['examples_per_second']:.0f} ex/s", flush=True)
    out["skewed_over_equal"] = (out["skewed"]["examples_per_second"]
                                / out["equal"]["examples_per_second"])
    out["skewed_over_per_client_loop"] = (out["skewed"]["examples_per_second"]
                                          / out["skewed_per_client_loop"]["examples_per_second"])
    return out


def _equal_split(data: FederatedData, seed: int = 0) -> FederatedData:
    """The same examples split iid into as many equal-size clients."""
    n, k = data.num_examples, data.num_clients
    perm = np.random.default_rng(seed).permutation(n)
    return FederatedData.from_partition(data.arrays, np.array_split(perm, k))


def _images(sizes: np.ndarray, num_classes: int, seed: int) -> FederatedData:
    rng = np.random.default_rng(seed)
    n = int(sizes.sum())
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return FederatedData.from_partition(
        {"x": x, "y": y}, [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))])


def w3_populations() -> tuple[FederatedData, FederatedData]:
    ds = synthetic(1.0, 1.0, num_clients=1000, seed=0)
    skewed = federate(ds, "natural", None, seed=0)
    return skewed, _equal_split(skewed)


def w4_populations(num_clients: int = 200) -> tuple[FederatedData, FederatedData]:
    rng = np.random.default_rng(4)
    sizes = np.clip(np.rint(rng.normal(227, 89, num_clients)), 10, 700).astype(np.int64)
    skewed = _images(sizes, 62, seed=4)
    return skewed, _equal_split(skewed)


def w5_populations(num_clients: int = 10_000, dim: int = 32) -> tuple[FederatedData, None]:
    rng = np.random.default_rng(5)
    # StackOverflow-like: lognormal with median ~60 and mean ~400 (sigma^2 = 2 ln(mean/median)).
    sizes = np.clip(np.rint(rng.lognormal(np.log(60), 1.95, num_clients)), 1, 100_000)
    sizes = sizes.astype(np.int64)
    n = int(sizes.sum())
    w = rng.normal(size=(dim, 10)).astype(np.float32)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = np.argmax(x @ w + rng.normal(size=(n, 10)).astype(np.float32), axis=1).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    skewed = FederatedData.from_partition(
        {"x": x, "y": y}, [np.arange(offsets[i], offsets[i + 1]) for i in range(num_clients)])
    return skewed, _equal_split(skewed)


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
    parser.add_argument("--skew-rounds", type=int, default=100,
                        help="rounds of each W3/W5 run (W4: --w4-rounds)")
    parser.add_argument("--w4-rounds", type=int, default=20, help="rounds of each W4 run")
    parser.add_argument("--padded-rounds", type=int, default=4,
                        help="rounds of the no-packing, largest-shape runs (slow by design)")
    parser.add_argument("--loop-rounds", type=int, default=20,
                        help="rounds of the per-client loops of W3-W5")
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
    skew = {"W3": ("W3 synthetic(1,1) mlp", w3_populations,
                   lambda: mlp((60,), 10), 10, 0.05, args.skew_rounds),
            "W4": ("W4 femnist-size cnn", w4_populations,
                   lambda: femnist_cnn((28, 28, 1), 62), 20, 0.1, args.w4_rounds),
            "W5": ("W5 heavy-tail logreg", w5_populations,
                   lambda: logistic_regression((32,), 10), 16, 0.1, args.skew_rounds)}
    for key, (name, populations, make_model, batch, lr, rounds) in skew.items():
        if key in wl:
            skewed, equal = populations()
            results["workloads"][key] = bench_skewed(
                name, make_model(), skewed, equal, batch=batch, lr=lr, rounds=rounds,
                padded_rounds=min(args.padded_rounds, rounds),
                loop_rounds=min(args.loop_rounds, rounds))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    summary = {}
    for k, v in results["workloads"].items():
        if "ratio_to_centralized" in v:
            summary[k] = {"ratio_to_centralized": v["ratio_to_centralized"],
                          "seconds_per_round_auto": v["seconds_per_round_auto"]}
        else:
            summary[k] = {"skewed_over_equal": v["skewed_over_equal"],
                          "skewed_over_per_client_loop": v["skewed_over_per_client_loop"],
                          "padding_efficiency": v["skewed"]["padding_efficiency"],
                          "compiled_programs": v["skewed"]["compiled_programs"]}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
