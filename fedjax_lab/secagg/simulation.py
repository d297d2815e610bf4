"""Run a whole SecAgg/SecAgg+ round in one process, with dropouts, counting every byte.

:func:`run_protocol` drives real :class:`SecAggClient` objects and a :class:`SecAggServer`
through the four message rounds, passing the actual serialised messages, so the byte counts
are those a deployment would send (plus its transport's framing). A client listed in
``dropouts`` stops answering from the named stage on; a client whose message is rejected, or
that refuses a forged message, drops out the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from fedjax_lab.secagg.messages import MessageError
from fedjax_lab.secagg.protocol import (
    STAGES,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
)


class SecAggResult(NamedTuple):
    """A finished round.

    Attributes:
      total: ``sum_{u in survivors} codes_u mod 2^bits`` (``uint64[dim]``).
      survivors: clients whose input is in ``total`` (``U3``), sorted.
      rejected: ``{client: reason}`` for messages the server or a client refused.
      upload_bytes: ``{stage: [bytes sent by each client]}`` (0 for clients that did not send).
      download_bytes: ``{stage: [bytes each client received to do that stage]}``: the
        neighbours' keys (``share``), the forwarded ciphertexts (``masked``), the survivor
        list (``unmask``); ``advertise`` receives nothing but the config.
      rounds: message rounds (4: advertise, share keys, masked input, unmasking).
    """

    total: np.ndarray
    survivors: tuple[int, ...]
    rejected: dict[int, str]
    upload_bytes: dict[str, list[int]]
    download_bytes: dict[str, list[int]]
    rounds: int

    def bytes_per_client(self) -> dict[str, float]:
        """Mean upload/download bytes per participating client over the round, per stage."""
        out = {}
        for stage in STAGES:
            for d, table in (("up", self.upload_bytes), ("down", self.download_bytes)):
                sent = [b for b in table[stage] if b]
                out[f"{stage}_{d}"] = float(np.mean(sent)) if sent else 0.0
        return out


Tamper = Callable[[str, int, bytes], bytes]


def new_session() -> bytes:
    """A fresh random 16-byte session id."""
    return os.urandom(16)


def run_protocol(
    config: SecAggConfig,
    codes: Mapping[int, np.ndarray],
    *,
    dropouts: Mapping[int, str] | None = None,
    tamper: Tamper | None = None,
) -> SecAggResult:
    """Runs one round over the clients in ``codes`` (their encoded inputs).

    Args:
      config: the round's parameters (``config.num_clients`` indices; those missing from
        ``codes`` never join).
      codes: ``{index: uint64[dim]}``.
      dropouts: ``{index: stage}``: the client sends nothing from ``stage`` on (one of
        ``"advertise"``, ``"share"``, ``"masked"``, ``"unmask"``).
      tamper: test hook ``(stage, client, message) -> message`` applied to every message on
        its way (client to server and server to client), to forge or corrupt it.

    Returns:
      A :class:`SecAggResult`. Raises :class:`SecAggError` naming the counts if too few
      clients are left at any stage.
    """
    dropouts = dict(dropouts or {})
    for u, stage in dropouts.items():
        if stage not in STAGES:
            raise ValueError(f"dropouts[{u}] must be one of {STAGES}, got {stage!r}")
    tamper = tamper or (lambda stage, client, data: data)
    server = SecAggServer(config)
    clients = {u: SecAggClient(config, u, c) for u, c in sorted(codes.items())}
    up = {s: [0] * config.num_clients for s in STAGES}
    down = {s: [0] * config.num_clients for s in STAGES}
    refused: dict[int, str] = {}
    inbox: dict[int, bytes | None] = dict.fromkeys(clients)
    steps = [
        ("advertise", lambda c, m: c.advertise(), server.receive_advertise),
        ("share", lambda c, m: c.share_keys(m), server.receive_shares),
        ("masked", lambda c, m: c.masked_input(m), server.receive_masked),
        ("unmask", lambda c, m: c.unmask(m), server.receive_unmask),
    ]
    result = None
    for i, (stage, act, receive) in enumerate(steps):
        sent = {}
        for u, c in clients.items():
            if u not in inbox or (u in dropouts and STAGES.index(dropouts[u]) <= i):
                continue
            try:
                out = act(c, inbox[u])
            except (MessageError, SecAggError) as e:
                refused[u] = f"{stage}: {e}"
                continue
            out = tamper(stage, u, out)
            up[stage][u] = len(out)
            sent[u] = out
        result = receive(sent)
        if i < len(steps) - 1:
            inbox = {}
            for v, m in result.items():
                m = tamper(STAGES[i + 1], v, m)
                down[STAGES[i + 1]][v] = len(m)
                inbox[v] = m
    return SecAggResult(
        total=result,
        survivors=tuple(sorted(server.u3)),
        rejected={**server.rejected, **refused},
        upload_bytes=up,
        download_bytes=down,
        rounds=len(steps),
    )
