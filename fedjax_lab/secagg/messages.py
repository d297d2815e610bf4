"""Wire format of the SecAgg messages (explicit framing, no pickle, every length checked).

Every message starts with ``MAGIC`` (4 bytes), its kind (1 byte), the round's 16-byte session id
and the sender's (client) index as ``uint32``; bodies are fixed-size records, so a parser knows
the exact length to expect and rejects anything else with :class:`MessageError`.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"SAG1"
SESSION_BYTES = 16
HEADER = struct.Struct("<4sB16sI")

ADVERTISE, KEYS, SHARES, FORWARD, MASKED, SURVIVORS, UNMASK = range(1, 8)
KIND_NAMES = {ADVERTISE: "advertise", KEYS: "keys", SHARES: "shares", FORWARD: "forward",
              MASKED: "masked", SURVIVORS: "survivors", UNMASK: "unmask"}


class MessageError(ValueError):
    """A malformed, forged or out-of-place message; the receiver rejects it."""


def pack(kind: int, session: bytes, sender: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, kind, session, sender) + body


def unpack(data: bytes, kind: int, session: bytes) -> tuple[int, bytes]:
    """Checks the header; returns ``(sender, body)``."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < HEADER.size:
        raise MessageError(f"{KIND_NAMES[kind]} message shorter than its header")
    magic, got_kind, got_session, sender = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MessageError("not a SecAgg message (bad magic)")
    if got_kind != kind:
        raise MessageError(
            f"expected a {KIND_NAMES[kind]} message, got kind {KIND_NAMES.get(got_kind, got_kind)}"
        )
    if got_session != session:
        raise MessageError("message belongs to another session (replayed or forged)")
    return sender, bytes(data[HEADER.size :])


def records(body: bytes, size: int, what: str, *, max_count: int) -> list[bytes]:
    """Splits a ``uint32 count`` + ``count`` fixed ``size`` records body."""
    if len(body) < 4:
        raise MessageError(f"{what}: missing record count")
    (count,) = struct.unpack_from("<I", body)
    if count > max_count:
        raise MessageError(f"{what}: {count} records, at most {max_count} allowed")
    if len(body) != 4 + count * size:
        raise MessageError(f"{what}: expected {4 + count * size} bytes, got {len(body)}")
    return [body[4 + i * size : 4 + (i + 1) * size] for i in range(count)]


def join_records(items: list[bytes]) -> bytes:
    return struct.pack("<I", len(items)) + b"".join(items)


def vector_bytes(bits: int) -> int:
    """Bytes per masked coordinate on the wire (byte aligned: ``ceil(bits / 8)``)."""
    return (bits + 7) // 8


def pack_vector(words: np.ndarray, bits: int) -> bytes:
    """``uint64`` ring elements as little-endian ``ceil(bits/8)``-byte fields (vectorised)."""
    width = vector_bytes(bits)
    raw = np.ascontiguousarray(words, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return raw[:, :width].tobytes()


def unpack_vector(body: bytes, dim: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_vector`; rejects a wrong length or an element ``>= 2^bits``."""
    width = vector_bytes(bits)
    if len(body) != dim * width:
        raise MessageError(f"masked vector: expected {dim * width} bytes, got {len(body)}")
    raw = np.zeros((dim, 8), dtype=np.uint8)
    raw[:, :width] = np.frombuffer(body, dtype=np.uint8).reshape(dim, width)
    words = raw.view("<u8").reshape(dim).astype(np.uint64)
    if bits < 64 and np.any(words >> np.uint64(bits)):
        raise MessageError(f"masked vector has elements outside Z_(2^{bits})")
    return words
