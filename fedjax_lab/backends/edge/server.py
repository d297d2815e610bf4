"""The edge server: a gRPC service that hands out rounds and validates uploads, and the backend.

:class:`EdgeServer` is the network side. Clients *pull* (as devices behind NAT do): they
``Join`` (the server compares their configuration with its own: shapes, the compiled client
program, the problem config), then long-poll ``Fetch`` for a task (the global server state, and
for each of their sampled clients its slot, PRNG key, client state and a digest of its data
layout), run the algorithm's jitted ``client_update`` and ``Submit`` one result per client: the
compressor's wire bytes plus the small additive fields of ``ClientOutput`` and the new client
state. Every request
is authenticated from its metadata with its worker's own key before its body is read (see
:mod:`.protocol`), size-capped per method and time-limited while it arrives, parsed by a
hostile-input-safe decoder, checked against templates before anything is decoded, and its
numbers are bounded and checked finite before they are aggregated.

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

import functools
import hashlib
import hmac
import math
import os
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

from fedjax_lab.backends.base import SingleProcessBackend
from fedjax_lab.backends.edge import _common, protocol
from fedjax_lab.backends.edge.client import EXIT_REFUSED
from fedjax_lab.backends.edge.secagg import (
    SecAggRequestError,
    SecureAggregation,
    SecureSumRound,
)
from fedjax_lab.backends.vmap import validate_round_inputs
from fedjax_lab.core.rng import client_keys
from fedjax_lab.core.tree import tree_all_finite
from fedjax_lab.core.types import Algorithm, ClientOutput, Cohort, ServerState
from fedjax_lab.secagg import SecAggError

DEFAULT_MAX_MESSAGE_BYTES = protocol.DEFAULT_MAX_MESSAGE_BYTES
DEFAULT_RECEIVE_TIMEOUT = 60.0
DEFAULT_MAX_CLOCK_SKEW = 300.0
# Concurrent calls one worker may have in flight: an honest client makes one at a time (a
# long-polling Fetch, then one Submit per client); a few more absorb its retries.
CALLS_PER_WORKER = 4
# Join, Fetch and a "failed" Submit are a header and nothing else.
SMALL_REQUEST_BYTES = protocol.SMALL_FRAME_BYTES
# HTTP/2 streams one connection may hold open (an honest client process needs 1 or 2).
STREAMS_PER_CONNECTION = 16


class _Rejected(ValueError):
    """An authenticated, well-framed result whose content is refused (``reason``: short)."""

    def __init__(self, reason: str, details: str) -> None:
        super().__init__(details)
        self.reason = reason


class _ResultSchema:
    """Validates and decodes one uploaded client result against the round's templates."""

    def __init__(self, output: ClientOutput, state: Any, codec: _common.PayloadCodec,
                 secure: bool = False) -> None:
        self.output = output
        self.state = state
        self.codec = codec
        # Under secure aggregation the update and the weight never travel in the clear: they
        # go through the SecAgg stages (.secagg); the result carries the rest.
        self.secure = secure
        self.metrics = _common.metric_names(output)
        self.names = (
            ({"weight"} if not secure else set()) | {f"m:{k}" for k in self.metrics}
            | _common.tree_names("e", output.extra) | _common.tree_names("c", state)
        )
        arrays = [output.weight, *output.metrics.values(), *jax.tree.leaves(output.extra),
                  *jax.tree.leaves(state)]
        # The largest valid result frame: prefix, header, every array at its template size
        # and the largest payload the codec accepts. Submit requests announcing more are
        # refused before a byte of their body is read.
        self.max_bytes = (
            SMALL_REQUEST_BYTES + (codec.max_bytes if not secure else 0)
            + sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays)
        )

    def parse(self, msg: protocol.Message, real_weight: float) -> tuple[ClientOutput, Any, int]:
        """``(ClientOutput, new client state, payload bytes)`` of an uploaded result.

        Args:
          msg: the decoded result frame.
          real_weight: the slot's example count (``cohort.weight``), the largest weight a
            client may claim.

        Raises:
          ValueError: a malformed result (:class:`protocol.ProtocolError`, the codec's checks)
            or refused numbers (:class:`_Rejected`: weight out of range, non-finite values).
        """
        msg.expect_names(self.names, {"payload"} if not self.secure else set())
        weight = float(msg.array("weight", (), np.float32)) if not self.secure else 0.0
        metrics = {}
        for k in self.metrics:
            spec = self.output.metrics[k]
            metrics[k] = np.array(msg.array(f"m:{k}", spec.shape, spec.dtype))
        extra = _common.read_tree(msg, "e", self.output.extra)
        state = _common.read_tree(msg, "c", self.state)
        if self.secure:
            data = b""
            update = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), self.output.update)
        else:
            data = msg.blobs["payload"]
            update = self.codec.from_bytes(data)
        if not (math.isfinite(weight) and 0.0 <= weight <= real_weight):
            raise _Rejected(
                "weight out of range",
                f"client weight {weight!r} is not in [0, {real_weight:g}] (the client's example "
                "count)",
            )
        for what, tree in (("metrics", metrics), ("extra", extra), ("client state", state)):
            if not _common.all_finite(tree):
                raise _Rejected("non-finite values", f"the result's {what} are not all finite")
        # After decoding: a payload of finite numbers can still decode to inf (e.g. a rand-k
        # value of 3e38 scaled by d/k).
        if not self.secure and not _common.all_finite(self.codec.decode(update)):
            raise _Rejected("non-finite values", "the update decodes to non-finite values")
        out = ClientOutput(update, np.float32(weight), metrics, extra)
        return out, state, len(data)


@dataclass
class _Round:
    round_id: int
    owners: dict[int, tuple[int, int]]  # slot -> (worker, population client)
    real_weights: dict[int, float]  # slot -> the client's example count (cohort.weight)
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


class _Refusal:
    """A call refused from its metadata: aborts at once, without reading the request stream.

    It runs on the server's small refusal pool (gRPC's ``experimental_thread_pool``), so a
    flood of unauthenticated calls never occupies the threads that serve the workers.
    """

    def __init__(self, pool: futures.ThreadPoolExecutor, code: grpc.StatusCode,
                 details: str) -> None:
        self.experimental_thread_pool = pool
        self.code = code
        self.details = details

    def __call__(self, request_iterator: Any, context: grpc.ServicerContext) -> None:
        del request_iterator
        context.abort(self.code, self.details)


class _Gate(grpc.GenericRpcHandler):
    """Admits a call from its metadata alone (runs in gRPC's poller thread, before the body)."""

    def __init__(self, server: EdgeServer) -> None:
        self._server = server
        self._methods = {protocol.method_path(m): m for m in protocol.METHODS}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = self._methods.get(handler_call_details.method)
        verdict = self._server._admit(method, handler_call_details.invocation_metadata)
        if isinstance(verdict, _Refusal):
            return grpc.stream_unary_rpc_method_handler(verdict)
        return grpc.stream_unary_rpc_method_handler(
            functools.partial(self._server._serve, method, verdict)
        )


class _Watch:
    def __init__(self, deadline: float, context: grpc.ServicerContext) -> None:
        self.deadline = deadline
        self.context = context
        self.fired = False


class _Watchdog:
    """Cancels calls whose request body has not fully arrived by its deadline (one thread).

    gRPC's Python server has no receive deadline of its own and the client's deadline is the
    client's choice: without this, an authenticated sender that stops mid-body would hold a
    thread and a buffer for as long as it likes.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[_Watch] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edge-watchdog", daemon=True)
        self._thread.start()

    def watch(self, context: grpc.ServicerContext, seconds: float) -> _Watch:
        watch = _Watch(time.monotonic() + seconds, context)
        with self._cond:
            self._watches.add(watch)
            self._cond.notify_all()
        return watch

    def unwatch(self, watch: _Watch) -> None:
        with self._cond:
            self._watches.discard(watch)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                expired = [w for w in self._watches if w.deadline <= now]
                for w in expired:
                    w.fired = True
                    self._watches.discard(w)
                if not expired:
                    nearest = min((w.deadline for w in self._watches), default=now + 3600.0)
                    self._cond.wait(nearest - now)
            for w in expired:
                w.context.cancel()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5.0)


class EdgeServer:
    """The gRPC service (thread-safe); :class:`EdgeBackend` drives its rounds.

    Every call is admitted or refused from its metadata alone, before gRPC reads its body
    (:class:`_Gate`): worker id, session, clock, nonce, announced length and the MAC under that
    worker's own key (see :mod:`.protocol`). Refused calls are aborted on a separate two-thread
    pool and counted (``refused_requests``); admitted ones are streamed in chunks up to the
    announced length, which is capped per method (Join and Fetch: a header; Submit: the largest
    valid result of the round's templates), within ``receive_timeout``.

    Args:
      num_workers: client processes allowed to connect, ids ``0..num_workers-1``.
      token: the master secret (>= 16 bytes); worker ``w`` authenticates with
        ``protocol.worker_key(token, w)`` and cannot pose as another worker.
      listen: ``host:port`` to bind (port 0 picks a free port; see :attr:`address`).
      max_message_bytes: upper bound of any message; the round's largest valid upload must fit.
      tls: optional ``(certificate chain PEM, private key PEM)`` to serve over TLS.
      poll_seconds: how long a ``Fetch`` (or an early ``Join``) waits before answering.
      receive_timeout: seconds an admitted call may take to deliver its whole body.
      max_clock_skew: seconds a request's timestamp may differ from the server's clock.
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
        receive_timeout: float = DEFAULT_RECEIVE_TIMEOUT,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or not (
            1 <= num_workers <= protocol.MAX_WORKERS
        ):
            raise ValueError(
                f"num_workers must be an int in [1, {protocol.MAX_WORKERS}], got {num_workers!r}"
            )
        if not isinstance(token, bytes) or len(token) < protocol.MIN_TOKEN_BYTES:
            raise ValueError(
                f"token must be bytes of length >= {protocol.MIN_TOKEN_BYTES} (a random secret)"
            )
        if not isinstance(max_message_bytes, int) or max_message_bytes < SMALL_REQUEST_BYTES:
            raise ValueError(
                f"max_message_bytes must be an int >= {SMALL_REQUEST_BYTES}, got "
                f"{max_message_bytes!r}"
            )
        for name, value in (("poll_seconds", poll_seconds), ("receive_timeout", receive_timeout),
                            ("max_clock_skew", max_clock_skew)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.num_workers = num_workers
        self.max_message_bytes = max_message_bytes
        self.poll_seconds = float(poll_seconds)
        self.receive_timeout = float(receive_timeout)
        self.max_clock_skew = float(max_clock_skew)
        self._keys = [protocol.worker_key(token, w) for w in range(num_workers)]
        self._cond = threading.Condition()
        self._round: _Round | None = None
        self._secagg: SecureSumRound | None = None
        self._document: dict[str, Any] | None = None
        self._limits = dict.fromkeys(protocol.METHODS, SMALL_REQUEST_BYTES)
        self._joined: set[int] = set()
        self._mismatched: dict[int, str] = {}  # worker -> why its configuration was refused
        self._ready: set[int] = set()
        self._told_stop: set[int] = set()
        self._seen: dict[int, float] = {}  # worker -> time of its last authenticated request
        self._inflight = [0] * num_workers
        self._nonces: dict[str, float] = {}  # nonce -> when it may be forgotten (monotonic)
        self._stopping = False
        # A fresh id per server start, covered by every MAC: requests signed for a previous
        # (crashed) server are refused, and its clients re-join instead of skipping rounds.
        self.session = secrets.token_hex(8)
        self._refused = 0  # calls refused before their message was accepted, since last round
        self._watchdog = _Watchdog()
        self._refusals = futures.ThreadPoolExecutor(2, thread_name_prefix="edge-refuse")
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=CALLS_PER_WORKER * num_workers + 4,
                                       thread_name_prefix="edge-serve"),
            handlers=(_Gate(self),),
            options=[
                ("grpc.max_receive_message_length", protocol.CHUNK_BYTES + 1024),
                ("grpc.max_send_message_length", -1),
                ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
                # A fixed per-stream window of one chunk: with gRPC's adaptive (BDP) windows a
                # caller could push many MiB of a body into the transport's buffers before the
                # gate's refusal reaches it. Honest uploads stream 1 MiB chunks, so one chunk
                # of lookahead keeps them at full speed on a LAN.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", protocol.CHUNK_BYTES + 1024),
                # Two servers silently sharing a port would split the clients between them.
                ("grpc.so_reuseport", 0),
            ],
        )
        try:
            if tls is not None:
                creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
                port = self._grpc.add_secure_port(listen, creds)
            else:
                port = self._grpc.add_insecure_port(listen)
        except RuntimeError as err:  # grpcio raises instead of returning 0 since 1.60
            port = 0
            cause = str(err).split(";")[0]
        else:
            cause = "port 0 returned"
        if not port:
            self._watchdog.close()
            raise OSError(f"could not bind the edge server to {listen!r} ({cause})")
        self.address = f"{listen.rsplit(':', 1)[0]}:{port}"
        self._grpc.start()

    # ------------------------------------------------------------------------------- admission
    def _refuse(self, code: grpc.StatusCode, details: str) -> _Refusal:
        with self._cond:
            self._refused += 1
        return _Refusal(self._refusals, code, details)

    def _admit(self, method: str | None, metadata: Any) -> protocol.RequestAuth | _Refusal:
        """The call's verified authentication, or its refusal; reads nothing but metadata."""
        if method is None:
            return self._refuse(grpc.StatusCode.UNIMPLEMENTED, "unknown method")
        auth = protocol.parse_request_metadata(metadata)
        if auth is None:
            return self._refuse(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or malformed authentication metadata")
        if auth.worker >= self.num_workers:
            return self._refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"unknown worker id {auth.worker} (this server has {self.num_workers})",
            )
        if not protocol.verify_request(self._keys[auth.worker], method, auth):
            return self._refuse(grpc.StatusCode.UNAUTHENTICATED,
                                f"invalid MAC: not signed with worker {auth.worker}'s key")
        skew = auth.time_ms / 1000.0 - time.time()
        if abs(skew) > self.max_clock_skew:
            return self._refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                f"request clock differs from the server's by {skew:+.0f} s (more than "
                f"{self.max_clock_skew:.0f} s): synchronize the clocks",
            )
        now = time.monotonic()
        with self._cond:
            if auth.nonce in self._nonces:
                self._refused += 1
                return _Refusal(self._refusals, grpc.StatusCode.UNAUTHENTICATED,
                                "replayed request (nonce already used)")
            if len(self._nonces) > 1024:
                self._nonces = {n: t for n, t in self._nonces.items() if t > now}
            # Remembered for as long as its timestamp stays acceptable.
            self._nonces[auth.nonce] = now + 2 * self.max_clock_skew
            if auth.session != self.session and not (method == protocol.JOIN
                                                     and auth.session == ""):
                self._refused += 1
                return _Refusal(self._refusals, grpc.StatusCode.ABORTED,
                                "session changed (the server restarted): join again")
            limit = self._limits[method]
            if auth.length > limit:
                self._refused += 1
                return _Refusal(
                    self._refusals, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{method} request of {auth.length} bytes exceeds the largest valid one "
                    f"({limit} bytes)",
                )
            if self._inflight[auth.worker] >= CALLS_PER_WORKER:
                self._refused += 1
                return _Refusal(self._refusals, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {CALLS_PER_WORKER} concurrent calls")
            self._inflight[auth.worker] += 1
            self._seen[auth.worker] = time.monotonic()
        return auth

    def _serve(self, method: str, auth: protocol.RequestAuth, request_iterator: Any,
               context: grpc.ServicerContext) -> bytes | None:
        """An admitted call: receive the body, run the method, sign the answer."""
        handler = {protocol.JOIN: self._join, protocol.FETCH: self._fetch,
                   protocol.SUBMIT: self._submit, protocol.SECAGG: self._secagg_call}[method]
        try:
            request = self._receive(auth, request_iterator, context)
            if request is None:
                return None  # cancelled: receive timeout, or the client went away
            answer = handler(auth.worker, request, context)
        except _Abort as err:
            context.abort(err.code, err.details)
        except Exception as err:  # never let one request take the server down
            print(f"edge server: {method} from worker {auth.worker} failed: {err!r}",
                  file=sys.stderr)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            with self._cond:
                self._inflight[auth.worker] -= 1
        context.set_trailing_metadata(((
            protocol.MAC_KEY,
            protocol.reply_mac(self._keys[auth.worker], method, auth, answer),
        ),))
        return answer

    def _receive(self, auth: protocol.RequestAuth, request_iterator: Any,
                 context: grpc.ServicerContext) -> bytearray | None:
        """The body: at most the announced (already capped) length, by ``receive_timeout``."""
        body = bytearray(auth.length)
        digest = hashlib.sha256()
        size = 0
        watch = self._watchdog.watch(context, self.receive_timeout)
        try:
            for chunk in request_iterator:
                end = size + len(chunk)
                if end > auth.length:
                    self._count_refused()
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"more than the announced {auth.length} bytes")
                body[size:end] = chunk
                digest.update(chunk)
                size = end
        except grpc.RpcError:
            if watch.fired:
                self._count_refused()
            return None
        finally:
            self._watchdog.unwatch(watch)
        if size != auth.length or not hmac.compare_digest(digest.hexdigest(), auth.digest):
            self._count_refused()
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED,
                         "the body is not the one the request's MAC covers")
        return body

    def _count_refused(self) -> None:
        with self._cond:
            self._refused += 1

    # ------------------------------------------------------------------------------ handlers
    def _join(self, worker: int, request: bytearray, context: Any) -> bytes:
        msg = _decode(request, "join")
        deadline = time.monotonic() + self.poll_seconds
        with self._cond:
            # The server knows its own document from its first round on; until then, early
            # clients are told to ask again.
            while self._document is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active() or self._stopping:
                    return protocol.encode_message({"kind": "wait"})
                self._cond.wait(remaining)
            problems = _common.compare_documents(self._document, msg.header.get("program"))
            if problems:
                reason = "; ".join(problems)
                if self._mismatched.get(worker) != reason:
                    print(f"edge: worker {worker} refused at join: its configuration differs "
                          f"from the server's: {reason}", file=sys.stderr, flush=True)
                self._mismatched[worker] = reason
                self._refused += 1
                self._cond.notify_all()
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"configuration mismatch with the server: {reason}; start the client with "
                    "the server's problem and flags",
                )
            self._mismatched.pop(worker, None)
            self._joined.add(worker)
        return protocol.encode_message({
            "kind": "welcome", "session": self.session, "num_workers": self.num_workers,
            "poll_seconds": self.poll_seconds, "max_message_bytes": self.max_message_bytes,
        })

    def _fetch(self, worker: int, request: bytearray, context: Any) -> bytes:
        msg = _decode(request, "fetch")
        after = _field(msg, "after_round", int)
        deadline = time.monotonic() + self.poll_seconds
        with self._cond:
            if worker not in self._joined:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "join first")
            self._ready.add(worker)
            self._cond.notify_all()
            while True:
                if self._stopping:
                    self._told_stop.add(worker)
                    self._cond.notify_all()
                    return protocol.encode_message({"kind": "stop"})
                rnd = self._round
                if rnd is not None and rnd.round_id > after and worker in rnd.tasks:
                    task = rnd.tasks[worker]
                    rnd.downlink_bytes += len(task)
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active():
                    return protocol.encode_message({"kind": "idle"})
                self._cond.wait(remaining)

    def _submit(self, worker: int, request: bytearray, context: Any) -> bytes:
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
            out, state, payload_bytes = rnd.schema.parse(msg, rnd.real_weights[slot])
        except _Rejected as err:  # well-formed, but numbers that must not reach the model
            self._reject(rnd, [slot], f"rejected result: {err.reason}")
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"rejected result: {err}") from err
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

    def _secagg_call(self, worker: int, request: bytearray, context: Any) -> bytes:
        """One stage of the open secure aggregation (see :mod:`.secagg`)."""
        msg = _decode(request, "secagg")
        deadline = time.monotonic() + self.poll_seconds
        with self._cond:
            while self._secagg is None:
                remaining = deadline - time.monotonic()
                if msg.header.get("stage") != "config":
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                 "no secure aggregation is open")
                if remaining <= 0 or not context.is_active() or self._stopping:
                    return protocol.encode_message({"kind": "secagg", "stage": "none"})
                self._cond.wait(remaining)
            rnd = self._secagg
        try:
            return rnd.handle(worker, msg, len(request), context.is_active)
        except SecAggRequestError as err:
            raise _Abort(grpc.StatusCode[err.code], err.details) from err

    def secure_sum(self, rnd: SecureSumRound) -> np.ndarray:
        """Opens ``rnd`` to the workers, runs its four stages, and closes it.

        Returns the unmasked sum (``uint64`` ring elements) of the surviving participants;
        raises :class:`fedjax_lab.secagg.SecAggError` when the round fails (too few left).
        """
        with self._cond:
            if self._secagg is not None:
                raise RuntimeError("a secure aggregation is already open")
            self._secagg = rnd
            self._limits[protocol.SECAGG] = rnd.max_request_bytes()
            self._cond.notify_all()
        try:
            return rnd.run()
        finally:
            with self._cond:
                self._secagg = None
                self._limits[protocol.SECAGG] = SMALL_REQUEST_BYTES

    def _reject(self, rnd: _Round, slots: Sequence[int] | None, reason: str, count: bool = True,
                worker: int | None = None) -> None:
        """Drops ``slots`` (or all of ``worker``'s pending slots) of ``rnd``."""
        with self._cond:
            rnd.drop(rnd.slots_of(worker) if slots is None else list(slots), reason)
            if count:
                rnd.rejected_messages += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------------- round control
    def configure(self, document: dict[str, Any], submit_limit: int) -> None:
        """Sets what joining clients must match and the size cap of a Submit request."""
        with self._cond:
            self._document = document
            self._limits[protocol.SUBMIT] = max(submit_limit, SMALL_REQUEST_BYTES)
            self._cond.notify_all()

    def ready_workers(self) -> set[int]:
        with self._cond:
            return set(self._ready)

    def mismatched_workers(self) -> dict[int, str]:
        """Workers refused at join (configuration mismatch) and why."""
        with self._cond:
            return dict(self._mismatched)

    def open_round(self, rnd: _Round) -> None:
        with self._cond:
            rnd.pending = set(rnd.owners)
            for worker, reason in self._mismatched.items():
                rnd.drop(rnd.slots_of(worker), f"configuration mismatch: {reason[:120]}")
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
        self._watchdog.close()
        self._refusals.shutdown(wait=False)

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


def _check_secure(algorithm: Algorithm, output: ClientOutput, state: Any) -> None:
    """Refuses algorithms whose per-client upload secure aggregation could not protect."""
    fix = ("; use an additive algorithm without compressor, client extras or client state "
           "(e.g. FedAvg), or run without secure aggregation")
    if not algorithm.additive:
        raise ValueError(f"secure aggregation needs an additive algorithm (a sum over clients); "
                         f"{algorithm.name} is not{fix}")
    if algorithm.compressor is not None:
        raise ValueError(f"secure aggregation sums dense updates; {algorithm.name} has a "
                         f"compressor whose per-client payload would be decoded by the server"
                         f"{fix}")
    if jax.tree.leaves(output.extra) or jax.tree.leaves(state):
        raise ValueError(f"{algorithm.name} uploads per-client extras or client state, which "
                         f"would travel in the clear{fix}")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _decode(request: bytes | bytearray, kind: str) -> protocol.Message:
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
    def __init__(self, launcher: WorkerLauncher, address: str, master: bytes, num_workers: int,
                 max_message_bytes: int, tls_ca: bytes | None) -> None:
        self.launcher = launcher
        self.address = address
        self.num_workers = num_workers
        self.max_message_bytes = max_message_bytes
        self._secret_dir = tempfile.mkdtemp(prefix="fedjax-edge-")  # mode 0700
        # Each process gets only its own worker key; the master secret never leaves memory.
        for w in range(num_workers):
            protocol.write_worker_key(self.key_path(w), master, w)
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

    def key_path(self, worker: int) -> str:
        return os.path.join(self._secret_dir, f"worker{worker}.key")

    def log_path(self, worker: int) -> str:
        return os.path.join(self.log_dir, f"worker{worker}.log")

    def _spawn(self, worker: int) -> None:
        cmd = [
            sys.executable, "-m", "fedjax_lab.backends.edge", "client",
            "--server", self.address, "--key-file", self.key_path(worker),
            "--parent-pid", str(os.getpid()),
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
            # A refused process (configuration mismatch, bad key) would be refused again.
            if proc.returncode != EXIT_REFUSED and self.restarts[w] < self.launcher.max_restarts:
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
    finish: Callable[..., tuple[ServerState, Any, jax.Array]]
    dim: int = 0  # secure aggregation: coordinates of the flattened update


class EdgeBackend(SingleProcessBackend):
    """Runs rounds on separate CPU client processes over gRPC (DESIGN.md "Backends").

    Nothing a client sends reaches the model unchecked (``docs/threat_model.md``): results are
    bounded (weight within ``[0, the client's example count]``), finite after decoding, and a
    server update that still comes out non-finite is not committed: the round keeps the
    previous server and client states (its round counter advances) and reports
    ``rejected_server_updates``.

    Args:
      num_workers: client processes; population client ``i`` lives on process ``i % num_workers``.
      token: the master secret (>= 16 random bytes); worker ``w`` gets only its derived key
        (``protocol.worker_key``, written by ``python -m fedjax_lab.backends.edge keys``).
      listen: address the server binds (``127.0.0.1:0``: loopback, any free port).
      round_timeout: seconds a round waits for its clients; late ones are dropped.
      join_timeout: seconds the first round waits for all client processes to be ready.
      max_message_bytes: upper bound of any message (the largest valid upload must fit).
      tls: optional ``(certificate chain PEM, private key PEM)`` for the server.
      tls_ca: root certificate PEM given to spawned clients (with ``tls``).
      launcher: spawn and supervise the client processes on this host; None when they are
        started by hand (``python -m fedjax_lab.backends.edge client ...``).
      poll_seconds: long-poll duration of ``Fetch``.
      receive_timeout: seconds an admitted request may take to deliver its body.
      problem_config: the JSON-able config that clients' ``EdgeProblem.config`` must equal
        (derived from the same source, e.g. the experiment's flags); None when the problem
        factory gives none.
      secure_aggregation: run SecAgg / SecAgg+ (:mod:`.secagg`) over the transport each round:
        clients upload their weighted update and weight only masked, the server decodes only
        their sum. Needs an additive algorithm without compressor, per-client extras or client
        state (they would travel in the clear).
    """

    name = "edge"
    cohort_multiple = 1

    def __init__(
        self,
        *,
        num_workers: int,
        token: bytes,
        listen: str = "127.0.0.1:0",
        round_timeout: float = 60.0,
        join_timeout: float = 120.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: tuple[bytes, bytes] | None = None,
        tls_ca: bytes | None = None,
        launcher: WorkerLauncher | None = None,
        poll_seconds: float = 2.0,
        receive_timeout: float = DEFAULT_RECEIVE_TIMEOUT,
        problem_config: Mapping[str, Any] | None = None,
        secure_aggregation: SecureAggregation | None = None,
    ) -> None:
        if secure_aggregation is not None:
            if not isinstance(secure_aggregation, SecureAggregation):
                raise ValueError("secure_aggregation must be a SecureAggregation, got "
                                 f"{type(secure_aggregation).__name__}")
            secure_aggregation.validate()
        self.secure_aggregation = secure_aggregation
        if not (round_timeout > 0 and join_timeout > 0):
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
        super().__init__()
        self.round_timeout = float(round_timeout)
        self.join_timeout = float(join_timeout)
        self.problem_config = _common.canonical_config(problem_config)
        self.server = EdgeServer(
            num_workers=num_workers, token=token, listen=listen,
            max_message_bytes=max_message_bytes, tls=tls, poll_seconds=poll_seconds,
            receive_timeout=receive_timeout,
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
        spec = _common.ProgramSpec.of_round(server_state, client_states, cohort)
        output = spec.output(algorithm)
        # The wire codec of the algorithm's own compressor (raw float32 deltas without one).
        codec = _common.PayloadCodec(algorithm.compressor, output.update)
        secure = self.secure_aggregation
        if secure is not None:
            _check_secure(algorithm, output, spec.state)
            secure.fixed_point.check_capacity(cohort.num_clients)
        schema = _ResultSchema(output, spec.state, codec, secure=secure is not None)
        if schema.max_bytes > self.server.max_message_bytes:
            raise ValueError(
                f"max_message_bytes={self.server.max_message_bytes} is below the largest valid "
                f"upload of this model/compressor ({schema.max_bytes} bytes); raise it"
            )
        self.server.configure(spec.document(algorithm, self.problem_config), schema.max_bytes)

        @jax.jit
        def finish(state, outputs):
            new_state, metrics = algorithm.server_update(state, algorithm.aggregate(outputs))
            committed = tree_all_finite((new_state.params, new_state.opt_state, new_state.extra))
            return new_state, metrics, committed

        dim = sum(math.prod(x.shape) for x in jax.tree.leaves(output.update))

        @jax.jit
        def finish_secure(state, outputs, update_sum, weight_sum):
            # The plain aggregate of the results (updates and weights are zero: they never
            # arrived in the clear) gives the metric sums; the update and weight sums are the
            # securely aggregated ones, as in fedjax_lab.secagg.with_secure_aggregation.
            base = algorithm.aggregate(outputs)
            leaves, treedef = jax.tree.flatten(base.update_sum)
            sums, start = [], 0
            for leaf in leaves:
                sums.append(update_sum[start : start + leaf.size].reshape(leaf.shape)
                            .astype(leaf.dtype))
                start += leaf.size
            agg = base._replace(update_sum=jax.tree.unflatten(treedef, sums),
                                weight_sum=weight_sum.astype(base.weight_sum.dtype))
            new_state, metrics = algorithm.server_update(state, agg)
            committed = tree_all_finite((new_state.params, new_state.opt_state, new_state.extra))
            return new_state, metrics, committed

        self._setup = _Setup(algorithm, schema, finish_secure if secure else finish, dim)
        return self._setup

    def _secure_sum(self, rnd: _Round, round_id: int, dim: int):
        """Runs SecAgg over the clients whose result arrived; ``(decoded sum | None, metrics)``.

        Clients that leave during the protocol are dropped from the round (their plaintext
        metrics too), so every number the round reports covers the same clients.
        """
        secure = self.secure_aggregation
        slots = sorted(rnd.results)
        info = {"secagg_failed": 1.0, "secagg_clients": float(len(slots)),
                "secagg_upload_bytes": 0.0, "secagg_download_bytes": 0.0}
        reason = None
        total = None
        if len(slots) < secure.min_clients:
            reason = (f"{len(slots)} client(s) left, fewer than min_clients="
                      f"{secure.min_clients}")
        else:
            config = secure.round_config(len(slots), dim + 1, os.urandom(16),
                                         int.from_bytes(os.urandom(8), "little"))
            sround = SecureSumRound(
                config, {i: rnd.owners[s][0] for i, s in enumerate(slots)},
                secure.stage_timeout, slots=dict(enumerate(slots)), round_id=round_id,
            )
            try:
                total = self.server.secure_sum(sround)
            except SecAggError as err:
                reason = str(err)
            info["secagg_upload_bytes"] = float(sum(sround.up_frame_bytes.values()))
            info["secagg_download_bytes"] = float(sum(sround.down_frame_bytes.values()))
            survivors = {slots[i] for i in sround.survivors()} if total is not None else set()
            for i, s in enumerate(slots):
                if s not in survivors:
                    rnd.results.pop(s)
                    rnd.dropped[s] = "secure aggregation: " + (
                        sround.dropped.get(i, "round failed") if total is not None
                        else "round failed")
        if total is None:
            for s in slots:
                if s in rnd.results:
                    rnd.results.pop(s)
                    rnd.dropped[s] = "secure aggregation: round failed"
            print(f"edge: round {round_id}: secure aggregation failed ({reason}); kept the "
                  "previous server and client states", file=sys.stderr)
            return None, info
        info["secagg_failed"] = 0.0
        return secure.fixed_point.decode(total), info

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
        everyone = set(range(self.num_workers))
        while True:
            self._check_workers()
            gone = self.supervisor.gone if self.supervisor else set()
            refused = set(self.server.mismatched_workers())
            missing = everyone - self.server.ready_workers() - gone - refused
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if refused:
            print(f"edge: client processes {sorted(refused)} were refused (configuration "
                  "mismatch, see above); their clients are dropped", file=sys.stderr)
        if missing:
            print(f"edge: client processes {sorted(missing)} not ready after "
                  f"{self.join_timeout:.0f}s; their clients are dropped until they connect",
                  file=sys.stderr)

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
        weights = np.asarray(jax.device_get(cohort.weight), np.float32)
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
            head = {"kind": "task", "round": round_id, "tasks": entries}
            if self.secure_aggregation is not None:
                fp = self.secure_aggregation.fixed_point
                head["secure_aggregation"] = {
                    "bits": fp.bits, "frac_bits": fp.frac_bits, "bound": float(fp.bound),
                    # How long the client waits for the protocol to open after its submit.
                    "wait": self.round_timeout + 30.0,
                }
            tasks[w] = protocol.encode_message(head, arrays)
        rnd = _Round(round_id, owners, {s: float(weights[s]) for s in owners}, tasks,
                     setup.schema)
        self.server.open_round(rnd)
        if self.supervisor is not None:
            for w in self.supervisor.gone:
                self.server.drop_worker(w, "client process gone")
        rnd, refused = self.server.wait_round(
            time.monotonic() + self.round_timeout, self._check_workers
        )
        secure_metrics: dict[str, float] = {}
        if self.secure_aggregation is not None:
            secure_total, secure_metrics = self._secure_sum(rnd, round_id, setup.dim)
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
        if self.secure_aggregation is None:
            new_server, metrics, committed = setup.finish(server_state, stacked)
        else:
            failed = secure_total is None
            total = np.zeros(setup.dim + 1) if failed else secure_total
            new_server, metrics, committed = setup.finish(
                server_state, stacked, np.asarray(total[:-1], np.float32),
                np.float32(total[-1]))
            if failed:  # no sum: no model update, as for a non-finite one (below)
                new_server = server_state._replace(round=new_server.round)
                new_states = host_states
        metrics = dict(metrics)
        metrics.update(secure_metrics)
        if not bool(committed):
            # Bounded, finite uploads can still overflow together (or with the server
            # optimizer): keep the last good model. The round is void for the clients too
            # (e.g. error-feedback residuals assumed their payload was applied).
            print(f"edge: round {round_id}: the server update is not finite; kept the previous "
                  "server and client states", file=sys.stderr)
            new_server = server_state._replace(round=new_server.round)
            new_states = host_states
        metrics.update({
            "dropped_clients": float(len(rnd.dropped)),
            "uplink_bytes": float(rnd.uplink_bytes),
            "uplink_message_bytes": float(rnd.uplink_message_bytes),
            "downlink_bytes": float(rnd.downlink_bytes),
            "rejected_messages": float(rnd.rejected_messages),
            "refused_requests": float(refused),
            "rejected_server_updates": 0.0 if bool(committed) else 1.0,
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
