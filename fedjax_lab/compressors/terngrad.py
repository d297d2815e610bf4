"""TernGrad stochastic ternarization (Wen et al., 2017)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_lab.compressors import _codec
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


def terngrad(clip_sigmas: float | None = None) -> Compressor:
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

    Returns:
      A stateless :class:`Compressor`.
    """
    if clip_sigmas is not None and (
        isinstance(clip_sigmas, bool)
        or not isinstance(clip_sigmas, numbers.Real)
        or not float(clip_sigmas) > 0.0
    ):
        raise ValueError(f"terngrad: clip_sigmas must be None or > 0, got {clip_sigmas!r}.")

    def _layout(tree, what):
        layout = tree_layout(tree, what=f"terngrad.{what}")
        _codec.check_int32_bits(32 + _codec.pad8(2 * layout.size), "terngrad")
        return layout

    def init(params):
        _layout(params, "init(params)")
        return ()

    def encode(updates, state, *, key):
        layout = _layout(updates, "encode(updates)")
        x = layout.flatten(updates)
        finite = jnp.all(jnp.isfinite(x))
        if clip_sigmas is not None and layout.size:
            bound = float(clip_sigmas) * jnp.std(x)
            x = jnp.clip(x, -bound, bound)
        scale = jnp.max(jnp.abs(x), initial=0.0)
        probability = jnp.abs(x) / jnp.where(scale > 0, scale, 1.0)
        keep = jax.random.uniform(key, x.shape) < probability
        trits = jnp.where(keep, jnp.sign(x), 0.0).astype(jnp.int8)
        return TernGradPayload(poison(scale, finite), trits, layout), state

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

    The same stream as ``BitWriter.bits`` of the (non-zero, negative) pairs, built with byte
    arithmetic instead of one byte per bit.
    """
    codes = (trits != 0).astype(np.uint8) << 1 | (trits < 0).astype(np.uint8)
    codes = np.concatenate([codes, np.zeros(-codes.size % 4, np.uint8)]).reshape(-1, 4)
    return (codes[:, 0] << 6 | codes[:, 1] << 4 | codes[:, 2] << 2 | codes[:, 3]).tobytes()


def _from_bytes(data: bytes, template: TernGradPayload) -> TernGradPayload:
    template.check()
    d = template.layout.size
    size = template.max_bits // 8
    view = _codec.check_length(data, size, size, "terngrad payload")
    scale = _codec.floats_from_bytes(view, 0, 1, "terngrad payload.scale").reshape(())
    packed = np.frombuffer(view[4:], dtype=np.uint8)
    # Byte b holds trits 4b..4b+3 in its bit pairs 7-6, 5-4, 3-2, 1-0; beyond d only padding.
    codes = np.stack([packed >> 6, packed >> 4, packed >> 2, packed], axis=1).reshape(-1) & 3
    if codes[d:].any():
        raise ValueError("from_bytes: terngrad payload: non-zero padding bits; data is corrupt.")
    codes = codes[:d]
    # Code 01 (zero with a sign) is invalid; 00, 10, 11 are 0, +1, -1.
    if np.any(codes == 1) or np.signbit(scale) or (scale == 0 and codes.any()):
        raise ValueError("from_bytes: terngrad payload has an invalid trit or scale; corrupt.")
    trits = np.array([0, 0, 1, -1], np.int8)[codes]
    return template.replace(scale=scale, trits=trits)
