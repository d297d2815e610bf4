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

import os
import sys
import time
from typing import Any

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.backends.edge import _common, protocol
from fedjax_lab.core.types import Batches
from fedjax_lab.data.cohort import CohortBuilder

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_SERVER_GONE = 4
EXIT_PARENT_GONE = 5


class EdgeClientError(RuntimeError):
    """The server refused this client (bad token, unknown id, configuration mismatch)."""


class _Connection:
    """Signed unary calls to the server; answers are verified with the server's MAC."""

    def __init__(self, address: str, worker: int, token: bytes, *, tls_ca: bytes | None,
                 server_name: str | None, max_message_bytes: int) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.worker = str(worker)
        self._token = token
        self._calls = {
            m: self.channel.unary_unary(protocol.method_path(m)) for m in protocol.METHODS
        }

    def call(self, method: str, frame: bytes, timeout: float) -> protocol.Message:
        mac = protocol.sign(self._token, method, self.worker, frame)
        answer, call = self._calls[method].with_call(
            frame, timeout=timeout,
            metadata=((protocol.WORKER_KEY, self.worker), (protocol.MAC_KEY, mac)),
        )
        server_mac = protocol.metadata_value(call.trailing_metadata(), protocol.MAC_KEY)
        if not protocol.verify(self._token, protocol.response_method(method), self.worker,
                               answer, server_mac):
            raise EdgeClientError(f"the answer to {method} is not signed with our token")
        return protocol.decode_message(answer)

    def close(self) -> None:
        self.channel.close()


_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.RESOURCE_EXHAUSTED)
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.FAILED_PRECONDITION)


class EdgeWorker:
    """The state of one client process (its data, templates and compiled client update)."""

    def __init__(self, problem: _common.EdgeProblem, worker: int, num_workers: int) -> None:
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker id {worker} not in [0, {num_workers})")
        self.problem = problem
        algorithm, data = problem.algorithm, problem.data
        spec = algorithm.data_spec
        self.builder = CohortBuilder(
            _common.PopulationLayout(np.asarray(data.offsets)),
            batch_size=spec.batch_size, local_epochs=spec.local_epochs,
            num_steps=spec.num_steps, cohort_size=1, seed=problem.seed, device_table=False,
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
        self.server_template = _common.shape_structs(algorithm.init(problem.init_params))
        self.state_template = _common.shape_structs(algorithm.client_init(problem.init_params))
        steps, batch = self.builder.steps, self.builder.batch
        table_t = _common.shape_structs(self.table)
        self.output_template = _common.output_template(
            algorithm, self.server_template, self.state_template, steps, batch, table_t
        )
        self.codec = _common.PayloadCodec(problem.compressor, self.output_template.update)
        features = {k: (tuple(v.shape[1:]), str(np.dtype(v.dtype))) for k, v in table_t.items()}
        self.fingerprint = _common.fingerprint(
            algorithm, self.server_template, self.state_template, self.output_template,
            steps, batch, features,
        )
        self.key_template = jax.random.key_data(jax.random.key(0))

        def one_client(server_state, state, index, mask, weight, key, table):
            batches = Batches(None, mask, weight, index=index, table=table)
            return algorithm.client_update(server_state, state, batches, key=key)

        self._client_fn = jax.jit(one_client)

    def warm_up(self) -> None:
        """Compiles the client update before the first task (so rounds time only training)."""
        if not self.hosted:
            return
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.server_template)
        state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.state_template)
        s, b = self.builder.steps, self.builder.batch
        out = self._client_fn(zeros, state, jnp.zeros((s, b), jnp.int32),
                              jnp.zeros((s, b), jnp.float32), jnp.float32(0.0),
                              jax.random.key(0), self.table)
        jax.block_until_ready(out)

    def run_task(self, round_id: int, entry: dict, server_state: Any, key_data: np.ndarray,
                 state: Any) -> bytes:
        """One client's update for ``round_id``: the result frame to submit."""
        client, slot = entry["client"], entry["slot"]
        head = {"round": round_id, "slot": slot, "client": client}
        if client not in self.local_lo:
            return _failed(head, f"client {client} is not hosted by this process")
        index = self.builder.client_index(client, round_id)
        if _common.layout_digest(index) != entry.get("layout"):
            return _failed(head, "data layout mismatch (seed/population/round differ)")
        one = self.builder.build(round_id, [client])
        local = np.where(
            index >= 0, index - int(self.problem.data.offsets[client]) + self.local_lo[client], 0
        ).astype(np.int32)
        key = jax.random.wrap_key_data(jnp.asarray(key_data))
        out, new_state = self._client_fn(
            server_state, state, jnp.asarray(local), jnp.asarray(one.mask[0]),
            jnp.asarray(one.weight[0]), key, self.table,
        )
        out, new_state = jax.device_get((out, new_state))
        try:
            payload = self.codec.to_bytes(out.update)
        except ValueError as err:  # e.g. a non-finite payload (compressor policy)
            return _failed(head, f"cannot encode the update: {err}")
        arrays = {"weight": np.asarray(out.weight, np.float32)}
        arrays.update({f"m:{k}": np.asarray(v) for k, v in out.metrics.items()})
        arrays.update(_common.tree_arrays("e", out.extra))
        arrays.update(_common.tree_arrays("c", new_state))
        return protocol.encode_message({"kind": "result", **head}, arrays, {"payload": payload})

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
    token: bytes,
    tls_ca: bytes | None = None,
    server_name: str | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    server_timeout: float = 60.0,
    parent_pid: int | None = None,
) -> int:
    """Joins ``server`` as client process ``worker`` and serves tasks until told to stop.

    Returns:
      An exit code: 0 after "stop", 3 if refused (token, id, configuration), 4 if the server
      stayed unreachable for ``server_timeout`` seconds, 5 if ``parent_pid`` went away.
    """
    conn = _Connection(server, worker, token, tls_ca=tls_ca, server_name=server_name,
                       max_message_bytes=max_message_bytes)
    try:
        return _serve(problem, conn, worker, server_timeout, parent_pid)
    except EdgeClientError as err:
        print(f"edge client {worker}: refused: {err}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        conn.close()


def _call(conn: _Connection, method: str, frame: bytes, timeout: float,
          server_timeout: float, parent_pid: int | None) -> protocol.Message | None:
    """A call retried while the server is unreachable; None when we should exit."""
    give_up = time.monotonic() + server_timeout
    delay = 0.05
    while True:
        try:
            return conn.call(method, frame, timeout)
        except grpc.RpcError as err:
            code = err.code()
            if code in _REFUSED:
                raise EdgeClientError(f"{method}: {code.name}: {err.details()}") from err
            if code not in _RETRY or time.monotonic() > give_up or _parent_gone(parent_pid):
                print(f"edge client: {method} failed: {code.name}: {err.details()}",
                      file=sys.stderr)
                return None
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def _serve(problem, conn: _Connection, worker: int, server_timeout: float,
           parent_pid: int | None) -> int:
    join = protocol.encode_message({"kind": "join", "pid": os.getpid()})
    welcome = _call(conn, protocol.JOIN, join, 10.0, server_timeout, parent_pid)
    if welcome is None:
        return EXIT_PARENT_GONE if _parent_gone(parent_pid) else EXIT_SERVER_GONE
    num_workers = welcome.field("num_workers", int)
    poll = float(welcome.field("poll_seconds", int | float))
    state = EdgeWorker(problem, worker, num_workers)
    state.warm_up()
    last_round, session = -1, ""
    while True:
        if _parent_gone(parent_pid):
            return EXIT_PARENT_GONE
        fetch = protocol.encode_message(
            {"kind": "fetch", "after_round": last_round, "session": session,
             "fingerprint": state.fingerprint}
        )
        msg = _call(conn, protocol.FETCH, fetch, poll + 10.0, server_timeout, parent_pid)
        if msg is None:
            return EXIT_PARENT_GONE if _parent_gone(parent_pid) else EXIT_SERVER_GONE
        kind = msg.header.get("kind")
        if kind == "stop":
            return EXIT_OK
        if kind != "task":
            continue
        round_id, entries, server_state, per_task = state.parse_task(msg)
        for entry, (key, client_state) in zip(entries, per_task, strict=True):
            frame = state.run_task(round_id, entry, server_state, key, client_state)
            try:
                conn.call(protocol.SUBMIT, frame, 30.0)
            except grpc.RpcError as err:  # the server dropped this client; go on
                print(f"edge client {worker}: submit of slot {entry['slot']} failed: "
                      f"{err.code().name}: {err.details()}", file=sys.stderr)
        last_round, session = round_id, str(msg.header.get("session", ""))
