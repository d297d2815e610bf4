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
the received bytes, so decoding never allocates more than the body, whose size the server
capped before reading it (see below). Callers then check every array against a template
(shape and dtype) before using it.

Authentication (see ``docs/threat_model.md``): the server holds a master secret; worker ``w``
holds only its own key ``HMAC(master, "fedjax-edge worker:w")`` (:func:`worker_key`), so it can
authenticate as ``w`` and nobody else. Every request carries, as gRPC metadata, the worker id, the
server's session id (random per server start), the sender's clock, a random nonce, the body's
length and SHA-256, and an HMAC-SHA256 of all of these under the worker's key. The server checks
that metadata *before* it reads the body (an unauthenticated call never gets a buffer or one
of the threads that serve workers), refuses stale clocks, replayed nonces and other sessions'
requests, then streams the body in chunks up to the announced length (capped per method) and
checks its digest. It answers with an HMAC that covers the request's MAC (:func:`reply_mac`),
so a client never accepts a replayed or forged answer. The MACs authenticate; they do not
encrypt: use TLS (``grpc.ssl_server_credentials``) when the network is not trusted.

This module deliberately imports only numpy and the standard library so that small tools (and
the hostile-client tests) can speak the protocol without starting JAX.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"FJE1"
# v2: per-worker keys, metadata authentication before the body, chunked request streams.
SERVICE = "fedjax_lab.edge.v2.Edge"
JOIN = "Join"
FETCH = "Fetch"
SUBMIT = "Submit"
SECAGG = "SecAgg"  # one stage of a secure aggregation round (fedjax_lab.backends.edge.secagg)
METHODS = (JOIN, FETCH, SUBMIT, SECAGG)
WORKER_KEY = "fje-worker"
SESSION_KEY = "fje-session"
TIME_KEY = "fje-time"
NONCE_KEY = "fje-nonce"
LENGTH_KEY = "fje-length"
DIGEST_KEY = "fje-digest"
MAC_KEY = "fje-mac"
_REQUEST_KEYS = (WORKER_KEY, SESSION_KEY, TIME_KEY, NONCE_KEY, LENGTH_KEY, DIGEST_KEY, MAC_KEY)
KEY_LABEL = "fedjax-edge worker"
REQUEST_LABEL = "fedjax-edge request v2"
REPLY_LABEL = "fedjax-edge reply v2"
CHUNK_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_WORKERS = 10**6
_WORKER = re.compile(r"[0-9]{1,6}")
_SESSION = re.compile(r"[0-9a-f]{0,64}")
_DIGITS = re.compile(r"[0-9]{1,15}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_HEADER_BYTES = 64 * 1024
SMALL_FRAME_BYTES = 8 + MAX_HEADER_BYTES  # a frame that is a header only (Join, Fetch)
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


# ------------------------------------------------------------------------------ credentials
def worker_key(master: bytes, worker: int) -> bytes:
    """Worker ``worker``'s own key: HMAC-SHA256 of ``"fedjax-edge worker:<id>"`` under ``master``.

    HMAC is a pseudo-random function, so a key says nothing about the master secret or another
    worker's key: a device holding the key of worker ``w`` can authenticate as ``w`` only.
    """
    _check_secret(master, "master secret")
    if isinstance(worker, bool) or not isinstance(worker, int) or not 0 <= worker < MAX_WORKERS:
        raise ValueError(f"worker id must be an int in [0, {MAX_WORKERS}), got {worker!r}")
    return hmac.new(master, f"{KEY_LABEL}:{worker}".encode(), hashlib.sha256).digest()


def _check_secret(secret: Any, what: str) -> None:
    if not isinstance(secret, bytes) or len(secret) < MIN_TOKEN_BYTES:
        raise ValueError(
            f"the {what} must be bytes of length >= {MIN_TOKEN_BYTES} (a random secret, e.g. "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )


def load_master(path: str) -> bytes:
    """Reads the server's master secret file (surrounding whitespace stripped).

    Raises:
      ValueError: the file cannot be read or holds fewer than 16 bytes.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as err:
        raise ValueError(f"cannot read {path!r}: {err.strerror or err}") from err
    if len(secret) < MIN_TOKEN_BYTES:
        raise ValueError(
            f"{path!r} holds {len(secret)} bytes; use at least {MIN_TOKEN_BYTES} random bytes, "
            "e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return secret


def write_worker_key(path: str, master: bytes, worker: int) -> None:
    """Writes worker ``worker``'s key file (mode 0600; refuses to overwrite a file)."""
    text = json.dumps({"fedjax_edge_worker_key": 1, "worker": worker,
                       "key": worker_key(master, worker).hex()})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def load_worker_key(path: str) -> tuple[int, bytes]:
    """``(worker id, key)`` from a file written by :func:`write_worker_key`.

    Raises:
      ValueError: the file cannot be read or is not a worker key file.
    """
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(4096).decode("utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read {path!r}: {err.strerror or err}") from err
    except ValueError as err:
        raise ValueError(f"{path!r} is not a worker key file (JSON): {err}") from err
    ok = (isinstance(doc, dict) and doc.get("fedjax_edge_worker_key") == 1
          and isinstance(doc.get("worker"), int) and not isinstance(doc.get("worker"), bool)
          and 0 <= doc["worker"] < MAX_WORKERS and isinstance(doc.get("key"), str)
          and _HEX64.fullmatch(doc["key"]))
    if not ok:
        raise ValueError(
            f"{path!r} is not a worker key file; write one with `python -m "
            "fedjax_lab.backends.edge keys --master-file SECRET --worker N --out FILE`"
        )
    return doc["worker"], bytes.fromhex(doc["key"])


# --------------------------------------------------------------------------- request signing
@dataclass(frozen=True)
class RequestAuth:
    """The authentication metadata of one request (parsed, not yet verified).

    Every field is covered by ``mac``; ``length`` and ``digest`` describe the body, so the
    server verifies the sender (and the size it announces) *before* it reads a byte of it.
    """

    worker: int
    session: str
    time_ms: int
    nonce: str
    length: int
    digest: str
    mac: str


def _request_mac(key: bytes, method: str, auth: RequestAuth) -> str:
    # Every field has a NUL-free, bounded format (checked by parse_request_metadata), so the
    # NUL-joined message is unambiguous.
    text = "\x00".join([
        REQUEST_LABEL, method, str(auth.worker), auth.session, str(auth.time_ms), auth.nonce,
        str(auth.length), auth.digest,
    ])
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sign_request(
    key: bytes, method: str, worker: int, session: str, frame: bytes, *,
    time_ms: int | None = None, nonce: str | None = None,
) -> tuple[tuple[tuple[str, str], ...], RequestAuth]:
    """Metadata authenticating ``frame`` as a ``method`` request of ``worker`` in ``session``.

    Args:
      key: the worker's key (:func:`worker_key`).
      method: one of :data:`METHODS`.
      worker: the sender's worker id.
      session: the server's session id ("" before the first ``Join``).
      frame: the request body.
      time_ms: the sender's clock in ms since the epoch (default: now).
      nonce: 32 hex digits (default: fresh random); the server refuses a nonce it has seen.

    Returns:
      ``(gRPC metadata, RequestAuth)``; keep the latter to verify the reply.
    """
    auth = RequestAuth(
        worker=worker, session=session,
        time_ms=int(time.time() * 1000) if time_ms is None else time_ms,
        nonce=secrets.token_hex(16) if nonce is None else nonce,
        length=len(frame), digest=hashlib.sha256(frame).hexdigest(), mac="",
    )
    auth = RequestAuth(**{**auth.__dict__, "mac": _request_mac(key, method, auth)})
    metadata = (
        (WORKER_KEY, str(auth.worker)), (SESSION_KEY, auth.session),
        (TIME_KEY, str(auth.time_ms)), (NONCE_KEY, auth.nonce), (LENGTH_KEY, str(auth.length)),
        (DIGEST_KEY, auth.digest), (MAC_KEY, auth.mac),
    )
    return metadata, auth


def parse_request_metadata(metadata: Any) -> RequestAuth | None:
    """The :class:`RequestAuth` of gRPC invocation metadata; None if any field is malformed."""
    values = {k: metadata_value(metadata, k) for k in _REQUEST_KEYS}
    if any(v is None for v in values.values()):
        return None
    formats = {WORKER_KEY: _WORKER, SESSION_KEY: _SESSION, TIME_KEY: _DIGITS, NONCE_KEY: _HEX32,
               LENGTH_KEY: _DIGITS, DIGEST_KEY: _HEX64, MAC_KEY: _HEX64}
    if not all(formats[k].fullmatch(v) for k, v in values.items()):
        return None
    return RequestAuth(
        worker=int(values[WORKER_KEY]), session=values[SESSION_KEY],
        time_ms=int(values[TIME_KEY]), nonce=values[NONCE_KEY], length=int(values[LENGTH_KEY]),
        digest=values[DIGEST_KEY], mac=values[MAC_KEY],
    )


def verify_request(key: bytes, method: str, auth: RequestAuth) -> bool:
    """Constant-time check of ``auth.mac`` (the body is checked later against ``auth.digest``)."""
    return hmac.compare_digest(_request_mac(key, method, auth), auth.mac)


def body_matches(auth: RequestAuth, frame: bytes) -> bool:
    """Whether a received body is the one the request's MAC covers."""
    return len(frame) == auth.length and hmac.compare_digest(
        hashlib.sha256(frame).hexdigest(), auth.digest
    )


def reply_mac(key: bytes, method: str, request: RequestAuth, frame: bytes) -> str:
    """The server's MAC of its answer ``frame``, bound to the request it answers.

    It covers the request's MAC (hence its session, time and nonce): a recorded answer replayed
    to another request, or to another worker, does not verify.
    """
    text = "\x00".join([REPLY_LABEL, method, str(request.worker), request.mac,
                        hashlib.sha256(frame).hexdigest()])
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def verify_reply(key: bytes, method: str, request: RequestAuth, frame: bytes, mac: Any) -> bool:
    """Constant-time check of a :func:`reply_mac`."""
    if not isinstance(mac, str) or not _HEX64.fullmatch(mac):
        return False
    return hmac.compare_digest(reply_mac(key, method, request, frame), mac)


def chunks(frame: bytes) -> list[bytes]:
    """The request stream of ``frame``: pieces of at most :data:`CHUNK_BYTES`.

    Requests stream in chunks so that the server's gRPC receive limit is one chunk and the
    per-method size limit is enforced as bytes arrive (gRPC's own limit is per server).
    """
    return [frame[i : i + CHUNK_BYTES] for i in range(0, len(frame), CHUNK_BYTES)]


def metadata_value(metadata: Any, key: str) -> str | None:
    """The single value of ``key`` in gRPC metadata, None if absent or repeated."""
    values = [m[1] for m in (metadata or ()) if m[0] == key]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    return values[0]
