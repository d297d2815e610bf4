"""Packing vs bucketing on a skewed population (the two ways to stop paying for padding).

Bucketing: each round's clients are grouped by the ladder rung of their own step count
(``CohortBuilder.round_steps``), every bucket runs as a padded vmapped cohort of its own shape
(``[C_b, S_b, B]``, ``C_b`` rounded up to a power of two), the buckets' additive aggregates are
summed and one server update follows. Packing: the default ``VmapBackend`` (clients back to back
in slots, layouts fixed by the cost model). Same workload as W3 of round_throughput.py
(FedProx Synthetic(1,1), 1000 clients, MLP (200, 200), batch 10, 10 clients/round); both
report real examples per second over every round after the first (later compiles included),
padding efficiency and programs compiled, in one run.

    python benchmarks/packing_vs_bucketing.py --json OUT [--rounds 100]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend, add_aggregates
from fedjax_lab.core.rng import SAMPLING_STREAM, client_keys, host_rng, round_key
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.datasets import federate, synthetic
from fedjax_lab.data.federated import sample_clients
from fedjax_lab.models import mlp
from fedjax_lab.runner import run

CLIENTS, BATCH, LR = 10, 10, 0.05


def bucketed(alg, data, params, rounds: int) -> dict:
    """FedAvg rounds run bucket by bucket; returns throughput, efficiency and compiles."""
    backend = VmapBackend("vmap", packing="off")
    builders: dict[int, CohortBuilder] = {}
    traces: defaultdict[tuple, int] = defaultdict(int)

    def partial(server_state, cohort, keys):
        traces[(cohort.mask.shape[:2])] += 1
        outputs, _ = backend.client_outputs(alg, server_state, (), cohort, keys)
        return alg.aggregate(outputs)

    partial_fn = jax.jit(partial)
    finish = jax.jit(alg.server_update)
    probe = CohortBuilder(data, batch_size=BATCH, local_epochs=1, cohort_size=CLIENTS, seed=0)
    state = alg.init(params)
    root = jax.random.key(0)
    seconds = examples = real = computed = 0.0
    for r in range(rounds):
        t0 = time.perf_counter()
        clients = sample_clients(data.num_clients, CLIENTS, host_rng(0, SAMPLING_STREAM, r))
        keys = client_keys(round_key(root, r), CLIENTS)
        buckets: defaultdict[int, list[int]] = defaultdict(list)
        for pos, c in enumerate(clients):
            buckets[probe.round_steps([c])].append(pos)
        agg = None
        for positions in buckets.values():
            size = 1 << (len(positions) - 1).bit_length()
            if size not in builders:
                builders[size] = CohortBuilder(data, batch_size=BATCH, local_epochs=1,
                                               cohort_size=size, seed=0)
            cohort = builders[size].build(r, clients[positions])
            pad = np.asarray(positions + [positions[0]] * (size - len(positions)), np.int32)
            part = partial_fn(state, cohort, keys[jnp.asarray(pad)])
            agg = part if agg is None else add_aggregates(agg, part)
            mask = cohort.mask
            real += float((mask.sum(axis=2) > 0).sum())
            computed += mask.shape[0] * mask.shape[1]
        state, metrics = finish(state, agg)
        ex = float(jax.block_until_ready(metrics["train_examples"]))
        if r > 0:
            seconds += time.perf_counter() - t0
            examples += ex
    return {"examples_per_second": examples / seconds, "padding_efficiency": real / computed,
            "compiled_programs": sum(traces.values()) + 1, "bucket_shapes": len(traces)}


def packed(alg, data, params, rounds: int) -> dict:
    backend = VmapBackend()
    res = run(alg, backend, data, params, rounds=rounds, clients_per_round=CLIENTS, seed=0)
    later = res.history[1:]
    return {"examples_per_second": sum(h["train_examples"] for h in later)
            / sum(h["round_seconds"] for h in later),
            "padding_efficiency": res.padding_efficiency,
            "compiled_programs": sum(res.compiles.values()),
            "layouts": [list(d) for d in backend.packing.layouts or ()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output JSON path")
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    data = federate(synthetic(1.0, 1.0, num_clients=1000, seed=0), "natural", None, seed=0)
    model = mlp((60,), 10)
    alg = fedavg(model, optax.sgd(LR), batch_size=BATCH, local_epochs=1)
    params = model.init(jax.random.key(0))
    out = {"jax": jax.__version__, "platform": jax.default_backend(), "rounds": args.rounds,
           "packing": packed(alg, data, params, args.rounds),
           "bucketing": bucketed(alg, data, params, args.rounds)}
    out["packing_over_bucketing"] = (out["packing"]["examples_per_second"]
                                     / out["bucketing"]["examples_per_second"])
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
