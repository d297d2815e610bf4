"""Wire protocol of the edge backend: explicit framing, HMAC authentication, hard limits.

Nothing on the wire is pickled. Every gRPC request and response body is one *frame*::

    b"FJE1" | uint32 little-endian header length | UTF-8 JSON header | body

The JSON header carries the message fields plus two lists that describe the body exactly:

* ``"arrays"``: ``[[name, dtype, shape], ...]``, raw C-order little-endian array bytes;
* ``"blobs"``: ``[[name, nbytes], ...]``, opaque byte strings (e.g. a compressor's wire codec).

The body is the arrays in order followed by the blobs in order, nothing else. The decoder treats
its input as hostile: the header length is capped, every declared size is computed with Python
integers (no overflow) and checked against the bytes actually present *before* anything is
sliced, only plain numeric dtypes are accepted, and the arrays it returns are read-only views of
the received bytes, so decoding never allocates more than the message that gRPC already limited
with ``grpc.max_receive_message_length``. Callers then check every array against a template
(shape and dtype) before using it.

Authentication: every request carries the sender's worker id and an HMAC-SHA256 of
``method | worker id | frame`` keyed with a shared secret token (gRPC metadata ``fje-worker``
and ``fje-mac``); the server compares with :func:`hmac.compare_digest` and answers with its own
HMAC in the trailing metadata, so a client also rejects forged tasks. The token authenticates,
it does not encrypt: use TLS (``grpc.ssl_server_credentials``) when the network is not trusted.

This module deliberately imports only numpy and the standard library so that small tools (and
the hostile-client tests) can speak the protocol without starting JAX.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"FJE1"
SERVICE = "fedjax_lab.edge.v1.Edge"
JOIN = "Join"
FETCH = "Fetch"
SUBMIT = "Submit"
METHODS = (JOIN, FETCH, SUBMIT)
WORKER_KEY = "fje-worker"
MAC_KEY = "fje-mac"
MAX_HEADER_BYTES = 64 * 1024
MAX_ENTRIES = 4096
MAX_NAME_CHARS = 128
MAX_NDIM = 8
MAX_DIM = 2**40
MIN_TOKEN_BYTES = 16
_PREFIX = struct.Struct("<4sI")
_DTYPES = (
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "bfloat16", "float32", "float64",
)


class ProtocolError(ValueError):
    """A frame or header that does not follow the protocol (malformed, forged, mismatched)."""


def method_path(method: str) -> str:
    """The gRPC method path of ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return f"/{SERVICE}/{method}"


def resolve_dtype(name: Any) -> np.dtype:
    """The numpy dtype of a whitelisted dtype name (little-endian), else ProtocolError."""
    if not isinstance(name, str) or name not in _DTYPES:
        raise ProtocolError(f"unsupported dtype {name!r}; allowed: {_DTYPES}")
    if name == "bfloat16":
        import ml_dtypes  # a JAX dependency; only needed for bfloat16 leaves

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name).newbyteorder("<")


def dtype_name(dtype: Any) -> str:
    """The protocol name of a dtype (the inverse of :func:`resolve_dtype`)."""
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(
            f"dtype {np.dtype(dtype)} cannot travel on the edge wire; allowed: {_DTYPES}"
        )
    return name


@dataclass(frozen=True)
class Message:
    """A decoded frame: JSON fields, named arrays (read-only views), named blobs."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    blobs: dict[str, bytes]

    def field(self, name: str, kind: type | tuple[type, ...]) -> Any:
        """Header field ``name`` checked to be of ``kind`` (bools are not ints here)."""
        value = self.header.get(name)
        if isinstance(value, bool) and kind is not bool:
            value = None
        if not isinstance(value, kind):
            raise ProtocolError(f"header field {name!r} must be {kind}, got {value!r}")
        return value

    def array(self, name: str, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """Array ``name``, which must have exactly ``shape`` and ``dtype``."""
        if name not in self.arrays:
            raise ProtocolError(f"array {name!r} is missing")
        value = self.arrays[name]
        if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
            raise ProtocolError(
                f"array {name!r} has shape {value.shape} dtype {value.dtype}, expected "
                f"{tuple(shape)} {np.dtype(dtype)}"
            )
        return value

    def expect_names(self, arrays: set[str], blobs: set[str] = frozenset()) -> None:
        """Raises unless the message carries exactly these arrays and blobs."""
        if set(self.arrays) != set(arrays) or set(self.blobs) != set(blobs):
            raise ProtocolError(
                f"unexpected message content: arrays {sorted(self.arrays)}, blobs "
                f"{sorted(self.blobs)}; expected arrays {sorted(arrays)}, blobs {sorted(blobs)}"
            )


def encode_message(
    header: Mapping[str, Any],
    arrays: Mapping[str, Any] | None = None,
    blobs: Mapping[str, bytes] | None = None,
) -> bytes:
    """One frame from JSON-able ``header`` fields, numpy ``arrays`` and byte ``blobs``."""
    arrays = dict(arrays or {})
    blobs = dict(blobs or {})
    if "arrays" in header or "blobs" in header:
        raise ValueError("header fields 'arrays' and 'blobs' are reserved for the body layout")
    specs, parts = [], []
    for name, value in arrays.items():
        arr = np.asarray(value)
        dtype = resolve_dtype(dtype_name(arr.dtype))
        parts.append(np.ascontiguousarray(arr, dtype=dtype).tobytes())
        specs.append([name, dtype_name(arr.dtype), [int(s) for s in arr.shape]])
    blob_specs = []
    for name, value in blobs.items():
        data = bytes(value)
        parts.append(data)
        blob_specs.append([name, len(data)])
    text = json.dumps(
        {**header, "arrays": specs, "blobs": blob_specs}, separators=(",", ":"), allow_nan=False
    ).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"message header is {len(text)} bytes > {MAX_HEADER_BYTES}")
    return b"".join([_PREFIX.pack(MAGIC, len(text)), text, *parts])


def _check_name(name: Any, seen: set[str]) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or name in seen:
        raise ProtocolError(f"bad or duplicate entry name {name!r}")
    seen.add(name)
    return name


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DIM:
        raise ProtocolError(f"{what} must be a non-negative integer <= 2**40, got {value!r}")
    return value


def decode_message(data: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Message:
    """Parses a frame from untrusted bytes; raises :class:`ProtocolError` on any violation."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"a frame must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise ProtocolError(f"frame of {len(view)} bytes is shorter than its prefix")
    magic, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if header_len > max_header_bytes or header_len > len(view) - _PREFIX.size:
        raise ProtocolError(
            f"declared header length {header_len} exceeds the limit ({max_header_bytes}) or "
            f"the frame ({len(view)} bytes)"
        )
    start = _PREFIX.size + header_len
    try:
        header = json.loads(bytes(view[_PREFIX.size : start]).decode("utf-8"))
    except (ValueError, RecursionError) as err:  # also over-long integer literals
        raise ProtocolError(f"header is not UTF-8 JSON: {err}") from err
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    array_specs, blob_specs = header.pop("arrays", None), header.pop("blobs", None)
    if not isinstance(array_specs, list) or not isinstance(blob_specs, list):
        raise ProtocolError("header must list 'arrays' and 'blobs'")
    if len(array_specs) + len(blob_specs) > MAX_ENTRIES:
        raise ProtocolError(f"more than {MAX_ENTRIES} arrays/blobs declared")
    body_len = len(view) - start
    offset, seen = 0, set()
    layout: list[tuple[str, np.dtype | None, tuple[int, ...], int, int]] = []
    for spec in array_specs:
        if not isinstance(spec, list) or len(spec) != 3 or not isinstance(spec[2], list):
            raise ProtocolError(f"array spec must be [name, dtype, shape], got {spec!r}")
        name = _check_name(spec[0], seen)
        dtype = resolve_dtype(spec[1])
        if len(spec[2]) > MAX_NDIM:
            raise ProtocolError(f"array {name!r} has more than {MAX_NDIM} dimensions")
        shape = tuple(_check_count(s, f"array {name!r} dimension") for s in spec[2])
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if nbytes > body_len - offset:
            raise ProtocolError(
                f"array {name!r} declares {nbytes} bytes but only {body_len - offset} remain"
            )
        layout.append((name, dtype, shape, offset, nbytes))
        offset += nbytes
    for spec in blob_specs:
        if not isinstance(spec, list) or len(spec) != 2:
            raise ProtocolError(f"blob spec must be [name, nbytes], got {spec!r}")
        name = _check_name(spec[0], seen)
        nbytes = _check_count(spec[1], f"blob {name!r} length")
        if nbytes > body_len - offset:
            raise ProtocolError(
                f"blob {name!r} declares {nbytes} bytes but only {body_len - offset} remain"
            )
        layout.append((name, None, (), offset, nbytes))
        offset += nbytes
    if offset != body_len:
        raise ProtocolError(f"{body_len - offset} trailing bytes after the declared body")
    arrays, blobs = {}, {}
    body = view[start:]
    for name, dtype, shape, off, nbytes in layout:
        chunk = body[off : off + nbytes]
        if dtype is None:
            blobs[name] = bytes(chunk)
        else:
            arrays[name] = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    return Message(header, arrays, blobs)


def sign(token: bytes, method: str, worker: str, frame: bytes) -> str:
    """Hex HMAC-SHA256 of ``method | worker | frame`` under ``token``."""
    mac = hmac.new(token, digestmod=hashlib.sha256)
    mac.update(method.encode() + b"\x00" + worker.encode() + b"\x00")
    mac.update(frame)
    return mac.hexdigest()


def verify(token: bytes, method: str, worker: str, frame: bytes, mac: Any) -> bool:
    """Constant-time check of a MAC produced by :func:`sign`."""
    if not isinstance(mac, str) or len(mac) != 64:
        return False
    return hmac.compare_digest(sign(token, method, worker, frame), mac)


def response_method(method: str) -> str:
    """The MAC domain of the server's answer to ``method`` (distinct from the request's)."""
    return f"{method}/response"


def load_token(path: str) -> bytes:
    """Reads a shared secret token file (surrounding whitespace stripped)."""
    with open(path, "rb") as f:
        token = f.read().strip()
    if len(token) < MIN_TOKEN_BYTES:
        raise ValueError(
            f"token file {path!r} holds {len(token)} bytes; use at least {MIN_TOKEN_BYTES} "
            "random bytes, e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return token


def metadata_value(metadata: Any, key: str) -> str | None:
    """The single value of ``key`` in gRPC metadata, None if absent or repeated."""
    values = [m[1] for m in (metadata or ()) if m[0] == key]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    return values[0]
