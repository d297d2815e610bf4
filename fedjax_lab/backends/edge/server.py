"""The edge server: a gRPC service that hands out rounds and validates uploads, and the backend.

:class:`EdgeServer` is the network side. Clients *pull* (as devices behind NAT do): they
``Join``, then long-poll ``Fetch`` for a task (the global server state, and for each of their
sampled clients its slot, PRNG key, client state and a digest of its data layout), run the
algorithm's jitted ``client_update`` and ``Submit`` one result per client: the compressor's wire
bytes plus the small additive fields of ``ClientOutput`` and the new client state. Every request
is authenticated (HMAC, see :mod:`.protocol`), size-capped by gRPC before it reaches Python,
parsed by a hostile-input-safe decoder and checked against templates before anything is decoded.

:class:`EdgeBackend` implements the ``Backend`` protocol on top of it: it publishes the round,
waits (bounded by ``round_timeout``) for the sampled clients, drops the ones that failed, timed
out, disconnected or misbehaved (``dropped_clients``), stacks what arrived with weight-0 padding
in the same slot order as the vmap backend, and runs the SAME ``aggregate`` + ``server_update``.
With no drops the result equals the vmap backend for the same seed.

Client states (error-feedback residuals, SCAFFOLD controls) stay in the runner's
``ClientStateStore`` on the server and travel with the task (downlink) and the result (uplink),
so a server checkpoint captures them and a restarted device continues exactly; they are counted
separately from the compressed update (``uplink_bytes``). Deployments that must keep such state
on the device can run stateless algorithms.

Requirements: the runner's cohort must index a device table (``device_table=True``, the
default), and ``server_state.round`` must count the rounds done (true for every algorithm here),
because clients rebuild their local data layout for that round.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import jax
import numpy as np

from fedjax_lab.backends.edge import _common, protocol
from fedjax_lab.backends.vmap import validate_round_inputs
from fedjax_lab.core.rng import client_keys
from fedjax_lab.core.types import Algorithm, ClientOutput, Cohort, ServerState

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_WORKER_ID = re.compile(r"[0-9]{1,6}")


class _ResultSchema:
    """Validates and decodes one uploaded client result against the round's templates."""

    def __init__(self, output: ClientOutput, state: Any, codec: _common.PayloadCodec) -> None:
        self.output = output
        self.state = state
        self.codec = codec
        self.metrics = _common.metric_names(output)
        self.names = (
            {"weight"} | {f"m:{k}" for k in self.metrics}
            | _common.tree_names("e", output.extra) | _common.tree_names("c", state)
        )

    def parse(self, msg: protocol.Message) -> tuple[ClientOutput, Any, int]:
        """``(ClientOutput, new client state, payload bytes)``; ValueError when invalid."""
        msg.expect_names(self.names, {"payload"})
        weight = msg.array("weight", (), np.float32)
        metrics = {}
        for k in self.metrics:
            spec = self.output.metrics[k]
            metrics[k] = np.array(msg.array(f"m:{k}", spec.shape, spec.dtype))
        if not np.isfinite(weight) or weight < 0:
            raise protocol.ProtocolError(f"client weight must be finite and >= 0, got {weight}")
        if not all(np.all(np.isfinite(v)) for v in metrics.values()):
            raise protocol.ProtocolError("client metrics must be finite")
        extra = _common.read_tree(msg, "e", self.output.extra)
        state = _common.read_tree(msg, "c", self.state)
        data = msg.blobs["payload"]
        update = self.codec.from_bytes(data)
        out = ClientOutput(update, np.array(weight), metrics, extra)
        return out, state, len(data)


@dataclass
class _Round:
    round_id: int
    owners: dict[int, tuple[int, int]]  # slot -> (worker, population client)
    tasks: dict[int, bytes]  # worker -> task frame
    schema: _ResultSchema
    pending: set[int] = field(default_factory=set)
    results: dict[int, tuple[ClientOutput, Any]] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    uplink_bytes: int = 0
    uplink_message_bytes: int = 0
    downlink_bytes: int = 0
    rejected_messages: int = 0

    def drop(self, slots: Sequence[int], reason: str) -> None:
        for slot in slots:
            if slot in self.pending:
                self.pending.discard(slot)
                self.dropped[slot] = reason

    def slots_of(self, worker: int) -> list[int]:
        return [s for s in self.pending if self.owners[s][0] == worker]


class EdgeServer:
    """The gRPC service (thread-safe); :class:`EdgeBackend` drives its rounds.

    Args:
      num_workers: client processes allowed to connect, ids ``0..num_workers-1``.
      token: shared secret (>= 16 bytes) keying the HMAC of every message.
      listen: ``host:port`` to bind (port 0 picks a free port; see :attr:`address`).
      max_message_bytes: gRPC receive limit; larger requests are refused before they are read.
      tls: optional ``(certificate chain PEM, private key PEM)`` to serve over TLS.
      poll_seconds: how long a ``Fetch`` waits for work before answering "idle".
    """

    def __init__(
        self,
        *,
        num_workers: int,
        token: bytes,
        listen: str = "127.0.0.1:0",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: tuple[bytes, bytes] | None = None,
        poll_seconds: float = 2.0,
    ) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if not isinstance(token, bytes) or len(token) < protocol.MIN_TOKEN_BYTES:
            raise ValueError(
                f"token must be bytes of length >= {protocol.MIN_TOKEN_BYTES} (a random secret)"
            )
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be an int >= 1024, got {max_message_bytes}")
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.num_workers = num_workers
        self.max_message_bytes = max_message_bytes
        self.poll_seconds = float(poll_seconds)
        self._token = token
        self._cond = threading.Condition()
        self._round: _Round | None = None
        self._fingerprint: str | None = None
        self._ready: set[int] = set()
        self._told_stop: set[int] = set()
        self._seen: dict[int, float] = {}  # worker -> time of its last authenticated request
        self._stopping = False
        # A fresh id per server start: a client that worked for a previous (crashed) server
        # must not skip the rounds a resumed server repeats.
        self.session = secrets.token_hex(8)
        self._refused = 0  # unauthenticated / unknown-worker requests since the last round
        handlers = {
            m: grpc.unary_unary_rpc_method_handler(self._guard(m, fn))
            for m, fn in ((protocol.JOIN, self._join), (protocol.FETCH, self._fetch),
                          (protocol.SUBMIT, self._submit))
        }
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2 * num_workers + 8),
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", -1),
            ],
            maximum_concurrent_rpcs=4 * num_workers + 16,
        )
        self._grpc.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(protocol.SERVICE, handlers),)
        )
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            port = self._grpc.add_secure_port(listen, creds)
        else:
            port = self._grpc.add_insecure_port(listen)
        if not port:
            raise OSError(f"could not bind the edge server to {listen!r}")
        self.address = f"{listen.rsplit(':', 1)[0]}:{port}"
        self._grpc.start()

    # ------------------------------------------------------------------------------ handlers
    def _guard(self, method: str, fn: Callable[[int, bytes, Any], bytes]):
        """Authenticates, runs ``fn``, signs the answer; unexpected errors become INTERNAL."""

        def behavior(request: bytes, context: grpc.ServicerContext) -> bytes:
            md = context.invocation_metadata()
            worker = protocol.metadata_value(md, protocol.WORKER_KEY)
            mac = protocol.metadata_value(md, protocol.MAC_KEY)
            if worker is None or not protocol.verify(self._token, method, worker, request, mac):
                self._count_refused()
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token MAC")
            if not _WORKER_ID.fullmatch(worker) or int(worker) >= self.num_workers:
                self._count_refused()
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"unknown worker id {worker!r} (this server has {self.num_workers})",
                )
            with self._cond:
                self._seen[int(worker)] = time.monotonic()
            try:
                answer = fn(int(worker), request, context)
            except _Abort as err:
                context.abort(err.code, err.details)
            except Exception as err:  # never let one request take the server down
                print(f"edge server: {method} from worker {worker} failed: {err!r}",
                      file=sys.stderr)
                context.abort(grpc.StatusCode.INTERNAL, "internal error")
            context.set_trailing_metadata(((
                protocol.MAC_KEY,
                protocol.sign(self._token, protocol.response_method(method), worker, answer),
            ),))
            return answer

        return behavior

    def _count_refused(self) -> None:
        with self._cond:
            self._refused += 1

    def _join(self, worker: int, request: bytes, context: Any) -> bytes:
        del context
        msg = _decode(request, "join")
        del msg
        return protocol.encode_message({
            "kind": "welcome", "num_workers": self.num_workers,
            "poll_seconds": self.poll_seconds, "max_message_bytes": self.max_message_bytes,
        })

    def _fetch(self, worker: int, request: bytes, context: Any) -> bytes:
        msg = _decode(request, "fetch")
        after = _field(msg, "after_round", int)
        if _field(msg, "session", str) != self.session:
            after = -1
        fingerprint = _field(msg, "fingerprint", str)
        deadline = time.monotonic() + self.poll_seconds
        with self._cond:
            self._ready.add(worker)
            self._cond.notify_all()
            while True:
                if self._stopping:
                    self._told_stop.add(worker)
                    self._cond.notify_all()
                    return protocol.encode_message({"kind": "stop"})
                if self._fingerprint is not None and fingerprint != self._fingerprint:
                    raise _Abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "configuration mismatch: the client's algorithm/model/data layout "
                        "differs from the server's; start both with the same flags",
                    )
                rnd = self._round
                if rnd is not None and rnd.round_id > after and worker in rnd.tasks:
                    task = rnd.tasks[worker]
                    rnd.downlink_bytes += len(task)
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active():
                    return protocol.encode_message({"kind": "idle"})
                self._cond.wait(remaining)

    def _submit(self, worker: int, request: bytes, context: Any) -> bytes:
        del context
        with self._cond:
            rnd = self._round
            if rnd is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "no round is open")
            rnd.uplink_message_bytes += len(request)
        try:
            msg = protocol.decode_message(request)
            kind = _field(msg, "kind", str)
            round_id, slot = _field(msg, "round", int), _field(msg, "slot", int)
            client = _field(msg, "client", int)
        except (protocol.ProtocolError, _Abort) as err:
            # Authenticated but unparseable: this worker is broken, drop all its clients.
            self._reject(rnd, None, "malformed message", worker=worker)
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed result: {err}") from err
        with self._cond:
            if self._round is not rnd or round_id != rnd.round_id:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"round {round_id} is not open (current: {rnd.round_id})")
            if rnd.owners.get(slot) != (worker, client):
                rnd.rejected_messages += 1
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED,
                             f"slot {slot} / client {client} is not assigned to worker {worker}")
            if slot not in rnd.pending:
                rnd.rejected_messages += 1
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"slot {slot} is already closed ({rnd.dropped.get(slot, 'received')})")
        if kind == "failed":
            reason = str(msg.header.get("reason", ""))[:200]
            self._reject(rnd, [slot], f"client failed: {reason}", count=False)
            return protocol.encode_message({"kind": "ack"})
        try:
            if kind != "result":
                raise protocol.ProtocolError(f"unexpected message kind {kind!r}")
            out, state, payload_bytes = rnd.schema.parse(msg)
        except ValueError as err:  # ProtocolError and the codec's own checks
            self._reject(rnd, [slot], "invalid result")
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid result: {err}") from err
        with self._cond:
            if slot in rnd.pending and self._round is rnd:
                rnd.pending.discard(slot)
                rnd.results[slot] = (out, state)
                rnd.uplink_bytes += payload_bytes
                self._cond.notify_all()
                return protocol.encode_message({"kind": "ack"})
        raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"slot {slot} closed while decoding")

    def _reject(self, rnd: _Round, slots: Sequence[int] | None, reason: str, count: bool = True,
                worker: int | None = None) -> None:
        """Drops ``slots`` (or all of ``worker``'s pending slots) of ``rnd``."""
        with self._cond:
            rnd.drop(rnd.slots_of(worker) if slots is None else list(slots), reason)
            if count:
                rnd.rejected_messages += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------------- round control
    def set_fingerprint(self, value: str) -> None:
        with self._cond:
            self._fingerprint = value
            self._cond.notify_all()

    def ready_workers(self) -> set[int]:
        with self._cond:
            return set(self._ready)

    def open_round(self, rnd: _Round) -> None:
        with self._cond:
            rnd.pending = set(rnd.owners)
            self._round = rnd
            self._cond.notify_all()

    def drop_worker(self, worker: int, reason: str) -> None:
        """Drops a worker's pending clients of the open round (e.g. its process died)."""
        with self._cond:
            rnd = self._round
            if rnd is not None:
                rnd.drop(rnd.slots_of(worker), reason)
                rnd.tasks.pop(worker, None)
                self._cond.notify_all()
            self._ready.discard(worker)

    def wait_round(self, deadline: float, check: Callable[[], None]) -> tuple[_Round, int]:
        """Waits until every slot is closed or ``deadline``; the rest are dropped (timeout)."""
        while True:
            with self._cond:
                rnd = self._round
                if not rnd.pending or time.monotonic() >= deadline:
                    rnd.drop(sorted(rnd.pending), "timeout")
                    self._round = None
                    refused, self._refused = self._refused, 0
                    return rnd, refused
                self._cond.wait(min(0.2, max(deadline - time.monotonic(), 0.0)))
            check()

    def stop(self, grace: float = 1.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._grpc.stop(grace).wait(grace + 5.0)

    def announce_stop(self) -> None:
        """Tells polling clients to exit and waits (bounded) until the live ones heard it.

        A client is live if it made a request within the last long-poll period; a client that
        vanished is not waited for.
        """
        horizon = self.poll_seconds + 1.0
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            live = {w for w, t in self._seen.items() if time.monotonic() - t <= horizon}
            self._cond.wait_for(lambda: live <= self._told_stop, timeout=horizon)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _decode(request: bytes, kind: str) -> protocol.Message:
    try:
        msg = protocol.decode_message(request)
    except protocol.ProtocolError as err:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {kind}: {err}") from err
    if msg.header.get("kind") != kind:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected a {kind!r} message")
    return msg


def _field(msg: protocol.Message, name: str, kind: type) -> Any:
    try:
        return msg.field(name, kind)
    except protocol.ProtocolError as err:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err


# ---------------------------------------------------------------------------------- supervisor
@dataclass(frozen=True)
class WorkerLauncher:
    """How the backend spawns its own client processes on this host (one-command runs).

    Attributes:
      problem: ``"package.module:function"`` building the :class:`EdgeProblem` from ``args``.
      args: the problem factory's command line (e.g. the experiment's flags).
      log_dir: where each client process writes ``worker{k}.log`` (a temp dir if None).
      max_restarts: how many times a client process that dies is restarted.
      env: extra environment variables (``JAX_PLATFORMS=cpu`` is always set).
    """

    problem: str
    args: Sequence[str] = ()
    log_dir: str | None = None
    max_restarts: int = 2
    env: Mapping[str, str] = field(default_factory=dict)


class _Supervisor:
    def __init__(self, launcher: WorkerLauncher, address: str, token: bytes, num_workers: int,
                 max_message_bytes: int, tls_ca: bytes | None) -> None:
        self.launcher = launcher
        self.address = address
        self.num_workers = num_workers
        self.max_message_bytes = max_message_bytes
        self._secret_dir = tempfile.mkdtemp(prefix="fedjax-edge-")  # mode 0700
        self.token_path = os.path.join(self._secret_dir, "token")
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(token)
        self.ca_path = None
        if tls_ca is not None:
            self.ca_path = os.path.join(self._secret_dir, "ca.pem")
            with open(self.ca_path, "wb") as f:
                f.write(tls_ca)
        self.log_dir = launcher.log_dir or os.path.join(self._secret_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.procs: dict[int, subprocess.Popen] = {}
        self.restarts = dict.fromkeys(range(num_workers), 0)
        self.gone: set[int] = set()
        for w in range(num_workers):
            self._spawn(w)

    def log_path(self, worker: int) -> str:
        return os.path.join(self.log_dir, f"worker{worker}.log")

    def _spawn(self, worker: int) -> None:
        cmd = [
            sys.executable, "-m", "fedjax_lab.backends.edge", "client",
            "--server", self.address, "--worker-id", str(worker),
            "--token-file", self.token_path, "--parent-pid", str(os.getpid()),
            "--max-message-bytes", str(self.max_message_bytes),
            "--problem", self.launcher.problem,
        ]
        if self.ca_path is not None:
            cmd += ["--tls-ca", self.ca_path]
        env = {**os.environ, **self.launcher.env, "JAX_PLATFORMS": "cpu"}
        with open(self.log_path(worker), "ab") as log:
            self.procs[worker] = subprocess.Popen(
                [*cmd, "--", *self.launcher.args], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env,
            )

    def log_tail(self, worker: int, lines: int = 15) -> str:
        try:
            with open(self.log_path(worker), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def poll(self) -> list[int]:
        """Workers whose process died since the last call (restarted while budget lasts)."""
        died = []
        for w, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            died.append(w)
            del self.procs[w]
            print(f"edge: client process {w} exited with code {proc.returncode}; last log "
                  f"lines:\n{self.log_tail(w)}", file=sys.stderr)
            if self.restarts[w] < self.launcher.max_restarts:
                self.restarts[w] += 1
                self._spawn(w)
            else:
                self.gone.add(w)
        return died

    def stop(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3.0)
        self.procs.clear()
        shutil.rmtree(self._secret_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ backend
@dataclass
class _Setup:
    algorithm: Algorithm
    schema: _ResultSchema
    finish: Callable[[ServerState, ClientOutput], tuple[ServerState, Any]]


class EdgeBackend:
    """Runs rounds on separate CPU client processes over gRPC (DESIGN.md "Backends").

    Args:
      num_workers: client processes; population client ``i`` lives on process ``i % num_workers``.
      token: shared secret authenticating every message (>= 16 random bytes).
      compressor: the compressor the algorithm encodes with (its wire codec carries the
        update); None when the algorithm uploads raw deltas (sent as 32-bit floats).
      listen: address the server binds (``127.0.0.1:0``: loopback, any free port).
      round_timeout: seconds a round waits for its clients; late ones are dropped.
      join_timeout: seconds the first round waits for all client processes to be ready.
      max_message_bytes: gRPC message size limit, both directions.
      tls: optional ``(certificate chain PEM, private key PEM)`` for the server.
      tls_ca: root certificate PEM given to spawned clients (with ``tls``).
      launcher: spawn and supervise the client processes on this host; None when they are
        started by hand (``python -m fedjax_lab.backends.edge client ...``).
      poll_seconds: long-poll duration of ``Fetch``.
    """

    name = "edge"
    cohort_multiple = 1

    def __init__(
        self,
        *,
        num_workers: int,
        token: bytes,
        compressor: Any = None,
        listen: str = "127.0.0.1:0",
        round_timeout: float = 60.0,
        join_timeout: float = 120.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: tuple[bytes, bytes] | None = None,
        tls_ca: bytes | None = None,
        launcher: WorkerLauncher | None = None,
        poll_seconds: float = 2.0,
    ) -> None:
        if round_timeout <= 0 or join_timeout <= 0:
            raise ValueError(
                f"round_timeout and join_timeout must be > 0, got {round_timeout}, {join_timeout}"
            )
        if launcher is not None and launcher.max_restarts < 0:
            raise ValueError(f"launcher.max_restarts must be >= 0, got {launcher.max_restarts}")
        if launcher is not None and tls is not None and tls_ca is None:
            raise ValueError(
                "tls_ca is needed with tls and a launcher: the spawned clients must verify the "
                "server certificate (pass its CA, or the certificate itself if self-signed)"
            )
        self.compressor = compressor
        self.round_timeout = float(round_timeout)
        self.join_timeout = float(join_timeout)
        self.server = EdgeServer(
            num_workers=num_workers, token=token, listen=listen,
            max_message_bytes=max_message_bytes, tls=tls, poll_seconds=poll_seconds,
        )
        self.num_workers = num_workers
        self._setup: _Setup | None = None
        self._joined = False
        self._closed = False
        self.supervisor = None
        if launcher is not None:
            try:
                self.supervisor = _Supervisor(
                    launcher, self.server.address, token, num_workers, max_message_bytes, tls_ca
                )
            except BaseException:
                self.server.stop(0.0)
                raise

    @property
    def address(self) -> str:
        return self.server.address

    # ------------------------------------------------------------------------------- setup
    def _prepare(self, algorithm: Algorithm, server_state, client_states, cohort: Cohort):
        if self._setup is not None and self._setup.algorithm is algorithm:
            return self._setup
        steps, batch = (int(s) for s in cohort.mask.shape[1:])
        table = _common.shape_structs(cohort.arrays)
        state_t = _common.unstacked_specs(client_states)
        server_t = _common.shape_structs(server_state)
        output = _common.output_template(algorithm, server_t, state_t, steps, batch, table)
        codec = _common.PayloadCodec(self.compressor, output.update)
        features = {k: (tuple(v.shape[1:]), str(np.dtype(v.dtype))) for k, v in table.items()}
        self.server.set_fingerprint(
            _common.fingerprint(algorithm, server_t, state_t, output, steps, batch, features)
        )
        largest = (protocol.MAX_HEADER_BYTES + codec.max_bytes
                   + sum(int(np.prod(s)) * 8 for s, _ in _common.leaf_specs(output))
                   + sum(int(np.prod(s)) * 8 for s, _ in _common.leaf_specs(state_t)))
        if largest > self.server.max_message_bytes:
            raise ValueError(
                f"max_message_bytes={self.server.max_message_bytes} is below the largest valid "
                f"upload of this model/compressor (~{largest} bytes); raise it"
            )

        @jax.jit
        def finish(state, outputs):
            return algorithm.server_update(state, algorithm.aggregate(outputs))

        self._setup = _Setup(algorithm, _ResultSchema(output, state_t, codec), finish)
        return self._setup

    def _check_workers(self) -> None:
        if self.supervisor is None:
            return
        for w in self.supervisor.poll():
            self.server.drop_worker(w, "client process died")
        if len(self.supervisor.gone) == self.num_workers:
            raise RuntimeError(
                "edge: every client process died; last log lines of worker 0:\n"
                + self.supervisor.log_tail(0)
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.join_timeout
        while time.monotonic() < deadline:
            self._check_workers()
            alive = self.num_workers - len(self.supervisor.gone if self.supervisor else ())
            if len(self.server.ready_workers()) >= alive:
                return
            time.sleep(0.1)
        missing = sorted(set(range(self.num_workers)) - self.server.ready_workers())
        print(f"edge: client processes {missing} not ready after {self.join_timeout:.0f}s; "
              "their clients are dropped until they connect", file=sys.stderr)

    # ------------------------------------------------------------------------------ running
    def run_round(
        self,
        algorithm: Algorithm,
        server_state: ServerState,
        client_states: Any,
        cohort: Cohort,
        key: jax.Array,
    ) -> tuple[ServerState, Any, dict[str, Any]]:
        """Runs one round on the client processes (see the module docstring)."""
        if self._closed:
            raise RuntimeError("this EdgeBackend is closed; create a new one")
        validate_round_inputs(algorithm, cohort, None)
        if cohort.index is None:
            raise ValueError(
                "EdgeBackend needs an indexed cohort (runner device_table=True) to tell clients "
                "their data layout"
            )
        setup = self._prepare(algorithm, server_state, client_states, cohort)
        if not self._joined:
            self._wait_ready()
            self._joined = True
        c = cohort.num_clients
        round_id = int(jax.device_get(server_state.round))
        ids = np.asarray(jax.device_get(cohort.client_ids)).astype(np.int64)
        mask = np.asarray(jax.device_get(cohort.mask))
        layout = np.where(mask > 0, np.asarray(jax.device_get(cohort.index)), -1)
        keys = np.asarray(jax.random.key_data(client_keys(key, c)))
        host_server = jax.device_get(server_state)
        host_states = jax.device_get(client_states)
        server_arrays = _common.tree_arrays("s", host_server)
        owners: dict[int, tuple[int, int]] = {}
        per_worker: dict[int, list[int]] = {}
        for slot, cid in enumerate(ids):
            if cid >= 0:
                owners[slot] = (int(cid) % self.num_workers, int(cid))
                per_worker.setdefault(int(cid) % self.num_workers, []).append(slot)
        tasks = {}
        for w, slots in per_worker.items():
            arrays = dict(server_arrays)
            entries = []
            for t, slot in enumerate(slots):
                entries.append({"slot": slot, "client": int(ids[slot]),
                                "layout": _common.layout_digest(layout[slot])})
                arrays[f"k{t}"] = keys[slot]
                one = jax.tree.map(lambda x, s=slot: x[s], host_states)
                arrays.update(_common.tree_arrays(f"c{t}_", one))
            tasks[w] = protocol.encode_message(
                {"kind": "task", "round": round_id, "session": self.server.session,
                 "tasks": entries}, arrays
            )
        rnd = _Round(round_id, owners, tasks, setup.schema)
        self.server.open_round(rnd)
        if self.supervisor is not None:
            for w in self.supervisor.gone:
                self.server.drop_worker(w, "client process gone")
        rnd, refused = self.server.wait_round(
            time.monotonic() + self.round_timeout, self._check_workers
        )
        outputs, states = [], []
        zero = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), setup.schema.output)
        for slot in range(c):
            if slot in rnd.results:
                out, state = rnd.results[slot]
            else:
                out, state = zero, jax.tree.map(lambda x, s=slot: x[s], host_states)
            outputs.append(out)
            states.append(state)
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *outputs)
        new_states = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
        new_server, metrics = setup.finish(server_state, stacked)
        metrics = dict(metrics)
        metrics.update({
            "dropped_clients": float(len(rnd.dropped)),
            "uplink_bytes": float(rnd.uplink_bytes),
            "uplink_message_bytes": float(rnd.uplink_message_bytes),
            "downlink_bytes": float(rnd.downlink_bytes),
            "rejected_messages": float(rnd.rejected_messages),
            "refused_requests": float(refused),
        })
        if rnd.dropped:
            reasons = sorted(set(rnd.dropped.values()))
            print(f"edge: round {round_id}: dropped {len(rnd.dropped)} client(s): {reasons}",
                  file=sys.stderr)
        return new_server, jax.tree.map(jax.numpy.asarray, new_states), metrics

    def close(self) -> None:
        """Stops the client processes (they get "stop") and the server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.announce_stop()
        try:
            if self.supervisor is not None:
                self.supervisor.stop()
        finally:
            self.server.stop()

    def __enter__(self) -> EdgeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
