"""QSGD stochastic quantization (Alistarh et al., 2017), the quantizer of FedPAQ."""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_lab.compressors import _bernoulli, _codec, _leafwise, _once, _select
from fedjax_lab.compressors._base import (
    Compressor,
    TreeLayout,
    check_array,
    host,
    poison,
    tree_layout,
)

_MAX_LEVELS = 2**15 - 1


def _level_dtype(num_levels: int) -> np.dtype:
    return np.dtype(np.int8) if num_levels <= 127 else np.dtype(np.int16)


@struct.dataclass
class QSGDPayload:
    """Bucket norms and signed integer levels ``sign(x_i) * l_i`` with ``0 <= l_i <= s``."""

    norms: jax.Array  # float32[num_buckets]
    levels: jax.Array  # int8/int16[d]
    layout: TreeLayout = struct.field(pytree_node=False)
    num_levels: int = struct.field(pytree_node=False)
    bucket_size: int = struct.field(pytree_node=False)  # effective size, >= 1

    @property
    def num_buckets(self) -> int:
        return -(-self.layout.size // self.bucket_size)

    @property
    def flag_bits(self) -> int:
        return 1 if self.layout.size else 0

    @property
    def dense_max(self) -> int:
        # Per coordinate: γ(l + 1) <= 2 floor(log2(s + 1)) + 1 bits, plus one sign bit.
        return self.layout.size * (2 * (self.num_levels + 1).bit_length())

    @property
    def sparse_max(self) -> int:
        # Count, plus Σ γ(run + 1) <= 2 d (as 2 floor(log2(r + 1)) <= 2 r and Σ runs <= d),
        # plus per non-zero a sign bit and γ(l) <= 2 floor(log2 s) + 1 bits.
        d = self.layout.size
        return _codec.count_width(d) + 2 * d + d * (2 * self.num_levels.bit_length())

    @property
    def max_bits(self) -> int:
        return 32 * self.num_buckets + _codec.pad8(self.flag_bits + self.dense_max)

    def check(self) -> None:
        check_array(self.norms, (self.num_buckets,), np.float32, "qsgd payload.norms")
        check_array(
            self.levels,
            (self.layout.size,),
            _level_dtype(self.num_levels),
            "qsgd payload.levels",
        )


def _check_max_bits(payload_like: QSGDPayload) -> None:
    # The jit-side bit count evaluates both codings, so both must fit in int32.
    worst = 32 * payload_like.num_buckets + _codec.pad8(
        payload_like.flag_bits + max(payload_like.dense_max, payload_like.sparse_max)
    )
    _codec.check_int32_bits(worst, "qsgd")


def _buckets(vector: jax.Array, bucket_size: int) -> jax.Array:
    d = vector.shape[0]
    num_buckets = -(-d // bucket_size)
    return jnp.pad(vector, (0, num_buckets * bucket_size - d)).reshape(num_buckets, bucket_size)


def qsgd(
    num_levels: int,
    bucket_size: int | None = None,
    *,
    rounding_bits: int | str | None = None,
) -> Compressor:
    """QSGD: unbiased stochastic quantization to ``s`` levels per sign.

    Alistarh, Grubic, Li, Tomioka, Vojnovic (2017), "QSGD: Communication-Efficient SGD via
    Gradient Quantization and Encoding", NeurIPS; the low-precision quantizer of FedPAQ
    (Reisizadeh et al., 2020, AISTATS, Example 1). For ``x`` in R^d (the update leaves
    concatenated, or each bucket of ``bucket_size`` consecutive coordinates):

        Q_s(x)_i = ‖x‖₂ · sign(x_i) · ξ_i(x, s),   ξ_i = (l + Bernoulli(s|x_i|/‖x‖ - l)) / s,

    with ``l = floor(s|x_i|/‖x‖)``. It is unbiased and
    ``E‖Q(x) - x‖² = (‖x‖²/s²) Σ τ_i(1 - τ_i) <= min(d/s², √d/s) ‖x‖²`` with
    ``τ_i = frac(s|x_i|/‖x‖)`` (per bucket with bucketing, ``d`` = bucket size).

    Wire format (QSGD §3.2): one float32 norm per bucket, then a one-bit mode flag followed by
    the shorter of two Elias-γ codings of the levels (ties go to the dense one):

    * dense: ``γ(l_i + 1)`` for every coordinate, and a sign bit for each non-zero level;
    * sparse (wins for small ``s``): the number of non-zeros, and for each non-zero the
      Elias-γ code of (zeros skipped + 1), a sign bit and ``γ(l_i)``.

    Norms are computed with max-scaling, so tiny and huge (finite) coordinates do not
    under/overflow; ``s|x_i|/‖x‖`` is capped at ``s`` because rounding can put it one ulp above.

    Args:
      num_levels: ``s``, an int in ``[1, 32767]`` (levels are stored as int8 for ``s <= 127``,
        int16 above).
      bucket_size: quantize consecutive buckets of this many coordinates, each with its own
        norm; ``None`` uses one bucket for the whole update.
      rounding_bits: random bits behind each coordinate's ``Bernoulli(s|x_i|/‖x‖ - l)``.
        ``None`` (default; the outputs of earlier versions for a given key): one float32
        uniform per coordinate, ``P(round up)`` exact to ``2**-23``. ``16`` or ``8``: a
        16/8-bit uniform plus a 32-bit tie breaker shared by 16 coordinates, 1.8x/3.2x less
        threefry work (not faster end to end on XLA:CPU, where the default's unrolled hash
        fuses with the rounding: ``benchmarks/rounding_ab.py``); ``P(round up)`` is exact to
        ``2**-(k+32)`` (exact for every ``s|x_i|/‖x‖ >= 2**-(k+9)``), so unbiasedness and
        the variance above hold as for independent draws, while coordinates of a tie-breaker
        group are correlated by at most ``1/(2**k - 1)`` (see
        ``fedjax_lab.compressors._bernoulli.bernoulli`` for the proof).
        ``"hash"``: a counter-based hash (murmur3's finaliser) of the coordinate index and 64
        threefry bits per call instead of any per-coordinate threefry work; ``P(round up)``
        is exact to ``2**-64`` (exact for every ``s|x_i|/‖x‖ - l >= 2**-41``), so
        unbiasedness, ``E‖Q(x) - x‖²`` and ``E‖Q(x)‖₀`` (hence the expected-bits bound) are
        those of independent draws, but the draws of one vector are NOT independent (proof
        and caveats in ``fedjax_lab.compressors._bernoulli.hash_bernoulli``). With one bucket
        it also encodes leaf by leaf (no flat float vector), which sums ``‖x‖²`` per leaf:
        the norm may differ from the default path's in the last bit.

    Returns:
      A stateless :class:`Compressor`.
    """
    if isinstance(num_levels, bool) or not isinstance(num_levels, numbers.Integral):
        raise TypeError(f"qsgd: num_levels must be an int, got {num_levels!r}.")
    if not 1 <= num_levels <= _MAX_LEVELS:
        raise ValueError(f"qsgd: num_levels={num_levels} must be in [1, {_MAX_LEVELS}].")
    if bucket_size is not None and (
        isinstance(bucket_size, bool)
        or not isinstance(bucket_size, numbers.Integral)
        or bucket_size < 1
    ):
        raise ValueError(f"qsgd: bucket_size must be None or an int >= 1, got {bucket_size!r}.")
    _bernoulli.check_rounding_bits(rounding_bits, "qsgd")
    s = int(num_levels)
    level_dtype = _level_dtype(s)

    def _shell(layout: TreeLayout) -> QSGDPayload:
        bucket = int(bucket_size) if bucket_size is not None else max(layout.size, 1)
        shell = QSGDPayload(None, None, layout, s, bucket)
        _check_max_bits(shell)
        return shell

    def init(params):
        _shell(tree_layout(params, what="qsgd.init(params)"))
        return ()

    def encode_hashed_leafwise(updates, layout, shell, key):
        # rounding_bits="hash" with one bucket: the same formulas leaf by leaf, with no flat
        # float vector (the hash draws depend only on the coordinate index, so each leaf draws
        # its own coordinates); the only difference from the flat path is the summation order
        # of ‖x‖² (per leaf, then across leaves).
        parts = _leafwise.leaves(layout, updates)
        finite = _leafwise.all_finite(parts)
        peak = _leafwise.peak(parts)
        safe = jnp.where(peak > 0, peak, 1.0)
        # (-x / peak)² and |x / peak| are the values of (|x| / peak)² and |x| / peak (division
        # and squaring are sign-symmetric), written so that the peak's |x|, the squares and
        # the levels share no subexpression: XLA writes a shared one out as a d-long vector
        # (|x| and x / peak were two extra passes, 34 -> 27 ms per 10M round trip), where
        # each of the three now reads x itself.
        squares = [jnp.sum(jnp.square(-part / safe)) for part in parts if part.size]
        scaled_norm = jnp.sqrt(functools.reduce(jnp.add, squares, jnp.float32(0.0)))
        divisor = jnp.where(scaled_norm > 0, scaled_norm, 1.0)
        key_words = _bernoulli.hash_keys(key)
        levels = []
        for offset, part in zip(layout.offsets, parts, strict=True):
            ratio = jnp.minimum(s * jnp.abs(part / safe) / divisor, float(s))
            lower = jnp.floor(ratio)
            level = lower + _bernoulli.hashed_draws(key_words, ratio - lower, offset)
            level = jnp.where(jnp.isfinite(ratio), level, 0.0)
            levels.append(jnp.where(part < 0, -level, level).astype(level_dtype))
        norms = poison(jnp.reshape(peak * scaled_norm, (1,)), finite)
        levels = _leafwise.concat_into(layout, levels, level_dtype)
        return QSGDPayload(norms, levels, layout, s, shell.bucket_size)

    def encode(updates, state, *, key):
        layout = tree_layout(updates, what="qsgd.encode(updates)")
        shell = _shell(layout)
        if rounding_bits == _bernoulli.HASH and shell.num_buckets == 1:
            return encode_hashed_leafwise(updates, layout, shell, key), state
        x = layout.flatten(updates)
        finite = _leafwise.all_finite([x])
        buckets = _buckets(x, shell.bucket_size)
        peak = jnp.max(jnp.abs(buckets), axis=1, keepdims=True, initial=0.0)
        # x_i / peak in [-1, 1]: no under/overflow. Squared without the abs (the same squares,
        # as division and squaring are sign-symmetric), so each reduction reads x itself and
        # no |x| vector is written for the two of them to share.
        scaled = buckets / jnp.where(peak > 0, peak, 1.0)
        scaled_norm = jnp.sqrt(jnp.sum(scaled * scaled, axis=1, keepdims=True))

        def signed_levels(key, buckets, peak, scaled_norm):
            magnitude = jnp.abs(buckets)
            scaled = magnitude / jnp.where(peak > 0, peak, 1.0)
            ratio = s * scaled / jnp.where(scaled_norm > 0, scaled_norm, 1.0)
            ratio = jnp.minimum(ratio, float(s))
            lower = jnp.floor(ratio)
            level = lower + _bernoulli.bernoulli(key, ratio - lower, rounding_bits)
            level = jnp.where(jnp.isfinite(ratio), level, 0.0)
            return jnp.where(buckets < 0, -level, level).astype(level_dtype)

        # The payload, decode and bits all read the levels: evaluate the random draws once.
        signed = _once.computed_once(finite, signed_levels, key, buckets, peak, scaled_norm)
        norms = poison((peak * scaled_norm)[:, 0], finite)
        payload = QSGDPayload(
            norms, signed.reshape(-1)[: layout.size], layout, s, shell.bucket_size
        )
        return payload, state

    def decode(payload: QSGDPayload):
        payload.check()
        if payload.num_buckets == 1:  # leaf by leaf: the same products, no flat float vector
            scale = payload.norms[0] / s
            return _leafwise.unflatten_map(
                payload.layout, payload.levels, lambda v: v.astype(jnp.float32) * scale
            )
        # Each coordinate's bucket scale, leaf by leaf (the same products as scaling the
        # (buckets, bucket_size) matrix, without its padded copy and flat float vector).
        scales = jnp.repeat(payload.norms / s, payload.bucket_size)
        layout = payload.layout
        leaves = [
            (payload.levels[o : o + n].astype(jnp.float32) * scales[o : o + n])
            .reshape(shape)
            .astype(dtype)
            for o, n, shape, dtype in zip(
                layout.offsets, layout.sizes, layout.shapes, layout.dtypes, strict=True
            )
        ]
        return jax.tree.unflatten(layout.treedef, leaves)

    def bits(payload: QSGDPayload) -> jax.Array:
        payload.check()
        d = payload.layout.size
        total = jnp.int32(32 * payload.num_buckets)
        if d == 0:
            return total
        dense, sparse = _stream_lengths_jit(payload.levels, s)
        stream = payload.flag_bits + jnp.minimum(dense, sparse)
        return total + _codec.padded(stream)

    return Compressor(init, encode, decode, bits, _to_bytes, _from_bytes)


def _stream_lengths_jit(levels: jax.Array, s: int) -> tuple[jax.Array, jax.Array]:
    """Dense and sparse stream lengths (int32) of int8/int16 ``levels`` in ``[-s, s]``.

    The per-coordinate sums behind them, from exponent sums as in :func:`_stream_lengths`
    (``dense = d + n + 2 Σ e(m + 1)``, ``sparse = count + 3 n + 2 (Σ e(gap) + Σ e(m))`` with
    ``e = floor(log2)``, ``m = |l|``), are taken over packed words, never over ``d`` int32
    values: on XLA:CPU a reduction whose input is integer arithmetic runs as a scalar loop
    (~13 ms per 10M coordinates each, ~60 ms for the former three), while the element-wise
    word work below vectorises and its reductions see ``d / 32`` values.

    * ``n`` and ``Σ e(gap)``: popcounts of the packed non-zero flags (:func:`_gap_exponents`).
    * ``Σ e(m + 1) = Σ_{k>=1} #{m_i >= 2**k - 1}`` and ``Σ_{m>0} e(m) = Σ_{k>=1} #{m_i >= 2**k}``
      (``e(v) = #{k >= 1: 2**k <= v}``), thresholds up to ``s`` only, as ``m_i <= s``: the
      levels are read 4 (int8) or 2 (int16) to a uint32 word and each threshold is one
      lane-wise add and mask (:func:`_threshold_counts`).

    Levels outside ``[-s, s]`` (never produced by ``encode``; ``to_bytes`` rejects them) give
    unspecified lengths.
    """
    d = levels.shape[0]
    words = _select._pack_words(levels != 0)
    dense_thresholds = [2**k - 1 for k in range(1, 16) if 2**k - 1 <= s]
    sparse_thresholds = [2**k for k in range(1, 16) if 2**k <= s]
    per_word = jnp.stack(
        [
            jax.lax.population_count(words).astype(jnp.int32),
            _threshold_counts(levels, dense_thresholds),
            _threshold_counts(levels, sparse_thresholds) + _gap_exponents(words),
        ]
    )
    n, dense_exponents, sparse_exponents = jnp.sum(per_word, axis=1)
    dense = d + n + 2 * dense_exponents
    sparse = _codec.count_width(d) + 3 * n + 2 * sparse_exponents
    return dense, sparse


def _threshold_counts(levels: jax.Array, thresholds: list[int]) -> jax.Array:
    """``Σ_j #{|l_i| >= thresholds[j]}`` per 32 coordinates (int32[ceil(d / 32)]).

    SWAR: the levels are bit-cast 4 (int8) or 2 (int16) to a uint32 word, one ``w``-bit lane
    each. A lane's magnitude is ``(l xor 0...0) + 0`` or ``(l xor 1...1) + 1 = -l``: both stay
    inside the lane as ``|l| <= s < 2**(w-1)``. Then ``|l| >= c`` is the top bit of
    ``|l| + 2**(w-1) - c < 2**w`` (no carry out of the lane either). The per-lane counts
    (at most 15 thresholds) are summed across lanes by one multiply (the top lane of
    ``acc * 0x01010101`` / ``* 0x00010001`` is the lane sum, < 2**w: no carries).
    """
    d = levels.shape[0]
    num_words = -(-d // 32)
    lanes = 4 if levels.dtype == jnp.int8 else 2
    width = 32 // lanes
    padded = jnp.pad(levels, (0, 32 * num_words - d)).reshape(num_words * 32 // lanes, lanes)
    words = jax.lax.bitcast_convert_type(padded, jnp.uint32).reshape(num_words, 32 // lanes)
    ones = jnp.uint32(sum(1 << (width * j) for j in range(lanes)))
    sign = (words >> (width - 1)) & ones
    magnitude = (words ^ (sign * jnp.uint32((1 << width) - 1))) + sign
    acc = jnp.zeros_like(magnitude)
    for c in thresholds:
        biased = magnitude + ones * jnp.uint32((1 << (width - 1)) - c)
        acc = acc + ((biased >> (width - 1)) & ones)
    lane_sums = (acc * ones) >> (32 - width)
    return jnp.sum(lane_sums, axis=1, dtype=jnp.uint32).astype(jnp.int32)


def _gap_exponents(words: jax.Array) -> jax.Array:
    """``Σ e(i - previous non-zero)`` over the non-zeros ``i`` of each word (int32[words]).

    ``words`` are packed non-zero flags (bit ``j`` of word ``w`` is coordinate ``32 w + j``);
    the previous non-zero of the first one is position ``-1``, as in the wire format.

    ``e(gap) = #{k >= 1: gap >= 2**k}``, and ``gap >= 2**k`` says the ``2**k - 1`` coordinates
    just below are zero. For every non-zero but the lowest of its word (``w & (w - 1)``) the
    previous non-zero is in the same word, so gaps are below 32 (``k <= 4``) and the windows are
    ands of the zero flags shifted up (``C_a & (C_b << a)`` widens a window of ``a`` to
    ``a + b``; bits shifted in from below 0 read as "not zero", right as the previous non-zero
    lies in the word). The lowest non-zero of a word takes its gap from the highest non-zero
    of the earlier words: a cumulative max over ``d / 32`` word positions, no per-coordinate
    scan.
    """
    zero = ~words
    c1 = zero << 1
    c2 = c1 & (c1 << 1)
    c3 = c1 & (c2 << 1)
    c4 = c2 & (c2 << 2)
    c7 = c3 & (c4 << 3)
    c8 = c4 & (c4 << 4)
    c15 = c7 & (c8 << 7)
    rest = words & (words - jnp.uint32(1))
    within = sum(jax.lax.population_count(rest & c).astype(jnp.int32) for c in (c1, c3, c7, c15))
    index = jnp.arange(words.shape[0], dtype=jnp.int32)
    top = jnp.where(words != 0, 32 * index + _codec.floor_log2(words), -1)
    before = jnp.concatenate([jnp.full((1,), -1, jnp.int32), jax.lax.cummax(top)[:-1]])
    lowest = jax.lax.population_count((words & (~words + jnp.uint32(1))) - jnp.uint32(1))
    first_gap = 32 * index + lowest.astype(jnp.int32) - before
    return within + jnp.where(words != 0, _codec.floor_log2(jnp.maximum(first_gap, 1)), 0)


def _host_streams(
    levels: np.ndarray, d: int, nonzero_pos: np.ndarray | None = None
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Dense/sparse stream lengths (exactly as ``bits``), non-zero positions and run lengths.

    The histogram form, kept as the reference that tests hold :func:`_stream_lengths` (what the
    codec uses) to.

    Work over all ``d`` levels is one ``flatnonzero`` (skipped when the caller already has the
    ascending non-zero positions); the rest is per non-zero (zero levels cost ``γ(1) = 1`` bit
    each in the dense coding and nothing in the sparse one).
    """
    if nonzero_pos is None:
        nonzero_pos = _codec.flatnonzero(levels)
    # Magnitudes are at most s: their code lengths come from a histogram (one pass, no
    # per-non-zero int64 temporaries), γ(l + 1) for the dense and γ(l) for the sparse coding.
    counts = np.bincount(np.abs(levels[nonzero_pos].astype(np.int32)))
    magnitude = np.arange(counts.size)
    gamma_of_next = 2 * _codec.floor_log2_np(magnitude + 1) + 1
    gamma_of_level = 2 * _codec.floor_log2_np(np.maximum(magnitude, 1)) + 1
    runs = np.diff(nonzero_pos, prepend=-1) - 1
    n = nonzero_pos.size
    dense = (d - n) + int(counts @ gamma_of_next) + n
    sparse = _codec.count_width(d) + _codec.gamma_total(runs + 1) + n + int(counts @ gamma_of_level)
    return dense, sparse, nonzero_pos, runs


def _one_below_powers_of_two(magnitudes: np.ndarray) -> int:
    """How many magnitudes ``m >= 1`` have ``m + 1`` a power of two (``m & (m + 1) == 0``)."""
    return int(np.count_nonzero((magnitudes & (magnitudes + magnitudes.dtype.type(1))) == 0))


def _stream_lengths(
    d: int, n: int, gap_exp_sum: int, magnitude_exp_sum: int, one_below_pow2: int
) -> tuple[int, int]:
    """Dense and sparse stream lengths (exactly ``_host_streams``'s) from exponent sums.

    With ``n`` non-zeros, ``e(v) = floor(log2 v)`` and the identity
    ``e(m + 1) = e(m) + [m + 1 is a power of two]`` (``one_below_pow2`` counts those ``m``):

    * dense ``= (d - n) + Σ γ(m + 1) + n = d + n + 2 (Σ e(m) + one_below_pow2)``;
    * sparse ``= count + Σ (γ(gap) + 1 + γ(m)) = count + 3 n + 2 (Σ e(gap) + Σ e(m))``.

    The writer computes the exponents anyway and the reader gets the sums from its field
    lengths (a γ field of ``n`` codes is ``n + 2 Σ e`` bits), so choosing (or checking) the
    coding costs one pass over the magnitudes instead of a histogram (a gather and a scatter
    per non-zero).
    """
    dense = d + n + 2 * (magnitude_exp_sum + one_below_pow2)
    sparse = _codec.count_width(d) + 3 * n + 2 * (gap_exp_sum + magnitude_exp_sum)
    return dense, sparse


def _exp_sum(exps: np.ndarray) -> int:
    return int(np.sum(exps, dtype=np.int64))


# Coordinates per chunk of the scan for non-zeros: its int64 positions (at most
# 8 MiB) are reused memory, where whole-vector positions (8 bytes per non-zero, 40 MB at 5M)
# would be fresh, page-faulting memory on every call.
_NONZERO_CHUNK = 1 << 20


def _nonzeros(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gaps and the values of the non-zeros of ``levels``, in order.

    The gaps are ``p_i - p_{i-1}`` (``p_0 + 1`` first), the runs of zeros + 1 that the sparse
    coding sends: uint32 (``d < 2**31``), or uint8 when all are below 256, so the γ writer's
    exponent and mantissa passes read one byte per gap. Values keep the levels' dtype.
    """
    gap_parts, value_parts = [], []
    last, top, expected = -1, 0, None
    for start in range(0, levels.size, _NONZERO_CHUNK):
        block = levels[start : start + _NONZERO_CHUNK]
        # The previous block's count picks flatnonzero's path for this one (its word scan
        # only pays on sparse levels); no separate counting pass over the levels.
        positions = _codec.flatnonzero(block, expected)
        k = positions.size
        expected = k
        if not k:
            continue
        value_parts.append(block[positions])
        positions += start
        gaps = np.empty(k, np.uint32)
        gaps[0] = positions[0] - last
        gaps[1:] = np.diff(positions)
        top = max(top, int(gaps.max()))
        gap_parts.append(gaps)
        last = int(positions[-1])
    if not gap_parts:
        return np.zeros(0, np.uint32), np.zeros(0, levels.dtype)
    # One pass joins the parts and, when every gap is below 256, narrows them.
    gap_dtype = np.uint8 if top < 256 else np.uint32
    gaps = np.concatenate(gap_parts, dtype=gap_dtype, casting="unsafe")
    return gaps, np.concatenate(value_parts)


def _unsigned(values: np.ndarray) -> np.ndarray:
    """``|values|`` of int8/int16 levels in [-s, s] (never the minimum) as uint8/uint16."""
    return np.abs(values).view(f"u{values.dtype.itemsize}")


def _check_canonical(
    norms: np.ndarray,
    levels: np.ndarray,
    payload: QSGDPayload,
    who: str,
    nonzero_pos: np.ndarray | None,
):
    """Rejects out-of-range levels, negative norms and non-zero levels under a zero norm.

    ``nonzero_pos`` are the non-zeros of ``levels`` if the caller has them (``None``: found
    here, and only when some norm is zero).
    """
    s = payload.num_levels
    if levels.size and (int(levels.min()) < -s or int(levels.max()) > s):
        raise ValueError(f"{who}: qsgd levels must be in [-{s}, {s}].")
    if np.any(np.signbit(norms)):
        raise ValueError(f"{who}: qsgd norms must be >= +0.")
    if not np.any(norms == 0):
        return
    if nonzero_pos is None:
        nonzero_pos = _codec.flatnonzero(levels)
    if np.any(norms[nonzero_pos // payload.bucket_size] == 0):
        raise ValueError(f"{who}: a bucket with norm 0 has non-zero levels (not canonical).")


# Non-zeros per chunk of the sparse decoder's scatter: its int64 positions (1 MiB) stay in
# cache, where whole-vector positions would be 8 bytes per non-zero of fresh memory.
_SCATTER_CHUNK = 1 << 17


def _scatter_sparse(
    levels: np.ndarray, gaps: np.ndarray, magnitudes: np.ndarray, negative: np.ndarray
) -> None:
    """``levels[p_i] = ±magnitudes[i]`` with ``p_i = Σ_{j<=i} gaps[j] - 1``, chunk by chunk.

    The caller has checked that the positions are below ``levels.size``. Signs are applied as
    ``(m ^ -b) + b`` (two's complement negation when ``b = 1``): SIMD passes in the level
    dtype, where ``np.negative(where=...)`` takes a masked, element-at-a-time loop.
    """
    level_dtype = levels.dtype
    signed_magnitudes = magnitudes.view(level_dtype)  # magnitudes <= s fit the signed dtype
    flags = negative.view(np.int8).astype(level_dtype, copy=False)
    carry = -1  # position of the previous non-zero
    for start in range(0, gaps.size, _SCATTER_CHUNK):
        stop = start + _SCATTER_CHUNK
        # Widened first: a uint32 -> int64 cumsum takes a casting loop, ~2.5x slower.
        positions = gaps[start:stop].astype(np.int64)
        np.cumsum(positions, out=positions)
        positions += carry
        carry = int(positions[-1])
        flag = flags[start:stop]
        levels[positions] = (signed_magnitudes[start:stop] ^ -flag) + flag


def _to_bytes(payload: QSGDPayload) -> bytes:
    payload.check()
    norms, levels = host(payload.norms), host(payload.levels)
    head = _codec.floats_to_bytes(norms, "qsgd payload.norms")
    _check_canonical(norms, levels, payload, "to_bytes", None)
    d = payload.layout.size
    writer = _codec.BitWriter()
    if d:
        # One scan for the non-zeros, shared by both stream lengths and the writer.
        gaps, nonzero = _nonzeros(levels)
        magnitudes = _unsigned(nonzero)
        magnitude_exps = _codec.gamma_exponents(magnitudes)
        gap_exps = _codec.gamma_exponents(gaps)
        dense, sparse = _stream_lengths(
            d,
            nonzero.size,
            _exp_sum(gap_exps),
            _exp_sum(magnitude_exps),
            _one_below_powers_of_two(magnitudes),
        )
        use_sparse = sparse < dense
        writer.bits(np.array([use_sparse]))
        if use_sparse:
            writer.fixed(np.array([nonzero.size]), _codec.count_width(d))
            writer.gamma(gaps, gap_exps)
            writer.gamma(magnitudes, magnitude_exps)
        else:
            # |l| + 1 in the levels' own width (|l| <= s <= 2**15 - 1, validated above): the
            # writer's small-value path then runs in uint8 without an int64 copy of d values.
            dense_magnitudes = _unsigned(levels)
            writer.gamma(dense_magnitudes + dense_magnitudes.dtype.type(1))
        writer.bits(nonzero < 0)
    return head + writer.to_bytes()


def _from_bytes(data: bytes, template: QSGDPayload) -> QSGDPayload:
    template.check()
    layout, s = template.layout, template.num_levels
    d, nb = layout.size, template.num_buckets
    view = _codec.check_length(
        data, 4 * nb + template.flag_bits, template.max_bits // 8, "qsgd payload"
    )
    norms = _codec.floats_from_bytes(view, 0, nb, "qsgd payload.norms")
    reader = _codec.BitReader(view[4 * nb :], "qsgd payload")
    level_dtype = _level_dtype(s)
    levels = np.zeros(d, dtype=level_dtype)
    if d:
        use_sparse = bool(reader.bits(1)[0])
        if use_sparse:
            n = int(reader.fixed(1, _codec.count_width(d))[0])
            if n > d:
                raise ValueError(f"from_bytes: qsgd payload: {n} non-zeros for d={d}; corrupt.")
            start = reader.position
            # Gaps as uint32 (d < 2**31); positions (their prefix sums) are only formed chunk by
            # chunk in _scatter_sparse. Gaps are >= 1, so the last position is the largest.
            gaps = reader.gamma(n, d, dtype=np.uint32)
            if n and int(np.sum(gaps, dtype=np.uint64)) > d:
                raise ValueError("from_bytes: qsgd payload: a position is out of range; corrupt.")
            # A γ field of n codes is n + 2 Σ e bits: the exponent sums without a pass.
            gap_exp_sum = (reader.position - start - n) // 2
            start = reader.position
            magnitudes = reader.gamma(n, s, dtype=np.dtype(f"u{level_dtype.itemsize}"))
            magnitude_exp_sum = (reader.position - start - n) // 2
        else:
            # uint8 codes when s + 1 < 256 (l + 1 - 1 <= 254 cannot wrap), int64 otherwise.
            narrow = np.uint8 if s + 1 < 256 else np.int64
            levels = (reader.gamma(d, s + 1, dtype=narrow) - narrow(1)).astype(level_dtype)
            # The levels are the magnitudes so far: one chunked scan gives the gaps and
            # magnitudes of the non-zeros (for the stream-length check and the signs).
            gaps, magnitudes = _nonzeros(levels)
            magnitudes = _unsigned(magnitudes)
            n = magnitudes.size
            gap_exp_sum = _exp_sum(_codec.gamma_exponents(gaps))
            magnitude_exp_sum = _exp_sum(_codec.gamma_exponents(magnitudes))
        # The reader's bits are 0/1 bytes: their bool view is exact (no copy).
        negative = reader.bits(n).view(np.bool_)
        # Both codings: the gaps are >= 1 and every magnitude is >= 1, so the n signed
        # magnitudes land exactly on the non-zeros (the dense branch rewrites them signed).
        _scatter_sparse(levels, gaps, magnitudes, negative)
    else:
        n, use_sparse = 0, False
    reader.finish()
    payload = QSGDPayload(norms, levels, layout, s, template.bucket_size)
    _check_canonical(norms, levels, payload, "from_bytes", None)
    if d:
        dense, sparse = _stream_lengths(
            d,
            n,
            gap_exp_sum,
            magnitude_exp_sum,
            _one_below_powers_of_two(magnitudes),
        )
        if use_sparse != (sparse < dense):
            raise ValueError("from_bytes: qsgd payload uses the longer of the two codings.")
    return payload
