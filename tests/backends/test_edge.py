"""The edge backend: wire protocol, equality with vmap, hostile clients, server kill + resume.

Process tests run real server and client processes on 127.0.0.1; every wait is bounded by
subprocess timeouts.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import chex
import grpc
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.scaffold import scaffold
from fedjax_lab.backends.edge import (
    EdgeBackend,
    EdgeProblem,
    WorkerLauncher,
    protocol,
)
from fedjax_lab.backends.edge.__main__ import main as edge_main
from fedjax_lab.backends.edge._common import PayloadCodec, ProgramSpec, compare_documents
from fedjax_lab.backends.edge.client import EXIT_REFUSED, Connection, EdgeClientError
from fedjax_lab.backends.edge.server import EdgeServer, _ResultSchema
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd, rand_k, with_error_feedback
from fedjax_lab.experiment import build_problem, main, run_fedavg_experiment
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.runner import run
from fedjax_lab.train import FedAvgConfig, fedavg_edge_problem
from tests.helpers import LinearModel, checkpointed_server_state, make_population
from tests.io.test_checkpoint import KILL_AFTER

# Client processes, sockets and round timeouts: run alone (scripts/run_tests.sh).
pytestmark = pytest.mark.serial

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = b"0123456789abcdef0123456789abcdef"
# Not compared with vmap: timings, and how the simulation laid out its steps (edge clients
# train each of their clients alone, on its real steps).
TIME_FIELDS = ("round_seconds", "wall_time", "real_steps", "computed_steps", "packed_slots")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module", autouse=True)
def _shared_compile_cache(tmp_path_factory):
    # Client processes of these tests compile the same programs; JAX's persistent cache
    # saves each later process ~1 s of XLA compilation (results are unaffected).
    ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# ----------------------------------------------------------------------------------- protocol
def test_frame_roundtrip_keeps_fields_arrays_and_blobs():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.int32(7),
              "e": np.zeros((0, 4), np.float32), "b": np.array([True, False])}
    frame = protocol.encode_message({"kind": "x", "n": 3}, arrays, {"p": b"\x01\x02\x03"})
    msg = protocol.decode_message(frame)
    assert msg.header == {"kind": "x", "n": 3}
    for k, v in arrays.items():
        chex.assert_trees_all_equal(msg.arrays[k], np.asarray(v))
        assert msg.arrays[k].dtype == np.asarray(v).dtype
    assert msg.blobs == {"p": b"\x01\x02\x03"}


def _prefixed(text: bytes) -> bytes:
    return protocol.MAGIC + len(text).to_bytes(4, "little") + text


def _raw_frame(header: dict, body: bytes) -> bytes:
    return _prefixed(json.dumps(header).encode()) + body


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"FJE", "shorter than its prefix"),
        (b"ZZZZ" + bytes(8), "bad magic"),
        (protocol.MAGIC + (2**31).to_bytes(4, "little") + b"{}", "declared header length"),
        (protocol.MAGIC + (3).to_bytes(4, "little") + b"\xff\xfe{", "not UTF-8 JSON"),
        (_raw_frame([1, 2], b""), "JSON object"),
        (_raw_frame({"arrays": [["w", "float32", [2**40]]], "blobs": []}, bytes(4)),
         "declares 4398046511104 bytes but only 4 remain"),
        (_raw_frame({"arrays": [], "blobs": [["p", 2**39]]}, bytes(8)), "declares"),
        (_raw_frame({"arrays": [["w", "uint8", [0, 2**41]]], "blobs": []}, b""), "<= 2\\*\\*40"),
        (_prefixed(b'{"n":' + b"9" * 5000 + b"}"), "not UTF-8 JSON"),  # int digits limit
        (_raw_frame({"arrays": [["w", "float32", [1]]], "blobs": []}, bytes(8)),
         "4 trailing bytes"),
        (_raw_frame({"arrays": [["w", "object", [1]]], "blobs": []}, bytes(8)),
         "unsupported dtype"),
        (_raw_frame({"arrays": [["w", "float32", [-1]]], "blobs": []}, b""), "non-negative"),
        (_raw_frame({"arrays": [["w", "float32", [True]]], "blobs": []}, bytes(4)),
         "non-negative integer"),
        (_raw_frame({"arrays": [["w", "uint8", [1]], ["w", "uint8", [1]]], "blobs": []},
                    bytes(2)), "duplicate"),
        (_raw_frame({"arrays": [["w", "uint8", [1] * 9]], "blobs": []}, bytes(1)),
         "dimensions"),
        (_raw_frame({"blobs": []}, b""), "must list 'arrays' and 'blobs'"),
    ],
    ids=["short", "magic", "header-len", "utf8", "not-object", "forged-array-len",
         "forged-blob-len", "huge-dim", "int-literal", "trailing", "dtype", "negative-dim",
         "bool-dim", "duplicate", "ndim", "no-layout"],
)
def test_hostile_frames_are_rejected_before_allocating(frame, message):
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.decode_message(frame)


def test_worker_keys_and_request_macs_bind_every_field():
    keys = [protocol.worker_key(TOKEN, w) for w in range(3)]
    assert len(set(keys)) == 3 and protocol.worker_key(b"y" * 32, 0) != keys[0]
    frame = protocol.encode_message({"kind": "fetch", "after_round": 3})
    _, auth = protocol.sign_request(keys[1], protocol.FETCH, 1, "ab12", frame)
    assert protocol.verify_request(keys[1], protocol.FETCH, auth)
    assert protocol.body_matches(auth, frame) and not protocol.body_matches(auth, frame + b"x")
    assert not protocol.verify_request(keys[0], protocol.FETCH, auth)  # another worker's key
    assert not protocol.verify_request(keys[1], protocol.SUBMIT, auth)
    for change in ({"worker": 0}, {"session": "ab13"}, {"time_ms": auth.time_ms + 1},
                   {"nonce": "0" * 32}, {"length": auth.length + 1}, {"digest": "0" * 64}):
        forged = protocol.RequestAuth(**{**auth.__dict__, **change})
        assert not protocol.verify_request(keys[1], protocol.FETCH, forged), change
    # A reply verifies for the request it answers only: not for another request (replay), not
    # for another method or key.
    answer = protocol.encode_message({"kind": "idle"})
    mac = protocol.reply_mac(keys[1], protocol.FETCH, auth, answer)
    _, other = protocol.sign_request(keys[1], protocol.FETCH, 1, "ab12", frame)
    assert protocol.verify_reply(keys[1], protocol.FETCH, auth, answer, mac)
    assert not protocol.verify_reply(keys[1], protocol.FETCH, other, answer, mac)
    assert not protocol.verify_reply(keys[1], protocol.JOIN, auth, answer, mac)
    assert not protocol.verify_reply(keys[0], protocol.FETCH, auth, answer, mac)
    assert not protocol.verify_reply(keys[1], protocol.FETCH, auth, answer + b"x", mac)


def test_request_metadata_parser_refuses_malformed_fields():
    frame = protocol.encode_message({"kind": "join"})
    metadata, auth = protocol.sign_request(TOKEN, protocol.JOIN, 2, "", frame)
    assert protocol.parse_request_metadata(metadata) == auth
    for key, value in ((protocol.WORKER_KEY, "-1"), (protocol.NONCE_KEY, "xyz"),
                       (protocol.LENGTH_KEY, "1e9"), (protocol.SESSION_KEY, "AB"),
                       (protocol.MAC_KEY, "00")):
        bad = [(k, value if k == key else v) for k, v in metadata]
        assert protocol.parse_request_metadata(bad) is None, key
    assert protocol.parse_request_metadata([*metadata, (protocol.MAC_KEY, auth.mac)]) is None
    assert protocol.parse_request_metadata(metadata[1:]) is None


def test_worker_key_files(tmp_path):
    path = tmp_path / "w3.key"
    protocol.write_worker_key(str(path), TOKEN, 3)
    assert protocol.load_worker_key(str(path)) == (3, protocol.worker_key(TOKEN, 3))
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        protocol.write_worker_key(str(path), TOKEN, 4)
    (tmp_path / "bad.key").write_text('{"worker": 1}')
    with pytest.raises(ValueError, match="is not a worker key file"):
        protocol.load_worker_key(str(tmp_path / "bad.key"))
    with pytest.raises(ValueError, match="cannot read"):
        protocol.load_worker_key(str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="master secret must be bytes of length >= 16"):
        protocol.worker_key(b"short", 0)


def test_uncompressed_codec_is_exact_and_capped():
    delta = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
             "b": np.float32([1e-30, -3e38, 0.0])}
    codec = PayloadCodec(None, jax.eval_shape(lambda: delta))
    data = codec.to_bytes(delta)
    assert len(data) == codec.max_bytes == 4 * 15
    chex.assert_trees_all_equal(codec.from_bytes(data), delta)
    with pytest.raises(ValueError, match="largest valid 60"):
        codec.from_bytes(data + b"\x00")
    with pytest.raises(ValueError):
        codec.from_bytes(data[:-1])


def _result_frame(output, state, payload, **arrays):
    values = {"weight": np.float32(5.0)}
    values.update({f"m:{k}": np.zeros(v.shape, v.dtype) for k, v in output.metrics.items()})
    for prefix, tree in (("e", output.extra), ("c", state)):
        for i, leaf in enumerate(jax.tree.leaves(tree)):
            values[f"{prefix}{i}"] = np.zeros(leaf.shape, leaf.dtype)
    values.update(arrays)
    head = {"kind": "result", "round": 0, "slot": 0, "client": 0}
    return protocol.decode_message(protocol.encode_message(head, values, {"payload": payload}))


def test_uploaded_numbers_are_bounded_and_finite_after_decoding():
    # SCAFFOLD with rand-k: a control-variate client state and an `extra` field to poison too.
    compressor = rand_k(4)
    alg = scaffold(MODEL, 0.1, num_clients=len(SIZES), batch_size=3, compressor=compressor)
    params = MODEL.init(jax.random.key(0))
    spec = ProgramSpec.of_problem(EdgeProblem(alg, make_population(SIZES), params, 0))
    output = spec.output(alg)
    schema = _ResultSchema(output, spec.state, PayloadCodec(compressor, output.update))
    zeros = jax.tree.map(jnp.zeros_like, params)
    payload, _ = compressor.encode(zeros, compressor.init(params), key=jax.random.key(1))
    good = compressor.to_bytes(payload)
    out, _, _ = schema.parse(_result_frame(output, spec.state, good), real_weight=5.0)
    assert float(out.weight) == 5.0
    # 3e38 is a finite float32 that the codec accepts; decoding scales it by d/k to inf.
    huge = compressor.to_bytes(payload.replace(values=np.full(4, 3e38, np.float32)))
    decoded = compressor.decode(compressor.from_bytes(huge, payload))
    assert any(np.isinf(leaf).any() for leaf in jax.tree.leaves(decoded))
    metric = next(iter(output.metrics))
    cases = [
        ({"weight": np.float32(3e38)}, good, "weight out of range"),
        ({"weight": np.float32(5.5)}, good, "weight out of range"),  # > its 5 examples
        ({"weight": np.float32(-1.0)}, good, "weight out of range"),
        ({"weight": np.float32(np.nan)}, good, "weight out of range"),
        ({f"m:{metric}": np.float32(np.inf)}, good, "non-finite values"),
        ({"e0": np.full(jax.tree.leaves(output.extra)[0].shape, np.nan, np.float32)}, good,
         "non-finite values"),
        ({"c0": np.full(jax.tree.leaves(spec.state)[0].shape, np.inf, np.float32)}, good,
         "non-finite values"),
        ({}, huge, "non-finite values"),
    ]
    for arrays, data, reason in cases:
        with pytest.raises(ValueError) as err:
            schema.parse(_result_frame(output, spec.state, data, **arrays), real_weight=5.0)
        assert err.value.reason == reason, arrays


def test_backend_arguments_are_checked():
    with pytest.raises(ValueError, match="token must be bytes of length >= 16"):
        EdgeBackend(num_workers=1, token=b"short")
    with pytest.raises(ValueError, match="num_workers must be an int in"):
        EdgeBackend(num_workers=0, token=TOKEN)
    with pytest.raises(ValueError, match="receive_timeout must be > 0"):
        EdgeBackend(num_workers=1, token=TOKEN, receive_timeout=0)
    with pytest.raises(ValueError, match="round_timeout and join_timeout must be > 0"):
        EdgeBackend(num_workers=1, token=TOKEN, round_timeout=0)
    with pytest.raises(ValueError, match="tls_ca is needed with tls and a launcher"):
        EdgeBackend(num_workers=1, token=TOKEN, tls=(b"cert", b"key"),
                    launcher=WorkerLauncher("m:f"))


# ------------------------------------------------------------------- admission, on real sockets
def _raw_call(address, method, frame, metadata, requests=None, timeout=20):
    """One call made by hand: ``(status name, answer or details, trailing metadata)``."""
    with grpc.insecure_channel(address) as channel:
        fn = channel.stream_unary(protocol.method_path(method))
        try:
            answer, call = fn.with_call(requests or iter(protocol.chunks(frame)),
                                        metadata=metadata, timeout=timeout)
            return "OK", answer, call.trailing_metadata()
        except grpc.RpcError as err:
            return err.code().name, err.details(), None


def _held(first: bytes, release: threading.Event, sent: list):
    """A request stream that sends ``first`` and then nothing until ``release``."""
    if first:
        yield first
    release.wait(30)
    sent.append(True)


def test_server_admits_only_signed_fresh_requests_of_its_own_session():
    doc = {"structure": "s", "program": "p", "config": None, "jax": jax.__version__}
    a = EdgeServer(num_workers=2, token=TOKEN, poll_seconds=0.2, receive_timeout=1.0)
    b = EdgeServer(num_workers=2, token=TOKEN, poll_seconds=0.2)  # another run, same master
    fake = None
    try:
        for srv in (a, b):
            srv.configure(doc, submit_limit=protocol.SMALL_FRAME_BYTES)
        key1 = protocol.worker_key(TOKEN, 1)
        join = protocol.encode_message({"kind": "join", "program": doc})

        def signed(method, frame, worker=1, session="", key=key1, **kw):
            return protocol.sign_request(key, method, worker, session, frame, **kw)[0]

        md = signed(protocol.JOIN, join)
        code, answer, _ = _raw_call(a.address, protocol.JOIN, join, md)
        assert code == "OK", answer
        session = protocol.decode_message(answer).header["session"]
        assert session == a.session != b.session
        refused = {
            "replayed": _raw_call(a.address, protocol.JOIN, join, md),  # captured on the wire
            "impostor": _raw_call(a.address, protocol.JOIN, join,
                                  signed(protocol.JOIN, join, worker=0)),  # key 1 posing as 0
            "unsigned": _raw_call(a.address, protocol.JOIN, join, ()),
            "unknown": _raw_call(a.address, protocol.JOIN, join,
                                 signed(protocol.JOIN, join, worker=7, key=b"k" * 32)),
            "stale-clock": _raw_call(a.address, protocol.JOIN, join, signed(
                protocol.JOIN, join, time_ms=int((time.time() - 3600) * 1000))),
        }
        assert {k: v[0] for k, v in refused.items()} == {
            "replayed": "UNAUTHENTICATED", "impostor": "UNAUTHENTICATED",
            "unsigned": "UNAUTHENTICATED", "unknown": "PERMISSION_DENIED",
            "stale-clock": "UNAUTHENTICATED",
        }
        assert "nonce already used" in refused["replayed"][1]
        assert "not signed with worker 0's key" in refused["impostor"][1]
        assert "synchronize the clocks" in refused["stale-clock"][1]
        # A request signed for run A is refused by run B, although B has the same master.
        fetch = protocol.encode_message({"kind": "fetch", "after_round": -1})
        md = signed(protocol.FETCH, fetch, session=session)
        assert _raw_call(b.address, protocol.FETCH, fetch, md)[0] == "ABORTED"
        code, idle, trailer = _raw_call(a.address, protocol.FETCH, fetch,
                                        signed(protocol.FETCH, fetch, session=session))
        assert code == "OK" and protocol.decode_message(idle).header["kind"] == "idle"
        # Announcing more than the method's limit: refused before the body is sent.
        release, sent = threading.Event(), []
        big = protocol.sign_request(key1, protocol.FETCH, 1, session,
                                    bytes(protocol.SMALL_FRAME_BYTES + 1))[0]
        code, details, _ = _raw_call(a.address, protocol.FETCH, b"", big,
                                     requests=_held(b"", release, sent))
        assert code == "RESOURCE_EXHAUSTED" and "exceeds the largest valid" in details
        assert not sent  # the server answered while the body was still held back
        release.set()
        # An authenticated sender that stops mid-body is cut off at the receive deadline.
        release, sent = threading.Event(), []
        code, details, _ = _raw_call(a.address, protocol.FETCH, b"",
                                     signed(protocol.FETCH, fetch, session=session),
                                     requests=_held(fetch[:10], release, sent))
        assert code == "CANCELLED" and not sent
        release.set()
        # A recorded answer replayed by a fake server to a new request is not accepted.
        fake = grpc.server(futures.ThreadPoolExecutor(2))

        def replay(request_iterator, context):
            context.set_trailing_metadata(tuple(trailer))
            return idle

        fake.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            protocol.SERVICE, {protocol.FETCH: grpc.stream_unary_rpc_method_handler(replay)}),))
        port = fake.add_insecure_port("127.0.0.1:0")
        fake.start()
        conn = Connection(f"127.0.0.1:{port}", 1, key1, tls_ca=None, server_name=None,
                           max_message_bytes=1 << 20)
        conn.session = session
        try:
            with pytest.raises(EdgeClientError, match="not signed for this request"):
                conn.call(protocol.FETCH, fetch, 10.0)
        finally:
            conn.close()
    finally:
        for srv in (a, b):
            srv.stop(0.0)
        if fake is not None:
            fake.stop(0)


# ------------------------------------------------------------------------ equivalence (EF-QSGD)
MODEL = LinearModel(dim=5, classes=3)
SIZES = [4, 9, 2, 7, 5, 11, 3, 6]


def ef_qsgd_problem(argv) -> EdgeProblem:
    """Problem factory used by the client processes of the equivalence test."""
    del argv
    compressor = with_error_feedback(qsgd(num_levels=4))
    alg = fedavg(MODEL, optax.sgd(0.3, momentum=0.5), batch_size=3, local_epochs=2,
                 compressor=compressor)
    return EdgeProblem(alg, make_population(SIZES, seed=2),
                       MODEL.init(jax.random.key(0)), 7)


def _self_signed(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )
    return cert.read_bytes(), key.read_bytes(), cert


def _key_file(tmp_path, worker, master=TOKEN):
    path = tmp_path / f"worker{worker}.key"
    if not path.exists():
        protocol.write_worker_key(str(path), master, worker)
    return path


def _client_cmd(address, key_file, *extra):
    return [sys.executable, "-m", "fedjax_lab.backends.edge", "client", "--server", address,
            "--key-file", str(key_file), "--server-timeout", "10", *extra]


def _finish(procs, timeout=30):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate())
    return outs


def test_edge_equals_vmap_over_tls_with_stateful_compressor(tmp_path):
    cert, key, cert_path = _self_signed(tmp_path)
    problem = ef_qsgd_problem([])
    kwargs = dict(rounds=3, clients_per_round=5, seed=problem.seed)
    ref = run(problem.algorithm, VmapBackend("vmap"), problem.data, problem.init_params,
              **kwargs)
    backend = EdgeBackend(num_workers=2, token=TOKEN,
                          tls=(cert, key), round_timeout=60, join_timeout=60)
    procs = [subprocess.Popen(
        _client_cmd(backend.address, _key_file(tmp_path, w), "--tls-ca", str(cert_path),
                    "--tls-server-name", "localhost",
                    "--problem", "tests.backends.test_edge:ef_qsgd_problem"),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for w in range(2)]
    try:
        edge = run(problem.algorithm, backend, problem.data, problem.init_params, **kwargs)
    finally:
        backend.close()
        outs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    chex.assert_trees_all_close(edge.server_state.params, ref.server_state.params, atol=1e-5)
    for a, b in zip(ref.history, edge.history, strict=True):
        for k, v in a.items():
            if k not in TIME_FIELDS:
                assert b[k] == pytest.approx(v, abs=1e-5), k
        assert b["dropped_clients"] == 0.0 and b["clients"] == 5.0
        # Bytes measured on the wire equal the compressor's bits() of the same payloads
        # (computed independently by the vmap run); QSGD payloads are byte aligned.
        assert abs(8 * b["uplink_bytes"] - a["upload_bits"]) <= 8 * 5
        assert b["uplink_bytes"] < 4 * 18 * 5  # really compressed (vs 32-bit floats)


def broken_problem(argv) -> EdgeProblem:
    """A problem factory that fails, as on a misconfigured device."""
    del argv
    raise ValueError("broken on purpose")


def test_supervisor_restarts_dead_client_processes_then_fails_clearly(tmp_path):
    problem = ef_qsgd_problem([])
    launcher = WorkerLauncher("tests.backends.test_edge:broken_problem", max_restarts=1,
                              log_dir=str(tmp_path), env={"PYTHONPATH": ROOT})
    backend = EdgeBackend(num_workers=1, token=TOKEN,
                          launcher=launcher, join_timeout=60)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)every client process died.*broken on purpose"):
            run(problem.algorithm, backend, problem.data, problem.init_params, rounds=1,
                clients_per_round=2, seed=0)
    finally:
        backend.close()
    assert backend.supervisor.restarts == {0: 1}
    assert (tmp_path / "worker0.log").read_text().count("broken on purpose") == 2


# ------------------------------------------------------------------------- hostile clients
ROGUE = r"""
import json, os, sys, threading, time
import grpc, numpy as np
from fedjax_lab.backends.edge import protocol as P

mode, key_file, spec_file = sys.argv[1:4]
spec = json.load(open(spec_file))
worker, key = P.load_worker_key(key_file)
channel = grpc.insecure_channel(spec["address"])
grpc.channel_ready_future(channel).result(timeout=120)  # the server may still be starting
calls = {m: channel.stream_unary(P.method_path(m)) for m in P.METHODS}
session = ""

def call(method, frame, wid=None, k=None, metadata=None, requests=None, **kw):
    md = metadata or P.sign_request(k or key, method, worker if wid is None else wid, session,
                                    frame, **kw)[0]
    try:
        answer, _ = calls[method].with_call(requests or iter(P.chunks(frame)), metadata=md,
                                            timeout=20)
        return "OK", P.decode_message(answer)
    except grpc.RpcError as e:
        return e.code().name, None

def result(head, weight, payload):
    arrays = {"weight": np.float32(weight)}
    arrays.update({f"m:{k}": np.zeros(s, d) for k, (s, d) in spec["metrics"].items()})
    return P.encode_message({"kind": "result", **head}, arrays,
                            {"payload": bytes.fromhex(spec[payload])})

join = P.encode_message({"kind": "join", "program": spec["doc"]})
while True:
    code, msg = call(P.JOIN, join)
    if code != "OK" or msg.header["kind"] == "welcome":
        break
session = msg.header["session"]
codes = []
if mode == "intruder":  # holds worker 1's key
    md = P.sign_request(key, P.JOIN, worker, "", join)[0]
    codes = [call(P.JOIN, join, metadata=md)[0], call(P.JOIN, join, metadata=md)[0],  # replay
             call(P.JOIN, join, wid=0)[0],  # worker 1's key posing as worker 0
             call(P.FETCH, P.encode_message({"kind": "fetch", "after_round": -1}), wid=0)[0],
             call(P.JOIN, join, k=b"x" * 32)[0], call(P.JOIN, join, metadata=[("a", "b")])[0],
             call(P.JOIN, join, wid=99)[0],
             call(P.JOIN, join, time_ms=int(time.time() * 1000) - 3_600_000)[0]]
    session = "0" * 16  # a run that is not this one
    codes.append(call(P.FETCH, P.encode_message({"kind": "fetch", "after_round": -1}))[0])
    print(json.dumps(codes))
    sys.exit(0)
after, deadline = -1, time.time() + 120
while time.time() < deadline:
    code, msg = call(P.FETCH, P.encode_message({"kind": "fetch", "after_round": after}))
    if code != "OK" or msg.header["kind"] == "stop":
        break
    if msg.header["kind"] != "task":
        continue
    after = msg.header["round"]
    t = msg.header["tasks"][0]
    head = {"round": after, "slot": t["slot"], "client": t["client"]}
    real = spec["weights"][str(t["client"])]
    first = after == spec["first_round"]
    if mode == "disconnect":
        os._exit(0)
    elif mode == "timeout":
        time.sleep(spec["round_timeout"] + 0.5)
        codes.append(call(P.SUBMIT, P.encode_message({"kind": "failed", **head}))[0])
    elif mode == "malformed":
        codes.append(call(P.SUBMIT, b"\x00 not a frame")[0])
    elif mode == "oversized":  # far below --max-message-bytes, far above a valid result
        codes.append(call(P.SUBMIT, bytes(1 << 20))[0])
    elif mode == "forged":
        other = {"kind": "failed", "round": after, "slot": 0, "client": 0}  # worker 0's client
        codes.append(call(P.SUBMIT, P.encode_message(other))[0])
        text = json.dumps({"kind": "result", **head, "blobs": [],
                           "arrays": [["weight", "float32", [1 << 40]]]}).encode()
        codes.append(call(P.SUBMIT, P.MAGIC + len(text).to_bytes(4, "little") + text
                          + bytes(4))[0])
    elif mode == "weight":  # a weight no client of this size can have
        codes.append(call(P.SUBMIT, result(head, 3e38 if first else real + 1, "zero"))[0])
    elif mode == "huge":  # valid credentials, bounded weight, finite numbers: accepted
        frame = (P.encode_message({"kind": "failed", **head}) if first
                 else result(head, real, "huge"))
        codes.append(call(P.SUBMIT, frame)[0])
    elif mode == "stall":  # announces a result, sends a piece of it, then nothing
        frame = result(head, real, "zero")
        release = threading.Event()
        def held():
            yield frame[:100]
            release.wait(30)
        codes.append(call(P.SUBMIT, frame, requests=held())[0])
        release.set()
print(json.dumps(codes))
"""
# FedProx's synthetic data: no scikit-learn import, which saves each process ~2 s.
DATA = ["--dataset", "synthetic_iid", "--partition", "iid"]
# Worker 0 is honest; workers 1..8 each attack in their own way (one client each).
ROGUES = ["disconnect", "timeout", "malformed", "oversized", "forged", "weight", "huge", "stall"]
FLAGS = [*DATA, "--num-clients", "9", "--clients-per-round", "9", "--edge-clients", "9",
         "--model", "logreg", "--local-epochs", "1", "--eval-every", "1", "--progress", "false",
         "--seed", "3", "--rounds", "2"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rogue_spec(path, address, problem, round_timeout):
    """What the numpy-only rogue processes need to speak the protocol for this problem."""
    spec = ProgramSpec.of_problem(problem)
    output = spec.output(problem.algorithm)
    assert not jax.tree.leaves(output.extra) and not jax.tree.leaves(spec.state)  # FedAvg
    codec = PayloadCodec(None, output.update)
    fill = lambda v: jax.tree.map(lambda s: np.full(s.shape, v, s.dtype), output.update)  # noqa: E731
    path.write_text(json.dumps({
        "address": address, "round_timeout": round_timeout, "first_round": 0,
        "doc": spec.document(problem.algorithm, problem.config),
        "metrics": {k: [list(v.shape), np.dtype(v.dtype).name] for k, v in output.metrics.items()},
        "zero": codec.to_bytes(fill(0.0)).hex(),
        "huge": codec.to_bytes(fill(3e38)).hex(),  # finite float32, overflows once weighted
        "weights": {str(c): float(n) for c, n in enumerate(problem.data.sizes)},
    }))


def test_hostile_clients_are_dropped_and_the_round_completes(tmp_path):
    round_timeout = 5.0  # the honest client must finish a round in it on a loaded machine
    master = tmp_path / "master"
    master.write_bytes(TOKEN)
    flags = [*FLAGS, "--edge-round-timeout", str(round_timeout), "--out", str(tmp_path / "run")]
    address = f"127.0.0.1:{_free_port()}"
    # Server and honest client start at once (the client retries until the server listens).
    # No --max-message-bytes: Submit's limit comes from the model, not from the flag.
    server = subprocess.Popen(
        [sys.executable, "-m", "fedjax_lab.backends.edge", "server", "--listen", address,
         "--master-file", str(master), "--join-timeout", "60", "--receive-timeout", "1",
         "--", *flags],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    procs = [server]
    try:
        procs.append(subprocess.Popen(
            [*_client_cmd(address, _key_file(tmp_path, 0)), "--", *flags],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        problem = fedavg_edge_problem(flags)  # while they start
        assert problem.data.sizes[ROGUES.index("huge") + 1] >= 2  # weight * 3e38 overflows
        _rogue_spec(tmp_path / "spec.json", address, problem, round_timeout)
        modes = [*ROGUES, "intruder"]
        procs += [subprocess.Popen(
            [sys.executable, "-c", ROGUE, mode, str(_key_file(tmp_path, min(w + 1, 8) if
                                                               mode != "intruder" else 1)),
             str(tmp_path / "spec.json")],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) for w, mode in enumerate(modes)]
        _, server_err = server.communicate(timeout=120)
        outs = _finish(procs[1:], timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert server.returncode == 0, server_err
    assert procs[1].returncode == 0, outs[0]
    codes = {m: json.loads(o[0].strip() or "[]") for m, o in zip(modes, outs[1:], strict=True)}
    assert codes["intruder"] == [
        "OK", "UNAUTHENTICATED",  # a signed request, then the same bytes replayed
        "UNAUTHENTICATED", "UNAUTHENTICATED",  # worker 1's key posing as worker 0
        "UNAUTHENTICATED", "UNAUTHENTICATED", "PERMISSION_DENIED",  # wrong key, none, id 99
        "UNAUTHENTICATED",  # a clock an hour off
        "ABORTED",  # signed for another session (run)
    ]
    assert codes["malformed"] == ["INVALID_ARGUMENT"] * 2
    assert codes["oversized"] == ["RESOURCE_EXHAUSTED"] * 2
    assert codes["forged"] == ["PERMISSION_DENIED", "INVALID_ARGUMENT"] * 2
    assert codes["weight"] == ["INVALID_ARGUMENT"] * 2
    assert codes["huge"] == ["OK", "OK"]  # accepted: bounded and finite
    assert codes["stall"] == ["CANCELLED"] * 2  # cut off at the receive deadline
    assert codes["timeout"][0] == "FAILED_PRECONDITION"
    assert set(codes["timeout"]) <= {"FAILED_PRECONDITION", "UNAVAILABLE"}
    assert codes["disconnect"] == []
    history = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [h["dropped_clients"] for h in history] == [8.0, 7.0]  # round 2 took "huge" in
    assert [h["clients"] for h in history] == [1.0, 1.0]
    assert [h["rejected_messages"] for h in history] == [4.0, 4.0]  # malformed, forged x2, weight
    # The intruder's 8 refused calls, and per round the oversized and the stalled upload.
    assert sum(h["refused_requests"] for h in history) == 12.0
    assert [h["rejected_server_updates"] for h in history] == [0.0, 1.0]
    assert history[1]["update_norm"] in ("inf", "nan")  # reported as such (JSON text), not 0
    assert "rejected result: weight out of range" in server_err
    assert "the server update is not finite; kept the previous" in server_err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dropped_clients"] == 15.0
    # Round 1 aggregated exactly the honest client (FedAvg of client 0 alone); round 2's
    # overflowing update was not committed: the model evaluated after it is round 1's.
    _, _, _, evaluate, _ = build_problem(FedAvgConfig.parse(flags))
    ref = run(problem.algorithm, VmapBackend("vmap"), problem.data.subset([0]),
              problem.init_params, rounds=2, clients_per_round=1, seed=problem.seed,
              evaluate=evaluate, eval_every=1)
    for k in ("train_loss", "update_norm", "train_examples", "upload_bits", "test_loss"):
        assert history[0][k] == pytest.approx(ref.history[0][k], abs=1e-5), k
    for k in ("train_loss", "train_examples", "upload_bits"):  # honest client 0 in round 2
        assert history[1][k] == pytest.approx(ref.history[1][k], abs=1e-5), k
    assert history[1]["test_loss"] == history[0]["test_loss"]
    assert history[1]["test_loss"] != pytest.approx(ref.history[1]["test_loss"], abs=1e-6)


# ------------------------------------------------------------------- floods and mismatches
# A raw HTTP/2 client (stdlib only): gRPC Submit calls without credentials that open their
# stream and stall, half of them after sending all but the last byte of a large message.
H2_FLOOD = r"""
import json, select, socket, struct, sys

address, path = sys.argv[1:3]
connections, streams_per_conn, declared = map(int, sys.argv[3:6])
host, port = address.rsplit(":", 1)

def frame(kind, flags, stream, payload=b""):
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return head + struct.pack(">I", stream) + payload

def literal(name, value):  # HPACK literal without indexing, new name, no Huffman
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

class Conn:
    def __init__(self, ids):
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
        self.buf, self.window, self.initial = b"", 65535, 65535
        self.streams = {}
        for i, sid in enumerate(ids):
            block = b"".join(literal(k, v) for k, v in [
                (":method", "POST"), (":scheme", "http"), (":path", path),
                (":authority", address), ("content-type", "application/grpc"), ("te", "trailers"),
                ("fje-worker", "0")])
            self.sock.sendall(frame(1, 4, sid, block))
            # Half the streams send nothing; the others all but the last byte of a message.
            todo = 5 + declared - 1 if i % 2 else 0
            self.streams[sid] = {"todo": todo, "sent": 0, "window": self.initial, "closed": False,
                                 "prefix": b"\x00" + struct.pack(">I", declared)}
        self.pump()

    def pump(self):
        for sid, st in self.streams.items():
            while not st["closed"] and st["todo"] > 0 and min(st["window"], self.window) > 0:
                n = min(st["todo"], st["window"], self.window, 16384)
                head, st["prefix"] = st["prefix"][:n], st["prefix"][n:]
                try:
                    self.sock.sendall(frame(0, 0, sid, head + bytes(n - len(head))))
                except OSError:
                    st["closed"] = True
                    break
                st["todo"] -= n; st["sent"] += n; st["window"] -= n; self.window -= n

    def read(self):
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            for st in self.streams.values(): st["closed"] = True
            return False
        self.buf += data
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n: break
            kind, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload, self.buf = self.buf[9:9 + n], self.buf[9 + n:]
            if kind == 4 and not flags & 1:  # SETTINGS: apply INITIAL_WINDOW_SIZE, ack
                for j in range(0, len(payload), 6):
                    ident, value = struct.unpack(">HI", payload[j:j + 6])
                    if ident == 4:
                        for st in self.streams.values(): st["window"] += value - self.initial
                        self.initial = value
                self.sock.sendall(frame(4, 1, 0))
            elif kind == 6 and not flags & 1:  # PING: answer
                self.sock.sendall(frame(6, 1, 0, payload))
            elif kind == 8:  # WINDOW_UPDATE
                inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
                if sid == 0: self.window += inc
                elif sid in self.streams: self.streams[sid]["window"] += inc
            elif kind == 3 and sid in self.streams:  # RST_STREAM
                self.streams[sid]["closed"] = True
            elif kind == 1 and flags & 1 and sid in self.streams:  # trailers: the call ended
                self.streams[sid]["closed"] = True
        self.pump()
        return True

conns = [Conn(range(1, 2 * streams_per_conn, 2)) for _ in range(connections)]
print("READY", flush=True)
inputs = [c.sock for c in conns] + [sys.stdin]
while True:  # serve the connections until stdin closes (the test's rounds are done)
    ready, _, _ = select.select(inputs, [], [], 1.0)
    if sys.stdin in ready and not sys.stdin.readline():
        break
    for c in conns:
        if c.sock in ready and not c.read():
            inputs.remove(c.sock)
streams = [st for c in conns for st in c.streams.values()]
print(json.dumps({"closed": sum(st["closed"] for st in streams), "streams": len(streams),
                  "max_sent": max(st["sent"] for st in streams)}), flush=True)
"""
SMALL = [*DATA, "--num-clients", "4", "--clients-per-round", "4", "--edge-clients", "2",
         "--model", "logreg", "--local-epochs", "1", "--eval-every", "0", "--progress", "false",
         "--seed", "1"]


def test_unauthenticated_flood_neither_stalls_rounds_nor_gets_its_bodies_read(tmp_path):
    flags = [*SMALL, "--rounds", "2"]
    problem = fedavg_edge_problem(flags)
    launcher = WorkerLauncher("fedjax_lab.train:fedavg_edge_problem", flags,
                              log_dir=str(tmp_path), env=ENV)
    backend = EdgeBackend(num_workers=2, token=TOKEN, launcher=launcher, round_timeout=60,
                          join_timeout=60, problem_config=problem.config)
    declared = 16 << 20
    flood = subprocess.Popen(
        [sys.executable, "-c", H2_FLOOD, backend.address, protocol.method_path(protocol.SUBMIT),
         "4", "10", str(declared)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert flood.stdout.readline().strip() == "READY"  # 40 streams open, bodies sent
        result = run(problem.algorithm, backend, problem.data, problem.init_params, rounds=2,
                     clients_per_round=4, seed=problem.seed)
    finally:
        out, err = flood.communicate("", timeout=30)  # its report, while the server is up
        backend.close()
    report = json.loads(out.strip().splitlines()[-1])
    # The server ended every stream without the message it announced: none was read.
    assert report["streams"] == report["closed"] == 40, (report, err)
    # and no stream could push more than the server's fixed per-stream window (one chunk)
    # into its buffers before the refusal: adaptive (BDP) windows once let all 16 MiB through.
    assert report["max_sent"] <= protocol.CHUNK_BYTES + 1024 < declared, report
    assert [h["dropped_clients"] for h in result.history] == [0.0, 0.0]
    assert [h["clients"] for h in result.history] == [4.0, 4.0]
    assert sum(h["refused_requests"] for h in result.history) == 40.0


def test_client_with_other_hyperparameters_is_refused_at_join(tmp_path, capfd):
    flags = [*SMALL, "--rounds", "1"]
    problem = fedavg_edge_problem(flags)
    backend = EdgeBackend(num_workers=2, token=TOKEN, round_timeout=30, join_timeout=60,
                          problem_config=problem.config)
    lr = ["--client-lr", "5.0"]  # the server's is 0.2; every shape still agrees
    procs = [subprocess.Popen(
        [*_client_cmd(backend.address, _key_file(tmp_path, w)), "--", *flags, *(lr if w else [])],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for w in range(2)]
    try:
        result = run(problem.algorithm, backend, problem.data, problem.init_params, rounds=1,
                     clients_per_round=4, seed=problem.seed)
    finally:
        backend.close()
        outs = _finish(procs)
    assert [p.returncode for p in procs] == [0, EXIT_REFUSED], outs
    said = capfd.readouterr().err
    for text in (outs[1][1], said):
        assert "client_lr (server 0.2, client 5.0)" in text, text
        assert "the compiled client program differs" in text, text
    assert "worker 1 refused at join" in said
    # Worker 1 hosts clients 1 and 3: dropped, with the reason; the round ran on the others.
    assert result.history[0]["dropped_clients"] == 2.0 and result.history[0]["clients"] == 2.0
    assert "configuration mismatch" in said


def test_join_document_catches_hyperparameters_that_shapes_cannot():
    data, params = make_population(SIZES, seed=2), MODEL.init(jax.random.key(0))

    def document(lr, momentum=0.5, levels=4, config=None):
        compressor = qsgd(num_levels=levels)
        alg = fedavg(MODEL, optax.sgd(lr, momentum=momentum), batch_size=3,
                     compressor=compressor)
        problem = EdgeProblem(alg, data, params, 7, config)
        return ProgramSpec.of_problem(problem).document(alg, problem.config)

    base = document(0.3)
    assert document(0.3) == base  # built again: the same program
    for other in (document(0.5), document(0.3, momentum=0.9)):
        assert other["structure"] == base["structure"]  # the shapes cannot tell
        assert compare_documents(base, other) == [
            "the compiled client program differs (a hyperparameter of the algorithm or "
            "compressor, e.g. a learning rate or quantization levels)"
        ]
    assert compare_documents(base, document(0.3, levels=8))
    assert compare_documents(document(0.3, config={"seed": 1, "alpha": 0.5}),
                             document(0.3, config={"seed": 2, "alpha": 0.5})) == [
        "flags differ: seed (server 1, client 2)"
    ]
    assert compare_documents(base, "not a document") == [
        "the client sent no configuration document"
    ]


# ------------------------------------------------------------------------------------ CLI
def test_bad_edge_flags_exit_2_with_one_line_naming_the_flag(tmp_path, capsys):
    master, key = tmp_path / "master", _key_file(tmp_path, 1)
    master.write_bytes(TOKEN)
    missing = str(tmp_path / "missing")
    server = ["server", "--master-file", str(master), "--listen", "127.0.0.1:0"]
    client = ["client", "--server", "127.0.0.1:1", "--key-file", str(key)]
    few = ["--num-clients", "3", "--clients-per-round", "3", "--edge-clients", "5"]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        ("--master-file", ["server", "--master-file", missing]),
        ("--tls-cert", [*server, "--tls-cert", missing, "--tls-key", missing]),
        ("--max-message-bytes", [*server, "--max-message-bytes", "10"]),
        ("--join-timeout", [*server, "--join-timeout", "-1"]),
        ("--listen", ["server", "--master-file", str(master), "--listen",
                      f"127.0.0.1:{busy.getsockname()[1]}"]),  # in use
        ("--listen", [*server[:3], "--listen", "no-such-host.invalid:1"]),
        ("--edge-clients", [*server, "--", *few]),
        ("--key-file", ["client", "--server", "127.0.0.1:1", "--key-file", missing]),
        ("--tls-ca", [*client, "--tls-ca", missing]),
        ("--max-message-bytes", [*client, "--max-message-bytes", "10"]),
        ("--worker-id", [*client, "--worker-id", "0"]),  # the key file is worker 1's
        ("--out", ["keys", "--master-file", str(master), "--worker", "1", "--out", str(key)]),
    ]
    try:
        for flag, argv in cases:
            assert edge_main(argv) == 2, argv
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), (argv, lines)
    finally:
        busy.close()
    assert main(FedAvgConfig, run_fedavg_experiment, ["--backend", "edge", *few]) == 2
    assert "error: --edge-clients=5 > --num-clients=3" in capsys.readouterr().err
    # The same through a real process: exit status 2, one line, no traceback.
    done = subprocess.run([sys.executable, "-m", "fedjax_lab.backends.edge", "server",
                           "--master-file", missing], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: --master-file: cannot read {missing!r}: No such file or directory"
    ]


# -------------------------------------------------------------------------- kill and resume
RESUME_FLAGS = [*DATA, "--num-clients", "8", "--clients-per-round", "3", "--model", "logreg",
                "--local-epochs", "1", "--eval-every", "2", "--progress", "false", "--seed", "5",
                "--rounds", "4", "--checkpoint-every", "2"]


def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_killed_edge_server_resumes_to_the_uninterrupted_result(tmp_path):
    ref_out, out = tmp_path / "vmap", tmp_path / "edge"
    assert main(FedAvgConfig, run_fedavg_experiment,
                [*RESUME_FLAGS, "--backend", "vmap", "--out", str(ref_out)]) == 0
    edge_flags = [*RESUME_FLAGS, "--backend", "edge", "--edge-clients", "2", "--out", str(out)]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, *edge_flags], cwd=ROOT, timeout=120,
        env={**ENV, "KILL_AFTER_ROUND": "3"}, capture_output=True, text=True,
    )
    assert killed.returncode == 17, killed.stderr
    assert [h["round"] for h in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2, 3]
    # The orphaned client processes notice that their server and parent are gone and exit.
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = _processes_mentioning(str(out))
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers
    # The restarted server may even run a different number of client processes.
    resumed = [*edge_flags, "--edge-clients", "1", "--resume", "true"]
    assert main(FedAvgConfig, run_fedavg_experiment, resumed) == 0
    ref, got = read_jsonl(str(ref_out / "metrics.jsonl")), read_jsonl(str(out / "metrics.jsonl"))
    assert [h["round"] for h in got] == [1, 2, 3, 4]  # round 3 of the killed run was dropped
    for a, b in zip(ref, got, strict=True):
        for k, v in a.items():
            if k not in TIME_FIELDS:
                assert b[k] == pytest.approx(v, abs=1e-5), k
        assert b["uplink_bytes"] * 8 == a["upload_bits"]  # float32 deltas: 32 bits each
    cfg = FedAvgConfig.parse(edge_flags)
    problem = fedavg_edge_problem(edge_flags)
    final = [checkpointed_server_state(d / "checkpoints", problem.algorithm,
                                       problem.init_params, cfg.rounds) for d in (out, ref_out)]
    chex.assert_trees_all_close(*final, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["uplink_bytes"] * 8 == summary["uplink_bits"] > 0
    assert summary["dropped_clients"] == 0.0
