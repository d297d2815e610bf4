"""SecAgg / SecAgg+ cost of one round: bytes per client per message round, and host time.

Usage::

    python benchmarks/secagg_cost.py --json OUT [--clients 10] [--dim 10000] [--bits 32]
        [--neighbours 4] [--drop 2]

Runs the real protocol (``fedjax_lab.secagg.run_protocol``) over ``--clients`` random inputs of
``--dim`` coordinates in a ``--bits``-bit ring, for SecAgg (complete graph) and SecAgg+
(``--neighbours`` k), once with every client surviving and once with ``--drop`` clients leaving
after sharing their keys (their pairwise masks are removed from shares of their key). Reports
the mean bytes each client sends and receives at each of the 4 message rounds (the real
serialised messages), the total against a plain float32 upload of ``4 * dim`` bytes, and the
wall time of the whole round on the host (all clients and the server in one process).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from fedjax_lab.secagg import (
    FixedPoint,
    SecAggConfig,
    default_threshold,
    new_session,
    run_protocol,
)


def measure(clients: int, dim: int, bits: int, neighbours: int | None, drop: int) -> dict:
    fp = FixedPoint(bits=bits, frac_bits=bits // 2, bound=1.0)
    rng = np.random.default_rng(0)
    codes = {i: fp.encode(rng.uniform(-1, 1, dim))[0] for i in range(clients)}
    holders = clients if neighbours is None or neighbours >= clients - 1 else neighbours + 1
    config = SecAggConfig(clients, dim, fp, default_threshold(holders), neighbours=neighbours,
                          session=new_session())
    start = time.perf_counter()
    res = run_protocol(config, codes, dropouts=dict.fromkeys(range(drop), "masked"))
    seconds = time.perf_counter() - start
    plain = fp.reduce(np.sum([codes[u] for u in res.survivors], axis=0, dtype=np.uint64))
    assert np.array_equal(res.total, plain), "unmasked sum differs from the plain sum"
    per = res.bytes_per_client()
    up = sum(v for k, v in per.items() if k.endswith("_up"))
    down = sum(v for k, v in per.items() if k.endswith("_down"))
    return {"protocol": "secagg" if holders == clients else f"secagg+ k={neighbours}",
            "clients": clients, "dim": dim, "bits": bits, "threshold": config.threshold,
            "dropped": drop, "rounds": res.rounds, "bytes_per_client": per,
            "upload_bytes": up, "download_bytes": down, "plain_float32_upload": 4 * dim,
            "upload_overhead_bytes": up - 4 * dim, "seconds": round(seconds, 4)}


def parser(description: str) -> argparse.ArgumentParser:
    """The flags both SecAgg cost benchmarks take (this one adds ``--drop``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", required=True)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--dim", type=int, default=10_000)
    p.add_argument("--bits", type=int, default=32)
    p.add_argument("--neighbours", type=int, default=4)
    return p


def write_rows(path: str, rows: list[dict], skip: tuple[str, ...] = ()) -> None:
    """Writes `rows` and the load average as JSON to `path`; prints each row without `skip`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows, "load_average": os.getloadavg()}, f, indent=1)
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k not in skip}))


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--drop", type=int, default=2)
    a = p.parse_args(argv)
    rows = [measure(a.clients, a.dim, a.bits, k, d)
            for k in (None, a.neighbours) for d in (0, a.drop)]
    write_rows(a.json, rows, skip=("bytes_per_client",))
    return rows


if __name__ == "__main__":
    main()
