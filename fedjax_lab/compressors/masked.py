"""Joint compression of selected leaves; the other leaves are sent raw."""

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
class MaskedPayload:
    """The inner payload of the selected leaves (as one tuple) and the raw other leaves."""

    part: Any  # inner payload of the tuple of selected leaves
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
    def max_bits(self) -> int:
        return 32 * self.raw_size + _codec.pad8(payload_max_bits(self.part, "masked"))

    def check(self) -> None:
        if len(self.raw) != len(self.raw_shapes):
            raise ValueError("masked payload: wrong number of raw leaves for its layout.")
        for value, shape in zip(self.raw, self.raw_shapes, strict=True):
            check_array(value, shape, np.float32, "masked payload.raw")


def masked(compressor: Compressor, compress: LeafPredicate) -> Compressor:
    """Compresses the selected leaves *together* with ``compressor``; sends the rest raw.

    For compressors defined on the whole model vector — e.g. STC's global top-p (Sattler et
    al., 2019) — while keeping small, sensitive leaves such as biases or normalisation scales
    exact: ``masked(stc(0.01), compress=lambda path, leaf: leaf.ndim > 1)``. The selected leaves
    are passed to ``compressor`` as one tuple (in ``jax.tree`` order), so norms, top-k and the
    like are taken over all of them. For a separate compression of each leaf use
    :func:`per_leaf`.

    Wire format: the raw leaves as float32, then the inner payload's bytes (no header: the
    inner part is the rest of the data).

    Args:
      compressor: inner compressor. Its payloads must expose ``max_bits`` (all compressors of
        this package do).
      compress: ``compress(path, leaf) -> bool`` on static paths/shapes; must select at least
        one leaf.

    Returns:
      A :class:`Compressor` whose state is the inner compressor's state.
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"masked: expected a Compressor, got {type(compressor).__name__}.")
    if not callable(compress):
        raise TypeError("masked: compress must be a callable compress(path, leaf) -> bool.")

    def _split(tree, what):
        layout = tree_layout(tree, what=f"masked.{what}", indexed=False)
        selected = select_leaves(tree, compress, what="masked")
        if not any(selected):
            raise ValueError(
                f"masked.{what}: compress selected no leaf; use identity() to send everything raw."
            )
        leaves = jax.tree.leaves(tree)
        chosen = tuple(leaf for leaf, c in zip(leaves, selected, strict=True) if c)
        rest = tuple(leaf for leaf, c in zip(leaves, selected, strict=True) if not c)
        return layout, selected, chosen, rest

    def init(params):
        _, _, chosen, _ = _split(params, "init(params)")
        return compressor.init(chosen)

    def encode(updates, state, *, key):
        layout, selected, chosen, rest = _split(updates, "encode(updates)")
        part, state = compressor.encode(chosen, state, key=key)
        raw = tuple(jnp.asarray(leaf).astype(jnp.float32) for leaf in rest)
        payload = MaskedPayload(part, raw, layout, selected)
        _codec.check_int32_bits(payload.max_bits, "masked")
        return payload, state

    def decode(payload: MaskedPayload):
        payload.check()
        chosen, raw = iter(compressor.decode(payload.part)), iter(payload.raw)
        leaves = [next(chosen) if c else next(raw) for c in payload.selected]
        leaves = [
            leaf.astype(dtype) for leaf, dtype in zip(leaves, payload.layout.dtypes, strict=True)
        ]
        return jax.tree.unflatten(payload.layout.treedef, leaves)

    def bits(payload: MaskedPayload) -> jax.Array:
        payload.check()
        return 32 * payload.raw_size + _codec.padded(compressor.bits(payload.part))

    def to_bytes(payload: MaskedPayload) -> bytes:
        payload.check()
        raw = b"".join(_codec.floats_to_bytes(host(v), "masked payload.raw") for v in payload.raw)
        return raw + compressor.to_bytes(payload.part)

    def from_bytes(data: bytes, template: MaskedPayload) -> MaskedPayload:
        template.check()
        raw_bytes = 4 * template.raw_size
        view = _codec.check_length(data, raw_bytes, template.max_bits // 8, "masked payload")
        offset, raw = 0, []
        for shape in template.raw_shapes:
            count = int(np.prod(shape, dtype=np.int64))
            values = _codec.floats_from_bytes(view, offset, count, "masked payload.raw")
            raw.append(values.reshape(shape))
            offset += 4 * count
        part = compressor.from_bytes(view[raw_bytes:], template.part)
        return template.replace(part=part, raw=tuple(raw))

    return Compressor(init, encode, decode, bits, to_bytes, from_bytes)
