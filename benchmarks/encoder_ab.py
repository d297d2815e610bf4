"""Encoder A/B: this checkout's compressors against an earlier revision's, interleaved.

Usage::

    python benchmarks/encoder_ab.py --json OUT [--baseline 7cb5f7a] [--size 10M] [--repeats 7]
                                   [--clients N]

On a shared machine only ratios measured side by side mean anything, so each repeat times the
memory pass (``2 u + 1``) right before every variant's jitted ``decode(encode(u))`` plus
``bits``, as ``compressor_throughput.py`` does, and reports per variant the median round-trip
time and the median memory-pass ratio. The baseline compressors are the modules of
``fedjax_lab/compressors`` at git revision ``--baseline`` (read with ``git show`` into a
temporary directory and imported next to this checkout's shared helpers), so old and new run in
one process on the same input. Each old/new pair with the same statistics is also checked bit
for bit (payload, decoded update and bits); ``rounding_bits='hash'`` rows have one only if
the baseline has that mode.
With ``--clients N`` the round trip is ``jax.vmap``-ed over N updates (the tree scaled by
``1 + i / N`` for client ``i``, one key each), as a round compresses its cohort, and the memory
pass runs over the same N trees.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compressor_throughput as B

from fedjax_lab import compressors as C

# Modules read from the baseline revision; a module missing there keeps this checkout's.
_MODULES = (
    "_base",
    "_bernoulli",
    "_leafwise",
    "_select",
    "sign",
    "qsgd",
    "terngrad",
    "sparsify",
    "stc",
    "sstc",
)


def load_baseline(revision: str, directory: str) -> dict:
    """The baseline's compressor modules, imported under private names.

    Names a baseline module imported from another module in :data:`_MODULES` are rebound to
    that module's baseline version, so e.g. the baseline ``stc`` selects with the baseline
    ``_select``.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = {}
    for name in _MODULES:
        shown = subprocess.run(
            ["git", "show", f"{revision}:fedjax_lab/compressors/{name}.py"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        if shown.returncode:
            continue
        path = os.path.join(directory, f"baseline_{name}.py")
        with open(path, "w") as f:
            f.write(shown.stdout)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # flax dataclasses look their module up
        spec.loader.exec_module(module)
        modules[name] = module
    current = {f"fedjax_lab.compressors.{name}": name for name in modules}
    for module in modules.values():
        for attr, value in list(vars(module).items()):
            if isinstance(value, types.ModuleType) and value.__name__ in current:
                setattr(module, attr, modules[current[value.__name__]])
            elif getattr(value, "__module__", None) in current:
                twin = modules[current[value.__module__]]
                if hasattr(twin, attr):
                    setattr(module, attr, getattr(twin, attr))
    return modules


def variants(old: dict, tree) -> dict[str, tuple]:
    """name -> (compressor, name of the variant it must equal bit for bit, or None)."""
    is_conv = B.common_conv_kernels(tree)
    return {
        "sign (baseline)": (old["sign"].sign(), None),
        "sign": (C.sign(), "sign (baseline)"),
        "scaled_sign (baseline)": (old["sign"].scaled_sign(), None),
        "scaled_sign": (C.scaled_sign(), "scaled_sign (baseline)"),
        "qsgd_s4 (baseline)": (old["qsgd"].qsgd(4), None),
        "qsgd_s4": (C.qsgd(4), "qsgd_s4 (baseline)"),
        "qsgd_s4_rb8 (baseline)": (old["qsgd"].qsgd(4, rounding_bits=8), None),
        "qsgd_s4_rb8": (C.qsgd(4, rounding_bits=8), "qsgd_s4_rb8 (baseline)"),
        **_hashed("qsgd_s4_hash", lambda m: m.qsgd(4, rounding_bits="hash"), old["qsgd"], C),
        "qsgd_s16_bucket512 (baseline)": (old["qsgd"].qsgd(16, bucket_size=512), None),
        "qsgd_s16_bucket512": (C.qsgd(16, bucket_size=512), "qsgd_s16_bucket512 (baseline)"),
        "terngrad (baseline)": (old["terngrad"].terngrad(), None),
        "terngrad": (C.terngrad(), "terngrad (baseline)"),
        **_hashed("terngrad_hash", lambda m: m.terngrad(rounding_bits="hash"), old["terngrad"], C),
        "top_k_1pct (baseline)": (old["sparsify"].top_k(0.01), None),
        "top_k_1pct": (C.top_k(0.01), "top_k_1pct (baseline)"),
        "rand_k_1pct (baseline)": (old["sparsify"].rand_k(0.01), None),
        "rand_k_1pct": (C.rand_k(0.01), "rand_k_1pct (baseline)"),
        "stc_1pct (baseline)": (old["stc"].stc(0.01), None),
        "stc_1pct": (C.stc(0.01), "stc_1pct (baseline)"),
        "sstc_1pct_kf0.1 (baseline)": (old["sstc"].sstc(0.01, 0.1, is_conv=is_conv), None),
        "sstc_1pct_kf0.1": (C.sstc(0.01, 0.1, is_conv=is_conv), "sstc_1pct_kf0.1 (baseline)"),
    }


def _hashed(name: str, make, old_module, new_module) -> dict[str, tuple]:
    """A ``rounding_bits='hash'`` row, with its baseline twin if the baseline has the mode."""
    try:
        baseline = make(old_module)
    except ValueError:  # a revision from before rounding_bits="hash"
        return {name: (make(new_module), None)}
    return {f"{name} (baseline)": (baseline, None), name: (make(new_module), f"{name} (baseline)")}


def round_trip(c, clients: int | None = None):
    def run(updates, key):
        payload, _ = c.encode(updates, (), key=key)
        return payload, c.decode(payload), c.bits(payload)

    return jax.jit(run if clients is None else jax.vmap(run))


def _same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(
            np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
        )
        for x, y in zip(la, lb, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="output JSON path")
    parser.add_argument("--baseline", default="7cb5f7a", help="git revision of the baseline")
    parser.add_argument("--size", default="10M", choices=[*B.SIZES, *B.MODELS])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=None, help="subset of variant names")
    parser.add_argument(
        "--clients", type=int, default=None, help="vmap the round trip over this many updates"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        sys.exit(2)
    if args.clients is not None and args.clients < 1:
        print("error: --clients must be >= 1", file=sys.stderr)
        sys.exit(2)
    single = B.make_tree(args.size, np.random.default_rng(0))
    tree, key = single, jax.random.key(0)
    if args.clients is not None:
        n = args.clients
        tree = jax.tree.map(lambda x: np.stack([x * (1 + i / n) for i in range(n)]), single)
        key = jax.random.split(key, n)
    tree = jax.device_put(tree)
    with tempfile.TemporaryDirectory() as directory:
        table = variants(load_baseline(args.baseline, directory), single)
    if args.only:
        table = {n: v for n, v in table.items() if n in args.only}
    runs = {name: round_trip(c, args.clients) for name, (c, _) in table.items()}
    outputs = {name: jax.device_get(run(tree, key)) for name, run in runs.items()}
    identical = {
        name: _same_bits(outputs[name], outputs[twin])
        for name, (_, twin) in table.items()
        if twin is not None and twin in outputs
    }
    memory_pass = jax.jit(lambda u: jax.tree.map(lambda x: 2 * x + 1, u))
    jax.block_until_ready(memory_pass(tree))
    ratios = {name: [] for name in runs}
    seconds = {name: [] for name in runs}
    passes = []
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(memory_pass(tree))
            middle = time.perf_counter()
            jax.block_until_ready(run(tree, key))
            end = time.perf_counter()
            passes.append(middle - start)
            ratios[name].append((middle - start) / (end - middle))
            seconds[name].append(end - middle)
    results = {
        "benchmark": "encoder_ab",
        "baseline": args.baseline,
        "size": args.size,
        "clients": args.clients,
        "params": int(sum(x.size for x in jax.tree.leaves(tree))),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average_end": os.getloadavg(),
        "memory_pass_s": round(statistics.median(passes), 5),
        "variants": {
            name: {
                "encode_decode_s": round(statistics.median(seconds[name]), 5),
                "memory_pass_ratio": round(statistics.median(ratios[name]), 4),
                **(
                    {"bit_identical_to": table[name][1], "bit_identical": identical[name]}
                    if name in identical
                    else {}
                ),
            }
            for name in runs
        },
    }
    for name, row in results["variants"].items():
        print(f"{name:26s} {json.dumps(row)}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    if not all(identical.values()):
        print("error: a variant differs from its baseline", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
