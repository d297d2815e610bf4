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


def all_finite(values: np.ndarray) -> bool:
    """Whether a float array has no NaN/Inf, by two reductions instead of an ``isfinite`` mask.

    ``max`` and ``min`` propagate NaN, and an infinity is the maximum (+Inf) or the minimum
    (-Inf), so both are finite exactly when every entry is: no ``d``-sized boolean temporary,
    which at 10M float32 entries is a third of the wire codec's time.
    """
    if values.size == 0:
        return True
    return bool(np.isfinite(values.max()) and np.isfinite(values.min()))


def floats_to_bytes(values: np.ndarray, what: str) -> bytes:
    """float32 little-endian bytes of ``values``; ``ValueError`` on non-finite entries."""
    values = np.asarray(values, dtype=np.float32)
    if not all_finite(values):
        raise ValueError(
            f"to_bytes: {what} contains NaN/Inf. Non-finite updates cannot be sent; reject the "
            "client update (check jnp.isfinite) before encoding."
        )
    return values.astype("<f4", copy=False).tobytes()


def floats_from_bytes(data: memoryview, offset: int, count: int, what: str) -> np.ndarray:
    """Reads ``count`` float32 values at byte ``offset``; ``ValueError`` on short/non-finite.

    Over ``bytes`` (immutable) on a little-endian host the result is a read-only view of the
    data, not a copy; otherwise a fresh float32 array.
    """
    end = offset + 4 * count
    if end > len(data):
        raise ValueError(f"from_bytes: data is truncated: {what} needs bytes [{offset}, {end}).")
    values = np.frombuffer(data[offset:end], dtype="<f4")
    if not (isinstance(data.obj, bytes) and values.dtype.isnative):
        # A read-only view is only safe over immutable bytes (a 40 MB copy saved at 10M
        # floats); a view of a bytearray would change if the caller reused its buffer.
        values = values.astype(np.float32)
    if not all_finite(values):
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


# Longest code the packed writer merges and places in one 64-bit word: a code starting at bit
# offset <= 7 of a byte must end within the 8 bytes from there.
_MAX_PACKED_WIDTH = 57
# At most 2**6 codes per merged code: codes of >= 1 bit could not merge further anyway.
_MAX_MERGE_LEVELS = 6
# Codes merged and packed per call of the packer (see BitWriter._add_codes).
_WRITE_CHUNK = 1 << 18


_UINT = {nbytes: np.dtype(f"u{nbytes}") for nbytes in (1, 2, 4, 8)}


def _uint_for(width: int) -> np.dtype:
    """Narrowest unsigned dtype holding ``width <= 64`` bits."""
    # A dict lookup: building a dtype from a string costs microseconds per call, and the
    # chunked writer calls this a few times per chunk and merge level.
    return _UINT[_container(width)]


def _merge_codes(values: np.ndarray, widths: np.ndarray, max_width: int):
    """Concatenates runs of ``2**k`` adjacent codes into one code each (bit-exact).

    Pairwise merging ``(a, la), (b, lb) -> (a << lb | b, la + lb)``, repeated while the longest
    merged code would still be at most 57 bits (the packer's 64-bit window) and at most
    ``_MAX_MERGE_LEVELS`` times. The bound uses the actual longest code after each level, so
    fields of mostly short codes (QSGD's γ codes of small levels) merge 16-32 codes into one.
    Each level is a few SIMD passes over half as many elements, in the narrowest unsigned
    dtype that holds the merged codes, so the per-code work of the packer (prefix sum, scatter)
    is done on ``1 / 2**k`` as many codes. Padding codes have length 0 (no bits).
    """
    n = values.size
    # Pad to a multiple of 2**levels once (a copy into the narrow dtype is made anyway),
    # except that inputs needing neither padding nor conversion (the writer's full chunks of
    # uint8 codes) are used as they are: merging never writes to its inputs.
    block = 1 << min(_MAX_MERGE_LEVELS, max(n - 1, 0).bit_length())
    size = -(-n // block) * block
    narrow = _uint_for(max_width)
    if size == n and values.dtype == narrow and values.flags.c_contiguous:
        codes = values
    else:
        codes = np.zeros(size, narrow)
        codes[:n] = values
    if size == n and widths.dtype == np.uint8 and widths.flags.c_contiguous:
        lengths = widths
    else:
        lengths = np.zeros(size, np.uint8)
        lengths[:n] = widths
    while 2 * max_width <= _MAX_PACKED_WIDTH and codes.size % 2 == 0 and codes.size > 1:
        narrow = _uint_for(max_width)
        if codes.dtype != narrow:
            codes = codes.astype(narrow)
        if narrow.itemsize < 8 and np.little_endian:
            # A pair of adjacent codes viewed as one element of twice the width holds the
            # first code in its low half: contiguous SIMD passes, where the strided columns
            # of a (-1, 2) reshape take numpy's element-at-a-time loops.
            wide = _UINT[2 * narrow.itemsize]
            pairs = codes.view(wide)
            pair_lengths = lengths.view(np.uint16)
            low_lengths = pair_lengths >> np.uint16(8)
            high = pairs & wide.type((1 << (8 * narrow.itemsize)) - 1)
            high <<= low_lengths.astype(wide)
            high |= pairs >> wide.type(8 * narrow.itemsize)
            codes = high
            lengths = ((pair_lengths & np.uint16(0xFF)) + low_lengths).astype(np.uint8)
        else:
            pairs_codes, pairs_lengths = codes.reshape(-1, 2), lengths.reshape(-1, 2)
            dtype = _uint_for(2 * max_width)
            low_lengths = pairs_lengths[:, 1]
            high = pairs_codes[:, 0].astype(dtype) << low_lengths.astype(dtype)
            codes = high | pairs_codes[:, 1]
            lengths = pairs_lengths[:, 0] + low_lengths
        max_width = int(lengths.max())
    return codes, lengths


def _pack_codes(codes: np.ndarray, lengths: np.ndarray, offset: int) -> tuple[np.ndarray, int]:
    """Packs codes of ``lengths <= 57`` bits, in order, starting at bit ``offset`` (0..7).

    Returns the bytes covering bits ``[0, offset + Σ lengths)`` (zero outside the codes) and
    ``Σ lengths``. Each
    code, shifted into the 64-bit big-endian word that starts at its first byte, is stored at
    that byte; byte ``b`` of the output is then the OR of byte ``k`` of the words stored at
    ``b - k`` for ``k = 0..7`` (eight SIMD passes over the output instead of one write per
    bit). Codes in disjoint bit ranges never share a bit, so OR is exact. Two codes can share
    a first byte only if some are shorter than 8 bits: then the codes are stored in ``lanes``
    interleaved passes, ``lanes * min_length >= 8`` making each pass's first bytes distinct
    (fancy-index ``|=`` is only correct without duplicates). Zero-length codes are dropped.
    """
    lengths64 = lengths.astype(np.int64)
    starts = np.cumsum(lengths64)
    total = int(starts[-1])
    starts -= lengths64
    starts += offset
    nbytes = -(-(offset + total) // 8)
    if int(lengths.min()) == 0:
        keep = lengths != 0
        codes, lengths64, starts = codes[keep], lengths64[keep], starts[keep]
    acc = np.zeros(nbytes, np.uint64)
    if codes.size:
        shift = (64 - (starts & 7) - lengths64).astype(np.uint64)
        words = codes.astype(np.uint64) << shift
        first = starts >> 3
        min_length = int(lengths64.min())
        lanes = 1 if min_length >= 8 else -(-8 // min_length)
        if lanes == 1:
            acc[first] = words
        else:
            for lane in range(lanes):
                acc[first[lane::lanes]] |= words[lane::lanes]
    columns = acc.astype(">u8").view(np.uint8).reshape(nbytes, 8)
    out = columns[:, 0].copy()
    for k in range(1, min(8, nbytes)):
        out[k:] |= columns[: nbytes - k, k]
    return out, total


class BitWriter:
    """Accumulates bit fields and packs them into bytes (MSB first, zero padded).

    Fields are packed as they are written: the writer keeps a list of byte arrays, and a field
    that starts inside a byte ORs that partial byte into its own first byte. Codes of at most
    57 bits go through :func:`_merge_codes` and :func:`_pack_codes` (no per-bit arrays); longer
    codes (rare: Rice quotients of long gaps, γ codes of values >= 2**28, wide fixed fields)
    are expanded to one byte per bit and packed with ``np.packbits``.
    """

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.length = 0

    def _add_packed(self, packed: np.ndarray, n_bits: int) -> None:
        """Appends a field packed from bit offset ``length % 8`` of its first byte."""
        if n_bits == 0:
            return
        if self.length % 8:
            previous = self._parts[-1]
            packed[0] |= previous[-1]
            self._parts[-1] = previous[:-1]
        self._parts.append(packed)
        self.length += n_bits

    def _add_unpacked(self, bits: np.ndarray) -> None:
        """Appends a field given as one uint8 0/1 per bit."""
        offset = self.length % 8
        if offset:
            bits = np.concatenate([np.zeros(offset, np.uint8), bits])
        self._add_packed(np.packbits(bits), bits.size - offset)

    def bits(self, flags: np.ndarray) -> None:
        """Writes one bit per element (truthy -> 1)."""
        flags = np.asarray(flags).ravel()
        if flags.dtype != np.bool_:
            flags = flags != 0
        self._add_unpacked(flags.view(np.uint8))

    def fixed(self, values: np.ndarray, width: int) -> None:
        """Writes each value in ``width`` bits (``0 <= value < 2**width``)."""
        values = np.asarray(values).ravel()
        if width == 0 or values.size == 0:
            return
        if width == 1:
            self.bits(values)
            return
        if width <= _MAX_PACKED_WIDTH:
            self._add_codes(values, np.full(values.size, width, np.uint8), width)
            return
        nbytes = _container(width)
        self._add_unpacked(_bit_matrix(values, nbytes)[:, 8 * nbytes - width :].ravel())

    def _add_codes(self, values: np.ndarray, widths: np.ndarray, max_width: int) -> None:
        # _WRITE_CHUNK codes at a time: the merge and pack temporaries (up to 8 bytes per code)
        # stay small and cached instead of being fresh, page-faulting memory for long fields.
        for start in range(0, values.size, _WRITE_CHUNK):
            stop = start + _WRITE_CHUNK
            chunk_width = max_width if stop >= values.size and not start else None
            part_widths = widths[start:stop]
            if chunk_width is None:
                chunk_width = int(part_widths.max())
            if chunk_width == 0:
                continue
            codes, lengths = _merge_codes(values[start:stop], part_widths, chunk_width)
            self._add_packed(*_pack_codes(codes, lengths, self.length % 8))

    def unary(self, counts: np.ndarray) -> None:
        """Writes each count ``q >= 0`` as ``q`` zeros followed by a one."""
        counts = np.asarray(counts).ravel()
        if counts.size == 0:
            return
        max_width = int(counts.max()) + 1
        if max_width <= _MAX_PACKED_WIDTH:
            # q zeros and a one are the (q + 1)-bit code of the value 1.
            self._add_codes(np.ones(counts.size, np.uint8), counts + 1, max_width)
            return
        counts = counts.astype(np.int64)
        ends = np.cumsum(counts + 1)
        out = np.zeros(int(ends[-1]), dtype=np.uint8)
        out[ends - 1] = 1
        self._add_unpacked(out)

    def varwidth(self, values: np.ndarray, widths: np.ndarray) -> None:
        """Writes ``values[j]`` in ``widths[j]`` bits (``widths <= 64``, values fit)."""
        values = np.asarray(values).ravel()
        widths = np.asarray(widths).ravel()
        if widths.size == 0:
            return
        max_width = int(widths.max())
        if max_width == 0:
            return
        if max_width <= _MAX_PACKED_WIDTH:
            self._add_codes(values, widths, max_width)
            return
        widths = widths.astype(np.int64)
        values = values.astype(np.uint64)
        out = np.zeros(int(widths.sum()), dtype=np.uint8)
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
        self._add_unpacked(out)

    def gamma(self, values: np.ndarray, exps: np.ndarray | None = None) -> None:
        """Elias-γ codes of ``values >= 1`` in separated order (all prefixes, then mantissas).

        ``exps``, if given, must be :func:`gamma_exponents` of the same ``values`` (a caller
        that already needed the code lengths passes them instead of having them recomputed).
        """
        values = np.asarray(values).ravel()
        if values.size == 0:
            return
        if exps is None:
            exps = gamma_exponents(values)
        n = exps
        if n.dtype == np.uint8:
            # Small values: mantissas in uint8 SIMD passes (see gamma_exponents).
            small = values.astype(np.uint8, copy=False)
            self.unary(n)
            self.varwidth(small - np.left_shift(np.uint8(1), n), n)
            return
        if n.dtype == np.int8:
            # Table exponents (values < 2**16) and int32 arithmetic, no uint64 copy.
            self.unary(n)
            self.varwidth(values.astype(np.int32) - (np.int32(1) << n.astype(np.int32)), n)
            return
        values = values.astype(np.uint64)
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
        if not self._parts:
            return b""
        return b"".join(part.tobytes() for part in self._parts)


def gamma_exponents(values: np.ndarray) -> np.ndarray:
    """``floor(log2 v)`` of integer ``values >= 1``: the Elias-γ exponents, in a narrow dtype.

    The dtype says which path computed them (and :meth:`BitWriter.gamma` follows it): uint8
    for many values below 256 (QSGD levels and the gaps between dense non-zeros: a sum of
    comparisons, all uint8 SIMD passes; a table lookup is a gather per value, several times
    slower), int8 from a table for values below ``2**16``, int64 otherwise.
    """
    values = np.asarray(values).ravel()
    if values.size == 0:
        return np.zeros(0, np.uint8)
    top = int(values.max())
    if top < 256 and values.size > 4096:
        small = values.astype(np.uint8, copy=False)
        n = np.zeros(small.shape, np.uint8)
        for t in range(1, top.bit_length()):
            # The bool mask's uint8 view (0/1) adds without a casting loop.
            n += (small >= (1 << t)).view(np.uint8)
        return n
    if top < _SMALL.size:
        return _SMALL[values]
    return floor_log2_np(values.astype(np.uint64))


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
        return _dense_flatnonzero(values)
    if expected_nonzeros is not None and 16 * expected_nonzeros > values.size:
        return _dense_flatnonzero(values)
    head = values.size - values.size % per_word
    words = _dense_flatnonzero(values[:head].view(np.uint64))
    if 2 * words.size > head // per_word:  # mostly non-zero: expanding would not pay
        return _dense_flatnonzero(values)
    local = _dense_flatnonzero(values[:head].reshape(-1, per_word)[words])
    out = words[local // per_word] * per_word + local % per_word
    if head < values.size:
        out = np.concatenate([out, head + np.flatnonzero(values[head:])])
    return out


def _dense_flatnonzero(values: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` through a boolean mask.

    numpy finds the non-zeros of a bool array without a branch per element, but of an integer
    array with one: on 10M int8 levels half non-zero (QSGD, s=16) the mispredicted branches
    make the direct call ~5x slower than the ``!= 0`` pass plus the bool scan together.
    """
    if values.dtype != np.bool_:
        values = values != 0
    return np.flatnonzero(values)


def gamma_total(values: np.ndarray) -> int:
    """``Σ (2 floor(log2 v) + 1)``: the Elias-γ length of integer ``values >= 1`` together."""
    values = np.asarray(values)
    if values.size and values.max() < _SMALL.size:
        # Table lookups summed in int64 without an int64 copy of the lookups.
        return 2 * int(np.sum(_SMALL[values], dtype=np.int64)) + values.size
    return int(np.sum(2 * floor_log2_np(values) + 1))


# floor(log2(v)) for v < 2**16 (entry 0, never a valid argument, is -1).
_SMALL = (np.frexp(np.arange(1 << 16, dtype=np.float64))[1] - 1).astype(np.int8)

# ----------------------------------------------------------------------------------------------
# Bit reader.

# Bits counted per step when the reader locates the end of a unary field, and prefix bits per
# chunk of the γ decoder (at most that many codes, so its int64 temporaries are 512 KiB).
_SCAN_BITS = 1 << 20
_CHUNK_BITS = 1 << 16


class BitReader:
    """Parses a bit section written by :class:`BitWriter`; every failure is a ``ValueError``."""

    def __init__(self, data: memoryview, what: str) -> None:
        raw = np.frombuffer(data, dtype=np.uint8)
        self._bits = np.unpackbits(raw)
        # The bytes again, 8 zero bytes longer, for 64-bit windows at any byte (varwidth).
        self._bytes = np.concatenate([raw, np.zeros(8, np.uint8)])
        self._pos = 0
        self._what = what

    @property
    def position(self) -> int:
        """Bits consumed so far (a field's length is the difference around its read)."""
        return self._pos

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

    def _ones(self, n: int, max_count: int) -> np.ndarray:
        """Positions (from the read position) of the ``n`` ones ending ``n`` unary codes.

        A valid field spans at most ``n * (max_count + 1)`` bits: never scan beyond. Within
        that limit the scan starts with ``2 n + 64`` bits and doubles, so a field of short
        codes is not scanned together with the (often much longer) rest of the stream.
        """
        remaining = self._bits.size - self._pos
        limit = min(remaining, n * (max_count + 1))
        start, stop, found, parts = 0, min(limit, 2 * n + 64), 0, []
        while True:
            # The field holds n ones: dense fields (QSGD γ prefixes) skip the word scan.
            # The unpacked bits are 0/1 bytes, so their bool view is exact (no `!= 0` pass).
            window = self._bits[self._pos + start : self._pos + stop].view(np.bool_)
            part = flatnonzero(window, n - found)
            parts.append(part + start if start else part)
            found += part.size
            if found >= n or stop == limit:
                break
            start, stop = stop, min(limit, 2 * stop)
        if found < n:
            if limit < remaining:  # n codes within their maxima would fit in the limit
                raise self._fail(f"a unary count exceeds its maximum {max_count}; corrupt.")
            raise self._fail("data is truncated or corrupt (unterminated unary code).")
        return (parts[0] if len(parts) == 1 else np.concatenate(parts))[:n]

    def unary(self, n: int, max_count: int) -> np.ndarray:
        """Reads ``n`` unary counts, each required to be ``<= max_count``."""
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        ones = self._ones(n, max_count)
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

    def gamma(self, n: int, max_value: int, dtype=np.int64) -> np.ndarray:
        """Reads ``n`` Elias-γ codes, each required to be in ``[1, max_value]``.

        The result has ``dtype`` (int64 by default; a narrower integer dtype that holds
        ``max_value`` saves the wide temporaries when values are small).
        """
        if n == 0:
            return np.zeros(0, dtype=dtype)
        max_value = max(int(max_value), 1)
        if max_value < 2**57:
            return self._windowed_gamma(n, max_value).astype(dtype, copy=False)
        exps = self.unary(n, max_value.bit_length() - 1)
        mantissas = self.varwidth(exps)
        values = (np.int64(1) << exps) | mantissas
        if values.max() > max_value:
            raise self._fail(f"an Elias-γ value exceeds its maximum {max_value}; data is corrupt.")
        return values

    def _nth_one(self, n: int, max_count: int) -> int:
        """Offset from the read position of the one that ends the ``n``-th unary code.

        Fails exactly as :meth:`_ones` does. Ones are counted (a SIMD reduction) in windows
        that start at ``2 n + 64`` bits and double, all at most ``_SCAN_BITS``; only the window
        that holds the ``n``-th one is scanned for positions, so no ``n``-sized int64 array of
        positions is made (at ``n = 5M`` one would be 40 MB of fresh, page-faulting memory).
        """
        remaining = self._bits.size - self._pos
        limit = min(remaining, n * (max_count + 1))
        bits = self._bits[self._pos : self._pos + limit].view(np.bool_)
        found, start, step = 0, 0, min(2 * n + 64, _SCAN_BITS)
        while start < limit:
            stop = min(limit, start + step)
            count = np.count_nonzero(bits[start:stop])
            if found + count >= n:
                ones = np.flatnonzero(bits[start:stop])
                return start + int(ones[n - found - 1])
            found, start, step = found + count, stop, min(2 * step, _SCAN_BITS)
        if limit < remaining:  # n codes within their maxima would fit in the limit
            raise self._fail(f"a unary count exceeds its maximum {max_count}; corrupt.")
        raise self._fail("data is truncated or corrupt (unterminated unary code).")

    def _windowed_gamma(self, n: int, max_value: int) -> np.ndarray:
        """:meth:`gamma` for ``max_value < 2**57``, in the narrowest unsigned dtype that fits.

        With ``p_i`` the position of code ``i``'s terminating one in the prefix field, the
        exponents are ``e_i = p_i - p_{i-1} - 1`` and code ``i``'s mantissa starts
        ``p_{i-1} + 1 - i`` bits (the zeros before its own prefix) into the mantissa field: no
        prefix sum. Each mantissa (exponent <= 57 bits) lies in the 2-, 4- or 8-byte
        big-endian window from its first byte.

        The prefix field's end is found first (:meth:`_nth_one`), then the codes are decoded
        ``_CHUNK_BITS`` prefix bits at a time: every int64 temporary is at most 512 KiB, so it
        stays in cache and is reused by the allocator instead of being fresh memory (numpy
        arrays above 32 MiB are mmap-ed and page-fault on first touch, which made the
        whole-field version's passes several times slower than their arithmetic).
        """
        max_count = max_value.bit_length() - 1
        prefix = self._nth_one(n, max_count) + 1  # prefix field length in bits
        first = self._pos + prefix  # the mantissa field's first bit
        mantissa_bits = prefix - n  # Σ e: the zeros of the prefix field
        # Errors in the old order: an over-long unary count is reported before a truncated
        # mantissa field, so a truncated field is only checked for exponents.
        truncated = first + mantissa_bits > self._bits.size
        nbytes = 2 if max_count <= 9 else 4 if max_count <= 25 else 8
        word = np.dtype(f"u{nbytes}")
        out = np.empty(n, _uint_for(max_count + 1))
        if not truncated:
            # The big-endian window at every byte of the field, built from shifted contiguous
            # byte slices (SIMD), then gathered from that native array: a gather straight from
            # an overlapping byte-swapped view takes numpy's slow non-contiguous path.
            lo = first >> 3
            field = self._bytes[lo : (first + mantissa_bits) // 8 + 1 + nbytes].astype(word)
            span = field.size - nbytes + 1
            windows = field[:span] << word.type(8 * (nbytes - 1))
            for k in range(1, nbytes):
                windows |= field[k : k + span] << word.type(8 * (nbytes - 1 - k))
        prefix_bits = self._bits[self._pos : first].view(np.bool_)
        index = np.arange(min(n, _CHUNK_BITS), dtype=np.int64)
        direct = out.dtype == word
        done, last, top_value = 0, -1, 0
        for start in range(0, prefix, _CHUNK_BITS):
            # Positions within the chunk; `start` only enters through scalars.
            ones = np.flatnonzero(prefix_bits[start : start + _CHUNK_BITS])
            k = ones.size
            if k == 0:  # a run of _CHUNK_BITS zeros: the next chunk's first exponent fails
                continue
            # after[i] = p_{i-1} + 1 (chunk-relative), so e_i = p_i - after[i].
            after = np.empty(k, np.int64)
            after[0] = last + 1 - start
            np.add(ones[:-1], 1, out=after[1:])
            last = start + int(ones[-1])
            exps = ones
            exps -= after
            top_exp = int(exps.max())
            if top_exp > max_count:
                message = f"a unary count exceeds its maximum {max_count}; data is corrupt."
                raise self._fail(message)
            if truncated:
                continue
            # starts = first + p_{i-1} + 1 - i, each mantissa's bit counted from byte lo.
            starts = after
            starts += start + first - done - 8 * lo
            starts -= index[:k]
            window = np.take(windows, starts >> 3)
            # Shifting the window left by the bit offset drops the bits before the mantissa;
            # shifting right by 8 nbytes - e keeps its e bits (numpy gives 0 for e = 0).
            window <<= (starts & 7).astype(word)
            width = exps.astype(word)
            window >>= word.type(8 * nbytes) - width
            # Straight into the output when it has the window's dtype (no copy pass).
            values = out[done : done + k] if direct else np.empty(k, word)
            np.left_shift(word.type(1), width, out=values)
            values |= window
            # Below the largest exponent every value is < 2**max_count <= max_value.
            if top_exp == max_count:
                top_value = max(top_value, int(values.max()))
            if not direct:
                out[done : done + k] = values
            done += k
        self._pos = first
        self._take(mantissa_bits)  # bounds check (raises if truncated) and advance
        if top_value > max_value:
            raise self._fail(f"an Elias-γ value exceeds its maximum {max_value}; data is corrupt.")
        return out

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
