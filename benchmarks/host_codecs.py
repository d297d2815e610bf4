"""Host wire codecs: ``to_bytes`` and ``from_bytes`` times of every compressor at 1M and 10M.

Usage::

    python benchmarks/host_codecs.py --json OUT [--sizes 1M 10M] [--repeats 3] [--only NAME ...]

The edge backend sends every client update through ``Compressor.to_bytes`` and
``Compressor.from_bytes`` on the host (numpy), so these run once per client per round; the
target of issue 13 is ``to_bytes + from_bytes <= 50 ms`` for a 10M-float32 update. For every
compressor and size this script encodes one update with the jitted ``encode`` (not timed) and
reports the median over ``--repeats`` of ``to_bytes`` and of ``from_bytes`` in milliseconds,
the wire size, and whether ``8 * len(bytes) == bits``. The pytrees and most compressors are
those of ``compressor_throughput.py``; QSGD is also run with many levels (s=64, dense
Elias-γ), and the ``masked`` wrapper around STC. Times are wall clock on whatever else the
machine is running: the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compressor_throughput as B

from fedjax_lab import compressors as C


def host_compressors(tree) -> dict[str, C.Compressor]:
    """``compressor_throughput``'s compressors plus dense many-level QSGD and ``masked``."""
    out = B.compressors(tree)
    out["qsgd_s64"] = C.qsgd(64)
    out["masked_stc_1pct_biases_raw"] = C.masked(C.stc(0.01), lambda path, leaf: leaf.ndim > 1)
    return out


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_one(c: C.Compressor, tree, repeats: int) -> dict:
    state = c.init(tree)
    key = jax.random.key(0)

    @jax.jit
    def run(updates, state, key):
        payload, _ = c.encode(updates, state, key=key)
        return payload, c.bits(payload)

    payload, bits = jax.device_get(run(jax.device_put(tree), state, key))
    template = jax.eval_shape(lambda: c.encode(tree, state, key=key)[0])
    data = c.to_bytes(payload)
    to_ms = _median_ms(lambda: c.to_bytes(payload), repeats)
    from_ms = _median_ms(lambda: c.from_bytes(data, template), repeats)
    return {
        "to_bytes_ms": round(to_ms, 2),
        "from_bytes_ms": round(from_ms, 2),
        "total_ms": round(to_ms + from_ms, 2),
        "wire_bytes": len(data),
        "bits_match": 8 * len(data) == int(bits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output JSON path")
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M"], choices=sorted(B.SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="subset of compressor names")
    args = parser.parse_args()
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        sys.exit(2)

    results = {
        "benchmark": "host_codecs",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "numpy": np.__version__,
        "load_average_start": os.getloadavg(),
        "repeats": args.repeats,
        "results": [],
    }
    B.run_table(args, results, host_compressors, lambda c, tree: bench_one(c, tree, args.repeats))

if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
