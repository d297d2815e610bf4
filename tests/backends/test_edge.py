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
import time

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.edge import (
    EdgeBackend,
    EdgeProblem,
    EdgeWorker,
    WorkerLauncher,
    protocol,
)
from fedjax_lab.backends.edge._common import PayloadCodec
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd, with_error_feedback
from fedjax_lab.experiment import (
    FedAvgConfig,
    edge_problem,
    main,
    parse_config,
    run_fedavg_experiment,
)
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.runner import run
from tests.helpers import LinearModel, checkpointed_server_state, make_population
from tests.io.test_checkpoint import KILL_AFTER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = b"0123456789abcdef0123456789abcdef"
TIME_FIELDS = ("round_seconds", "wall_time")
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


def test_mac_binds_token_method_worker_and_bytes():
    frame = protocol.encode_message({"kind": "join"})
    mac = protocol.sign(TOKEN, protocol.JOIN, "3", frame)
    assert protocol.verify(TOKEN, protocol.JOIN, "3", frame, mac)
    assert not protocol.verify(b"x" * 32, protocol.JOIN, "3", frame, mac)
    assert not protocol.verify(TOKEN, protocol.SUBMIT, "3", frame, mac)
    assert not protocol.verify(TOKEN, protocol.JOIN, "4", frame, mac)
    assert not protocol.verify(TOKEN, protocol.JOIN, "3", frame + b"\x00", mac)
    assert not protocol.verify(TOKEN, protocol.JOIN, "3", frame, None)


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


def test_backend_arguments_are_checked():
    with pytest.raises(ValueError, match="token must be bytes of length >= 16"):
        EdgeBackend(num_workers=1, token=b"short")
    with pytest.raises(ValueError, match="num_workers must be a positive int"):
        EdgeBackend(num_workers=0, token=TOKEN)
    with pytest.raises(ValueError, match="round_timeout and join_timeout must be > 0"):
        EdgeBackend(num_workers=1, token=TOKEN, round_timeout=0)
    with pytest.raises(ValueError, match="tls_ca is needed with tls and a launcher"):
        EdgeBackend(num_workers=1, token=TOKEN, tls=(b"cert", b"key"),
                    launcher=WorkerLauncher("m:f"))


# ------------------------------------------------------------------------ equivalence (EF-QSGD)
MODEL = LinearModel(dim=5, classes=3)
SIZES = [4, 9, 2, 7, 5, 11, 3, 6]


def ef_qsgd_problem(argv) -> EdgeProblem:
    """Problem factory used by the client processes of the equivalence test."""
    del argv
    compressor = with_error_feedback(qsgd(num_levels=4))
    alg = fedavg(MODEL, optax.sgd(0.3, momentum=0.5), batch_size=3, local_epochs=2,
                 compressor=compressor)
    return EdgeProblem(alg, compressor, make_population(SIZES, seed=2),
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


def _client_cmd(address, worker, token_file, *extra):
    return [sys.executable, "-m", "fedjax_lab.backends.edge", "client", "--server", address,
            "--worker-id", str(worker), "--token-file", str(token_file),
            "--server-timeout", "10", *extra]


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
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    problem = ef_qsgd_problem([])
    kwargs = dict(rounds=3, clients_per_round=5, seed=problem.seed)
    ref = run(problem.algorithm, VmapBackend("vmap"), problem.data, problem.init_params,
              **kwargs)
    backend = EdgeBackend(num_workers=2, token=TOKEN, compressor=problem.compressor,
                          tls=(cert, key), round_timeout=60, join_timeout=60)
    procs = [subprocess.Popen(
        _client_cmd(backend.address, w, token_file, "--tls-ca", str(cert_path),
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
    backend = EdgeBackend(num_workers=1, token=TOKEN, compressor=problem.compressor,
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
import json, os, sys, time
import grpc, numpy as np
from fedjax_lab.backends.edge import protocol as P

mode, worker, address, token_file, limit, fingerprint, timeout = sys.argv[1:8]
token = P.load_token(token_file)
channel = grpc.insecure_channel(address)
grpc.channel_ready_future(channel).result(timeout=120)  # the server may still be starting
calls = {m: channel.unary_unary(P.method_path(m)) for m in P.METHODS}

def call(method, frame, tok=token, wid=worker, mac=True):
    md = [(P.WORKER_KEY, wid)] + ([(P.MAC_KEY, P.sign(tok, method, wid, frame))] if mac else [])
    try:
        answer, _ = calls[method].with_call(frame, metadata=md, timeout=20)
        return "OK", P.decode_message(answer)
    except grpc.RpcError as e:
        return e.code().name, None

codes = []
join = P.encode_message({"kind": "join"})
if mode == "intruder":
    codes = [call(P.JOIN, join, tok=b"x" * 32)[0], call(P.JOIN, join, mac=False)[0],
             call(P.JOIN, join, wid="99")[0]]
    print(json.dumps(codes))
    sys.exit(0)
assert call(P.JOIN, join)[0] == "OK"
after, session, deadline = -1, "", time.time() + 120
while time.time() < deadline:
    code, msg = call(P.FETCH, P.encode_message(
        {"kind": "fetch", "after_round": after, "session": session, "fingerprint": fingerprint}))
    if code != "OK" or msg.header["kind"] == "stop":
        break
    if msg.header["kind"] != "task":
        continue
    after, session = msg.header["round"], msg.header["session"]
    t = msg.header["tasks"][0]
    head = {"round": after, "slot": t["slot"], "client": t["client"]}
    if mode == "disconnect":
        os._exit(0)
    elif mode == "timeout":
        time.sleep(float(timeout) + 0.5)
        codes.append(call(P.SUBMIT, P.encode_message({"kind": "failed", **head}))[0])
    elif mode == "malformed":
        codes.append(call(P.SUBMIT, b"\x00 not a frame")[0])
    elif mode == "oversized":
        codes.append(call(P.SUBMIT, bytes(int(limit) + 1024))[0])
    elif mode == "forged":
        other = {"kind": "failed", "round": after, "slot": 0, "client": 0}  # worker 0's client
        codes.append(call(P.SUBMIT, P.encode_message(other))[0])
        text = json.dumps({"kind": "result", **head, "blobs": [],
                           "arrays": [["weight", "float32", [1 << 40]]]}).encode()
        codes.append(call(P.SUBMIT, P.MAGIC + len(text).to_bytes(4, "little") + text
                          + bytes(4))[0])
print(json.dumps(codes))
"""
# FedProx's synthetic data: no scikit-learn import, which saves each process ~2 s.
DATA = ["--dataset", "synthetic_iid", "--partition", "iid"]
FLAGS = [*DATA, "--num-clients", "6", "--clients-per-round", "6", "--edge-clients", "6",
         "--model", "logreg", "--local-epochs", "1", "--eval-every", "0", "--progress", "false",
         "--seed", "3", "--rounds", "2"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hostile_clients_are_dropped_and_the_round_completes(tmp_path):
    limit, round_timeout = 256 * 1024, 3.0
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    flags = [*FLAGS, "--edge-round-timeout", str(round_timeout), "--out", str(tmp_path / "run")]
    address = f"127.0.0.1:{_free_port()}"
    # Server and honest client start at once (the client retries until the server listens).
    server = subprocess.Popen(
        [sys.executable, "-m", "fedjax_lab.backends.edge", "server", "--listen", address,
         "--token-file", str(token_file), "--join-timeout", "60",
         "--max-message-bytes", str(limit), "--", *flags],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    procs = [server]
    try:
        procs.append(subprocess.Popen(
            [*_client_cmd(address, 0, token_file), "--", *flags],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        problem = edge_problem(flags)  # while they start: the hostile clients need the
        fingerprint = EdgeWorker(problem, 0, 6).fingerprint  # configuration fingerprint
        modes = ["disconnect", "timeout", "malformed", "oversized", "forged", "intruder"]
        rogues = [subprocess.Popen(
            [sys.executable, "-c", ROGUE, mode, str(min(w, 5) + 1 if mode != "intruder" else 0),
             address, str(token_file), str(limit), fingerprint, str(round_timeout)],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) for w, mode in enumerate(modes)]
        procs += rogues
        _, server_err = server.communicate(timeout=120)
        outs = _finish(procs[1:], timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert server.returncode == 0, server_err
    assert procs[1].returncode == 0, outs[0]
    codes = {m: json.loads(o[0].strip() or "[]") for m, o in zip(modes, outs[1:], strict=True)}
    assert codes["intruder"] == ["UNAUTHENTICATED", "UNAUTHENTICATED", "PERMISSION_DENIED"]
    assert codes["malformed"] == ["INVALID_ARGUMENT"] * 2
    assert codes["oversized"] == ["RESOURCE_EXHAUSTED"] * 2
    assert codes["forged"] == ["PERMISSION_DENIED", "INVALID_ARGUMENT"] * 2
    assert codes["timeout"][0] == "FAILED_PRECONDITION"
    assert set(codes["timeout"]) <= {"FAILED_PRECONDITION", "UNAVAILABLE"}
    assert codes["disconnect"] == []
    history = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [h["dropped_clients"] for h in history] == [5.0, 5.0]
    assert [h["clients"] for h in history] == [1.0, 1.0]
    assert [h["rejected_messages"] for h in history] == [3.0, 3.0]  # malformed + 2 forged
    assert sum(h["refused_requests"] for h in history) == 3.0  # the intruder's attempts
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dropped_clients"] == 10.0
    # The rounds aggregated exactly the honest client: FedAvg of client 0 alone (round 2's
    # loss and both update norms depend on the params each round produced).
    ref = run(problem.algorithm, VmapBackend("vmap"), problem.data.subset([0]),
              problem.init_params, rounds=2, clients_per_round=1, seed=problem.seed)
    for a, b in zip(ref.history, history, strict=True):
        for k in ("train_loss", "update_norm", "train_examples", "upload_bits"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k
    assert summary["uplink_bytes"] * 8 == sum(h["upload_bits"] for h in ref.history)


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
    cfg = parse_config(FedAvgConfig, edge_flags)
    problem = edge_problem(edge_flags)
    final = [checkpointed_server_state(d / "checkpoints", problem.algorithm,
                                       problem.init_params, cfg.rounds) for d in (out, ref_out)]
    chex.assert_trees_all_close(*final, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["uplink_bytes"] * 8 == summary["uplink_bits"] > 0
    assert summary["dropped_clients"] == 0.0
