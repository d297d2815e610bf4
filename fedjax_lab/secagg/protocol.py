"""SecAgg (Bonawitz et al., 2017) and SecAgg+ (Bell et al., 2020): clients and server.

The semi-honest protocol of Bonawitz et al. (CCS 2017, Fig. 4 without the consistency check
and signatures), in four message rounds, over client indices ``0..n-1`` (Shamir point
``index + 1``):

0. **Advertise keys.** Client ``u`` draws two X25519 key pairs, ``(c_u^PK, c_u^SK)`` for the
   client-to-client channel and ``(s_u^PK, s_u^SK)`` for the pairwise masks, and sends the
   public keys. The server sends each client its neighbours' keys (``U1``).
1. **Share keys.** ``u`` draws a self-mask seed ``b_u``, Shamir-shares ``b_u`` and ``s_u^SK``
   ``t``-of-``h`` among its holders (its neighbours in ``U1`` and itself) and sends each
   neighbour ``v`` its shares encrypted with AES-GCM under ``HKDF(X25519(c_u^SK, c_v^PK))``
   (the relaying server cannot read them; a forged or altered one fails authentication), plus
   a SHA-256 commitment to ``b_u`` (an addition: it lets the server verify a reconstructed
   ``b_u``, as ``s_u^PK`` verifies ``s_u^SK``). The server forwards each ciphertext (``U2``).
2. **Masked input.** ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in N(u) ∩ U2, u < v}
   PRG(s_uv) - sum_{v in N(u) ∩ U2, u > v} PRG(s_uv) mod 2^b`` with ``s_uv =
   HKDF(X25519(s_u^SK, s_v^PK))`` (``U3``).
3. **Unmasking.** The server tells each survivor which of its neighbours sent ``y`` (``U3``).
   Survivor ``v`` decrypts the shares it holds and, for each neighbour ``u``, reveals ``b_u``'s
   share if ``u`` survived, else ``s_u^SK``'s share, never both. From ``t`` shares the server
   rebuilds ``b_u`` for survivors and ``s_u^SK`` for dropped clients (verified against the
   commitment / advertised public key), recomputes the dropped clients' pairwise masks with
   their surviving neighbours and returns ``sum_{u in U3} x_u mod 2^b``.

SecAgg+ (Bell et al., 2020) is the same protocol on a sparse ``k``-regular neighbour graph
(:mod:`fedjax_lab.secagg.graph`), ``neighbours=k``: each client agrees keys, shares and masks
with ``k`` clients instead of ``n - 1``, so client cost is ``O(k)`` keys/shares rather than
``O(n)``, and ``t`` counts holders out of ``k + 1``.

The threshold must be a strict majority of the holders (``t > h / 2``, ``h = n`` or ``k + 1``):
below that, disjoint sets of clients could hand the server both shares of one client.
Key agreement, HKDF, AES-GCM and the PRG come from ``cryptography``, imported lazily.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from fedjax_lab.secagg import messages as msg
from fedjax_lab.secagg import shamir
from fedjax_lab.secagg.fixedpoint import FixedPoint
from fedjax_lab.secagg.graph import neighbour_graph
from fedjax_lab.secagg.messages import MessageError
from fedjax_lab.secagg.prg import expand

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
PLAINTEXT_BYTES = 4 + 4 + 2 * shamir.SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + PLAINTEXT_BYTES + TAG_BYTES
B_SHARE, SK_SHARE = 0, 1
STAGES = ("advertise", "share", "masked", "unmask")
ROUNDS = len(STAGES)


class SecAggError(RuntimeError):
    """The round cannot finish (too few clients left); the message names the counts."""


class SecAggConfig(NamedTuple):
    """One round's public parameters (the server sends them to every client).

    Attributes:
      num_clients: ``n``, clients indexed ``0..n-1``.
      dim: length of each client's input vector.
      fixed_point: the ring ``Z_{2^bits}`` and code of the inputs.
      threshold: ``t``, shares needed to rebuild a client's secret; ``h/2 < t <= h``.
      neighbours: ``None`` for SecAgg (complete graph), an even ``k`` for SecAgg+.
      graph_seed: public seed of the SecAgg+ graph's relabelling.
      session: 16 bytes naming the round; bound into every message, key and ciphertext.
    """

    num_clients: int
    dim: int
    fixed_point: FixedPoint
    threshold: int
    neighbours: int | None = None
    graph_seed: int = 0
    session: bytes = bytes(16)

    def graph(self) -> list[np.ndarray]:
        return neighbour_graph(self.num_clients, self.neighbours, self.graph_seed)

    def holders(self) -> int:
        """Shares per client: its neighbours and itself."""
        return len(self.graph()[0]) + 1 if self.num_clients > 1 else 1

    def validate(self) -> SecAggConfig:
        """Raises ValueError naming the field; returns ``self``."""
        if not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ValueError(f"num_clients must be a positive integer, got {self.num_clients!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        self.fixed_point.check_capacity(self.num_clients)
        if len(self.session) != msg.SESSION_BYTES:
            raise ValueError(f"session must be {msg.SESSION_BYTES} bytes, got {len(self.session)}")
        h = self.holders()
        if not isinstance(self.threshold, int) or not h // 2 < self.threshold <= h:
            raise ValueError(
                f"threshold must be a strict majority of the {h} share holders per client, in "
                f"[{h // 2 + 1}, {h}], got {self.threshold!r}"
            )
        return self


def default_threshold(holders: int) -> int:
    """The smallest strict majority, ``floor(h / 2) + 1``."""
    return holders // 2 + 1


# ----------------------------------------------------------------------------- crypto helpers
def _keypair():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes_raw()


def _agree(sk, peer_public: bytes, purpose: bytes, session: bytes) -> bytes:
    """``HKDF-SHA256(X25519(sk, peer), info=purpose || session)``, 32 bytes."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # low-order point: all-zero shared secret
        raise MessageError(f"invalid X25519 public key: {e}") from e
    info = b"fedjax_lab/secagg/" + purpose + b"/" + session
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _aesgcm(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _commit(session: bytes, index: int, seed: bytes) -> bytes:
    data = b"fedjax_lab/secagg/b/" + session + struct.pack("<I", index) + seed
    return hashlib.sha256(data).digest()


def _mask_sign(u: int, v: int) -> int:
    """The sign client ``u`` gives the mask it shares with ``v``: + if ``u < v``."""
    return 1 if u < v else -1


# ----------------------------------------------------------------------------- client
class SecAggClient:
    """One client's side of the protocol; call the four methods in order.

    Args:
      config: the round's public parameters.
      index: this client's index.
      codes: its input, ``uint64`` ring elements of length ``config.dim``
        (``config.fixed_point.encode``).
    """

    def __init__(self, config: SecAggConfig, index: int, codes: np.ndarray):
        self.config = config.validate()
        if not 0 <= index < config.num_clients:
            raise ValueError(f"index must be in [0, {config.num_clients}), got {index}")
        codes = np.asarray(codes)
        if codes.dtype != np.uint64 or codes.shape != (config.dim,):
            raise ValueError(f"codes must be uint64 of shape ({config.dim},), got "
                             f"{codes.dtype} {codes.shape}")
        if np.any(config.fixed_point.reduce(codes) != codes):
            raise ValueError(f"codes must lie in Z_(2^{config.fixed_point.bits})")
        self.index = index
        self._codes = codes
        self._neighbours = set(config.graph()[index].tolist())
        self._stage = 0
        self._c_sk, self._c_pk = _keypair()
        self._s_sk, self._s_pk = _keypair()
        self._peers: dict[int, tuple[bytes, bytes]] = {}
        self._shares: dict[int, tuple[int, int]] = {}  # sender -> (sk share, b share) for me
        self._b: bytes | None = None  # self-mask seed, drawn when sharing

    def _advance(self, stage: int) -> None:
        if self._stage != stage:
            raise MessageError(f"client {self.index}: {STAGES[stage]} called at stage "
                               f"{STAGES[self._stage] if self._stage < ROUNDS else 'done'}")
        self._stage += 1

    def advertise(self) -> bytes:
        """Round 0: ``(c_u^PK, s_u^PK)``."""
        self._advance(0)
        return msg.pack(msg.ADVERTISE, self.config.session, self.index, self._c_pk + self._s_pk)

    def share_keys(self, keys: bytes) -> bytes:
        """Round 1: from the neighbours' keys, the encrypted shares and ``b_u``'s commitment."""
        self._advance(1)
        cfg = self.config
        _, body = msg.unpack(keys, msg.KEYS, cfg.session)
        for rec in msg.records(body, 4 + 2 * KEY_BYTES, "keys", max_count=len(self._neighbours)):
            (v,) = struct.unpack_from("<I", rec)
            if v not in self._neighbours or v in self._peers:
                raise MessageError(f"client {self.index}: keys list names {v}, not a new neighbour")
            self._peers[v] = (rec[4 : 4 + KEY_BYTES], rec[4 + KEY_BYTES :])
        if len(self._peers) + 1 < cfg.threshold:
            raise SecAggError(
                f"client {self.index}: {len(self._peers)} neighbours advertised keys, fewer than "
                f"threshold - 1 = {cfg.threshold - 1}"
            )
        self._b = os.urandom(KEY_BYTES)
        holders = [self.index, *sorted(self._peers)]
        xs = [h + 1 for h in holders]
        sk_int = int.from_bytes(self._s_sk.private_bytes_raw(), "big")
        sk_shares = shamir.split(sk_int, xs, cfg.threshold)
        b_shares = shamir.split(int.from_bytes(self._b, "big"), xs, cfg.threshold)
        self._shares[self.index] = (sk_shares[self.index + 1], b_shares[self.index + 1])
        out = []
        for v in holders[1:]:
            key = _agree(self._c_sk, self._peers[v][0], b"share-encryption", cfg.session)
            plain = (struct.pack("<II", self.index, v) + shamir.to_bytes(sk_shares[v + 1])
                     + shamir.to_bytes(b_shares[v + 1]))
            nonce = os.urandom(NONCE_BYTES)
            aad = cfg.session + struct.pack("<II", self.index, v)
            out.append(struct.pack("<I", v) + nonce + _aesgcm(key).encrypt(nonce, plain, aad))
        body = _commit(cfg.session, self.index, self._b) + msg.join_records(out)
        return msg.pack(msg.SHARES, cfg.session, self.index, body)

    def masked_input(self, forwarded: bytes) -> bytes:
        """Round 2: decrypt the neighbours' shares (reject forged ones), send the masked input."""
        self._advance(2)
        cfg = self.config
        _, body = msg.unpack(forwarded, msg.FORWARD, cfg.session)
        for rec in msg.records(body, 4 + CIPHERTEXT_BYTES, "forward",
                               max_count=len(self._peers)):
            (u,) = struct.unpack_from("<I", rec)
            if u not in self._peers or u in self._shares:
                raise MessageError(f"client {self.index}: share from {u}, not a keyed neighbour "
                                   "or a second one")
            key = _agree(self._c_sk, self._peers[u][0], b"share-encryption", cfg.session)
            nonce, ct = rec[4 : 4 + NONCE_BYTES], rec[4 + NONCE_BYTES :]
            aad = cfg.session + struct.pack("<II", u, self.index)
            from cryptography.exceptions import InvalidTag

            try:
                plain = _aesgcm(key).decrypt(nonce, ct, aad)
            except InvalidTag as e:
                raise MessageError(
                    f"client {self.index}: the share from client {u} fails authentication "
                    "(forged or altered)"
                ) from e
            if struct.unpack_from("<II", plain) != (u, self.index):
                raise MessageError(f"client {self.index}: share from {u} names other clients")
            self._shares[u] = (shamir.from_bytes(plain[8 : 8 + shamir.SHARE_BYTES]),
                               shamir.from_bytes(plain[8 + shamir.SHARE_BYTES :]))
        fp, d = cfg.fixed_point, cfg.dim
        y = self._codes + expand(self._b, d, fp.bits)
        for v in self._shares:  # neighbours in U2 (they shared with us), and ourselves
            if v == self.index:
                continue
            seed = _agree(self._s_sk, self._peers[v][1], b"pairwise-mask", cfg.session)
            mask = expand(seed, d, fp.bits)
            y = y + mask if _mask_sign(self.index, v) > 0 else y - mask
        return msg.pack(msg.MASKED, cfg.session, self.index,
                        msg.pack_vector(fp.reduce(y), fp.bits))

    def unmask(self, survivors: bytes) -> bytes:
        """Round 3: for each neighbour, ``b_u``'s share if it survived, else ``s_u^SK``'s."""
        self._advance(3)
        cfg = self.config
        _, body = msg.unpack(survivors, msg.SURVIVORS, cfg.session)
        alive = set()
        for rec in msg.records(body, 4, "survivors", max_count=len(self._shares)):
            (u,) = struct.unpack_from("<I", rec)
            if u not in self._shares or u in alive:
                raise MessageError(f"client {self.index}: survivor list names {u}, which did "
                                   "not share with it (or twice)")
            alive.add(u)
        if self.index not in alive:
            raise MessageError(f"client {self.index}: survivor list omits this client")
        if len(alive) < cfg.threshold:
            raise SecAggError(
                f"client {self.index}: only {len(alive)} of its share holders (itself included) "
                f"sent masked inputs, fewer than the threshold {cfg.threshold}; refusing to unmask"
            )
        out = []
        for u, (sk_share, b_share) in sorted(self._shares.items()):
            kind, share = (B_SHARE, b_share) if u in alive else (SK_SHARE, sk_share)
            out.append(struct.pack("<IB", u, kind) + shamir.to_bytes(share))
        self._shares.clear()  # never answer twice
        return msg.pack(msg.UNMASK, cfg.session, self.index, msg.join_records(out))


# ----------------------------------------------------------------------------- server
class SecAggServer:
    """The server's side; it relays messages and learns only the survivors' sum.

    Each ``receive_*`` takes ``{sender: message}`` (the transport authenticates who sent what)
    from the clients that answered, rejects malformed messages (their senders count as dropped,
    ``rejected`` lists them) and returns ``{client: message}`` to send next.
    """

    def __init__(self, config: SecAggConfig):
        self.config = config.validate()
        self.graph = [set(g.tolist()) for g in config.graph()]
        self.rejected: dict[int, str] = {}
        self._stage = 0
        self.u1: dict[int, tuple[bytes, bytes]] = {}
        self.u2: set[int] = set()
        self.u3: dict[int, np.ndarray] = {}
        self._commitments: dict[int, bytes] = {}
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # recipient -> sender -> record

    def _advance(self, stage: int) -> None:
        if self._stage != stage:
            raise SecAggError(f"server: {STAGES[stage]} messages received at stage {self._stage}")
        self._stage += 1

    def _parse(self, messages: Mapping[int, bytes], kind: int, allowed: set[int]):
        out = {}
        for sender, data in messages.items():
            if sender not in allowed:
                self.rejected[sender] = f"{msg.KIND_NAMES[kind]} from a client not in the round"
                continue
            try:
                claimed, body = msg.unpack(data, kind, self.config.session)
                if claimed != sender:
                    raise MessageError(f"claims to be from client {claimed}")
                out[sender] = body
            except MessageError as e:
                self.rejected[sender] = f"{msg.KIND_NAMES[kind]}: {e}"
        return out

    def _require(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise SecAggError(
                f"round failed: {count} of {self.config.num_clients} clients {what}, fewer than "
                f"the threshold t={self.config.threshold}"
            )

    def receive_advertise(self, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        self._advance(0)
        cfg = self.config
        for u, body in self._parse(messages, msg.ADVERTISE, set(range(cfg.num_clients))).items():
            if len(body) != 2 * KEY_BYTES:
                self.rejected[u] = "advertise: wrong length"
                continue
            self.u1[u] = (body[:KEY_BYTES], body[KEY_BYTES:])
        # A client whose neighbourhood is too thin cannot be protected: drop it (iteratively,
        # since dropping it thins its neighbours' neighbourhoods).
        while True:
            thin = [u for u in self.u1 if len(self.graph[u] & self.u1.keys()) + 1 < cfg.threshold]
            if not thin:
                break
            for u in thin:
                del self.u1[u]
        self._require(len(self.u1), "advertised keys with enough neighbours")
        out = {}
        for v in self.u1:
            recs = [struct.pack("<I", u) + self.u1[u][0] + self.u1[u][1]
                    for u in sorted(self.graph[v] & self.u1.keys())]
            out[v] = msg.pack(msg.KEYS, cfg.session, v, msg.join_records(recs))
        return out

    def receive_shares(self, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        self._advance(1)
        cfg = self.config
        for u, body in self._parse(messages, msg.SHARES, set(self.u1)).items():
            expected = sorted(self.graph[u] & self.u1.keys())
            try:
                recs = msg.records(body[32:], 4 + CIPHERTEXT_BYTES, "shares",
                                   max_count=len(expected))
                to = [struct.unpack_from("<I", r)[0] for r in recs]
                if len(body) < 32 or to != expected:
                    raise MessageError("shares are not addressed to exactly its keyed neighbours")
            except MessageError as e:
                self.rejected[u] = f"shares: {e}"
                continue
            self.u2.add(u)
            self._commitments[u] = body[:32]
            for v, r in zip(to, recs, strict=True):
                self._ciphertexts.setdefault(v, {})[u] = struct.pack("<I", u) + r[4:]
        self._require(len(self.u2), "sent their encrypted shares")
        return {
            v: msg.pack(msg.FORWARD, cfg.session, v, msg.join_records(
                [rec for u, rec in sorted(self._ciphertexts.get(v, {}).items()) if u in self.u2]))
            for v in sorted(self.u2)
        }

    def receive_masked(self, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        self._advance(2)
        cfg = self.config
        for u, body in self._parse(messages, msg.MASKED, self.u2).items():
            try:
                self.u3[u] = msg.unpack_vector(body, cfg.dim, cfg.fixed_point.bits)
            except MessageError as e:
                self.rejected[u] = f"masked: {e}"
        self._require(len(self.u3), "sent masked inputs")
        return {
            v: msg.pack(msg.SURVIVORS, cfg.session, v, msg.join_records(
                [struct.pack("<I", u) for u in sorted((self.graph[v] & self.u2) | {v})
                 if u in self.u3]))
            for v in sorted(self.u3)
        }

    def receive_unmask(self, messages: Mapping[int, bytes]) -> np.ndarray:
        """Rebuilds the secrets it needs; returns ``sum_{u in U3} x_u mod 2^b`` (``uint64``)."""
        self._advance(3)
        cfg = self.config
        fp = cfg.fixed_point
        sk_shares: dict[int, dict[int, int]] = {}
        b_shares: dict[int, dict[int, int]] = {}
        responders = 0
        for v, body in self._parse(messages, msg.UNMASK, set(self.u3)).items():
            try:
                recs = msg.records(body, 5 + shamir.SHARE_BYTES, "unmask",
                                   max_count=len(self.graph[v]) + 1)
                parsed = []
                for r in recs:
                    u, kind = struct.unpack_from("<IB", r)
                    if u not in (self.graph[v] & self.u2) | {v} or kind != (
                            B_SHARE if u in self.u3 else SK_SHARE):
                        raise MessageError(f"share of client {u} of the wrong kind or holder")
                    parsed.append((u, kind, shamir.from_bytes(r[5:])))
            except MessageError as e:
                self.rejected[v] = f"unmask: {e}"
                continue
            responders += 1
            for u, kind, y in parsed:
                (b_shares if kind == B_SHARE else sk_shares).setdefault(u, {})[v + 1] = y
        self._require(responders, "answered the unmasking round")
        total = np.zeros(cfg.dim, dtype=np.uint64)
        for u in sorted(self.u3):
            got = b_shares.get(u, {})
            if len(got) < cfg.threshold:
                raise SecAggError(
                    f"round failed: {len(got)} shares of survivor {u}'s self-mask arrived, fewer "
                    f"than the threshold t={cfg.threshold}"
                )
            b_int = shamir.reconstruct(got, cfg.threshold)
            seed = b_int.to_bytes(KEY_BYTES, "big") if b_int < 2 ** (8 * KEY_BYTES) else b""
            if _commit(cfg.session, u, seed) != self._commitments[u]:
                raise SecAggError(f"round failed: client {u}'s self-mask seed rebuilt from "
                                  "shares does not match its commitment (forged shares)")
            total = total + self.u3[u] - expand(seed, cfg.dim, fp.bits)
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        for u in sorted(self.u2 - self.u3.keys()):
            alive = self.graph[u] & self.u3.keys()
            if not alive:
                continue  # no survivor masked with u
            got = sk_shares.get(u, {})
            if len(got) < cfg.threshold:
                raise SecAggError(
                    f"round failed: {len(got)} shares of dropped client {u}'s mask key arrived, "
                    f"fewer than the threshold t={cfg.threshold}"
                )
            sk_int = shamir.reconstruct(got, cfg.threshold)
            if sk_int >= 2 ** (8 * KEY_BYTES):
                raise SecAggError(f"round failed: client {u}'s rebuilt key is not a key")
            sk = X25519PrivateKey.from_private_bytes(sk_int.to_bytes(KEY_BYTES, "big"))
            if sk.public_key().public_bytes_raw() != self.u1[u][1]:
                raise SecAggError(f"round failed: client {u}'s mask key rebuilt from shares "
                                  "does not match its advertised public key (forged shares)")
            for v in sorted(alive):
                mask = expand(_agree(sk, self.u1[v][1], b"pairwise-mask", cfg.session),
                              cfg.dim, fp.bits)
                # v added sign(v, u) * mask; take it back out.
                total = total - mask if _mask_sign(v, u) > 0 else total + mask
        return fp.reduce(total)
