"""Exact bit accounting of the conv-layer part of STC and SSTC payloads.

Mora, Foschini, Bellavista (2022), "Structured Sparse Ternary Compression for Convolutional
Layers in Federated Learning" (Table I) compare STC (Sattler et al., 2019) and SSTC by the
compression factor of the *convolutional layers* alone. These helpers give the exact number of
bits each payload spends on conv layers, computed inside jit (int32, vmap-able):

* STC: the payload is one ternary vector over the whole model. Its conv part is re-encoded
  on its own with the same code: the conv-restricted ternary vector (conv leaves concatenated
  in ``jax.tree`` order, positions counted inside that vector) written as an STC stream, i.e.
  the count of non-zeros in ``bit_length(k)`` bits, the Golomb/Rice-coded gaps with the same
  ``b*`` and one sign bit per non-zero (see :func:`~fedjax_lab.compressors.stc.write_ternary`).
* SSTC: everything of the stream that describes conv layers: the per-layer kept-kernel counts
  and kernel indices (``b_k`` bits each) and the 2-bit ternary map of every kept element.

Neither count includes the shared float32 ``μ`` nor byte padding; both are unpadded stream
lengths, so ``32 * conv_size / bits`` is the conv-layer compression factor against 32-bit
FedAvg.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.compressors._base import TreeLayout
from fedjax_lab.compressors.sstc import SSTCPayload
from fedjax_lab.compressors.stc import STCPayload, compact, ternary_stream_bits


def conv_leaves(
    tree: Any, is_conv: Callable[[Any, Any], bool] | None = None
) -> tuple[bool, ...]:
    """Which leaves (``jax.tree`` order) are conv kernels; default: every 4-D leaf (as SSTC).

    Args:
      tree: params/updates pytree (arrays or ``jax.ShapeDtypeStruct``).
      is_conv: optional ``is_conv(path, leaf) -> bool``.

    Returns:
      One bool per leaf.
    """
    flags = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flag = len(np.shape(leaf)) == 4 if is_conv is None else is_conv(path, leaf)
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"conv_leaves: is_conv must return a bool, got {flag!r}.")
        flags.append(bool(flag))
    return tuple(flags)


def conv_size(layout: TreeLayout, conv: tuple[bool, ...]) -> int:
    """Number of coordinates in the conv leaves."""
    _check_mask(layout, conv, "conv_size")
    return sum(n for n, c in zip(layout.sizes, conv, strict=True) if c)


def _check_mask(layout: TreeLayout, conv: tuple[bool, ...], who: str) -> None:
    if len(conv) != len(layout.shapes):
        raise ValueError(
            f"{who}: conv has {len(conv)} flags but the payload has {len(layout.shapes)} "
            "leaves; build it with conv_leaves(params) for the same params tree."
        )


def stc_conv_split(payload: STCPayload, conv: tuple[bool, ...]) -> tuple[jax.Array, jax.Array]:
    """The conv-restricted ternary vector of an STC payload, in canonical form.

    Args:
      payload: ONE :class:`~fedjax_lab.compressors.stc.STCPayload` (vmap for a stack).
      conv: per-leaf conv flags (:func:`conv_leaves`).

    Returns:
      ``(indices[k], signs[k])``: the non-zeros that fall in conv leaves first, by ascending
      position inside the concatenated conv leaves, then zeros (the STC canonical form).
    """
    payload.check()
    layout = payload.layout
    _check_mask(layout, conv, "stc_conv_split")
    sizes = np.asarray(layout.sizes, np.int64)
    ends = np.cumsum(sizes)
    flags = np.asarray(conv, bool)
    # Coordinates of non-conv leaves before each leaf: subtracting them turns a global position
    # inside a conv leaf into its position inside the concatenated conv leaves.
    skipped = np.cumsum(np.where(flags, 0, sizes)) - np.where(flags, 0, sizes)
    leaf = jnp.searchsorted(jnp.asarray(ends, jnp.int32), payload.indices, side="right")
    leaf = jnp.minimum(leaf, len(sizes) - 1)
    in_conv = jnp.asarray(flags)[leaf] & (payload.signs != 0)
    local = payload.indices - jnp.asarray(skipped, jnp.int32)[leaf]
    signs = jnp.where(in_conv, payload.signs, 0).astype(jnp.int8)
    return compact(local.astype(jnp.int32), signs, conv_size(layout, conv))


def stc_conv_bits(payload: STCPayload, conv: tuple[bool, ...]) -> jax.Array:
    """Exact bits of the conv part of an STC payload (count + Golomb gaps + signs; int32).

    See the module docstring: the conv-restricted ternary vector re-encoded with the payload's
    own code (capacity ``k`` and Rice parameter ``b*``).
    """
    indices, signs = stc_conv_split(payload, conv)
    return jnp.int32(ternary_stream_bits(indices, signs, payload.k, payload.golomb_b))


def stc_conv_nonzeros(payload: STCPayload, conv: tuple[bool, ...]) -> jax.Array:
    """Number of non-zeros of an STC payload that fall in conv leaves (int32)."""
    return jnp.sum(stc_conv_split(payload, conv)[1] != 0).astype(jnp.int32)


def sstc_conv_bits(payload: SSTCPayload) -> jax.Array:
    """Exact bits of the conv part of an SSTC payload (counts + kernel indices + maps; int32).

    ``sum_l b_l + sum_{kept kernels} (b_layer + 2 H W)`` with ``b_l = bit_length(C_l F_l)``;
    the first terms of the SSTC stream (``fedjax_lab.compressors.sstc`` wire format).
    """
    payload.check()
    spec = payload.spec
    bits = jnp.int32(sum(spec.index_widths) + spec.num_keep * 2 * spec.kernel_size)
    if spec.num_keep:
        layer = jnp.searchsorted(
            jnp.asarray(spec.kernel_offsets[1:], jnp.int32), payload.kernel_ids, side="right"
        )
        bits = bits + jnp.sum(jnp.asarray(spec.index_widths, jnp.int32)[layer])
    return bits


def sstc_conv_nonzeros(payload: SSTCPayload) -> jax.Array:
    """Number of non-zero trits inside the kept kernels of an SSTC payload (int32)."""
    payload.check()
    return jnp.sum(payload.kernel_trits != 0).astype(jnp.int32)


def sstc_conv_size(payload: SSTCPayload) -> int:
    """Number of coordinates in the leaves SSTC treats as conv kernels."""
    spec = payload.spec
    return sum(spec.layout.sizes[i] for i in spec.conv_leaves)
