"""No compression: the 32 bits/float baseline."""

from __future__ import annotations

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
    tree_layout,
)


@struct.dataclass
class IdentityPayload:
    """The update as one float32 vector (leaves concatenated in ``jax.tree`` order)."""

    values: jax.Array  # float32[d]
    layout: TreeLayout = struct.field(pytree_node=False)

    @property
    def max_bits(self) -> int:
        return 32 * self.layout.size

    def check(self) -> None:
        check_array(self.values, (self.layout.size,), np.float32, "identity payload.values")


def identity() -> Compressor:
    """Sends every coordinate as a float32 (32 bits per coordinate, no header).

    The uncompressed baseline of federated averaging (McMahan et al., 2017, "Communication-
    Efficient Learning of Deep Networks from Decentralized Data"). Leaves of other floating
    dtypes are sent as float32 and cast back by ``decode``.

    Returns:
      A stateless :class:`Compressor`; ``bits = 32 * d``.
    """

    def init(params):
        layout = tree_layout(params, what="identity.init(params)")
        _codec.check_int32_bits(32 * layout.size, "identity")
        return ()

    def encode(updates, state, *, key):
        del key  # deterministic
        layout = tree_layout(updates, what="identity.encode(updates)")
        _codec.check_int32_bits(32 * layout.size, "identity")
        return IdentityPayload(layout.flatten(updates), layout), state

    def decode(payload: IdentityPayload):
        payload.check()
        return payload.layout.unflatten(payload.values)

    def bits(payload: IdentityPayload) -> jax.Array:
        payload.check()
        return jnp.int32(32 * payload.layout.size)

    def to_bytes(payload: IdentityPayload) -> bytes:
        payload.check()
        return _codec.floats_to_bytes(host(payload.values), "identity payload.values")

    def from_bytes(data: bytes, template: IdentityPayload) -> IdentityPayload:
        template.check()
        d = template.layout.size
        view = _codec.check_length(data, 4 * d, 4 * d, "identity payload")
        values = _codec.floats_from_bytes(view, 0, d, "identity payload.values")
        return IdentityPayload(values, template.layout)

    return Compressor(init, encode, decode, bits, to_bytes, from_bytes)
