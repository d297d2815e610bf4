"""Stochastic rounding A/B: QSGD and TernGrad round trips at 10M, interleaved in one process.

Usage::

    python benchmarks/rounding_ab.py --json OUT [--size 10M] [--repeats 7]

On a shared machine only ratios measured side by side mean anything, so each repeat times the
memory pass (``2 u + 1``) and then every variant, and reports per variant the median over
repeats of memory-pass time / round-trip time (``memory_pass_ratio``, as in
``compressor_throughput.py``) and the median round-trip time. Variants: QSGD s=4 and TernGrad
with the default rounding, with ``rounding_bits`` 16 and 8 and with ``"hash"``. (The
before/after of QSGD's bit accounting in the README was measured with a version of this script
that also ran the earlier cumulative-max ``bits`` as a baseline.)

Floors, timed the same way: the default rounding's draws alone, one threefry word per
coordinate (``compressors.random_uniform`` of ``d`` floats, written; and the sum of
``random_bits`` of ``d`` words, nothing written: the hash's compute alone), and
``jax.random.uniform`` (JAX's own lowering). A default-rounding round trip computes at least
those words, so ``memory_pass_ratio`` of the compute-only floor bounds the ratio any
implementation of the default rounding (same outputs) can reach on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compressor_throughput as B

from fedjax_lab import compressors as C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="output JSON path")
    parser.add_argument("--size", default="10M", choices=sorted(B.SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tree = B.make_tree(args.size, np.random.default_rng(0))
    variants = {
        "qsgd_s4 (default rounding)": C.qsgd(4),
        "qsgd_s4 rounding_bits=16": C.qsgd(4, rounding_bits=16),
        "qsgd_s4 rounding_bits=8": C.qsgd(4, rounding_bits=8),
        "terngrad (default rounding)": C.terngrad(),
        "terngrad rounding_bits=16": C.terngrad(rounding_bits=16),
        "terngrad rounding_bits=8": C.terngrad(rounding_bits=8),
        "qsgd_s4 rounding_bits=hash": C.qsgd(4, rounding_bits="hash"),
        "terngrad rounding_bits=hash": C.terngrad(rounding_bits="hash"),
    }
    d = sum(x.size for x in jax.tree.leaves(tree))
    floors = {
        "floor: random_uniform of d (written)": jax.jit(
            lambda updates, key: C.random_uniform(key, (d,))
        ),
        "floor: sum of random_bits of d (compute only)": jax.jit(
            lambda updates, key: jnp.sum(C.random_bits(key, (d,)) >> jnp.uint32(31))
        ),
        "floor: jax.random.uniform of d (JAX's lowering)": jax.jit(
            lambda updates, key: jax.random.uniform(key, (d,))
        ),
    }

    def round_trip(c):
        @jax.jit
        def run(updates, key):
            payload, _ = c.encode(updates, (), key=key)
            return c.decode(payload), c.bits(payload)

        return run

    runs = {**{name: round_trip(c) for name, c in variants.items()}, **floors}
    memory_pass = jax.jit(lambda u: jax.tree.map(lambda x: 2 * x + 1, u))
    updates, key = jax.device_put(tree), jax.random.key(0)
    jax.block_until_ready(memory_pass(updates))
    for run in runs.values():
        jax.block_until_ready(run(updates, key))
    ratios = {name: [] for name in runs}
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(memory_pass(updates))
            middle = time.perf_counter()
            jax.block_until_ready(run(updates, key))
            end = time.perf_counter()
            ratios[name].append((middle - start) / (end - middle))
            seconds[name].append(end - middle)
    results = {
        "size": args.size,
        "params": d,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "variants": {
            name: {
                "memory_pass_ratio": round(statistics.median(ratios[name]), 4),
                "encode_decode_s": round(statistics.median(seconds[name]), 5),
            }
            for name in runs
        },
    }
    for name, row in results["variants"].items():
        print(f"{name:40s} ratio {row['memory_pass_ratio']:.4f}  {row['encode_decode_s']:.3f} s")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
