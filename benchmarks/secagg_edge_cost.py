"""SecAgg / SecAgg+ over the edge transport: bytes on the wire per client per call, and time.

Usage::

    python benchmarks/secagg_edge_cost.py --json OUT [--clients 10] [--dim 10000] [--bits 32]
        [--neighbours 4]

Starts a real :class:`EdgeServer` on loopback and one authenticated connection (its own worker
key) per client, in threads, and runs one secure sum (``fedjax_lab.backends.edge.secagg``) for
SecAgg (complete graph) and SecAgg+ (``--neighbours`` k). Reports, per client, the SecAgg
request frames it sent and the answer frames it received at each call (the ``config`` call and
the 4 stages; frames include the edge framing, not the gRPC/HTTP2 headers and the 7 metadata
fields of ~350 B per call), against a plain edge upload of a ``4 * dim``-byte float32 update,
and the wall time of the round.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from secagg_cost import parser, write_rows

from fedjax_lab.backends.edge import protocol
from fedjax_lab.backends.edge.client import Connection
from fedjax_lab.backends.edge.secagg import CONFIG, SecureSumRound, run_secagg_worker
from fedjax_lab.backends.edge.server import EdgeServer
from fedjax_lab.secagg import STAGES, FixedPoint, SecAggConfig, default_threshold, new_session


def measure(server: EdgeServer, token: bytes, clients: int, dim: int, bits: int,
            neighbours: int | None) -> dict:
    fp = FixedPoint(bits=bits, frac_bits=bits // 2, bound=1.0)
    rng = np.random.default_rng(0)
    values = {i: rng.uniform(-1, 1, dim) for i in range(clients)}
    holders = clients if neighbours is None or neighbours >= clients - 1 else neighbours + 1
    k = None if holders == clients else neighbours
    config = SecAggConfig(clients, dim, fp, default_threshold(holders), neighbours=k,
                          session=new_session())
    rnd = SecureSumRound(config, {i: i for i in range(clients)}, stage_timeout=60.0)
    out = {}

    def work(w):
        conn = Connection(server.address, w, protocol.worker_key(token, w), tls_ca=None,
                           server_name=None, max_message_bytes=1 << 26)
        conn.session = server.session
        try:
            run_secagg_worker(lambda f, t: conn.call(protocol.SECAGG, f, t),
                              lambda c, idx: {i: values[i] for i in idx})
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    out["total"] = server.secure_sum(rnd)
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    plain = fp.reduce(np.sum([fp.encode(v)[0] for v in values.values()], axis=0,
                             dtype=np.uint64))
    assert np.array_equal(out["total"], plain), "unmasked sum differs from the plain sum"
    up = {s: rnd.up_frame_bytes[s] / clients for s in STAGES}
    down = {s: rnd.down_frame_bytes[s] / clients for s in (CONFIG, *STAGES)}
    return {"protocol": "secagg" if k is None else f"secagg+ k={k}", "clients": clients,
            "dim": dim, "bits": bits, "threshold": config.threshold,
            "calls_per_client": 1 + len(STAGES), "up_frame_bytes": up,
            "down_frame_bytes": down, "upload_bytes": sum(up.values()),
            "download_bytes": sum(down.values()), "plain_float32_upload": 4 * dim,
            "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    a = parser(__doc__.splitlines()[0]).parse_args(argv)
    token = secrets.token_bytes(32)
    server = EdgeServer(num_workers=a.clients, token=token, poll_seconds=0.5)
    try:
        rows = [measure(server, token, a.clients, a.dim, a.bits, k)
                for k in (None, a.neighbours)]
    finally:
        server.stop(0.0)
    write_rows(a.json, rows)
    return rows


if __name__ == "__main__":
    main()
