"""Per-coordinate Bernoulli draws for stochastic rounding, with an explicit random-bit budget.

QSGD and TernGrad round every coordinate up with a probability ``p_i``; on XLA:CPU the threefry
draw of one 32-bit word per coordinate costs several memory passes of a 10M-parameter update,
more than the quantizer itself. :func:`bernoulli` draws ``Bernoulli(p_i)`` either as before (one
float32 uniform per coordinate) or from ``k``-bit integer uniforms plus one shared 32-bit
"tie breaker" per group of :data:`GROUP` coordinates, ``k + 32 / GROUP`` random bits per
coordinate instead of 32, or (``rounding_bits='hash'``, :func:`hash_bernoulli`) from a
counter-based hash of the coordinate index and 64 threefry bits per call: exact marginals, no
per-coordinate threefry work, but no independence across coordinates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.compressors import _once, _threefry

ROUNDING_BITS = (8, 16)
"""The accepted integer ``rounding_bits`` (bits of the per-coordinate threefry uniform)."""

HASH = "hash"
"""``rounding_bits`` value selecting counter-based hashed uniforms (:func:`hash_bernoulli`)."""

GROUP = 16
"""Coordinates sharing one 32-bit tie breaker (consecutive in row-major order)."""


def check_rounding_bits(rounding_bits: int | None, who: str) -> None:
    """``ValueError`` unless ``rounding_bits`` is ``None`` or one of :data:`ROUNDING_BITS`."""
    if rounding_bits is None or (type(rounding_bits) is str and rounding_bits == HASH):
        return
    if type(rounding_bits) is not int or rounding_bits not in ROUNDING_BITS:
        raise ValueError(
            f"{who}: rounding_bits must be None or one of {ROUNDING_BITS} or {HASH!r}, got "
            f"{rounding_bits!r}."
        )


def correlation_bound(rounding_bits: int | None) -> float:
    """Largest correlation between two coordinates' draws (0 with independent draws).

    ``ValueError`` for :data:`HASH`, whose draws have no proven correlation bound.
    """
    if rounding_bits == HASH:
        raise ValueError("rounding_bits='hash' has exact marginals but no correlation bound.")
    return 0.0 if rounding_bits is None else 1.0 / (2**rounding_bits - 1)


# murmur3's 32-bit finaliser (Appleby, MurmurHash3, public domain): xor-shifts and odd
# multiplications, each a bijection of the 32-bit words, so the composition is one.
_FMIX_SHIFTS = (16, 13, 16)
_FMIX_MULTIPLIERS = (0x85EBCA6B, 0xC2B2AE35)
_GOLDEN = 0x9E3779B9  # odd: i -> i * _GOLDEN is a bijection mod 2**32


def fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finaliser on uint32 words: a bijection of ``{0, ..., 2**32 - 1}``."""
    h = h ^ (h >> _FMIX_SHIFTS[0])
    h = h * jnp.uint32(_FMIX_MULTIPLIERS[0])
    h = h ^ (h >> _FMIX_SHIFTS[1])
    h = h * jnp.uint32(_FMIX_MULTIPLIERS[1])
    return h ^ (h >> _FMIX_SHIFTS[2])


def hash_words(index: jax.Array, key_word: jax.Array) -> jax.Array:
    """``fmix32(index * 0x9E3779B9 + key_word)`` (uint32, mod ``2**32``).

    For a fixed ``index`` the map ``key_word -> word`` is a bijection (a translation, then
    ``fmix32``), so a uniform ``key_word`` gives an exactly uniform word for every index.
    """
    return fmix32(index * jnp.uint32(_GOLDEN) + key_word)


def hash_bernoulli(key: jax.Array, p: jax.Array) -> jax.Array:
    """``b_i ~ Bernoulli(p_i)`` from a counter-based hash (``rounding_bits='hash'``).

    Draws two uint32 words ``K1, K2`` from ``key`` with threefry (the only threefry work, 64
    bits per call instead of 32 per coordinate) and gives coordinate ``i`` (row-major position
    in ``p``) the words ``U_i = H(i, K1)`` (:func:`hash_words`) and ``T_i = U_i xor K2``. Then,
    with ``t_i = p_i 2**32`` (exact), ``a_i = floor(t_i)``, ``c_i = ceil((t_i - a_i) 2**32)``::

        b_i = [p_i >= 1]  or  [U_i < a_i]  or  ([U_i = a_i] and [T_i < c_i]).

    Proof of the marginal: for a fixed ``i``, ``K -> H(i, K)`` is a bijection of the 32-bit
    words (``K -> i * 0x9E3779B9 + K`` is a translation mod ``2**32`` and ``fmix32`` a
    composition of xor-shifts and odd multiplications, each invertible), so ``U_i`` is
    exactly uniform; given ``U_i``, ``T_i = U_i xor K2`` is uniform because ``K2`` is uniform
    and independent of ``K1``, so ``T_i`` is uniform and independent of ``U_i``.
    For ``p_i < 1`` (then ``t_i <= 2**32 - 2**8`` and ``c_i <= 2**32 - 2**8`` are exact uint32
    values): ``P(b_i) = a_i / 2**32 + (1 / 2**32)(c_i / 2**32) = ceil(p_i 2**64) / 2**64``,
    which is ``p_i`` exactly whenever ``p_i 2**64`` is an integer, i.e. for every float32
    ``p_i >= 2**-41`` (its ulp is ``>= 2**-64``) and ``p_i = 0``; below that the excess is
    under ``2**-64``. ``p_i = 1`` gives ``b_i = 1``.

    So each ``b_i`` has the marginal of an independent draw (exactly, down to ``2**-41``), and
    every expectation that is a sum over coordinates is the independent-draw value: QSGD's
    and TernGrad's unbiasedness, ``E‖Q(x) - x‖² = Σ_i Var Q_i(x)`` (QSGD Lemma 3.1's variance
    bound), ``E‖Q(x)‖₀`` (QSGD Lemma 3.1's sparsity bound) and so QSGD's expected-bits bound,
    which only uses that the code length is a concave function of the number of non-zeros
    (Jensen). NOT exact, and not claimed: independence across coordinates. All draws of one
    call are functions of 64 random bits, and the pairwise joint law of ``(U_i, U_j)`` is
    whatever ``fmix32`` makes of a fixed index difference (``U_i != U_j`` always, for
    instance); the variance of a weighted sum ``Σ w_i b_i`` over coordinates of one vector,
    and tail bounds that assume independent coordinates, have no proof here. Different keys
    (different clients, rounds) give independent ``(K1, K2)`` and so independent vectors.

    Args:
      key: a PRNG key.
      p: float32 probabilities in ``[0, 1]``, at most ``2**32`` entries; entries outside
        (NaN from a non-finite input) give arbitrary draws that callers mask.

    Returns:
      A boolean array of ``p``'s shape.
    """
    return hashed_draws(hash_keys(key), p, 0)


def hash_keys(key: jax.Array) -> jax.Array:
    """The two uint32 words ``K1, K2`` of :func:`hash_bernoulli`, drawn with threefry."""
    return jax.random.bits(key, (2,), jnp.uint32)


def hashed_draws(key_words: jax.Array, p: jax.Array, first_index: int) -> jax.Array:
    """:func:`hash_bernoulli`'s draws for coordinates ``first_index + row-major position``.

    Lets a caller draw a long vector piece by piece (e.g. leaf by leaf) with exactly the
    draws of one call on the whole vector.
    """
    index = jax.lax.iota(jnp.uint32, p.size).reshape(p.shape) + jnp.uint32(first_index)
    p = p.astype(jnp.float32)
    t = jnp.minimum(p, jnp.float32(1.0 - 2.0**-24)) * jnp.float32(2.0**32)
    a = jnp.floor(t)
    c = jnp.ceil((t - a) * jnp.float32(2.0**32))
    a_int, c_int = a.astype(jnp.uint32), c.astype(jnp.uint32)
    u = hash_words(index, key_words[0])
    w = u ^ key_words[1]  # uniform and independent of u for each i (K2 is): the tie breaker
    return (p >= 1) | (u < a_int) | ((u == a_int) & (w < c_int))


def bernoulli(key: jax.Array, p: jax.Array, rounding_bits: int | None) -> jax.Array:
    """Boolean draws ``b_i ~ Bernoulli(p_i)`` for float32 ``p`` in ``[0, 1]`` (any shape).

    ``rounding_bits=None`` is ``jax.random.uniform(key, p.shape) < p``: one threefry word per
    coordinate, of which the float32 uniform keeps 23 bits, so
    ``P(b_i) = ceil(p_i 2**23) / 2**23``, exact only when ``p_i`` is a multiple of ``2**-23``.

    ``rounding_bits=k`` (8 or 16) splits ``t_i = p_i 2**k`` (exact: a power-of-two scaling) into
    ``a_i = floor(t_i)`` and ``f_i = t_i - a_i`` (exact: the fraction of a float is a float),
    draws a ``k``-bit integer uniform ``U_i`` and, for each group of :data:`GROUP` consecutive
    coordinates, one 32-bit integer uniform ``W`` independent of the ``U``, and sets::

        b_i = [U_i < a_i]  or  ([U_i = a_i] and [W < c_i]),   c_i = ceil(f_i 2**32).

    Proof of the probability: ``U_i`` and ``W`` are independent, so
    ``P(b_i) = a_i / 2**k + (1 / 2**k) (c_i / 2**32) = ceil(p_i 2**(k+32)) / 2**(k+32)``
    (``a_i 2**32 + ceil(f_i 2**32) = ceil(t_i 2**32)`` as ``a_i`` is an integer). That equals
    ``p_i`` exactly whenever ``p_i 2**(k+32)`` is an integer, which holds for every float32
    ``p_i >= 2**-(k+9)`` (its ulp is at least ``2**-(k+32)``) and for ``p_i = 0``; below that
    the excess is under ``2**-(k+32)``, ``2**(9-k)`` times smaller than the default path's
    worst case. (``f_i 2**32 < 2**32 - 2**8`` and ``c_i`` are exact float32 integers, so the
    conversion to uint32 is exact; ``p_i = 1`` gives ``a_i = 2**k > U_i``.)

    Each ``b_i`` therefore has exactly the marginal of an independent draw, so every
    expectation that is a sum over coordinates (unbiasedness, ``E‖Q(x) - x‖²``, the expected
    number of non-zeros) is unchanged. Draws of different groups are independent; within a
    group they share ``W`` and only ``W``: given ``W`` they are independent with
    ``P(b_i | W) = r_i = (a_i + [W < c_i]) / 2**k``, so with ``q_i = c_i / 2**32``
    ``Cov(b_i, b_j) = 2**-2k Cov([W < c_i], [W < c_j])`` lies in
    ``[0, 2**-2k sqrt(q_i(1-q_i) q_j(1-q_j))]`` (Cauchy-Schwarz), while the law of total
    variance gives ``Var b_i >= E r_i(1 - r_i) >= 2**-k (1 - 2**-k) q_i (1 - q_i)`` (``r_i``
    takes values in ``{0, 2**-k}`` if ``a_i = 0``, in ``{1 - 2**-k, 1}`` if ``a_i = 2**k - 1``
    and in ``[2**-k, 1 - 2**-k]`` otherwise). Hence the correlation of
    two draws is at most ``ρ = 1 / (2**k - 1)`` (:func:`correlation_bound`), and for every
    weight vector ``w``: ``Var Σ w_i b_i <= (1 + (GROUP - 1) ρ) Σ w_i² Var b_i`` (by
    ``2|w_i w_j| σ_i σ_j <= w_i² σ_i² + w_j² σ_j²`` over the pairs of a group): at most
    1.0002 times the independent variance for ``k = 16`` and 1.059 times for ``k = 8``.

    Args:
      key: a PRNG key.
      p: float32 probabilities in ``[0, 1]``; entries outside (NaN from a non-finite input)
        give arbitrary draws that callers mask.
      rounding_bits: ``None``, 8 or 16 (see :data:`ROUNDING_BITS`), or :data:`HASH`
        (:func:`hash_bernoulli`).

    Returns:
      A boolean array of ``p``'s shape.
    """
    if rounding_bits is None:
        return _threefry.uniform(key, p.shape) < p
    if rounding_bits == HASH:
        return hash_bernoulli(key, p)
    k = int(rounding_bits)
    lanes = 32 // k
    n = p.size
    # Rows of GROUP coordinates; a row count divisible by `lanes` lets one uint32 word feed
    # `lanes` rows (lane j of word w serves row j * rows/lanes + w: contiguous slices, no
    # interleaving shuffle).
    rows = -(-max(n, 1) // GROUP)
    rows = -(-rows // lanes) * lanes
    key_u, key_w = jax.random.split(key)
    narrow = jnp.uint8 if k == 8 else jnp.uint16
    mask = jnp.uint32((1 << k) - 1)
    shifts = jnp.asarray([32 - k * (j + 1) for j in range(lanes)], jnp.uint32)[:, None, None]

    def draw_words(key_u, key_w):
        # Lane j of every word, the lanes stacked (row j * rows/lanes + w), as k-bit values.
        words = _threefry.bits(key_u, (rows // lanes, GROUP))
        u = ((words[None] >> shifts) & mask).astype(narrow).reshape(rows * GROUP)
        return u, _threefry.bits(key_w, (rows,))

    # The lanes and the tie breakers are written out once, as a conditional's outputs (the
    # predicate only has to be opaque to XLA: both branches are the same), and the
    # coordinates read them unpadded. Fused into the comparisons, XLA:CPU recomputed every
    # word's hash once per lane (u) and once per coordinate of its row (w), 4-16x the threefry
    # work these bits exist to save, and indexing through the padded rows cost as much again.
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = data.reshape(-1)
    u, w = _once.computed_once(data[0] != data[-1], draw_words, key_u, key_w)
    u = u[:n].astype(jnp.uint32)
    w = jnp.broadcast_to(w[:, None], (rows, GROUP)).reshape(-1)[:n]
    t = p.reshape(-1).astype(jnp.float32) * jnp.float32(2.0**k)
    a = jnp.floor(t)
    c = jnp.ceil((t - a) * jnp.float32(2.0**32))
    a_int, c_int = a.astype(jnp.uint32), c.astype(jnp.uint32)
    draw = (u < a_int) | ((u == a_int) & (w < c_int))
    return draw.reshape(p.shape)
