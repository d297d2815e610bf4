"""SecAgg / SecAgg+ over the edge backend's real gRPC transport (loopback, one thread per worker).

Every worker is a separate authenticated connection (its own HMAC key) to a real EdgeServer;
the server only sees what crosses the wire, which these tests inspect.
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import chex
import grpc
import jax
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.edge import EdgeBackend, EdgeProblem, protocol
from fedjax_lab.backends.edge.__main__ import main as edge_main
from fedjax_lab.backends.edge.client import Connection, run_client
from fedjax_lab.backends.edge.secagg import (
    SecureAggregation,
    SecureSumRound,
    run_secagg_worker,
)
from fedjax_lab.backends.edge.server import EdgeServer
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.runner import run
from fedjax_lab.secagg import FixedPoint, SecAggConfig, SecAggError
from fedjax_lab.secagg import messages as wire
from tests.helpers import LinearModel, make_population

pytestmark = pytest.mark.serial

TOKEN = b"secagg-edge-test-master-secret-0123456789"
WORKERS = 5
FP = FixedPoint(bits=32, frac_bits=16, bound=4.0)


@pytest.fixture(scope="module")
def server():
    srv = EdgeServer(num_workers=WORKERS, token=TOKEN, poll_seconds=0.5, receive_timeout=5.0)
    yield srv
    srv.stop(0.0)


def connect(server, worker, key=None):
    conn = Connection(server.address, worker, key or protocol.worker_key(TOKEN, worker),
                       tls_ca=None, server_name=None, max_message_bytes=1 << 24)
    conn.session = server.session
    return conn


def config(n, dim, t, fp=FP, k=None):
    return SecAggConfig(num_clients=n, dim=dim, fixed_point=fp, threshold=t, neighbours=k,
                        graph_seed=7, session=os.urandom(16))


def run_round(server, cfg, values, *, stage_timeout=1.0, stop_before=None, tamper=None,
              owners=None, before_workers=None):
    """Participant ``i`` on worker ``owners[i]`` (default ``i``); returns the round and results."""
    owners = owners or {i: i for i in range(cfg.num_clients)}
    rnd = SecureSumRound(cfg, owners, stage_timeout)
    results, errors = {}, {}
    outcome = {}

    def serve():
        try:
            outcome["total"] = server.secure_sum(rnd)
        except SecAggError as err:
            outcome["error"] = err

    def work(w):
        conn = connect(server, w)
        try:
            results[w] = run_secagg_worker(
                lambda frame, timeout: conn.call(protocol.SECAGG, frame, timeout),
                lambda c, idx: {i: values[i] for i in idx},
                stop_before=(stop_before or {}).get(w), tamper=tamper)
        except Exception as err:
            errors[w] = err
        finally:
            conn.close()

    driver = threading.Thread(target=serve)
    driver.start()
    if before_workers is not None:
        before_workers(rnd)
    threads = [threading.Thread(target=work, args=(w,)) for w in sorted(set(owners.values()))]
    for t in threads:
        t.start()
    for t in [*threads, driver]:
        t.join(60.0)
    return rnd, outcome, results, errors


def codes_sum(values, who, fp=FP):
    return fp.reduce(np.sum([fp.encode(values[i])[0] for i in who], axis=0, dtype=np.uint64))


def test_loopback_sum_is_the_exact_fixed_point_sum_and_bytes_are_counted(server):
    rng = np.random.default_rng(0)
    n, dim = 4, 257
    values = {i: rng.uniform(-1, 1, dim) for i in range(n)}
    cfg = config(n, dim, t=3)
    # Two workers hosting two participants each: one SecAgg call per worker per stage.
    rnd, outcome, results, errors = run_round(server, cfg, values, owners={0: 0, 1: 1, 2: 0, 3: 1})
    assert not errors and all(r["status"] == "done" for r in results.values())
    np.testing.assert_array_equal(outcome["total"], codes_sum(values, range(n)))
    decoded = FP.decode(outcome["total"])
    np.testing.assert_allclose(decoded, sum(values.values()), rtol=0, atol=n * FP.resolution / 2)
    assert rnd.survivors() == (0, 1, 2, 3) and not rnd.dropped
    assert rnd.calls == {"config": 2, "advertise": 2, "share": 2, "masked": 2, "unmask": 2}
    # The masked upload is header + dim * 4 bytes per participant, inside its frame.
    assert all(len(m) == wire.HEADER.size + 4 * dim for m in rnd.received["masked"].values())
    assert rnd.up_frame_bytes["masked"] > 2 * 2 * 4 * dim


def test_server_view_of_one_upload_is_uniform(server):
    """The masked vector the server received over the wire passes a chi-square uniformity test
    (64 bins of 2^14 16-bit values; chi2(63) 1e-6 upper quantile), although the input is 0."""
    fp = FixedPoint(16, 4, 1.0)
    dim, n = 2**14, 3
    values = {i: np.zeros(dim) for i in range(n)}
    rnd, outcome, _, errors = run_round(server, config(n, dim, t=2, fp=fp), values)
    assert not errors
    np.testing.assert_array_equal(outcome["total"], np.zeros(dim, np.uint64))
    seen = wire.unpack_vector(rnd.received["masked"][0][wire.HEADER.size:], dim, 16)
    bound = stats.chi2.isf(1e-6, 63)

    def chi2(v):
        counts = np.bincount((v >> np.uint64(10)).astype(np.int64), minlength=64)
        return float(np.sum((counts - dim / 64) ** 2 / (dim / 64)))

    assert chi2(seen) < bound
    assert chi2(fp.encode(values[0])[0]) > bound  # the test has power on the plain input


def test_dropout_after_sharing_keys_still_recovers_the_sum(server):
    rng = np.random.default_rng(1)
    n, dim = 5, 33
    values = {i: rng.uniform(-1, 1, dim) for i in range(n)}
    rnd, outcome, results, errors = run_round(server, config(n, dim, t=3), values,
                                              stop_before={4: "masked", 3: "masked"})
    assert not errors and results[4]["status"] == "stopped"
    assert rnd.survivors() == (0, 1, 2)
    assert "no masked message" in rnd.dropped[4]
    np.testing.assert_array_equal(outcome["total"], codes_sum(values, range(3)))


def test_too_many_dropouts_fail_the_round_cleanly(server):
    n, dim = 4, 9
    values = {i: np.full(dim, 0.5) for i in range(n)}
    rnd, outcome, results, errors = run_round(server, config(n, dim, t=3), values,
                                              stop_before={2: "masked", 3: "masked"})
    assert "total" not in outcome and rnd.total is None
    assert results[2]["status"] == results[3]["status"] == "stopped"
    assert "2 of 4 clients sent masked inputs, fewer than the threshold t=3" in str(
        outcome["error"])
    # The waiting workers are told, with the same reason, and fail cleanly too.
    assert set(errors) == {0, 1}
    assert all(isinstance(e, SecAggError) and "threshold" in str(e) for e in errors.values())


def test_forged_share_and_malformed_messages_over_the_wire_are_rejected(server):
    rng = np.random.default_rng(2)
    n, dim = 5, 17
    values = {i: rng.uniform(-1, 1, dim) for i in range(n)}
    cfg = config(n, dim, t=3)

    def tamper(stage, index, data):
        if stage == "share" and index == 0:
            # Flip a ciphertext byte of the share participant 0 sends to participant 1 (the
            # first record): AES-GCM authentication fails at participant 1.
            data = bytearray(data)
            data[wire.HEADER.size + 32 + 4 + 4 + 20] ^= 1
            return bytes(data)
        if stage == "advertise" and index == 4:
            return data[:-1]  # malformed: a truncated key
        return data

    refusals = {}

    def raw_calls(rnd):
        # While stage 0 is open: forged and malformed calls straight on the wire.
        conn0 = connect(server, 0)
        try:
            # Long-polls until the round is open.
            hello = protocol.encode_message({"kind": "secagg", "stage": "config"})
            assert conn0.call(protocol.SECAGG, hello, 10.0).field("indices", list) == [0]
            adv = wire.pack(wire.ADVERTISE, cfg.session, 1, bytes(64))
            frame = protocol.encode_message(
                {"kind": "secagg", "stage": "advertise", "session": cfg.session.hex()},
                blobs={"u1": adv})  # participant 1 belongs to worker 1
            for name, f in (("other's participant", frame), ("garbage", b"FJE1junk")):
                with pytest.raises(grpc.RpcError) as err:
                    conn0.call(protocol.SECAGG, f, 5.0)
                refusals[name] = err.value.code()
        finally:
            conn0.close()
        forger = connect(server, 2, key=protocol.worker_key(b"not-the-master-secret-123", 2))
        try:
            with pytest.raises(grpc.RpcError) as err:
                forger.call(protocol.SECAGG, frame, 5.0)
            refusals["wrong key"] = err.value.code()
        finally:
            forger.close()

    rnd, outcome, results, errors = run_round(server, cfg, values, tamper=tamper,
                                              before_workers=raw_calls)
    assert refusals == {"other's participant": grpc.StatusCode.PERMISSION_DENIED,
                        "garbage": grpc.StatusCode.INVALID_ARGUMENT,
                        "wrong key": grpc.StatusCode.UNAUTHENTICATED}
    assert rnd.refused_requests == 1  # the wrong owner; the other two never reach the round
    assert not errors
    assert "fails authentication" in results[1]["refused"][1]
    assert "advertise" in rnd.dropped[4]
    assert rnd.survivors() == (0, 2, 3)
    np.testing.assert_array_equal(outcome["total"], codes_sum(values, (0, 2, 3)))


# ------------------------------------------------------------- training rounds (EdgeBackend)
MODEL = LinearModel(dim=5, classes=3)
SIZES = [4, 9, 2, 7, 5, 11]
# Example counts up to 11 times |u| <= 1: a 48-bit ring with 2^-24 resolution.
SECURE = SecureAggregation(FixedPoint(bits=48, frac_bits=24, bound=64.0), stage_timeout=5.0)


def fedavg_problem(argv=()) -> EdgeProblem:
    del argv
    alg = fedavg(MODEL, optax.sgd(0.3), batch_size=3, local_epochs=1)
    return EdgeProblem(alg, make_population(SIZES, seed=2), MODEL.init(jax.random.key(0)), 7)


def test_fedavg_rounds_over_secure_aggregation_equal_plain_fedavg():
    problem = fedavg_problem()
    kwargs = dict(rounds=2, clients_per_round=4, seed=problem.seed)
    ref = run(problem.algorithm, VmapBackend("vmap"), problem.data, problem.init_params,
              **kwargs)
    backend = EdgeBackend(num_workers=1, token=TOKEN, round_timeout=60, join_timeout=60,
                          poll_seconds=0.3, secure_aggregation=SECURE)
    codes = {}
    threads = [threading.Thread(target=lambda w=w: codes.setdefault(w, run_client(
        problem, server=backend.address, worker=w, key=protocol.worker_key(TOKEN, w),
        server_timeout=20.0))) for w in range(1)]
    for t in threads:
        t.start()
    try:
        edge = run(problem.algorithm, backend, problem.data, problem.init_params, **kwargs)
    finally:
        backend.close()
        for t in threads:
            t.join(30.0)
    assert codes == {0: 0}
    # Each of the 4 clients' |w u| and w carry at most 2^-25 of rounding; the sums divide by
    # the total weight (>= 2 examples per client here).
    chex.assert_trees_all_close(edge.server_state.params, ref.server_state.params, atol=1e-5)
    for a, b in zip(ref.history, edge.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)
        assert b["secagg_failed"] == 0.0 and b["secagg_clients"] == 4.0
        assert b["dropped_clients"] == 0.0 and b["uplink_bytes"] == 0.0  # no plaintext update
        # Masked inputs alone: 4 clients x (18 + 1 coordinates) x 6 bytes.
        assert b["secagg_upload_bytes"] > 4 * 19 * 6
    print("secagg bytes per round", edge.history[-1]["secagg_upload_bytes"],
          edge.history[-1]["secagg_download_bytes"])


def test_secure_aggregation_refuses_what_it_cannot_protect():
    problem = fedavg_problem()
    with pytest.raises(ValueError, match="neighbours must be None"):
        EdgeBackend(num_workers=1, token=TOKEN, secure_aggregation=SECURE._replace(neighbours=3))
    alg = fedavg(MODEL, optax.sgd(0.3), batch_size=3, local_epochs=1,
                 compressor=qsgd(num_levels=4))
    backend = EdgeBackend(num_workers=1, token=TOKEN, secure_aggregation=SECURE)
    try:
        with pytest.raises(ValueError, match="compressor whose per-client payload"):
            run(alg, backend, problem.data, problem.init_params, rounds=1,
                clients_per_round=2, seed=0)
    finally:
        backend.close()


def test_bad_secure_aggregation_flags_exit_2_naming_the_flag(tmp_path, capsys):
    master = tmp_path / "master"
    master.write_bytes(TOKEN)
    server = ["server", "--master-file", str(master), "--listen", "127.0.0.1:0"]
    secure = [*server, "--secure-aggregation"]
    cases = [
        ("--secagg-neighbours needs", [*server, "--secagg-neighbours", "4"]),
        ("--secagg-neighbours: neighbours must be", [*secure, "--secagg-neighbours", "3"]),
        ("--secagg-bits/--secagg-frac-bits/--secagg-bound: bits", [*secure, "--secagg-bits",
                                                                   "80"]),
        ("--secagg-bits/--secagg-frac-bits/--secagg-bound: bound=1e+20", [
            *secure, "--secagg-bound", "1e20"]),
        ("--secagg-stage-timeout", [*secure, "--secagg-stage-timeout", "0"]),
        ("--secure-aggregation sums dense updates; --compressor qsgd", [
            *secure, "--", "--compressor", "qsgd"]),
    ]
    for start, argv in cases:
        assert edge_main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), (argv, lines)


def test_a_failed_secure_aggregation_drops_the_clients_and_updates_nothing(capfd):
    backend = EdgeBackend(num_workers=1, token=TOKEN,
                          secure_aggregation=SECURE._replace(stage_timeout=0.2))
    try:
        # Too few for the protocol: it does not run.
        rnd = SimpleNamespace(results={3: None}, owners={3: (0, 3)}, dropped={})
        total, info = backend._secure_sum(rnd, 0, 18)
        assert total is None and info["secagg_failed"] == 1.0 and not rnd.results
        assert rnd.dropped == {3: "secure aggregation: round failed"}
        assert "fewer than min_clients=2" in capfd.readouterr().err
        # Nobody answers the advertise stage: SecAggError, clean failure.
        rnd = SimpleNamespace(results={0: None, 2: None}, owners={0: (0, 0), 2: (0, 2)},
                              dropped={})
        total, info = backend._secure_sum(rnd, 1, 18)
        assert total is None and info["secagg_failed"] == 1.0 and set(rnd.dropped) == {0, 2}
        assert "0 of 2 clients advertised keys" in capfd.readouterr().err
    finally:
        backend.close()
