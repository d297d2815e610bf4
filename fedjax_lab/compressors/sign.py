"""One-bit sign compressors: signSGD and its scaled variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_lab.compressors import _codec, _leafwise
from fedjax_lab.compressors._base import (
    Compressor,
    TreeLayout,
    check_array,
    host,
    poison,
    tree_layout,
)


@struct.dataclass
class SignPayload:
    """A float32 scale and one packed bit per coordinate (1 = negative, MSB first)."""

    scale: jax.Array  # float32[]
    signs: jax.Array  # uint8[ceil(d / 8)], padding bits zero
    layout: TreeLayout = struct.field(pytree_node=False)
    unit: bool = struct.field(pytree_node=False)  # sign(): scale is 0 or 1

    @property
    def num_bytes(self) -> int:
        return -(-self.layout.size // 8)

    @property
    def max_bits(self) -> int:
        return 32 + 8 * self.num_bytes

    def check(self) -> None:
        check_array(self.scale, (), np.float32, "sign payload.scale")
        check_array(self.signs, (self.num_bytes,), np.uint8, "sign payload.signs")


def _sign_compressor(name: str, unit: bool, scale_fn) -> Compressor:
    def _layout(tree, what):
        layout = tree_layout(tree, what=f"{name}.{what}")
        _codec.check_int32_bits(32 + 8 * -(-layout.size // 8), name)
        return layout

    def init(params):
        _layout(params, "init(params)")
        return ()

    def encode(updates, state, *, key):
        del key  # deterministic
        layout = _layout(updates, "encode(updates)")
        # Leaf by leaf, never materialising the flat vector (see _leafwise): the same bits as
        # `x = layout.flatten(updates)`, `scale_fn(x)`, `jnp.packbits(x < 0)` at a third of
        # the memory traffic; tests/compressors/test_leafwise.py pins it to that formulation.
        parts = _leafwise.leaves(layout, updates)
        scale = poison(scale_fn(layout, updates, parts), _leafwise.all_finite(parts))
        signs = _leafwise.pack_bits(layout, [part < 0 for part in parts])
        return SignPayload(scale, signs, layout, unit), state

    def decode(payload: SignPayload):
        payload.check()
        layout, scale = payload.layout, payload.scale
        # Each leaf straight from its bytes (no decoded flat vector to slice).
        leaves = [
            jnp.where(_leafwise.unpack_leaf(payload.signs, offset, size), -scale, scale)
            .reshape(shape)
            .astype(dtype)
            for offset, size, shape, dtype in zip(
                layout.offsets, layout.sizes, layout.shapes, layout.dtypes, strict=True
            )
        ]
        return jax.tree.unflatten(layout.treedef, leaves)

    def bits(payload: SignPayload) -> jax.Array:
        payload.check()
        return jnp.int32(payload.max_bits)

    return Compressor(init, encode, decode, bits, _to_bytes, _from_bytes)


def sign() -> Compressor:
    """signSGD: one bit per coordinate, ``decode = sign(x)`` with ``sign(0) = +1``.

    Bernstein, Wang, Azizzadenesheli, Anandkumar (2018), "signSGD: Compressed Optimisation for
    Non-Convex Problems", ICML. One bit cannot represent 0, so zero coordinates decode to +1;
    the payload also carries a float32 scale that is 1, or 0 when the whole update is zero
    (so ``decode(encode(0)) == 0``), or NaN for non-finite input. Biased.

    Wire format: float32 scale, then ``ceil(d/8)`` bytes of sign bits: ``32 + 8 ceil(d/8)``.

    Returns:
      A stateless :class:`Compressor`.
    """

    def scale_fn(layout, updates, parts):
        # any(x != 0) as max|x| > 0 per leaf (the same for finite x; non-finite x is poisoned).
        return jnp.where(_leafwise.peak(parts) > 0, 1.0, 0.0).astype(jnp.float32)

    return _sign_compressor("sign", True, scale_fn)


def scaled_sign() -> Compressor:
    """Scaled sign: ``(‖x‖₁/d) · sign(x)`` (``sign(0) = +1``).

    Karimireddy, Rebjock, Stich, Jaggi (2019), "Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes", ICML (the compressor of EF-SignSGD). Biased; its squared error is
    exactly ``‖x - C(x)‖² = ‖x‖² - ‖x‖₁²/d``, so it is a ``(‖x‖₁²/(d‖x‖²))``-contraction.
    ``‖x‖₁/d`` is computed as ``max|x| · mean(|x|/max|x|)`` so it cannot overflow.

    Wire format: float32 scale, then ``ceil(d/8)`` bytes of sign bits.

    Returns:
      A stateless :class:`Compressor`.
    """

    def scale_fn(layout, updates, parts):
        if layout.size == 0:
            return jnp.float32(0.0)
        peak = _leafwise.peak(parts)  # max is exact in any order: leaf by leaf
        safe = jnp.where(peak > 0, peak, 1.0)
        # The float sum keeps the flat vector, so its summation order (and every bit of the
        # scale) is that of earlier versions.
        return peak * jnp.mean(jnp.abs(layout.flatten(updates)) / safe)

    return _sign_compressor("scaled_sign", False, scale_fn)


def _check_canonical(scale: float, signs: np.ndarray, payload: SignPayload, who: str) -> None:
    d = payload.layout.size
    if np.signbit(scale) or (payload.unit and scale not in (0.0, 1.0)):
        raise ValueError(f"{who}: sign payload scale {scale} is invalid.")
    bits = np.unpackbits(signs)
    if bits[d:].any() or (scale == 0.0 and bits.any()):
        raise ValueError(f"{who}: sign payload has non-zero padding or signs with scale 0.")


def _to_bytes(payload: SignPayload) -> bytes:
    payload.check()
    scale, signs = host(payload.scale), host(payload.signs)
    head = _codec.floats_to_bytes(scale, "sign payload.scale")
    _check_canonical(float(scale), signs, payload, "to_bytes")
    return head + signs.tobytes()


def _from_bytes(data: bytes, template: SignPayload) -> SignPayload:
    template.check()
    size = template.max_bits // 8
    view = _codec.check_length(data, size, size, "sign payload")
    scale = _codec.floats_from_bytes(view, 0, 1, "sign payload.scale").reshape(())
    signs = np.frombuffer(view[4:], dtype=np.uint8).copy()
    _check_canonical(float(scale), signs, template, "from_bytes")
    return template.replace(scale=scale, signs=signs)
