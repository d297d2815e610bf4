"""Compressor throughput: jitted encode+decode and host wire codec, on 1M and 10M parameters.

Usage::

    python benchmarks/compressor_throughput.py --json OUT [--sizes 1M 10M femnist_cnn resnet18]
        [--repeats 5]

For every compressor and model size it reports

* ``encode_decode_s``: median wall time of one jitted ``decode(encode(u))`` (``bits`` included)
  after compilation, and ``encode_decode_gbps`` = float32 input bytes (4 d) / time;
* ``memory_pass_s``: median time of a jitted ``2 u + 1`` over the same tree, timed alternately
  with the round trip (one of each per repeat, so both see the same machine load), and
  ``memory_pass_ratio``: the median over repeats of memory-pass time / round-trip time (the
  compressor's throughput as a fraction of a plain read-and-write pass);
* ``to_bytes_s`` / ``from_bytes_s``: median host codec times, with the same GB/s-of-input
  normalisation and the wire rate in MB/s;
* ``wire_bytes``, ``bits_per_param`` and the compression ratio against float32.

The ``1M``/``10M`` pytrees look like a small CNN (two 3x3 conv kernels in HWIO layout, a dense
layer and the biases) so that SSTC has conv kernels to select; ``femnist_cnn`` and ``resnet18``
are those models' parameter trees (SSTC keeps the conv kernels of the most common spatial
size). Times are wall-clock on whatever else the machine is running; the load average is
recorded next to them, and the ratio to the memory pass is the number to compare across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import compressors as C
from fedjax_lab import models

SIZES = {
    # name: ((conv1 C, F), (conv2 C, F), (dense in, out))
    "1M": ((64, 128), (128, 256), (625, 1000)),
    "10M": ((256, 512), (512, 512), (6400, 1000)),
}


MODELS = ("femnist_cnn", "resnet18")


def make_tree(size: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if size in MODELS:
        model = models.femnist_cnn() if size == "femnist_cnn" else models.resnet18_gn()
        shapes = jax.eval_shape(model.init, jax.random.key(0))
        return jax.tree.map(
            lambda s: (0.01 * rng.standard_normal(s.shape)).astype(np.float32), shapes
        )
    (c1, f1), (c2, f2), (din, dout) = SIZES[size]
    shapes = {
        "conv1": {"kernel": (3, 3, c1, f1), "bias": (f1,)},
        "conv2": {"kernel": (3, 3, c2, f2), "bias": (f2,)},
        "dense": {"kernel": (din, dout), "bias": (dout,)},
    }
    return jax.tree.map(
        lambda s: (0.01 * rng.standard_normal(s)).astype(np.float32),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def common_conv_kernels(tree):
    """SSTC's ``is_conv``: the 4-D kernels of the tree's most common spatial size."""
    kernel_sizes = [leaf.shape[:2] for leaf in jax.tree.leaves(tree) if leaf.ndim == 4]
    common = max(set(kernel_sizes), key=kernel_sizes.count)

    def is_conv(path, leaf):
        del path
        return leaf.ndim == 4 and leaf.shape[:2] == common

    return is_conv


def compressors(tree) -> dict[str, C.Compressor]:
    def not_bias(path, leaf):
        del path
        return leaf.ndim > 1

    is_conv = common_conv_kernels(tree)
    return {
        "identity": C.identity(),
        "qsgd_s4": C.qsgd(4),
        # Same statistics from 16/8-bit rounding uniforms (fewer threefry words).
        "qsgd_s4_rb16": C.qsgd(4, rounding_bits=16),
        "qsgd_s4_rb8": C.qsgd(4, rounding_bits=8),
        # Same marginals from a counter-based hash (no per-coordinate threefry work).
        "qsgd_s4_hash": C.qsgd(4, rounding_bits="hash"),
        "qsgd_s16_bucket512": C.qsgd(16, bucket_size=512),
        "rand_k_1pct": C.rand_k(0.01),
        "top_k_1pct": C.top_k(0.01),
        "sign": C.sign(),
        "scaled_sign": C.scaled_sign(),
        "terngrad": C.terngrad(),
        "terngrad_rb8": C.terngrad(rounding_bits=8),
        "terngrad_hash": C.terngrad(rounding_bits="hash"),
        "stc_1pct": C.stc(0.01),
        "sstc_1pct_kf0.1": C.sstc(0.01, 0.1, is_conv=is_conv),
        "ef_stc_1pct": C.with_error_feedback(C.stc(0.01)),
        "per_leaf_qsgd_s4_biases_raw": C.per_leaf(C.qsgd(4), not_bias),
    }


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(c: C.Compressor, tree, repeats: int) -> dict:
    d = sum(x.size for x in jax.tree.leaves(tree))
    state = c.init(tree)
    key = jax.random.key(0)

    @jax.jit
    def round_trip(updates, state, key):
        payload, state = c.encode(updates, state, key=key)
        return payload, state, c.decode(payload), c.bits(payload)

    @jax.jit
    def memory_pass(updates):
        return jax.tree.map(lambda u: 2 * u + 1, updates)

    device_tree = jax.device_put(tree)
    start = time.perf_counter()
    jax.block_until_ready(round_trip(device_tree, state, key))
    compile_s = time.perf_counter() - start
    jax.block_until_ready(memory_pass(device_tree))
    trips, passes = [], []
    for _ in range(repeats):
        passes.append(_time(lambda: jax.block_until_ready(memory_pass(device_tree))))
        trips.append(_time(lambda: jax.block_until_ready(round_trip(device_tree, state, key))))
    seconds = statistics.median(trips)
    ratio = statistics.median(p / t for p, t in zip(passes, trips, strict=True))
    payload, _, _, bits = jax.device_get(round_trip(device_tree, state, key))

    data = c.to_bytes(payload)
    assert 8 * len(data) == int(bits), "bits() disagrees with the wire size"
    to_s = _median_time(lambda: c.to_bytes(payload), repeats)
    template = jax.eval_shape(lambda: c.encode(tree, state, key=key)[0])
    from_s = _median_time(lambda: c.from_bytes(data, template), repeats)

    input_gb = 4 * d / 1e9
    return {
        "params": int(d),
        "compile_s": round(compile_s, 3),
        "encode_decode_s": round(seconds, 5),
        "encode_decode_gbps": round(input_gb / seconds, 3),
        "memory_pass_s": round(statistics.median(passes), 5),
        "memory_pass_gbps": round(input_gb / statistics.median(passes), 3),
        "memory_pass_ratio": round(ratio, 4),
        "host_codec_s": round(to_s + from_s, 5),
        "wire_bytes": len(data),
        "bits_per_param": round(8 * len(data) / d, 4),
        "compression_ratio": round(32 * d / (8 * len(data)), 2),
        "to_bytes_s": round(to_s, 5),
        "to_bytes_gbps_of_input": round(input_gb / to_s, 3),
        "to_bytes_wire_mbps": round(len(data) / 1e6 / to_s, 2),
        "from_bytes_s": round(from_s, 5),
        "from_bytes_gbps_of_input": round(input_gb / from_s, 3),
        "from_bytes_wire_mbps": round(len(data) / 1e6 / from_s, 2),
    }


def run_table(args, results: dict, make_compressors, bench) -> None:
    """For every size and compressor: one JSON row (printed as it comes), then the JSON file.

    ``make_compressors(tree)`` names the compressors of a tree; ``bench(c, tree)`` measures one.
    Each row is printed as soon as it is measured, so a long run shows progress, and the jit
    caches are cleared between rows so a row's memory does not stay for the next.
    """
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for size in args.sizes:
        tree = make_tree(size, rng)
        params = sum(x.size for x in jax.tree.leaves(tree))
        for name, c in make_compressors(tree).items():
            if args.only and name not in args.only:
                continue
            row = {"size": size, "params": int(params), "compressor": name, **bench(c, tree)}
            results["results"].append(row)
            print(json.dumps(row), flush=True)
            jax.clear_caches()
    results["load_average_end"] = os.getloadavg()
    results["total_s"] = round(time.perf_counter() - start, 1)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.json} in {results['total_s']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output JSON path")
    sizes = [*SIZES, *MODELS]
    parser.add_argument("--sizes", nargs="+", default=sizes, choices=sizes)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="subset of compressor names")
    args = parser.parse_args()

    results = {
        "benchmark": "compressor_throughput",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_start": os.getloadavg(),
        "repeats": args.repeats,
        "results": [],
    }
    run_table(args, results, compressors, lambda c, tree: bench_one(c, tree, args.repeats))


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
