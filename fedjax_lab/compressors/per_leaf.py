"""Per-leaf application of a compressor; unselected leaves are sent raw."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_lab.compressors import _codec
from fedjax_lab.compressors._base import (
    Compressor,
    LeafPredicate,
    TreeLayout,
    check_array,
    host,
    payload_max_bits,
    select_leaves,
    tree_layout,
)


@struct.dataclass
class PerLeafPayload:
    """One inner payload per compressed leaf and raw float32 values for the other leaves."""

    parts: tuple[Any, ...]  # inner payloads of the selected leaves, in jax.tree order
    raw: tuple[jax.Array, ...]  # float32 arrays of the unselected leaves, in jax.tree order
    layout: TreeLayout = struct.field(pytree_node=False)
    selected: tuple[bool, ...] = struct.field(pytree_node=False)

    @property
    def raw_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(s for s, c in zip(self.layout.shapes, self.selected, strict=True) if not c)

    @property
    def raw_size(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.raw_shapes)

    @property
    def part_max_bytes(self) -> tuple[int, ...]:
        return tuple(-(-payload_max_bits(p, "per_leaf") // 8) for p in self.parts)

    @property
    def header_widths(self) -> tuple[int, ...]:
        return tuple(_codec.count_width(m) for m in self.part_max_bytes)

    @property
    def max_bits(self) -> int:
        return (
            _codec.pad8(sum(self.header_widths)) + 32 * self.raw_size + 8 * sum(self.part_max_bytes)
        )

    def check(self) -> None:
        if len(self.parts) != sum(self.selected) or len(self.raw) != len(self.raw_shapes):
            raise ValueError("per_leaf payload: wrong number of parts for its layout.")
        for value, shape in zip(self.raw, self.raw_shapes, strict=True):
            check_array(value, shape, np.float32, "per_leaf payload.raw")


def per_leaf(compressor: Compressor, compress: LeafPredicate | None = None) -> Compressor:
    """Applies ``compressor`` to every selected leaf on its own; other leaves go raw (float32).

    The usual layer-wise application of quantizers and sparsifiers (e.g. TernGrad's layer-wise
    scaling, Wen et al. 2017; QSGD per layer, Alistarh et al. 2017): each selected leaf is
    compressed as a separate vector with its own norm/scale/k and its own key
    (``jax.random.split(key, num_selected)``). Biases are often sent raw:
    ``per_leaf(qsgd(4), compress=lambda path, leaf: leaf.ndim > 1)``. A count ``k`` applies to
    every leaf (a leaf smaller than ``k`` raises); pass a fraction for mixed sizes.
    To compress the selected leaves *jointly* instead, use :func:`masked`.

    Wire format: a header with each part's byte length (``bit_length(max bytes of that part)``
    bits each, padded to a byte), the raw leaves as float32, then every part's own bytes.
    ``bits`` counts all of it.

    Args:
      compressor: inner compressor, applied to one leaf (an array) at a time. Its payloads must
        expose ``max_bits`` (all compressors of this package do).
      compress: ``compress(path, leaf) -> bool`` on static paths/shapes; ``None`` = every leaf.

    Returns:
      A :class:`Compressor`; its state is a tuple with the inner state of each compressed leaf
      and ``()`` for raw leaves.
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"per_leaf: expected a Compressor, got {type(compressor).__name__}.")

    def init(params):
        tree_layout(params, what="per_leaf.init(params)", indexed=False)
        selected = select_leaves(params, compress, what="per_leaf")
        leaves = jax.tree.leaves(params)
        return tuple(
            compressor.init(leaf) if chosen else ()
            for leaf, chosen in zip(leaves, selected, strict=True)
        )

    def encode(updates, state, *, key):
        layout = tree_layout(updates, what="per_leaf.encode(updates)", indexed=False)
        selected = select_leaves(updates, compress, what="per_leaf")
        leaves = jax.tree.leaves(updates)
        if not isinstance(state, tuple) or len(state) != len(leaves):
            raise ValueError(
                f"per_leaf.encode: state must be the tuple from init with one entry per leaf "
                f"({len(leaves)}), got {type(state).__name__}."
            )
        keys = jax.random.split(key, max(sum(selected), 1))
        parts, raw, new_state, j = [], [], [], 0
        for leaf, chosen, leaf_state in zip(leaves, selected, state, strict=True):
            if chosen:
                part, leaf_state = compressor.encode(leaf, leaf_state, key=keys[j])
                parts.append(part)
                j += 1
            else:
                raw.append(jnp.asarray(leaf).astype(jnp.float32))
            new_state.append(leaf_state)
        payload = PerLeafPayload(tuple(parts), tuple(raw), layout, selected)
        _codec.check_int32_bits(payload.max_bits, "per_leaf")
        return payload, tuple(new_state)

    def decode(payload: PerLeafPayload):
        payload.check()
        parts, raw = iter(payload.parts), iter(payload.raw)
        leaves = [
            compressor.decode(next(parts)) if chosen else next(raw) for chosen in payload.selected
        ]
        leaves = [
            leaf.astype(dtype) for leaf, dtype in zip(leaves, payload.layout.dtypes, strict=True)
        ]
        return jax.tree.unflatten(payload.layout.treedef, leaves)

    def bits(payload: PerLeafPayload) -> jax.Array:
        payload.check()
        total = jnp.int32(_codec.pad8(sum(payload.header_widths)) + 32 * payload.raw_size)
        for part in payload.parts:
            total = total + _codec.padded(compressor.bits(part))
        return total

    def to_bytes(payload: PerLeafPayload) -> bytes:
        payload.check()
        blobs = [compressor.to_bytes(part) for part in payload.parts]
        writer = _codec.BitWriter()
        for blob, width in zip(blobs, payload.header_widths, strict=True):
            writer.fixed(np.array([len(blob)]), width)
        raw = b"".join(_codec.floats_to_bytes(host(v), "per_leaf payload.raw") for v in payload.raw)
        return writer.to_bytes() + raw + b"".join(blobs)

    def from_bytes(data: bytes, template: PerLeafPayload) -> PerLeafPayload:
        template.check()
        header_bytes = _codec.pad8(sum(template.header_widths)) // 8
        raw_bytes = 4 * template.raw_size
        view = _codec.check_length(
            data, header_bytes + raw_bytes, template.max_bits // 8, "per_leaf payload"
        )
        reader = _codec.BitReader(view[:header_bytes], "per_leaf payload header")
        lengths = [int(reader.fixed(1, width)[0]) for width in template.header_widths]
        reader.finish()
        if any(n > m for n, m in zip(lengths, template.part_max_bytes, strict=True)) or (
            header_bytes + raw_bytes + sum(lengths) != len(view)
        ):
            raise ValueError(
                "from_bytes: per_leaf payload part lengths do not match the data length."
            )
        offset, raw = header_bytes, []
        for shape in template.raw_shapes:
            count = int(np.prod(shape, dtype=np.int64))
            raw.append(
                _codec.floats_from_bytes(view, offset, count, "per_leaf payload.raw").reshape(shape)
            )
            offset += 4 * count
        parts = []
        for length, part in zip(lengths, template.parts, strict=True):
            parts.append(compressor.from_bytes(view[offset : offset + length], part))
            offset += length
        return template.replace(parts=tuple(parts), raw=tuple(raw))

    return Compressor(init, encode, decode, bits, to_bytes, from_bytes)
