"""Bit-level wire codec shared by all compressors.

Every payload travels as ``[float32 section][bit section]``:

* the float section holds the payload's float32 numbers (norms, scales, kept values) as
  little-endian IEEE-754, 4 bytes each, so it is always byte aligned;
* the bit section is one bit stream (most significant bit of each byte first) padded with
  zero bits to a whole byte.

``bits(payload)`` counts the float section and the *padded* bit section, so
``8 * len(to_bytes(p)) == bits(p)`` exactly for every compressor of this package.

Variable-length integers use two classic prefix codes:

* Elias-γ (Elias 1975) codes ``v >= 1`` as ``N = floor(log2 v)`` zeros, a one, then the ``N``
  low bits of ``v``: ``2N + 1`` bits.
* Golomb codes with a power-of-two parameter ``2**b`` (Rice codes; Golomb 1966) code
  ``g >= 0`` as the quotient ``g >> b`` in unary (that many zeros, then a one) followed by the
  ``b`` low bits: ``(g >> b) + 1 + b`` bits.

A field of many codes is written in *separated* order: first the unary parts of all codes, then
all their binary parts. Each code word keeps its length, so the size is exactly that of the
interleaved code, but both halves can be packed and parsed with vectorised numpy (positions of
ones, cumulative sums) instead of a per-code Python loop.

The reader is meant for hostile bytes: every count is checked against the template before it is
used to size an array, reads past the end raise, and leftover bytes or non-zero padding raise.
All errors are ``ValueError``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

GOLDEN_RATIO = (1.0 + math.sqrt(5.0)) / 2.0
_INT32_MAX = 2**31 - 1

# ----------------------------------------------------------------------------------------------
# Static (Python int) helpers.


def index_width(d: int) -> int:
    """Bits of a fixed-width index into ``range(d)``: ``bit_length(d - 1)`` (0 when d <= 1)."""
    return max(d - 1, 0).bit_length()


def count_width(n_max: int) -> int:
    """Bits of a fixed-width count in ``[0, n_max]``: ``bit_length(n_max)``."""
    return int(n_max).bit_length()


def pad8(n_bits: int) -> int:
    """``n_bits`` rounded up to a whole number of bytes (in bits)."""
    return -(-n_bits // 8) * 8


def golomb_bits(p: float) -> int:
    """Rice parameter ``b*`` of Sattler et al. (2019), Eq. (18), for index gaps at density ``p``.

    ``b* = 1 + floor(log2(ln(φ - 1) / ln(1 - p)))`` with φ the golden ratio; the Golomb
    divisor is ``2**b*``. For dense vectors (``p`` above ~0.38) the formula drops below zero and
    the divisor is 1 (``b* = 0``, plain unary gaps), the only meaningful choice there.

    Args:
      p: fraction of non-zero positions, in ``(0, 1]``.

    Returns:
      ``b*`` as a Python int, ``>= 0``.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"golomb_bits: density p must be in (0, 1], got {p!r}.")
    if p >= 1.0:
        return 0
    ratio = math.log(GOLDEN_RATIO - 1.0) / math.log1p(-p)
    return max(0, 1 + math.floor(math.log2(ratio)))


def check_int32_bits(max_bits: int, what: str) -> None:
    """Raises ``ValueError`` if the largest possible payload of ``what`` overflows int32 bits."""
    if max_bits > _INT32_MAX:
        raise ValueError(
            f"{what}: the largest possible payload is {max_bits} bits, which does not fit the "
            f"int32 returned by bits() (max {_INT32_MAX} bits = 256 MiB per payload). Use a "
            "compressor with fewer bits per coordinate (or a smaller sparsity) for this model."
        )


# ----------------------------------------------------------------------------------------------
# jit-side code lengths (int32, vmap-able).


def floor_log2(v: jax.Array) -> jax.Array:
    """``floor(log2(v))`` for int32 ``v >= 1`` (``-1`` for ``v == 0``), exact integer math."""
    v = jnp.asarray(v, jnp.int32)
    return jnp.int32(31) - jax.lax.clz(v)


def gamma_length(v: jax.Array) -> jax.Array:
    """Elias-γ code length of ``v >= 1`` in bits."""
    return 2 * floor_log2(v) + 1


def rice_length(g: jax.Array, b: int) -> jax.Array:
    """Rice (Golomb, divisor ``2**b``) code length of ``g >= 0`` in bits."""
    return jnp.right_shift(jnp.asarray(g, jnp.int32), b) + (1 + b)


def padded(stream_bits: jax.Array) -> jax.Array:
    """Bit-stream length rounded up to whole bytes (int32)."""
    return (stream_bits + 7) // 8 * 8


# ----------------------------------------------------------------------------------------------
# Host-side float sections.


def floats_to_bytes(values: np.ndarray, what: str) -> bytes:
    """float32 little-endian bytes of ``values``; ``ValueError`` on non-finite entries."""
    values = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"to_bytes: {what} contains NaN/Inf. Non-finite updates cannot be sent; reject the "
            "client update (check jnp.isfinite) before encoding."
        )
    return values.astype("<f4", copy=False).tobytes()


def floats_from_bytes(data: memoryview, offset: int, count: int, what: str) -> np.ndarray:
    """Reads ``count`` float32 values at byte ``offset``; ``ValueError`` on short/non-finite."""
    end = offset + 4 * count
    if end > len(data):
        raise ValueError(f"from_bytes: data is truncated: {what} needs bytes [{offset}, {end}).")
    values = np.frombuffer(data[offset:end], dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"from_bytes: {what} contains NaN/Inf; the data is corrupt.")
    return values


def check_length(data: bytes, min_bytes: int, max_bytes: int, what: str) -> memoryview:
    """Rejects data outside ``[min_bytes, max_bytes]`` before anything is allocated."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"from_bytes: data must be bytes, got {type(data).__name__}.")
    view = memoryview(data).cast("B")
    if len(view) < min_bytes:
        raise ValueError(
            f"from_bytes: data is truncated: {what} needs at least {min_bytes} bytes, "
            f"got {len(view)}."
        )
    if len(view) > max_bytes:
        raise ValueError(
            f"from_bytes: data is too long: {what} is at most {max_bytes} bytes, "
            f"got {len(view)} (extended or wrong template)."
        )
    return view


# ----------------------------------------------------------------------------------------------
# Bit writer.


def _container(width: int) -> int:
    """Smallest unsigned container size in bytes holding ``width`` bits (1, 2, 4 or 8)."""
    for nbytes in (1, 2, 4, 8):
        if width <= 8 * nbytes:
            return nbytes
    raise ValueError(f"codec: a single binary field cannot exceed 64 bits, got {width}.")


def _bit_matrix(values: np.ndarray, nbytes: int) -> np.ndarray:
    """``[n, 8 * nbytes]`` matrix of the bits of ``values`` (MSB first) as uint8 0/1."""
    be = np.ascontiguousarray(values.astype(f">u{nbytes}"))
    return np.unpackbits(be.view(np.uint8).reshape(-1, nbytes), axis=1)


class BitWriter:
    """Accumulates bit fields and packs them into bytes (MSB first, zero padded)."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.length = 0

    def _add(self, chunk: np.ndarray) -> None:
        self._chunks.append(chunk)
        self.length += int(chunk.size)

    def bits(self, flags: np.ndarray) -> None:
        """Writes one bit per element (truthy -> 1)."""
        self._add(np.asarray(flags).astype(np.uint8, copy=False).ravel())

    def fixed(self, values: np.ndarray, width: int) -> None:
        """Writes each value in ``width`` bits (``0 <= value < 2**width``)."""
        values = np.asarray(values).ravel()
        if width == 0 or values.size == 0:
            return
        if width == 1:
            self.bits(values)
            return
        nbytes = _container(width)
        self._add(_bit_matrix(values, nbytes)[:, 8 * nbytes - width :].ravel())

    def unary(self, counts: np.ndarray) -> None:
        """Writes each count ``q >= 0`` as ``q`` zeros followed by a one."""
        counts = np.asarray(counts, dtype=np.int64).ravel()
        ends = np.cumsum(counts + 1)
        out = np.zeros(int(ends[-1]) if counts.size else 0, dtype=np.uint8)
        out[ends - 1] = 1
        self._add(out)

    def varwidth(self, values: np.ndarray, widths: np.ndarray) -> None:
        """Writes ``values[j]`` in ``widths[j]`` bits (``widths <= 64``, values fit)."""
        values = np.asarray(values).ravel()
        widths = np.asarray(widths, dtype=np.int64).ravel()
        total = int(widths.sum())
        if total == 0:
            return
        if int(widths.max()) <= 8:
            # Short codes (QSGD's γ mantissas, small levels): each value's 8 bits as a row,
            # keeping its last `width` bits; row-major compaction is the stream order.
            used = widths > 0
            rows = np.unpackbits(values[used].astype(np.uint8)[:, None], axis=1)
            self._add(rows[_LAST_BITS[widths[used]]])
            return
        values = values.astype(np.uint64)
        out = np.zeros(total, dtype=np.uint8)
        starts = np.cumsum(widths) - widths
        # Step t writes bit t (from the top) of every code longer than t: the work is one
        # element per written bit plus one filter per step, with no per-code x 64 matrix.
        used = widths > 0
        values, widths, starts = values[used], widths[used], starts[used]
        for t in range(int(widths.max())):
            if t:
                longer = widths > t
                values, widths, starts = values[longer], widths[longer], starts[longer]
            shift = (widths - 1 - t).astype(np.uint64)
            out[starts + t] = (values >> shift) & np.uint64(1)
        self._add(out)

    def gamma(self, values: np.ndarray) -> None:
        """Elias-γ codes of ``values >= 1`` in separated order (all prefixes, then mantissas)."""
        values = np.asarray(values).ravel()
        if values.size == 0:
            return
        if values.max() < _SMALL.size:
            # Small values (QSGD levels): table exponents and int32 arithmetic, no uint64 copy.
            n = _SMALL[values]
            self.unary(n)
            self.varwidth(values.astype(np.int32) - (np.int32(1) << n.astype(np.int32)), n)
            return
        values = values.astype(np.uint64)
        n = floor_log2_np(values)
        self.unary(n)
        mask = (np.uint64(1) << n.astype(np.uint64)) - np.uint64(1)
        self.varwidth(values & mask, n)

    def rice(self, values: np.ndarray, b: int) -> None:
        """Rice codes (divisor ``2**b``) of ``values >= 0`` in separated order."""
        values = np.asarray(values, dtype=np.int64).ravel()
        if values.size == 0:
            return
        self.unary(values >> b)
        self.fixed(values & ((1 << b) - 1), b)

    def to_bytes(self) -> bytes:
        if not self._chunks:
            return b""
        stream = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        return np.packbits(stream).tobytes()


def floor_log2_np(values: np.ndarray) -> np.ndarray:
    """Exact ``floor(log2(v))`` for integer ``v >= 1`` (int64 result)."""
    values = np.asarray(values)
    if values.size and values.max() < _SMALL.size:
        # Codec values are mostly small (levels, short gaps): a table lookup, no float64 pass.
        return _SMALL[values].astype(np.int64)
    # frexp is exact below 2**53 (the float64 conversion is exact there): v = m 2**e, m in
    # [0.5, 1). The rare larger values take an exact integer path.
    out = np.frexp(values.astype(np.float64))[1].astype(np.int64) - 1
    big = values >= 2**53
    if np.any(big):
        rest = values[big].astype(np.uint64)
        exact = np.zeros(rest.shape, dtype=np.int64)
        for shift in (32, 16, 8, 4, 2, 1):
            high = rest >= (np.uint64(1) << np.uint64(shift))
            exact += np.where(high, shift, 0)
            rest = np.where(high, rest >> np.uint64(shift), rest)
        out[big] = exact
    return out


def flatnonzero(values: np.ndarray, expected_nonzeros: int | None = None) -> np.ndarray:
    """``np.flatnonzero`` of a 1-D integer array, fast when most entries are zero.

    Entries are scanned 8 bytes at a time (one uint64 word covers ``8 // itemsize`` entries),
    and only words that are non-zero are expanded: on a sparse vector (QSGD levels at small
    ``s``, unary bit streams of long runs) that is one pass over ``d / 8`` words instead of
    ``d`` entries. Mostly non-zero inputs take the plain ``np.flatnonzero``, directly when the
    caller's estimate ``expected_nonzeros`` says so (it only picks the path).
    """
    values = np.ascontiguousarray(values).ravel()
    per_word = 8 // values.itemsize
    if values.itemsize > 8 or per_word == 1 or values.size < 1024:
        return np.flatnonzero(values)
    if expected_nonzeros is not None and 16 * expected_nonzeros > values.size:
        return np.flatnonzero(values)
    head = values.size - values.size % per_word
    words = np.flatnonzero(values[:head].view(np.uint64))
    if 2 * words.size > head // per_word:  # mostly non-zero: expanding would not pay
        return np.flatnonzero(values)
    local = np.flatnonzero(values[:head].reshape(-1, per_word)[words])
    out = words[local // per_word] * per_word + local % per_word
    if head < values.size:
        out = np.concatenate([out, head + np.flatnonzero(values[head:])])
    return out


def gamma_total(values: np.ndarray) -> int:
    """``Σ (2 floor(log2 v) + 1)``: the Elias-γ length of integer ``values >= 1`` together."""
    values = np.asarray(values)
    if values.size and values.max() < _SMALL.size:
        # Table lookups summed in int64 without an int64 copy of the lookups.
        return 2 * int(np.sum(_SMALL[values], dtype=np.int64)) + values.size
    return int(np.sum(2 * floor_log2_np(values) + 1))


# Row w: which of a byte's 8 bits (MSB first) belong to a w-bit code, its last w.
_LAST_BITS = np.arange(8)[None, :] >= 8 - np.arange(9)[:, None]

# floor(log2(v)) for v < 2**16 (entry 0, never a valid argument, is -1).
_SMALL = (np.frexp(np.arange(1 << 16, dtype=np.float64))[1] - 1).astype(np.int8)

# ----------------------------------------------------------------------------------------------
# Bit reader.


class BitReader:
    """Parses a bit section written by :class:`BitWriter`; every failure is a ``ValueError``."""

    def __init__(self, data: memoryview, what: str) -> None:
        raw = np.frombuffer(data, dtype=np.uint8)
        self._bits = np.unpackbits(raw)
        # The bytes again, 8 zero bytes longer, for 64-bit windows at any byte (varwidth).
        self._bytes = np.concatenate([raw, np.zeros(8, np.uint8)])
        self._pos = 0
        self._what = what

    def _fail(self, message: str) -> ValueError:
        return ValueError(f"from_bytes: {self._what}: {message}")

    def _take(self, n: int) -> np.ndarray:
        end = self._pos + n
        if n < 0 or end > self._bits.size:
            raise self._fail(f"data is truncated (needs {n} more bits at bit {self._pos}).")
        out = self._bits[self._pos : end]
        self._pos = end
        return out

    def bits(self, n: int) -> np.ndarray:
        """Reads ``n`` single bits (uint8 0/1)."""
        return self._take(n)

    def fixed(self, n: int, width: int) -> np.ndarray:
        """Reads ``n`` unsigned values of ``width`` bits each (int64)."""
        if width == 0 or n == 0:
            return np.zeros(n, dtype=np.int64)
        if width > 63:
            raise ValueError(f"codec: fixed fields are at most 63 bits, got {width}.")
        chunk = self._take(n * width).reshape(n, width)
        nbytes = _container(width)
        matrix = np.zeros((n, 8 * nbytes), dtype=np.uint8)
        matrix[:, 8 * nbytes - width :] = chunk
        packed = np.packbits(matrix, axis=1)
        return packed.view(f">u{nbytes}").reshape(n).astype(np.int64)

    def unary(self, n: int, max_count: int) -> np.ndarray:
        """Reads ``n`` unary counts, each required to be ``<= max_count``."""
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        # A valid field spans at most n * (max_count + 1) bits: never scan (or allocate) beyond.
        remaining = self._bits.size - self._pos
        window = min(remaining, n * (max_count + 1))
        # The field holds n ones: dense fields (QSGD dense γ prefixes) skip the word scan.
        ones = flatnonzero(self._bits[self._pos : self._pos + window], n)[:n]
        if ones.size < n:
            if window < remaining:  # n codes within their maxima would fit in the window
                raise self._fail(f"a unary count exceeds its maximum {max_count}; corrupt.")
            raise self._fail("data is truncated or corrupt (unterminated unary code).")
        counts = np.diff(ones, prepend=-1) - 1
        if counts.max() > max_count:
            raise self._fail(f"a unary count exceeds its maximum {max_count}; data is corrupt.")
        self._pos += int(ones[-1]) + 1
        return counts

    def varwidth(self, widths: np.ndarray) -> np.ndarray:
        """Reads values of the given widths (``<= 63`` each) as int64."""
        widths = np.asarray(widths, dtype=np.int64)
        n = widths.size
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if int(widths.max()) > 63:
            raise ValueError(f"codec: varwidth fields are at most 63 bits, got {widths.max()}.")
        total = int(widths.sum())
        first = self._pos
        chunk = self._take(total)
        max_width = int(widths.max())
        if max_width <= 57:
            # Each code lies within the 8 * nbytes bits from its first byte (bit offset <= 7,
            # width <= 8 * nbytes - 7): read that big-endian word through an overlapping
            # byte-stride view and shift the code out, a few operations per code instead of
            # one per bit, in the narrowest word that fits (2 bytes for QSGD's mantissas).
            nbytes = 2 if max_width <= 9 else 4 if max_width <= 25 else 8
            word = np.dtype(f"u{nbytes}")
            starts = first + np.cumsum(widths) - widths
            windows = np.ndarray(
                (self._bytes.size - 7,), dtype=f">u{nbytes}", buffer=self._bytes, strides=(1,)
            )[starts >> 3].astype(word)
            shift = (8 * nbytes - (starts & 7) - widths).astype(word)
            mask = (word.type(1) << widths.astype(word)) - word.type(1)
            return ((windows >> shift) & mask).astype(np.int64)
        values = np.zeros(n, dtype=np.int64)
        # Step t appends bit t of every code longer than t (see BitWriter.varwidth).
        codes = np.flatnonzero(widths)
        starts = (np.cumsum(widths) - widths)[codes]
        code_widths = widths[codes]
        for t in range(int(widths.max())):
            if t:
                longer = code_widths > t
                codes, starts, code_widths = codes[longer], starts[longer], code_widths[longer]
            values[codes] = (values[codes] << 1) | chunk[starts + t]
        return values

    def gamma(self, n: int, max_value: int) -> np.ndarray:
        """Reads ``n`` Elias-γ codes, each required to be in ``[1, max_value]``."""
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        max_value = max(int(max_value), 1)
        exps = self.unary(n, max_value.bit_length() - 1)
        mantissas = self.varwidth(exps)
        values = (np.int64(1) << exps) | mantissas
        if values.max() > max_value:
            raise self._fail(f"an Elias-γ value exceeds its maximum {max_value}; data is corrupt.")
        return values

    def rice(self, n: int, b: int, max_value: int) -> np.ndarray:
        """Reads ``n`` Rice codes (divisor ``2**b``), each required to be in ``[0, max_value]``."""
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        quotients = self.unary(n, max(int(max_value), 0) >> b)
        values = (quotients << b) | self.fixed(n, b)
        if values.max() > max_value:
            raise self._fail(f"a Golomb value exceeds its maximum {max_value}; data is corrupt.")
        return values

    def finish(self) -> int:
        """Checks that only zero padding (< 8 bits) remains; returns the bits consumed."""
        rest = self._bits[self._pos :]
        if rest.size >= 8:
            raise self._fail(f"{rest.size // 8} unexpected trailing byte(s) (extended data).")
        if rest.any():
            raise self._fail("non-zero padding bits; data is corrupt.")
        return self._pos
