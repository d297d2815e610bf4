"""Exact top-k selection without sorting: a radix threshold, then bit-word compaction.

``lax.top_k`` over a whole update is a partial sort (O(d log k), single threaded on XLA:CPU).
Top-k sparsifiers only need the *set* of the ``k`` largest scores, in ascending index order,
with ties broken towards the lower index. This module finds it in O(d) passes:

1. Scores map to ``uint32`` keys whose unsigned order is the IEEE total order of the floats
   (``-0.0`` below ``+0.0``), the order ``lax.top_k`` uses.
2. The k-th largest key ``T`` is bracketed from a strided sample of ~32768 keys (one small
   histogram of their high 16 bits): two passes over packed flag words count the keys above
   and inside the bracket, its keys are compacted into a buffer, and two 65536-bin histograms
   of the buffer (high, then low 16 bits) give ``T`` exactly. When the bracket provably misses
   ``T`` or holds too many keys (adversarial or heavily tied data), the same two-digit radix
   selection runs on histograms of every key instead, so the result never depends on the
   sample, only the time does.
3. The result is every index with ``key > T`` plus the first ``k - count(key > T)`` indices
   with ``key == T``, read out of 32-bit words of flags (one word per 32 coordinates) in
   ascending order. With a bracket, those words are the words of ``key > hi`` (its first
   counting pass) plus one bit per selected buffer entry; without, two more passes over every
   key flag ``key > T`` and ``key == T``.

The score may come in parts (:func:`top_k_parts`, e.g. one per leaf of an update): every pass
then runs over the parts, whose flag words are concatenated in a *padded index space* where each
part starts at a multiple of 32, so the update is never flattened into one d-long vector (on
XLA:CPU writing that vector costs more than the selection's own passes at 10M coordinates).

The output equals ``jnp.sort(lax.top_k(score, k)[1])`` for NaN-free scores (tests pin this on
adversarial inputs). NaN scores are ordered above every number (their bit patterns are clamped
to one key); callers poison their payload on non-finite input anyway.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.compressors import _leafwise, _once

_DIGIT = 16  # bits per radix digit: two digits cover a 32-bit key
_BINS = 1 << _DIGIT
_TOP = np.uint32(0xFFFFFFFF)  # NaN keys are clamped below this
# From this many coordinates on, "auto" selects by radix histograms (see top_k_indices).
RADIX_MIN_SIZE = 1 << 14
# Keys sampled to bracket the threshold (see _sample_bracket).
_SAMPLE = 1 << 15
# Up to this many flag words, _expand finds the non-zero ones with jnp.nonzero.
_DIRECT_WORDS = 1 << 12


def sortable_keys(score: jax.Array) -> jax.Array:
    """``uint32`` keys in the IEEE total order of NaN-free float32 (``-0.0 < +0.0``)."""
    bits = jax.lax.bitcast_convert_type(score.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    keys = jnp.where(negative, ~bits, bits | np.uint32(0x80000000))
    return jnp.minimum(keys, _TOP - 1)


def _histogram(digits: jax.Array) -> jax.Array:
    """Counts of each digit in ``[0, 65536)``; digits outside are dropped."""
    return jnp.zeros((_BINS,), jnp.int32).at[digits].add(1, mode="drop")


def _digit_of_rank(hist: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Digit holding the ``rank``-th largest element (1-based) and the count above it."""
    above = jnp.cumsum(hist[::-1])[::-1] - hist  # elements in strictly higher bins
    digit = jnp.max(jnp.where((above < rank) & (above + hist >= rank), jnp.arange(_BINS), -1))
    return digit.astype(jnp.uint32), above[digit]


def _pack_words(flags: jax.Array) -> jax.Array:
    """uint32 words, bit ``j`` of word ``w`` = ``flags[32 w + j]`` (zero padded)."""
    d = flags.shape[0]
    full = d - d % 32
    powers = jnp.arange(32, dtype=jnp.uint32)
    words = jnp.sum(
        flags[:full].reshape(-1, 32).astype(jnp.uint32) << powers[None, :], axis=1, dtype=jnp.uint32
    )
    if full == d:
        return words
    # The partial last word is packed on its own: padding the whole vector to a multiple of 32
    # inside the packing pass makes XLA:CPU test bounds on every element.
    tail = jnp.pad(flags[full:], (0, 32 - d % 32)).astype(jnp.uint32)
    return jnp.concatenate([words, jnp.sum(tail << powers, dtype=jnp.uint32)[None]])


def _select_bit(word: jax.Array, rank: jax.Array) -> jax.Array:
    """Position of the ``rank``-th (0-based) set bit of ``word`` counted from bit 0."""
    pos = jnp.zeros_like(rank)
    for width in (16, 8, 4, 2, 1):
        low = word & np.uint32((1 << width) - 1)
        ones = jax.lax.population_count(low).astype(rank.dtype)
        high = rank >= ones
        rank = jnp.where(high, rank - ones, rank)
        word = jnp.where(high, word >> width, low)
        pos = pos + jnp.where(high, width, 0)
    return pos


def _owners(ends: jax.Array, size: int) -> jax.Array:
    """``searchsorted(ends, arange(size), side="right")`` for non-decreasing ``ends >= 0``.

    Counts how many ``ends`` fall at or below each slot with one scatter-add and a cumulative
    sum, instead of ``size`` binary searches (3x faster on XLA:CPU at ``size = 10^5``).
    """
    counts = jnp.zeros((size + 1,), jnp.int32).at[jnp.minimum(ends, size)].add(1)
    return jnp.cumsum(counts[:size])


def _expand(words: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Ascending positions of the first ``size`` set bits of ``words`` and their validity."""
    if words.shape[0] > _DIRECT_WORDS:
        # The non-zero words are themselves the set bits of one flag per word: finding them
        # recursively reads 32x fewer flags than jnp.nonzero's cumulative sum over all words.
        ids, used = _expand(_pack_words(words != 0), size)
    else:
        nonzero = words != 0
        ids = jnp.nonzero(nonzero, size=size, fill_value=0)[0]
        used = jnp.arange(size) < jnp.sum(nonzero, dtype=jnp.int32)
    chosen = jnp.where(used, words[ids], 0)
    ones = jax.lax.population_count(chosen).astype(jnp.int32)
    ends = jnp.cumsum(ones)
    slot = jnp.arange(size, dtype=jnp.int32)
    j = jnp.minimum(_owners(ends, size), size - 1)
    bit = _select_bit(chosen[j], slot - (ends[j] - ones[j]))
    return (ids[j] * 32 + bit).astype(jnp.int32), slot < ends[-1]


def nonzero_positions(flags: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """``jnp.nonzero(flags, size=size, fill_value=0)`` and which slots are filled.

    Reads positions out of packed flag words: ``jnp.nonzero`` runs a whole-vector cumsum and a
    scatter, which XLA:CPU executes several times slower than these word passes.
    """
    if size == 0:
        return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
    positions, valid = _expand(_pack_words(flags), size)
    return jnp.where(valid, positions, 0), valid


def _first_bits(words: jax.Array, keep: jax.Array) -> jax.Array:
    """Each word with only its lowest ``keep`` set bits left (``0 <= keep <= popcount``)."""
    ones = jax.lax.population_count(words).astype(jnp.int32)
    cut = _select_bit(words, jnp.minimum(keep, 31))
    low = (jnp.uint32(1) << cut.astype(jnp.uint32)) - jnp.uint32(1)
    return jnp.where(keep >= ones, words, words & jnp.where(keep > 0, low, jnp.uint32(0)))


def _count(words: jax.Array) -> jax.Array:
    """Number of set bits in packed flag words.

    Counting through packed words is ~5x faster on XLA:CPU than ``jnp.sum(flags)``, whose
    fused compare-and-convert reduction runs as a scalar loop.
    """
    return jnp.sum(jax.lax.population_count(words).astype(jnp.int32))


def _rank_in(keys: jax.Array, valid: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact ``rank``-th largest (1-based) of ``keys[valid]`` and the count strictly above it.

    Two 65536-bin histograms: the high 16 bits of the answer from all valid keys, then its low
    16 bits from the valid keys in that high bin.
    """
    high_digits = jnp.where(valid, keys >> _DIGIT, _BINS).astype(jnp.int32)
    high, c_high = _digit_of_rank(_histogram(high_digits), rank)
    in_bin = valid & ((keys >> _DIGIT) == high)
    low_digits = jnp.where(in_bin, keys & np.uint32(_BINS - 1), _BINS).astype(jnp.int32)
    low, c_low = _digit_of_rank(_histogram(low_digits), rank - c_high)
    return (high << _DIGIT) | low, c_high + c_low


def _layout(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Flat offsets and padded-space starts (each a multiple of 32) of parts of ``sizes``."""
    offsets, starts, flat, padded = [], [], 0, 0
    for size in sizes:
        offsets.append(flat)
        starts.append(padded)
        flat += size
        padded += -(-size // 32) * 32
    return tuple(offsets), tuple(starts)


class _Keys:
    """Sort keys (:func:`sortable_keys`) given in parts, addressed in the padded index space.

    Part ``l`` (flat offset ``offsets[l]``, size ``sizes[l]``) occupies positions
    ``starts[l] ..`` with every ``starts[l]`` a multiple of 32, so each part packs into whole
    flag words of its own and the concatenated words are the flags of the padded space (the
    padding bits are zero). One part is the flat vector itself.

    The keys may be given as ``sources`` and ``key_fn(i, sources[i])`` (elementwise, cheap):
    :meth:`fresh` then recomputes them from the sources. A fallback inside a while loop must
    use fresh keys: keys captured by the loop body are loop operands, which XLA materialises
    (a 40 MB write at 10M coordinates, on every call, though the loop rarely runs), where the
    sources are usually buffers already (the update's leaves).
    """

    def __init__(self, sources: list[jax.Array], key_fn=None):
        self._sources = [(i, source) for i, source in enumerate(sources) if source.shape[0]]
        self._key_fn = key_fn
        self.parts = [
            source if key_fn is None else key_fn(i, source) for i, source in self._sources
        ]
        self.sizes = tuple(part.shape[0] for part in self.parts)
        self.size = sum(self.sizes)
        self.offsets, self.starts = _layout(self.sizes)
        # One past the last part's last position: what unused slots point at.
        self.end = self.starts[-1] + self.sizes[-1] if self.sizes else 0

    def fresh(self) -> _Keys:
        """The same keys, recomputed from the sources (see the class docstring)."""
        if self._key_fn is None:
            return self
        sources = [source for _, source in self._sources]
        ids = [i for i, _ in self._sources]
        return _Keys(sources, lambda j, source: self._key_fn(ids[j], source))

    def words(self, flag_fn) -> jax.Array:
        """Packed flag words of ``flag_fn(keys)``, part by part."""
        words = [_pack_words(flag_fn(part)) for part in self.parts]
        return words[0] if len(words) == 1 else jnp.concatenate(words)

    def histogram(self, digit_fn) -> jax.Array:
        """:func:`_histogram` of ``digit_fn(keys)`` over every part."""
        hist = jnp.zeros((_BINS,), jnp.int32)
        for part in self.parts:
            hist = hist.at[digit_fn(part)].add(1, mode="drop")
        return hist

    def sample(self, stride: int) -> jax.Array:
        """``keys[::stride]`` of the flat order: each part from its first multiple of stride."""
        pieces = [
            part[-offset % stride :: stride]
            for part, offset in zip(self.parts, self.offsets, strict=True)
        ]
        pieces = [piece for piece in pieces if piece.shape[0]]
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)

    def gather(self, positions: jax.Array, valid: jax.Array) -> jax.Array:
        """Keys at the valid ones of ascending padded ``positions`` (others: any value)."""
        positions = jnp.where(valid, positions, self.end)
        return _leafwise.gather_parts(self.parts, self.starts, positions)

    def to_flat(self, positions: jax.Array) -> jax.Array:
        """Flat indices of padded positions inside the parts."""
        if len(self.parts) == 1:
            return positions
        shift = np.array(self.starts) - np.array(self.offsets)  # non-decreasing
        part = jnp.searchsorted(jnp.asarray(self.starts[1:], jnp.int32), positions, side="right")
        return positions - jnp.asarray(shift, jnp.int32)[part]


def _as_keys(keys: _Keys | jax.Array) -> _Keys:
    """One vector of keys is a single part."""
    return keys if isinstance(keys, _Keys) else _Keys([keys])


def _whole_vector_threshold(keys: _Keys | jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k-th largest key ``T`` and ``count(key > T)`` from histograms of every key."""
    keys = _as_keys(keys)
    d = keys.size
    high, c_high = _digit_of_rank(
        keys.histogram(lambda part: (part >> _DIGIT).astype(jnp.int32)), jnp.int32(k)
    )
    in_bin = keys.words(lambda part: (part >> _DIGIT) == high)
    # Low digit: histogram of the bin's keys, from a compacted buffer when the bin fits in it.
    cap = min(d, max(1024, d // 256))
    positions, valid = _expand(in_bin, cap)
    low_digits = jnp.where(valid, keys.gather(positions, valid) & np.uint32(_BINS - 1), _BINS)
    fits = _count(in_bin) <= cap

    def whole(carry):
        del carry

        def digits(part):
            in_part_bin = (part >> _DIGIT) == high
            return jnp.where(in_part_bin, part & np.uint32(_BINS - 1), _BINS).astype(jnp.int32)

        return jnp.bool_(True), keys.histogram(digits)

    # A loop of at most one step rather than lax.cond: under vmap a cond runs both branches,
    # a while loop runs only while some client's bin did not fit.
    _, low_hist = jax.lax.while_loop(
        lambda carry: ~carry[0], whole, (fits, _histogram(low_digits.astype(jnp.int32)))
    )
    low, c_low = _digit_of_rank(low_hist, k - c_high)
    return (high << _DIGIT) | low, c_high + c_low


def _sample_bracket(
    keys: _Keys | jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(ok, T, count(key > T), words)`` from a bracket around the k-th largest key ``T``.

    A strided sample of about :data:`_SAMPLE` keys gives, from one small histogram of its high
    digits, a key range ``[lo, hi]`` expected to hold ``T`` with a margin of 4 standard
    deviations of the sample rank on either side. Two passes over packed flag words count the
    keys above ``hi`` and inside the range. ``ok`` says that ``T`` is provably inside
    (``count(key > hi) < k <= count(key >= lo)``) and that the range's keys fit a buffer sized
    for the expected range; then they are compacted and ``T`` is found exactly among them.

    ``words`` are the flag words of the selection (:func:`_threshold_words`), built from what
    the bracket already has: the words of ``key > hi`` plus the buffer's keys above ``T`` and
    its first ties, set one bit each. Every key outside the buffer is ``> hi`` or ``< lo``, so
    the two passes over all keys that :func:`_threshold_words` makes are not needed.
    Where ``ok`` is false the other results are meaningless.
    """
    keys = _as_keys(keys)
    d = keys.size
    stride = max(1, d // _SAMPLE)
    sample = keys.sample(stride)
    m = sample.shape[0]
    expected = k * m / d  # rank of T within the sample, from the top
    margin = 4.0 * math.sqrt(expected) + 1.0
    hi_rank = math.floor(expected - margin)  # 1-based sample ranks; < 1: no upper bound
    lo_rank = math.ceil(expected + margin)  # > m: no lower bound
    hist = _histogram((sample >> _DIGIT).astype(jnp.int32))
    if hi_rank >= 1:
        digit, _ = _digit_of_rank(hist, jnp.int32(hi_rank))
        hi = (digit << _DIGIT) | np.uint32(_BINS - 1)
    else:
        hi = jnp.uint32(_TOP)
    lo = _digit_of_rank(hist, jnp.int32(lo_rank))[0] << _DIGIT if lo_rank <= m else jnp.uint32(0)
    # Keys in the bracket: ~(lo_rank - hi_rank) sample strides, plus the two partial end bins.
    cap = min(d, 2 * (lo_rank - max(hi_rank, 0) + 2) * stride + 4096)
    above_words = keys.words(lambda part: part > hi)
    c_above = _count(above_words)
    inside_words = keys.words(lambda part: (part >= lo) & (part <= hi))
    c_inside = _count(inside_words)
    positions, valid = _expand(inside_words, cap)
    inside = keys.gather(positions, valid)
    found, c_found = _rank_in(inside, valid, k - c_above)
    greater = c_above + c_found
    # The buffer is in ascending position order, so its first k - greater ties are the
    # selection's (lower index first).
    tie = valid & (inside == found)
    take = valid & ((inside > found) | (tie & (jnp.cumsum(tie, dtype=jnp.int32) <= k - greater)))
    bits = jnp.where(take, jnp.uint32(1) << (positions & 31).astype(jnp.uint32), jnp.uint32(0))
    # Distinct bits of words that have none of them yet: adding them is or-ing them.
    words = above_words.at[positions >> 5].add(bits, mode="drop")
    ok = (c_above < k) & (k <= c_above + c_inside) & (c_inside <= cap)
    return ok, found, greater, words


def _threshold_words(keys: _Keys, k: int, threshold: jax.Array, greater: jax.Array) -> jax.Array:
    """Flag words of every key ``> T`` and the first ``k - count(key > T)`` keys ``== T``."""
    above = keys.words(lambda part: part > threshold)
    ties = keys.words(lambda part: part == threshold)
    tie_counts = jax.lax.population_count(ties).astype(jnp.int32)
    before = jnp.cumsum(tie_counts) - tie_counts
    keep = jnp.clip(k - greater - before, 0, tie_counts)
    return above | _first_bits(ties, keep)


def _selected_words(keys: _Keys | jax.Array, k: int) -> jax.Array:
    """Flag words (padded space) of the ``k`` largest keys, ties to the lower position.

    From :func:`_sample_bracket` where its bracket holds; otherwise (adversarial or heavily
    tied data, or fewer than ``2 * _SAMPLE`` keys) from :func:`_whole_vector_threshold` and
    :func:`_threshold_words`: the result is exact either way, only the time differs. The
    scatter-add histogram of every key that the bracket avoids costs ~35 ms at 10M
    coordinates on XLA:CPU, the sample and the two counting passes a fraction of that.
    """
    keys = _as_keys(keys)

    def whole(carry):
        del carry
        fresh = keys.fresh()
        return jnp.bool_(True), _threshold_words(fresh, k, *_whole_vector_threshold(fresh, k))

    if keys.size < 2 * _SAMPLE:
        # The "sample" would be every key: its histogram is the whole-vector one, and the
        # bracket's counting passes and buffer only add work (2x under vmap over 1000 vectors
        # of 16384 coordinates).
        return whole(None)[1]
    ok, _, _, words = _sample_bracket(keys, k)
    # At most one step (see _whole_vector_threshold on why not lax.cond).
    _, words = jax.lax.while_loop(lambda carry: ~carry[0], whole, (ok, words))
    return words


def top_k_indices(score: jax.Array, k: int, *, method: str = "auto") -> jax.Array:
    """Ascending indices of the ``k`` largest entries of ``score`` (ties: lower index first).

    Args:
      score: float32 vector ``[d]``.
      k: static count, ``1 <= k <= d``.
      method: ``"radix"`` (the histogram selection above), ``"sort"`` (``lax.top_k`` of the
        same keys, then a sort of the ``k`` indices) or ``"auto"``: radix from
        :data:`RADIX_MIN_SIZE` (16384) coordinates on. Both give the same indices. For small
        vectors the two 65536-bin histograms cost more than ``lax.top_k``, and under ``vmap``
        over many small vectors (a statistical test's 10^4 keys) they dominate time and
        memory; from 16384 coordinates on ``lax.top_k`` of the int32 keys (a full sort on
        XLA:CPU, whose TopK kernel takes float32 only) loses at every ``k`` (measured
        2026-12-03, one process, jax 0.10, radix vs sort: d = 4096, k = 41: 1.4 vs 0.9 ms;
        d = 16384, k = 164: 2.0 vs 8.0 ms; d = 995024, k = 10 / 9950: 24 / 25 vs 704 / 730
        ms; vmapped 1000 x 16384, k = 16: 3.5 vs 10.1 s).

    Returns:
      int32 ``[k]``, strictly increasing; equal to ``jnp.sort(lax.top_k(score, k)[1])`` for
      NaN-free ``score``.
    """
    return top_k_parts([score], k, method=method)


def top_k_parts(
    parts: list[jax.Array], k: int, *, method: str = "auto", score=None, aux=None
) -> jax.Array:
    """:func:`top_k_indices` of ``concat(parts)``, without forming the concatenation.

    Under ``jax.vmap`` (e.g. over a round's clients) a selection of at least
    ``_once.LOOP_MIN_SIZE`` (2^16) coordinates runs once per batch element in a ``lax.map``
    loop rather than vectorised over the batch: batched, its gathers, scatters and prefix sums
    over packed words ran ~3x slower on XLA:CPU (10 FEMNIST CNN updates, STC 1 %: 191 vs
    61 ms per round trip). Smaller selections (e.g. the statistical tests' 10^4 vmapped
    draws) stay vectorised.

    Args:
      parts: float32 vectors (e.g. one per leaf of an update; empty ones allowed).
      k: static count, ``1 <= k <= d`` (``d`` the parts' total size).
      method: as in :func:`top_k_indices`.
      score: optional ``score(i, parts[i], aux)``, an elementwise-cheap function giving part
        ``i``'s scores (e.g. ``|x|``); the selection then ranks the scores. It is re-applied
        wherever the scores are read instead of being materialised.
      aux: the arrays ``score`` reads besides the parts (any pytree, e.g. SSTC's kept-kernel
        flags), passed here rather than closed over so that a vmapped call loops over them
        together with the parts.

    Returns:
      int32 ``[k]`` flat indices into ``concat(parts)``, strictly increasing.
    """
    d = sum(part.shape[0] for part in parts)
    if not 1 <= k <= d:
        raise ValueError(f"top_k_indices: k={k} must be in [1, {d}].")
    if method not in ("auto", "radix", "sort"):
        raise ValueError(f"top_k_indices: method must be 'auto', 'radix' or 'sort', got {method!r}")
    if score is None:
        score = _identity_score
    if method == "sort" or (method == "auto" and d < RADIX_MIN_SIZE):
        flat = jnp.concatenate([score(i, part, aux) for i, part in enumerate(parts)])
        # The same keys as signed integers keep their order; lax.top_k puts equal values'
        # lower index first, the tie rule of the radix path.
        keys = sortable_keys(flat) ^ np.uint32(0x80000000)
        signed = jax.lax.bitcast_convert_type(keys, jnp.int32)
        return jnp.sort(jax.lax.top_k(signed, k)[1]).astype(jnp.int32)

    def select(parts, aux):
        return _radix_parts(parts, aux, k, score)

    if d >= _once.LOOP_MIN_SIZE:
        select = _once.looped_under_vmap(select)
    return select(list(parts), aux)


def _identity_score(i: int, part: jax.Array, aux) -> jax.Array:
    del i, aux
    return part


def _radix_parts(parts: list[jax.Array], aux, k: int, score) -> jax.Array:
    """The radix selection of :func:`top_k_parts` (one vector; see the module docstring)."""
    sizes = tuple(part.shape[0] for part in parts if part.shape[0])
    if _layout(sizes)[1][-1] + sizes[-1] > np.iinfo(np.int32).max:
        # The padded space would overflow int32 positions (d within 31 per part of 2^31).
        parts = [jnp.concatenate([score(i, part, aux) for i, part in enumerate(parts)])]
        score = _identity_score
    keys = _Keys(parts, lambda i, part: sortable_keys(score(i, part, aux)))
    positions, _ = _expand(_selected_words(keys, k), k)
    return keys.to_flat(positions)
