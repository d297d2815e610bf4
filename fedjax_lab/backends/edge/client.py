"""An edge client process: hosts some of the population's clients and trains them on CPU.

Population client ``i`` lives on client process ``i % num_workers`` (the server tells the
process ``num_workers`` when it joins). The process keeps only the example rows of its own
clients. For each task it lays out a client's data with the same
``CohortBuilder.client_index(client, round)`` as the simulation (checked against the digest the
server sent), runs the algorithm's jitted ``client_update`` for that ONE client with the slot's
PRNG key, and uploads the compressor's wire bytes (``to_bytes``) with the rest of the
``ClientOutput`` and the new client state.

Every wait is bounded: RPCs have deadlines, an unreachable server is retried for
``server_timeout`` seconds, and with ``parent_pid`` the process exits as soon as its launcher is
gone (so a killed experiment does not leave clients behind).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Any

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.backends import packed
from fedjax_lab.backends.edge import _common, protocol
from fedjax_lab.backends.edge.secagg import run_secagg_worker
from fedjax_lab.backends.vmap import has_conv
from fedjax_lab.core.local import is_local_update
from fedjax_lab.core.types import Cohort
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.packing import pack, split_layout
from fedjax_lab.secagg import FixedPoint, SecAggError

# Steps per call of a stepwise client update: small, so a client's last call wastes little.
SEGMENT_STEPS = 4

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_SERVER_GONE = 4
EXIT_PARENT_GONE = 5


class EdgeClientError(RuntimeError):
    """The server refused this client (bad key, unknown id, configuration mismatch)."""


class _Rejoin(Exception):
    """The server's session changed (it restarted): join again."""


class Connection:
    """Signed calls to the server; answers are verified with the server's MAC.

    Each request streams its frame in chunks (:func:`protocol.chunks`) with metadata that
    authenticates it (:func:`protocol.sign_request`) under this worker's own key; the answer's
    MAC must cover that very request, so a replayed or forged answer is refused.
    """

    def __init__(self, address: str, worker: int, key: bytes, *, tls_ca: bytes | None,
                 server_name: str | None, max_message_bytes: int) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", protocol.CHUNK_BYTES),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.worker = worker
        self.session = ""  # learnt from the server's welcome
        self._key = key
        self._calls = {
            m: self.channel.stream_unary(protocol.method_path(m)) for m in protocol.METHODS
        }

    def call(self, method: str, frame: bytes, timeout: float) -> protocol.Message:
        metadata, auth = protocol.sign_request(self._key, method, self.worker, self.session,
                                               frame)
        answer, call = self._calls[method].with_call(
            iter(protocol.chunks(frame)), timeout=timeout, metadata=metadata,
        )
        server_mac = protocol.metadata_value(call.trailing_metadata(), protocol.MAC_KEY)
        if not protocol.verify_reply(self._key, method, auth, answer, server_mac):
            raise EdgeClientError(f"the answer to {method} is not signed for this request")
        return protocol.decode_message(answer)

    def close(self) -> None:
        self.channel.close()


_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.RESOURCE_EXHAUSTED)
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)


class EdgeWorker:
    """The state of one client process (its data, templates and compiled client update).

    Args:
      problem: the problem of this run (as the server's).
      worker: this process's id.
      num_workers: client processes of the run (from the server's welcome).
      spec: the problem's :class:`_common.ProgramSpec` if already computed (for the join).
    """

    def __init__(self, problem: _common.EdgeProblem, worker: int, num_workers: int,
                 spec: _common.ProgramSpec | None = None) -> None:
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker id {worker} not in [0, {num_workers})")
        self.problem = problem
        self.num_workers = num_workers
        algorithm, data = problem.algorithm, problem.data
        spec = spec or _common.ProgramSpec.of_problem(problem)
        data_spec = algorithm.data_spec
        self.builder = CohortBuilder(
            _common.PopulationLayout(np.asarray(data.offsets)),
            batch_size=data_spec.batch_size, local_epochs=data_spec.local_epochs,
            num_steps=data_spec.num_steps, cohort_size=1, seed=problem.seed, device_table=False,
        )
        self.hosted = [c for c in range(data.num_clients) if c % num_workers == worker]
        rows = [np.arange(data.offsets[c], data.offsets[c + 1]) for c in self.hosted]
        self.local_lo = {}
        lo = 0
        for c, r in zip(self.hosted, rows, strict=True):
            self.local_lo[c] = lo
            lo += len(r)
        take = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        # At least one row so that the compiled gather has a valid (masked) row 0.
        take = take if len(take) else np.zeros(1, np.int64)
        # data.take: a lazily read population reads only this worker's clients' rows.
        self.table = {k: jnp.asarray(v) for k, v in data.take(take).items()}
        self.server_template = spec.server
        self.state_template = spec.state
        self.output_template = spec.output(algorithm)
        self.codec = _common.PayloadCodec(algorithm.compressor, self.output_template.update)
        self.key_template = jax.random.key_data(jax.random.key(0))
        local = algorithm.client_update
        self.stepwise = is_local_update(local)
        if self.stepwise:
            # Only the client's real steps run, SEGMENT_STEPS per call (the packed round of
            # fedjax_lab.backends.packed with one slot): a small client does not pay for the
            # population's largest. Conv models on CPU take straight-line steps.
            mode = "unrolled" if has_conv(self.server_template) else "vmap"
            self._init = jax.jit(packed.init_fn(local, 1))
            self._segment = jax.jit(packed.segment_fn(local, mode), donate_argnums=(2, 3))
            self._finish = jax.jit(functools.partial(packed.finish_clients, local))
        else:
            self._client_fn = jax.jit(_common.client_program(algorithm))

    def warm_up(self) -> None:
        """Compiles the client update before the first task (so rounds time only training)."""
        if not self.hosted:
            return
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.server_template)
        state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.state_template)
        b = self.builder.batch
        index = np.zeros((1, self.builder.steps, b), np.int32)
        jax.block_until_ready(self._train(zeros, state, index, np.zeros(index.shape, np.float32),
                                          np.float32(0.0), jax.random.key(0)))

    def _train(self, server_state, state, index, mask, weight, key):
        """``(ClientOutput, new state)`` of one client laid out as ``index``/``mask`` [1, S, B]."""
        if not self.stepwise:
            return self._client_fn(server_state, state, jnp.asarray(index[0]),
                                   jnp.asarray(mask[0]), jnp.asarray(weight), key, self.table)
        states = jax.tree.map(lambda x: jnp.asarray(x)[None], state)
        weights = jnp.asarray(weight, jnp.float32)[None]
        carry, buffer, ctx = self._init(server_state, states, weights, key[None])
        one = Cohort(arrays=self.table, index=index, mask=mask, weight=weights,
                     client_ids=np.zeros(1, np.int32))
        for piece in split_layout(pack(one, 1, SEGMENT_STEPS)):
            carry, buffer = self._segment(server_state, ctx, carry, buffer, self.table,
                                          *packed.segment_inputs(piece))
        out, new_states = self._finish(server_state, states, buffer, weights, key[None])
        return jax.tree.map(lambda x: x[0], (out, new_states))

    def run_task(self, round_id: int, entry: dict, server_state: Any, key_data: np.ndarray,
                 state: Any, secure: dict | None = None) -> bytes | tuple[bytes, np.ndarray]:
        """One client's update for ``round_id``: the result frame to submit.

        With ``secure`` (the task's secure aggregation code: bits, frac_bits, bound) it returns
        ``(frame, x)``: the frame without the update and weight, and ``x = [w u, w]`` (float64,
        flattened), the input this client gives the SecAgg protocol (None if refused).
        """
        frame = self._run_task(round_id, entry, server_state, key_data, state, secure)
        if secure is not None and not isinstance(frame, tuple):
            return frame, None
        return frame

    def _run_task(self, round_id, entry, server_state, key_data, state, secure):
        client, slot = entry["client"], entry["slot"]
        head = {"round": round_id, "slot": slot, "client": client}
        if client not in self.local_lo:
            return _failed(head, f"client {client} is not hosted by this process")
        index = self.builder.client_index(client, round_id)
        if _common.layout_digest(index) != entry.get("layout"):
            return _failed(head, "data layout mismatch (seed/population/round differ)")
        local = np.where(
            index >= 0, index - int(self.problem.data.offsets[client]) + self.local_lo[client], 0
        ).astype(np.int32)
        key = jax.random.wrap_key_data(jnp.asarray(key_data))
        out, new_state = self._train(
            server_state, state, local[None], (index >= 0).astype(np.float32)[None],
            np.float32(self.builder.client_weight(client, index)), key,
        )
        out, new_state = jax.device_get((out, new_state))
        if secure is not None:
            return self._secure_result(head, out, new_state, secure,
                                       float(self.builder.client_weight(client, index)))
        try:
            payload = self.codec.to_bytes(out.update)
        except ValueError as err:  # e.g. a non-finite payload (compressor policy)
            return _failed(head, f"cannot encode the update: {err}")
        arrays = {"weight": np.asarray(out.weight, np.float32)}
        arrays.update({f"m:{k}": np.asarray(v) for k, v in out.metrics.items()})
        arrays.update(_common.tree_arrays("e", out.extra))
        arrays.update(_common.tree_arrays("c", new_state))
        return protocol.encode_message({"kind": "result", **head}, arrays, {"payload": payload})

    def _secure_result(self, head: dict, out: Any, new_state: Any, secure: dict,
                       examples: float) -> bytes | tuple[bytes, np.ndarray]:
        """The checks the server makes on plaintext uploads, made here (it sees only a sum).

        The weight must lie in ``[0, examples]`` and ``[w u, w]`` be finite and within the
        fixed-point bound; otherwise the client reports "failed" instead of joining the sum.
        """
        try:
            fp = FixedPoint(int(secure["bits"]), int(secure["frac_bits"]),
                            float(secure["bound"])).validate()
        except (KeyError, TypeError, ValueError) as err:
            return _failed(head, f"bad secure aggregation settings: {err}")
        weight = float(out.weight)
        if not (math.isfinite(weight) and 0.0 <= weight <= examples):
            return _failed(head, f"weight {weight!r} is not in [0, {examples:g}]")
        flat = [np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(out.update)]
        x = np.concatenate([*(weight * f for f in flat), [weight]])
        try:
            fp.encode(x)  # refuses non-finite values and values beyond the bound
        except ValueError as err:
            return _failed(head, f"secure aggregation input refused: {err}")
        if not all(np.all(np.isfinite(np.asarray(v))) for v in
                   jax.tree.leaves((out.metrics, out.extra, new_state))):
            return _failed(head, "non-finite metrics or state")
        arrays = {f"m:{k}": np.asarray(v) for k, v in out.metrics.items()}
        arrays.update(_common.tree_arrays("e", out.extra))
        arrays.update(_common.tree_arrays("c", new_state))
        return protocol.encode_message({"kind": "result", **head}, arrays), x

    def parse_task(self, msg: protocol.Message):
        """``(round, entries, server_state, [(key_data, client_state)])`` from a task frame."""
        round_id = msg.field("round", int)
        entries = msg.field("tasks", list)
        server_state = jax.tree.map(
            jnp.asarray, _common.read_tree(msg, "s", self.server_template)
        )
        per_task = []
        for t, entry in enumerate(entries):
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k), int) for k in ("slot", "client")
            ):
                raise protocol.ProtocolError(f"bad task entry {entry!r}")
            key = msg.array(f"k{t}", self.key_template.shape, self.key_template.dtype)
            state = jax.tree.map(
                jnp.asarray, _common.read_tree(msg, f"c{t}_", self.state_template)
            )
            per_task.append((np.array(key), state))
        return round_id, entries, server_state, per_task


def _failed(head: dict, reason: str) -> bytes:
    print(f"edge client: slot {head['slot']} failed: {reason}", file=sys.stderr)
    return protocol.encode_message({"kind": "failed", **head, "reason": reason})


def _parent_gone(parent_pid: int | None) -> bool:
    return parent_pid is not None and os.getppid() != parent_pid


def run_client(
    problem: _common.EdgeProblem,
    *,
    server: str,
    worker: int,
    key: bytes,
    tls_ca: bytes | None = None,
    server_name: str | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    server_timeout: float = 60.0,
    parent_pid: int | None = None,
) -> int:
    """Joins ``server`` as client process ``worker`` and serves tasks until told to stop.

    Args:
      problem: the problem of this run (the server refuses a different configuration).
      server: ``host:port`` of the edge server.
      worker: this process's worker id.
      key: this worker's key (``protocol.load_worker_key``).
      tls_ca: root certificate PEM to connect over TLS (None: plaintext).
      server_name: expected name in the server certificate.
      max_message_bytes: the largest answer (task) accepted.
      server_timeout: give up after the server was unreachable this long (s).
      parent_pid: exit when this process is no longer our parent.

    Returns:
      An exit code: 0 after "stop", 3 if refused (key, id, configuration), 4 if the server
      stayed unreachable for ``server_timeout`` seconds, 5 if ``parent_pid`` went away.
    """
    conn = Connection(server, worker, key, tls_ca=tls_ca, server_name=server_name,
                       max_message_bytes=max_message_bytes)
    try:
        return _serve(problem, conn, worker, server_timeout, parent_pid)
    except EdgeClientError as err:
        print(f"edge client {worker}: refused: {err}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        conn.close()


def _call(conn: Connection, method: str, frame: bytes, timeout: float,
          server_timeout: float, parent_pid: int | None) -> protocol.Message | None:
    """A call retried while the server is unreachable; None when we should exit."""
    give_up = time.monotonic() + server_timeout
    delay = 0.05
    while True:
        try:
            return conn.call(method, frame, timeout)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.ABORTED and method != protocol.JOIN:
                raise _Rejoin from err
            if code in _REFUSED:
                raise EdgeClientError(f"{method}: {code.name}: {err.details()}") from err
            if code not in _RETRY or time.monotonic() > give_up or _parent_gone(parent_pid):
                print(f"edge client: {method} failed: {code.name}: {err.details()}",
                      file=sys.stderr)
                return None
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def _join(conn: Connection, document: dict, server_timeout: float,
          parent_pid: int | None) -> protocol.Message | None:
    """The server's welcome (its session is then ``conn.session``); None when we should exit."""
    conn.session = ""
    frame = protocol.encode_message({"kind": "join", "pid": os.getpid(), "program": document})
    while True:
        if _parent_gone(parent_pid):
            return None
        welcome = _call(conn, protocol.JOIN, frame, 30.0, server_timeout, parent_pid)
        if welcome is None or welcome.header.get("kind") == "welcome":
            break
        # "wait": the server has not set up its first round yet.
    if welcome is not None:
        conn.session = welcome.field("session", str)
    return welcome


def _serve(problem, conn: Connection, worker: int, server_timeout: float,
           parent_pid: int | None) -> int:
    spec = _common.ProgramSpec.of_problem(problem)
    document = spec.document(problem.algorithm, problem.config)
    state = None
    while True:  # once per server session
        welcome = _join(conn, document, server_timeout, parent_pid)
        if welcome is None:
            return EXIT_PARENT_GONE if _parent_gone(parent_pid) else EXIT_SERVER_GONE
        num_workers = welcome.field("num_workers", int)
        poll = float(welcome.field("poll_seconds", int | float))
        if state is None or state.num_workers != num_workers:
            state = EdgeWorker(problem, worker, num_workers, spec)
            state.warm_up()
        try:
            return _work(state, conn, worker, poll, server_timeout, parent_pid)
        except _Rejoin:
            print(f"edge client {worker}: the server restarted; joining again", file=sys.stderr)


def _work(state: EdgeWorker, conn: Connection, worker: int, poll: float,
          server_timeout: float, parent_pid: int | None) -> int:
    """Fetches and runs tasks until "stop" (raises :class:`_Rejoin` on a new session)."""
    last_round = -1
    while True:
        if _parent_gone(parent_pid):
            return EXIT_PARENT_GONE
        fetch = protocol.encode_message({"kind": "fetch", "after_round": last_round})
        msg = _call(conn, protocol.FETCH, fetch, poll + 10.0, server_timeout, parent_pid)
        if msg is None:
            return EXIT_PARENT_GONE if _parent_gone(parent_pid) else EXIT_SERVER_GONE
        kind = msg.header.get("kind")
        if kind == "stop":
            return EXIT_OK
        if kind != "task":
            continue
        round_id, entries, server_state, per_task = state.parse_task(msg)
        secure = msg.header.get("secure_aggregation")
        secure = secure if isinstance(secure, dict) else None
        inputs = {}
        for entry, (key, client_state) in zip(entries, per_task, strict=True):
            frame = state.run_task(round_id, entry, server_state, key, client_state, secure)
            if secure is not None:
                frame, x = frame
            try:
                conn.call(protocol.SUBMIT, frame, 30.0)
            except grpc.RpcError as err:  # the server dropped this client; go on
                if err.code() == grpc.StatusCode.ABORTED:
                    raise _Rejoin from err
                print(f"edge client {worker}: submit of slot {entry['slot']} failed: "
                      f"{err.code().name}: {err.details()}", file=sys.stderr)
                continue
            if secure is not None and x is not None:
                inputs[entry["slot"]] = x
        if inputs:
            _secure_aggregate(conn, worker, round_id, inputs, float(secure.get("wait", 90.0)))
        last_round = round_id


def _secure_aggregate(conn: Connection, worker: int, round_id: int,
                      inputs: dict[int, np.ndarray], wait: float) -> None:
    """Takes part in the round's SecAgg protocol with these slots' inputs ``[w u, w]``."""

    def values(config, slots):
        unknown = sorted(s for s in slots.values() if s not in inputs)
        if unknown:
            raise ValueError(f"the server asks for slots {unknown} this process did not submit")
        return {i: inputs[s] for i, s in slots.items()}

    try:
        run_secagg_worker(lambda frame, timeout: conn.call(protocol.SECAGG, frame, timeout),
                          values, round_id=round_id, config_timeout=wait)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.ABORTED:
            raise _Rejoin from err
        print(f"edge client {worker}: secure aggregation of round {round_id} failed: "
              f"{err.code().name}: {err.details()}", file=sys.stderr)
    except (SecAggError, ValueError, TimeoutError) as err:  # incl. ProtocolError, MessageError
        print(f"edge client {worker}: secure aggregation of round {round_id} failed: {err}",
              file=sys.stderr)
