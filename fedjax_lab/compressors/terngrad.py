"""TernGrad stochastic ternarization (Wen et al., 2017)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_lab.compressors import _bernoulli, _codec, _leafwise, _once, _threefry
from fedjax_lab.compressors._base import (
    Compressor,
    TreeLayout,
    check_array,
    host,
    poison,
    tree_layout,
)


@struct.dataclass
class TernGradPayload:
    """A float32 scale ``s_t`` and one trit in ``{-1, 0, +1}`` per coordinate."""

    scale: jax.Array  # float32[]
    trits: jax.Array  # int8[d]
    layout: TreeLayout = struct.field(pytree_node=False)

    @property
    def max_bits(self) -> int:
        return 32 + _codec.pad8(2 * self.layout.size)

    def check(self) -> None:
        check_array(self.scale, (), np.float32, "terngrad payload.scale")
        check_array(self.trits, (self.layout.size,), np.int8, "terngrad payload.trits")


def terngrad(
    clip_sigmas: float | None = None, *, rounding_bits: int | str | None = None
) -> Compressor:
    """TernGrad: ``s_t · sign(g) ∘ b`` with ``b_i ~ Bernoulli(|g_i|/s_t)``, ``s_t = max|g|``.

    Wen, Xu, Yan, Wu, Wang, Chen, Li (2017), "TernGrad: Ternary Gradients to Reduce
    Communication in Distributed Deep Learning", NeurIPS. Without clipping (the default) it is
    unbiased with per-coordinate variance ``|x_i| (s_t - |x_i|)``.

    With ``clip_sigmas = c`` the update is first clipped to ``[-cσ, cσ]`` (σ = standard
    deviation of the update's coordinates; the paper uses c = 2.5) as in the paper's §3.3. The
    ternarization is then unbiased for the *clipped* vector only, so the compressor is biased
    by ``clip(x) - x`` on every coordinate beyond ``cσ``; it trades that bias for a lower
    variance. The paper's layer-wise scaling is ``per_leaf(terngrad(...))``.

    Wire format: float32 scale, then 2 bits per coordinate (a non-zero bit and a sign bit):
    ``32 + 8 ceil(2d/8)`` bits.

    Args:
      clip_sigmas: ``None`` (unbiased) or a positive float ``c``.
      rounding_bits: random bits behind each ``Bernoulli(|x_i|/s_t)``. ``None`` (default; the
        outputs of earlier versions for a given key): one float32 uniform per coordinate,
        exact to ``2**-23``. ``16`` or ``8``: a 16/8-bit uniform plus a 32-bit tie breaker
        shared by 16 coordinates, 1.8x/3.2x less threefry work (not faster end to end on
        XLA:CPU, where the default's unrolled hash fuses with the rounding:
        ``benchmarks/rounding_ab.py``), exact to
        ``2**-(k+32)`` (exact for every ``|x_i|/s_t >= 2**-(k+9)``), so unbiasedness and the
        per-coordinate variance hold as for independent draws, with coordinates of a
        tie-breaker group correlated by at most ``1/(2**k - 1)`` (proof in
        ``fedjax_lab.compressors._bernoulli.bernoulli``). ``"hash"``: a counter-based hash
        (murmur3's finaliser) of the coordinate index and 64 threefry bits per call, no
        per-coordinate threefry work; each draw is exact to ``2**-64`` (exact for every
        ``|x_i|/s_t >= 2**-41``), so unbiasedness and the per-coordinate variance hold as for
        independent draws, but draws of one vector are NOT independent of each other (proof
        and caveats in ``fedjax_lab.compressors._bernoulli.hash_bernoulli``).

    Returns:
      A stateless :class:`Compressor`.
    """
    if clip_sigmas is not None and (
        isinstance(clip_sigmas, bool)
        or not isinstance(clip_sigmas, numbers.Real)
        or not float(clip_sigmas) > 0.0
    ):
        raise ValueError(f"terngrad: clip_sigmas must be None or > 0, got {clip_sigmas!r}.")
    _bernoulli.check_rounding_bits(rounding_bits, "terngrad")

    def _layout(tree, what):
        layout = tree_layout(tree, what=f"terngrad.{what}")
        _codec.check_int32_bits(32 + _codec.pad8(2 * layout.size), "terngrad")
        return layout

    def init(params):
        _layout(params, "init(params)")
        return ()

    def encode_leafwise(updates, layout, key):
        # Without clipping, every output is a per-coordinate function of x_i, max |x| (exact
        # in any order) and the coordinate's own draw (a slice of the flat draws: threefry's
        # partitionable counters, or the hash of the flat index), so each leaf is ternarized
        # on its own: the same payload without writing the update out as a flat vector.
        parts = _leafwise.leaves(layout, updates)
        finite = _leafwise.all_finite(parts)
        scale = _leafwise.peak(parts)

        def ternarize(key, parts, scale):
            safe = jnp.where(scale > 0, scale, 1.0)
            key_words = _bernoulli.hash_keys(key) if rounding_bits == _bernoulli.HASH else None
            trits = []
            for offset, part in zip(layout.offsets, parts, strict=True):
                probability = jnp.abs(part) / safe
                if key_words is None:
                    draws = _threefry.uniform_slice(key, layout.size, offset, part.size)
                    keep = draws < probability
                else:
                    keep = _bernoulli.hashed_draws(key_words, probability, offset)
                trits.append(jnp.where(keep, jnp.sign(part), 0.0).astype(jnp.int8))
            return _leafwise.concat_into(layout, trits, jnp.int8)

        trits = _once.computed_once(finite, ternarize, key, parts, scale)
        return TernGradPayload(poison(scale, finite), trits, layout)

    def encode(updates, state, *, key):
        layout = _layout(updates, "encode(updates)")
        if clip_sigmas is None and rounding_bits in (None, _bernoulli.HASH):
            # Vmapped over a round's clients the flat formulation is the faster one on
            # XLA:CPU (10 FEMNIST CNN updates: 72 ms flat, 80 ms leaf by leaf looped over the
            # clients, 357 ms leaf by leaf batched); one update at a time, leaf by leaf.
            run = _once.vmapped_as(
                lambda u, k: encode_leafwise(u, layout, k), lambda u, k: encode_flat(u, layout, k)
            )
            return run(updates, key), state
        return encode_flat(updates, layout, key), state

    def encode_flat(updates, layout, key):
        x = layout.flatten(updates)
        finite = _leafwise.all_finite([x])
        if clip_sigmas is not None and layout.size:
            bound = float(clip_sigmas) * jnp.std(x)
            x = jnp.clip(x, -bound, bound)
        scale = jnp.max(jnp.abs(x), initial=0.0)

        def ternarize(key, x, scale):
            probability = jnp.abs(x) / jnp.where(scale > 0, scale, 1.0)
            keep = _bernoulli.bernoulli(key, probability, rounding_bits)
            return jnp.where(keep, jnp.sign(x), 0.0).astype(jnp.int8)

        # The payload and decode both read the trits: evaluate the random draws once.
        trits = _once.computed_once(finite, ternarize, key, x, scale)
        return TernGradPayload(poison(scale, finite), trits, layout)

    def decode(payload: TernGradPayload):
        payload.check()
        return payload.layout.unflatten(payload.trits.astype(jnp.float32) * payload.scale)

    def bits(payload: TernGradPayload) -> jax.Array:
        payload.check()
        return jnp.int32(payload.max_bits)

    return Compressor(init, encode, decode, bits, _to_bytes, _from_bytes)


def _to_bytes(payload: TernGradPayload) -> bytes:
    payload.check()
    scale, trits = host(payload.scale), host(payload.trits)
    head = _codec.floats_to_bytes(scale, "terngrad payload.scale")
    if np.signbit(scale) or (trits.size and (trits.min() < -1 or trits.max() > 1)):
        raise ValueError("to_bytes: terngrad payload needs scale >= +0 and trits in {-1, 0, 1}.")
    if scale == 0 and trits.any():
        raise ValueError("to_bytes: terngrad payload has non-zero trits with scale 0.")
    return head + _pack_trits(trits)


def _pack_trits(trits: np.ndarray) -> bytes:
    """Two bits per trit (non-zero bit, sign bit), four trits a byte, MSB first, zero padded.

    The same stream as ``BitWriter.bits`` of the (non-zero, negative) pairs. Four int8 trits are
    one little-endian uint32 whose bytes are 0x00, 0x01 or 0xFF: bit 0 of a byte is the
    non-zero bit and bit 1 the sign bit, so a few lane-wise word operations build the four
    2-bit codes at once (a quarter of the array operations of a per-trit pass). One multiply
    then gathers them: with codes ``c_i`` at bits ``8 i``, ``codes * (2**30 + 2**20 + 2**10 + 1)``
    holds ``c_0 c_1 c_2 c_3`` in bits 31..24 (``c_i`` lands at ``8 i + 30 - 10 i``); every
    other product lands in disjoint bit pairs below 24 (no carry into them) or past bit 31
    (dropped mod 2**32).
    """
    raw = np.ascontiguousarray(trits, dtype=np.int8).view(np.uint8)
    if raw.size % 4:
        raw = np.concatenate([raw, np.zeros(-raw.size % 4, np.uint8)])
    words = raw.view("<u4")
    lanes = np.uint32(0x01010101)
    codes = (words & lanes) << np.uint32(1) | (words >> np.uint32(1)) & lanes
    codes *= np.uint32(2**30 + 2**20 + 2**10 + 1)
    codes >>= np.uint32(24)
    return codes.astype(np.uint8).tobytes()


def _trit_table() -> np.ndarray:
    """``uint32[256]``: byte ``b`` -> its four trits as int8 bytes of a little-endian word."""
    codes = (np.arange(256)[:, None] >> np.array([6, 4, 2, 0])) & 3
    trits = np.array([0, 0, 1, -1], np.int8)[codes]  # code 01 is invalid, rejected separately
    return np.ascontiguousarray(trits).view("<u4").reshape(256)


_TRITS = _trit_table()


def _from_bytes(data: bytes, template: TernGradPayload) -> TernGradPayload:
    template.check()
    d = template.layout.size
    size = template.max_bits // 8
    view = _codec.check_length(data, size, size, "terngrad payload")
    scale = _codec.floats_from_bytes(view, 0, 1, "terngrad payload.scale").reshape(())
    packed = np.frombuffer(view[4:], dtype=np.uint8)
    # Byte b holds trits 4b..4b+3 in its bit pairs 7-6, 5-4, 3-2, 1-0; beyond d only padding.
    tail = 2 * (-d % 4)
    if packed.size and packed[-1] & ((1 << tail) - 1):
        raise ValueError("from_bytes: terngrad payload: non-zero padding bits; data is corrupt.")
    # Code 01 (zero with a sign) is invalid; 00, 10, 11 are 0, +1, -1.
    sign_without_value = (packed & ~(packed >> 1) & 0x55).any()
    if sign_without_value or np.signbit(scale) or (scale == 0 and packed.any()):
        raise ValueError("from_bytes: terngrad payload has an invalid trit or scale; corrupt.")
    trits = _TRITS[packed].view(np.int8)[:d]
    return template.replace(scale=scale, trits=trits)
