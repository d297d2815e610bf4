"""SecAgg / SecAgg+ over the edge backend's authenticated gRPC transport.

The four message rounds of Bonawitz et al. (CCS 2017, Fig. 4; SecAgg+ of Bell et al., CCS 2020,
on a sparse neighbour graph) run between real client processes and the :class:`EdgeServer`
through one extra authenticated method, ``SecAgg`` (:data:`protocol.SECAGG`). Each call is a
normal edge request (per-worker HMAC metadata checked before the body is read, size capped,
framed, see :mod:`.protocol`); its frame carries, as blobs named ``u<index>``, the SecAgg
messages (:mod:`fedjax_lab.secagg.messages`) of every SecAgg participant the worker hosts, for
one stage. The call returns when the server closes that stage, with the next stage's message
for each of the worker's surviving participants (neighbours' keys, forwarded AES-GCM share
ciphertexts, survivor list). The server never receives a participant's input in the clear,
only ``y_u`` masked with pairwise and self masks, and decodes only the unmasked *sum*.

Server side, :class:`SecureSumRound` is the stage machine: a stage closes when every expected
participant has sent its message or at its deadline (``stage_timeout``); the missing ones are
dropouts. It feeds the received messages to :class:`fedjax_lab.secagg.SecAggServer`, which
rejects malformed or forged messages one sender at a time, and fails the round with
:class:`fedjax_lab.secagg.SecAggError` (naming the counts) when fewer than the threshold are
left: then every waiting worker is answered ``failed`` and no sum is produced.

Client side, :func:`run_secagg_worker` drives one :class:`fedjax_lab.secagg.SecAggClient` per
hosted participant; a participant whose incoming message is forged (a share that fails
authentication) stops there, as a dropout. Inputs are encoded on the client
(``FixedPoint.encode``, which refuses non-finite values and values beyond the bound): the
checks the server makes on plaintext uploads move to the clients (``docs/threat_model.md``).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from fedjax_lab.backends.edge import protocol
from fedjax_lab.secagg import (
    STAGES,
    FixedPoint,
    MessageError,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    default_threshold,
    shamir,
)
from fedjax_lab.secagg import messages as wire
from fedjax_lab.secagg import protocol as secagg_protocol

CONFIG = "config"  # the pseudo-stage in which a worker learns the round's parameters
_BLOB = re.compile(r"u([0-9]{1,7})")


class SecureAggregation(NamedTuple):
    """The edge backend's secure aggregation settings (``EdgeBackend(secure_aggregation=...)``).

    Attributes:
      fixed_point: the code of each client's input ``[w_i u_i, w_i]``; ``bound`` must cover
        ``|w_i u_i|`` and ``w_i`` (the example count when weighting by examples), and ``bits``
        the cohort's sum (``FixedPoint.check_capacity``). Clients refuse (never clip) values
        beyond it.
      neighbours: ``None`` for SecAgg (complete graph), an even ``k`` for SecAgg+ (used when
        ``k < n - 1`` for the ``n`` clients that reached the protocol).
      threshold_fraction: ``t = ceil(fraction * holders)``, at least a strict majority.
      stage_timeout: seconds each of the four stages waits; clients missing it drop out.
      min_clients: a round with fewer clients left does not aggregate (one client's "sum"
        would be its update): it keeps the previous model and reports ``secagg_failed``.
    """

    fixed_point: FixedPoint
    neighbours: int | None = None
    threshold_fraction: float | None = None
    stage_timeout: float = 10.0
    min_clients: int = 2

    def validate(self) -> SecureAggregation:
        """Raises ValueError naming the field and the fix; returns ``self``."""
        if not isinstance(self.fixed_point, FixedPoint):
            raise ValueError(f"fixed_point must be a FixedPoint, got {self.fixed_point!r}")
        self.fixed_point.validate()
        k = self.neighbours
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2):
            raise ValueError(f"neighbours must be None (SecAgg) or an even integer >= 2 "
                             f"(SecAgg+), got {k!r}")
        f = self.threshold_fraction
        if f is not None and not 0.5 < f <= 1:
            raise ValueError(f"threshold_fraction must be in (0.5, 1], got {f!r}")
        if not (isinstance(self.stage_timeout, int | float) and self.stage_timeout > 0):
            raise ValueError(f"stage_timeout must be > 0 seconds, got {self.stage_timeout!r}")
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int) or (
                self.min_clients < 2):
            raise ValueError(f"min_clients must be an integer >= 2, got {self.min_clients!r}")
        return self

    def round_config(self, n: int, dim: int, session: bytes, graph_seed: int) -> SecAggConfig:
        """The :class:`SecAggConfig` of a round with ``n`` participants."""
        k = self.neighbours if self.neighbours is not None and self.neighbours < n - 1 else None
        holders = n if k is None else k + 1
        t = default_threshold(holders)
        if self.threshold_fraction is not None:
            t = max(t, min(holders, math.ceil(self.threshold_fraction * holders)))
        return SecAggConfig(num_clients=n, dim=dim, fixed_point=self.fixed_point, threshold=t,
                            neighbours=k, graph_seed=graph_seed, session=session).validate()


class SecAggRequestError(Exception):
    """A SecAgg request refused; ``code`` names a ``grpc.StatusCode`` member."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def max_message_bytes(config: SecAggConfig, stage: str) -> int:
    """The largest valid SecAgg message one participant sends in ``stage``."""
    h = wire.HEADER.size
    k = config.holders() - 1
    if stage == "advertise":
        return h + 2 * secagg_protocol.KEY_BYTES
    if stage == "share":
        return h + 32 + 4 + k * (4 + secagg_protocol.CIPHERTEXT_BYTES)
    if stage == "masked":
        return h + config.dim * wire.vector_bytes(config.fixed_point.bits)
    if stage == "unmask":
        return h + 4 + (k + 1) * (5 + shamir.SHARE_BYTES)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def config_header(config: SecAggConfig, stage_timeout: float) -> dict[str, Any]:
    fp = config.fixed_point
    return {
        "num_clients": config.num_clients, "dim": config.dim, "bits": fp.bits,
        "frac_bits": fp.frac_bits, "bound": float(fp.bound), "threshold": config.threshold,
        "neighbours": config.neighbours, "graph_seed": config.graph_seed,
        "session": config.session.hex(), "stage_timeout": float(stage_timeout),
    }


def config_from_header(msg: protocol.Message) -> tuple[SecAggConfig, float]:
    """The round's parameters from the server's ``config`` answer (checked)."""
    try:
        neighbours = msg.header.get("neighbours")
        if neighbours is not None and (isinstance(neighbours, bool)
                                       or not isinstance(neighbours, int)):
            raise protocol.ProtocolError(f"neighbours must be an int or null, got {neighbours!r}")
        session = bytes.fromhex(msg.field("session", str))
        config = SecAggConfig(
            num_clients=msg.field("num_clients", int), dim=msg.field("dim", int),
            fixed_point=FixedPoint(msg.field("bits", int), msg.field("frac_bits", int),
                                   float(msg.field("bound", int | float))),
            threshold=msg.field("threshold", int), neighbours=neighbours,
            graph_seed=msg.field("graph_seed", int), session=session,
        ).validate()
        timeout = float(msg.field("stage_timeout", int | float))
    except ValueError as err:  # ProtocolError is a ValueError too
        raise protocol.ProtocolError(f"bad secure aggregation config: {err}") from err
    return config, timeout


class SecureSumRound:
    """The server's side of one secure aggregation over the edge transport.

    Args:
      config: the round's public parameters (``config.session`` names it on the wire).
      owners: ``{participant index: worker id}``: who may send each participant's messages.
      stage_timeout: seconds each stage waits for the expected participants.
      slots: ``{participant index: label}`` told to its worker (the cohort slot it trains).
      round_id: the training round this aggregation belongs to (told to the workers).
    """

    def __init__(self, config: SecAggConfig, owners: Mapping[int, int],
                 stage_timeout: float, *, slots: Mapping[int, int] | None = None,
                 round_id: int = -1) -> None:
        self.config = config.validate()
        if not owners or any(not 0 <= i < config.num_clients for i in owners):
            raise ValueError(f"owners must map participant indices in [0, {config.num_clients}) "
                             f"to workers, got {dict(owners)!r}")
        if not stage_timeout > 0:
            raise ValueError(f"stage_timeout must be > 0, got {stage_timeout!r}")
        self.owners = dict(owners)
        self.slots = dict(slots) if slots is not None else {i: i for i in owners}
        self.round_id = int(round_id)
        self.stage_timeout = float(stage_timeout)
        self.server = SecAggServer(config)
        self.cond = threading.Condition()
        self.stage = 0  # index into STAGES; len(STAGES) once finished
        self.closing = False
        self.expected = set(self.owners)
        self.inbox: dict[int, bytes] = {}
        self.replies: dict[int, dict[int, bytes]] = {}  # stage -> {index: next message}
        self.failure: str | None = None
        self.total: np.ndarray | None = None
        self.dropped: dict[int, str] = {}  # index -> why it left the round
        self.refused_requests = 0  # SecAgg calls refused (wrong stage, owner, size)
        # What the server saw, for the accounting and the tests of its view.
        self.received: dict[str, dict[int, bytes]] = {s: {} for s in STAGES}
        self.up_frame_bytes: dict[str, int] = dict.fromkeys(STAGES, 0)
        self.down_frame_bytes: dict[str, int] = dict.fromkeys([CONFIG, *STAGES], 0)
        self.calls: dict[str, int] = dict.fromkeys([CONFIG, *STAGES], 0)

    def max_request_bytes(self) -> int:
        """The largest valid SecAgg request of any worker (the server's size cap)."""
        per_worker: dict[int, int] = {}
        for w in self.owners.values():
            per_worker[w] = per_worker.get(w, 0) + 1
        largest = max(max_message_bytes(self.config, s) for s in STAGES)
        return protocol.SMALL_FRAME_BYTES + max(per_worker.values()) * (largest + 64)

    # ------------------------------------------------------------------------- request side
    def handle(self, worker: int, msg: protocol.Message, request_bytes: int,
               is_active: Callable[[], bool]) -> bytes:
        """Answers one SecAgg call of ``worker`` (blocks until its stage closes)."""
        stage = msg.header.get("stage")
        mine = sorted(i for i, w in self.owners.items() if w == worker)
        if stage == CONFIG:
            answer = protocol.encode_message({
                "kind": "secagg", "stage": CONFIG, "indices": mine,
                "slots": [self.slots[i] for i in mine], "round": self.round_id,
                **config_header(self.config, self.stage_timeout)})
            with self.cond:
                self.calls[CONFIG] += 1
                self.down_frame_bytes[CONFIG] += len(answer)
            return answer
        if stage not in STAGES:
            raise self._refuse("INVALID_ARGUMENT", f"unknown SecAgg stage {stage!r}")
        s = STAGES.index(stage)
        if msg.header.get("session") != self.config.session.hex():
            raise self._refuse("FAILED_PRECONDITION", "another secure aggregation session")
        if msg.arrays:
            raise self._refuse("INVALID_ARGUMENT", "a SecAgg request carries no arrays")
        items: dict[int, bytes] = {}
        limit = max_message_bytes(self.config, stage)
        for name, data in msg.blobs.items():
            match = _BLOB.fullmatch(name)
            if match is None:
                raise self._refuse("INVALID_ARGUMENT", f"bad SecAgg blob name {name!r}")
            index = int(match.group(1))
            if self.owners.get(index) != worker:
                raise self._refuse("PERMISSION_DENIED",
                                   f"participant {index} is not hosted by worker {worker}")
            if len(data) > limit:
                raise self._refuse("INVALID_ARGUMENT",
                                   f"{stage} message of {len(data)} bytes > {limit}")
            items[index] = data
        with self.cond:
            if self.failure is not None:
                return self._answer(worker, s, mine)
            if s != self.stage or self.closing:
                self.refused_requests += 1
                raise SecAggRequestError("FAILED_PRECONDITION",
                                         f"SecAgg stage {stage} is not open")
            late = [i for i in items if i not in self.expected or i in self.inbox]
            if late:
                self.refused_requests += 1
                raise SecAggRequestError(
                    "FAILED_PRECONDITION",
                    f"participants {late} are not expected in stage {stage} (dropped or sent)")
            self.inbox.update(items)
            self.received[stage].update(items)
            self.up_frame_bytes[stage] += request_bytes
            self.calls[stage] += 1
            self.cond.notify_all()
            # Bounded: the stage closes by its deadline; the finishing computation (Shamir,
            # PRG expansion) gets another stage_timeout.
            give_up = time.monotonic() + 3 * self.stage_timeout
            while self.stage <= s and self.failure is None:
                remaining = give_up - time.monotonic()
                if remaining <= 0 or not is_active():
                    raise SecAggRequestError("DEADLINE_EXCEEDED",
                                             f"SecAgg stage {stage} did not close in time")
                self.cond.wait(min(remaining, 0.5))
            return self._answer(worker, s, mine)

    def _refuse(self, code: str, details: str) -> SecAggRequestError:
        with self.cond:
            self.refused_requests += 1
        return SecAggRequestError(code, details)

    def _answer(self, worker: int, s: int, mine: list[int]) -> bytes:
        """(under the lock) The reply to a worker's stage-``s`` call."""
        if self.failure is not None:
            answer = protocol.encode_message(
                {"kind": "secagg", "stage": STAGES[s], "status": "failed",
                 "reason": self.failure[:500]})
        else:
            nxt = self.replies.get(s, {})
            blobs = {f"u{i}": nxt[i] for i in mine if i in nxt}
            status = "done" if s == len(STAGES) - 1 else "next"
            answer = protocol.encode_message(
                {"kind": "secagg", "stage": STAGES[s], "status": status}, blobs=blobs)
        self.down_frame_bytes[STAGES[s]] += len(answer)
        return answer

    # ------------------------------------------------------------------------------ driver
    def run(self) -> np.ndarray:
        """Runs the four stages; returns ``sum_{u in U3} x_u mod 2^bits`` (``uint64``).

        Raises:
          SecAggError: fewer than the threshold were left at some stage (the message names the
            counts); waiting workers are told ``failed``.
        """
        receivers = (self.server.receive_advertise, self.server.receive_shares,
                     self.server.receive_masked, self.server.receive_unmask)
        for s, stage in enumerate(STAGES):
            deadline = time.monotonic() + self.stage_timeout
            with self.cond:
                self.cond.wait_for(lambda: self.expected <= self.inbox.keys(),
                                   timeout=max(deadline - time.monotonic(), 0.0))
                self.closing = True
                messages = dict(self.inbox)
                for i in sorted(self.expected - messages.keys()):
                    self.dropped[i] = f"no {stage} message by the stage deadline"
            try:
                out = receivers[s](messages)
            except SecAggError as err:
                with self.cond:
                    self.failure = str(err)
                    self.cond.notify_all()
                raise
            with self.cond:
                for i, reason in self.server.rejected.items():
                    self.dropped.setdefault(i, reason)
                if s < len(STAGES) - 1:
                    self.replies[s] = out
                    self.expected = set(out)
                else:
                    self.total = out
                self.inbox = {}
                self.stage = s + 1
                self.closing = False
                self.cond.notify_all()
        return self.total

    def survivors(self) -> tuple[int, ...]:
        """Participants whose input is in the sum (``U3``)."""
        return tuple(sorted(self.server.u3))


# ------------------------------------------------------------------------------ client side
Call = Callable[[bytes, float], protocol.Message]
Tamper = Callable[[str, int, bytes], bytes]


def run_secagg_worker(
    call: Call,
    inputs: Callable[[SecAggConfig, Mapping[int, int]], Mapping[int, np.ndarray]],
    *,
    round_id: int | None = None,
    config_timeout: float = 30.0,
    stop_before: str | None = None,
    tamper: Tamper | None = None,
) -> dict[str, Any]:
    """One worker's side of a secure aggregation over the edge transport.

    Args:
      call: a signed ``SecAgg`` call, ``(frame, timeout) -> answer``
        (``Connection.call`` bound to :data:`protocol.SECAGG`).
      inputs: ``(config, {index: slot}) -> {index: float vector}``, this worker's
        participants' inputs; they are fixed-point encoded here, which raises ValueError for
        non-finite values or values beyond ``config.fixed_point.bound`` (nothing is clipped).
      round_id: wait for the aggregation of this training round (None: the open one).
      config_timeout: how long to ask for the round's parameters.
      stop_before: test hook: stop (as a crashed or hanging device) before this stage.
      tamper: test hook ``(stage, index, message) -> message`` on outgoing SecAgg messages.

    Returns:
      ``{"status": "done" | "stopped", "refused": {index: reason}, "indices": [...]}``.

    Raises:
      SecAggError: the server failed the round (too few participants left).
    """
    give_up = time.monotonic() + config_timeout
    while True:
        answer = call(protocol.encode_message({"kind": "secagg", "stage": CONFIG}), 30.0)
        if answer.header.get("stage") == CONFIG and round_id in (None,
                                                                  answer.header.get("round")):
            break
        if time.monotonic() > give_up:
            raise TimeoutError("no secure aggregation round was opened")
        time.sleep(0.05)
    config, stage_timeout = config_from_header(answer)
    indices = answer.field("indices", list)
    slots = answer.field("slots", list)
    if len(slots) != len(indices) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in [*indices, *slots]):
        raise protocol.ProtocolError("bad participant list in the secure aggregation config")
    values = inputs(config, dict(zip(indices, slots, strict=True)))
    clients = {}
    for i in indices:
        codes, _ = config.fixed_point.encode(np.asarray(values[i], np.float64).reshape(-1))
        clients[i] = SecAggClient(config, i, codes)
    steps = {
        "advertise": lambda c, m: c.advertise(), "share": lambda c, m: c.share_keys(m),
        "masked": lambda c, m: c.masked_input(m), "unmask": lambda c, m: c.unmask(m),
    }
    refused: dict[int, str] = {}
    inbox: dict[int, bytes | None] = dict.fromkeys(indices)
    for stage in STAGES:
        if stage == stop_before:
            return {"status": "stopped", "refused": refused, "indices": indices}
        blobs = {}
        for i in sorted(inbox):
            try:
                out = steps[stage](clients[i], inbox[i])
            except (MessageError, SecAggError) as err:  # forged input: this one drops out
                refused[i] = f"{stage}: {err}"
                continue
            blobs[f"u{i}"] = tamper(stage, i, out) if tamper else out
        if not blobs:
            return {"status": "dropped", "refused": refused, "indices": indices}
        frame = protocol.encode_message(
            {"kind": "secagg", "stage": stage, "session": config.session.hex()}, blobs=blobs)
        answer = call(frame, 4 * stage_timeout + 10.0)
        if answer.header.get("status") == "failed":
            raise SecAggError(f"the server failed the round: {answer.header.get('reason')}")
        inbox = {}
        for name, data in answer.blobs.items():
            match = _BLOB.fullmatch(name)
            if match is None or int(match.group(1)) not in clients:
                raise protocol.ProtocolError(f"answer names a participant not hosted: {name!r}")
            inbox[int(match.group(1))] = data
    return {"status": "done", "refused": refused, "indices": indices}
