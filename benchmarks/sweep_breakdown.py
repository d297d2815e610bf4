"""Where a sweep's time goes: one local SGD step of P points x C clients in each program shape.

For each model (logistic regression, the MLP, the FEMNIST CNN; digits-sized inputs, batch 20,
C = 10 clients, P = 16 points) it times, once compiled (median of ``--reps`` calls):

* ``clients``: one step of C vmapped clients (what one sequential run does per step); x P;
* ``points_vmapped``: the step of P x C clients vmapped together (the ``vmap`` execution):
  its ratio to ``clients`` x P is the cost of dots batched over points x clients;
* ``points_flat``: the same with points folded into the client axis (one batch axis of P x C);
* ``points_map``: P x C as ``lax.map`` over points of the C-vmapped step (the ``map``
  execution): its ratio is the cost of looping the points inside the program;
* ``clients_unrolled``: the C clients as a traced Python loop (the round's ``unrolled`` plan),
  x P;
* ``clients_in_loop``: two C-vmapped steps inside a ``fori_loop`` vs the same two steps
  unrolled (a while loop around the step: a scan over rounds or local steps is one);
* ``gather``: gathering the step's examples from the device table, ``[P, C, B]`` vs P x
  ``[C, B]`` indices.

    python benchmarks/sweep_breakdown.py --json runs/bench/sweep_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_speedup import write_json

from fedjax_lab.models import get_model

POINTS, CLIENTS, BATCH, TABLE_ROWS = 16, 10, 20, 1437


def timed(calls: dict, reps: int) -> dict[str, float]:
    """Median seconds of each ``fn(*args)`` once compiled, the calls interleaved round-robin so
    that a shared machine's load changes hit every program alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_model(name: str, image_size: int, reps: int) -> dict:
    shape = (image_size, image_size, 1)
    model = get_model(name, shape, 10)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    table_x = jnp.asarray(rng.normal(size=(TABLE_ROWS, *shape)), jnp.float32)
    table_y = jnp.asarray(rng.integers(0, 10, TABLE_ROWS), jnp.int32)
    index = jnp.asarray(rng.integers(0, TABLE_ROWS, (POINTS, CLIENTS, BATCH)), jnp.int32)
    lrs = jnp.asarray(np.geomspace(0.01, 1.0, POINTS), jnp.float32)

    def step(p, idx, lr):  # one client's local SGD step on its gathered batch
        def loss(q):
            logits = model.apply(q, table_x[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, table_y[idx]).mean()

        return jax.tree.map(lambda w, g: w - lr * g, p, jax.grad(loss)(p))

    per_point = jax.tree.map(lambda x: jnp.broadcast_to(x, (CLIENTS, *x.shape)), params)
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (POINTS, *x.shape)), per_point)
    clients = jax.jit(jax.vmap(step, in_axes=(0, 0, None)))
    points_vmapped = jax.jit(jax.vmap(jax.vmap(step, in_axes=(0, 0, None))))
    # Points folded into the client axis: one flat batch axis of P x C instead of two.
    points_flat = jax.jit(lambda p, i, lr: jax.tree.map(
        lambda x: x.reshape(POINTS, CLIENTS, *x.shape[1:]),
        jax.vmap(step)(jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), p),
                       i.reshape(-1, BATCH), jnp.repeat(lr, CLIENTS))))
    points_map = jax.jit(lambda p, i, lr: jax.lax.map(
        lambda xs: jax.vmap(step, in_axes=(0, 0, None))(*xs), (p, i, lr)))

    def unrolled(p, idx, lr):
        outs = [step(jax.tree.map(lambda x, c=c: x[c], p), idx[c], lr) for c in range(CLIENTS)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    clients_unrolled = jax.jit(unrolled)
    two = jax.vmap(step, in_axes=(0, 0, None))
    in_loop = jax.jit(lambda p, i, lr: jax.lax.fori_loop(0, 2, lambda _, q: two(q, i, lr), p))
    straight = jax.jit(lambda p, i, lr: two(two(p, i, lr), i, lr))
    gather_all = jax.jit(lambda i: table_x[i])
    gather_one = jax.jit(lambda i: table_x[i])

    one = (per_point, index[0], lrs[0])
    t = timed({
        "clients_x_points": (clients, one),
        "points_vmapped": (points_vmapped, (stacked, index, lrs)),
        "points_flat": (points_flat, (stacked, index, lrs)),
        "points_map": (points_map, (stacked, index, lrs)),
        "clients_unrolled_x_points": (clients_unrolled, one),
        "two_steps_in_fori_loop": (in_loop, one),
        "two_steps_straight": (straight, one),
        "gather_points_x_clients": (gather_all, (index,)),
        "gather_clients_x_points": (gather_one, (index[0],)),
    }, reps)
    for k in ("clients_x_points", "clients_unrolled_x_points", "gather_clients_x_points"):
        t[k] *= POINTS  # one point's program, run for every point
    base = t["clients_x_points"]
    out = {
        "model": name,
        "image_size": image_size,
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "seconds": t,
        "ratios": {
            "points_vmapped / clients_x_points": t["points_vmapped"] / base,
            "points_flat / clients_x_points": t["points_flat"] / base,
            "points_map / clients_x_points": t["points_map"] / base,
            "clients_unrolled / clients_vmapped": t["clients_unrolled_x_points"] / base,
            "fori_loop / straight": t["two_steps_in_fori_loop"] / t["two_steps_straight"],
            "gather / step (points_vmapped)": t["gather_points_x_clients"] / t["points_vmapped"],
        },
    }
    print(json.dumps(out), file=sys.stderr, flush=True)  # partial results of a long run
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="logreg,mlp,cnn")
    parser.add_argument("--cnn-image-size", type=int, default=28)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"logreg", "mlp", "cnn"} or args.reps < 1:
        parser.error("--models: comma list of logreg, mlp, cnn; --reps >= 1")
    out = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "load_average_at_start": list(os.getloadavg()),
        "workloads": [bench_model(m, args.cnn_image_size if m == "cnn" else 8, args.reps)
                      for m in models],
        "load_average_at_end": list(os.getloadavg()),
    }
    write_json(out, args.json)


if __name__ == "__main__":
    main()
