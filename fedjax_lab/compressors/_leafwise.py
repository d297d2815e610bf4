"""Leaf-by-leaf forms of "flatten the update, work on the vector, unflatten" (same bits).

Every compressor of this package is defined on the concatenation ``x`` of the update's leaves
(:meth:`TreeLayout.flatten`). On XLA:CPU materialising ``x`` for a 10M-parameter update costs
2-4 memory passes (one fresh 40 MB buffer written by a chain of slice updates), and so does
materialising a decoded vector before :meth:`TreeLayout.unflatten` slices it. The helpers here
compute the same values without the big vector:

* :func:`leaves` gives each leaf as a float32 vector (exactly the slices of ``x``);
* :func:`peak` and :func:`all_finite` are ``max |x|`` and ``all(isfinite(x))`` from one
  reduction per leaf (both exact in any order; a reduction over a fused ``jnp.concatenate``
  of the leaves runs 10-30x slower than over the leaves on XLA:CPU);
* :func:`pack_bits` is ``jnp.packbits`` of the concatenated per-leaf bits, packed leaf by leaf
  (each leaf starts at bit ``offset mod 8`` of its first byte; bytes shared by two leaves are
  the bitwise or of both leaves' parts, as padding bits are zero);
* :func:`unpack_leaf` reads one leaf's bits back out of such a packed vector;
* :func:`concat_into` writes per-leaf pieces (e.g. int8 levels) into one payload vector, and
  :func:`unflatten_map` decodes a payload vector leaf by leaf;
* :func:`scatter_add_leaves` decodes sparse ``(index, value)`` pairs straight into the leaves,
  and :func:`gather_flat` is the inverse read, ``x[indices]``, straight from the leaves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fedjax_lab.compressors._base import TreeLayout, Updates


def leaves(layout: TreeLayout, tree: Updates) -> list[jax.Array]:
    """The leaves of ``tree`` raveled and cast to float32 (the pieces of ``layout.flatten``)."""
    return [jnp.ravel(jnp.asarray(leaf)).astype(jnp.float32) for leaf in jax.tree.leaves(tree)]


def peak(parts: list[jax.Array]) -> jax.Array:
    """``max |x|`` (0 for no coordinates) as a max of per-leaf maxima (max is exact in any order).

    A NaN leaf gives NaN or a finite number depending on the order; callers poison non-finite
    inputs (:func:`all_finite`) so that difference never shows.
    """
    peaks = [jnp.max(jnp.abs(part)) for part in parts if part.size]
    return functools.reduce(jnp.maximum, peaks, jnp.float32(0.0))


def all_finite(parts: list[jax.Array]) -> jax.Array:
    """``jnp.all(jnp.isfinite(x))`` as ``Σ (x_i - x_i) == 0`` per leaf.

    ``x_i - x_i`` is +0 for finite ``x_i`` and NaN for ±Inf/NaN, so each sum is 0 or NaN in any
    summation order; a float sum vectorises on XLA:CPU, a boolean all-reduce does not.
    """
    sums = [jnp.sum(part - part) for part in parts if part.size]
    return functools.reduce(jnp.logical_and, [s == 0 for s in sums], jnp.bool_(True))


def concat_into(layout: TreeLayout, parts: list[jax.Array], dtype) -> jax.Array:
    """``jnp.concatenate(parts)`` as slice updates of one buffer (faster on XLA:CPU)."""
    out = jnp.zeros((layout.size,), dtype)
    for offset, size, part in zip(layout.offsets, layout.sizes, parts, strict=True):
        if size:
            out = jax.lax.dynamic_update_slice(out, part.astype(dtype), (offset,))
    return out


def unflatten_map(layout: TreeLayout, vector: jax.Array, fn) -> Updates:
    """``layout.unflatten(fn(vector))`` for an elementwise ``fn``, applied slice by slice.

    Each output leaf is computed from its own slice of ``vector``, so the decoded flat vector
    is never materialised; elementwise, so every value is the one of the flat formulation.
    """
    leaves = [
        fn(vector[offset : offset + size]).reshape(shape).astype(dtype)
        for offset, size, shape, dtype in zip(
            layout.offsets, layout.sizes, layout.shapes, layout.dtypes, strict=True
        )
    ]
    return jax.tree.unflatten(layout.treedef, leaves)


def scatter_add_leaves(
    layout: TreeLayout, indices: jax.Array, values: jax.Array, order: jax.Array
) -> Updates:
    """``layout.unflatten(zeros(d).at[indices].add(values))`` without the d-long vector.

    Sparse decoders scatter ``k << d`` values; writing them into one fresh d-long buffer and
    slicing it into leaves costs three passes over d (zero fill, scatter, slice copies) on
    XLA:CPU. Here every leaf is its own buffer and receives only the entries inside it: the
    window of ``min(k, leaf size)`` entries starting at the first one past the leaf's offset.

    Args:
      layout: the update's layout.
      indices: int32[k] flat indices in ``[0, d)``.
      values: float32[k].
      order: int32[k], non-decreasing: ``indices`` where an entry may land in any leaf and
        ``>= d`` where it can only land at index 0 (a payload's trailing padding, e.g. STC's
        zero-sign entries). The first leaf always receives every entry, so it adds exactly the
        flat formulation's values in the flat formulation's order.

    Returns:
      The decoded update (leaves cast to their dtypes); all NaN if ``order`` decreases
      anywhere (a payload breaking its documented order is reported, not partly dropped).
    """
    k = indices.shape[0]
    ordered = jnp.all(order[1:] >= order[:-1]) if k > 1 else jnp.bool_(True)
    starts = jnp.searchsorted(order, jnp.asarray(layout.offsets, jnp.int32), side="left")
    # Windows never reach past the end of the padded arrays, so no dynamic_slice is clamped:
    # under jit XLA:CPU moved a clamped window of `values` (a gather of the update at
    # `indices`) by one entry relative to the same window of `indices` (measured: rand-k's
    # fused encode + decode put a neighbour's value into a leaf).
    windows = [max(size, 2) for size in layout.sizes]
    pad = max([w for w in windows[1:] if w < k], default=0)
    padded_indices = jnp.concatenate([indices, jnp.full((pad,), layout.size, indices.dtype)])
    padded_values = jnp.concatenate([values, jnp.zeros((pad,), values.dtype)])
    leaves = []
    for leaf, (offset, size, shape, dtype) in enumerate(
        zip(layout.offsets, layout.sizes, layout.shapes, layout.dtypes, strict=True)
    ):
        # At least 2 entries: XLA turns a one-entry scatter-add into a store, which would keep
        # a -0.0 value where the flat formulation's k-entry scatter adds it to +0.0.
        window = windows[leaf]
        if leaf == 0 or window >= k:
            window_indices, window_values = indices, values
        else:
            # Entries past the leaf (later leaves, padding) are dropped below.
            window_indices = jax.lax.dynamic_slice(padded_indices, (starts[leaf],), (window,))
            window_values = jax.lax.dynamic_slice(padded_values, (starts[leaf],), (window,))
        local = window_indices - offset
        local = jnp.where((local >= 0) & (local < size), local, size)  # size: dropped
        # A broken order starts every leaf from NaN (NaN + anything stays NaN): one fill, where
        # selecting NaN after the scatter was another pass over the leaf.
        fill = jnp.where(ordered, jnp.float32(0), jnp.float32(jnp.nan))
        part = jnp.full((size,), fill).at[local].add(window_values, mode="drop")
        leaves.append(part.reshape(shape).astype(dtype))
    return jax.tree.unflatten(layout.treedef, leaves)


def gather_parts(
    parts: list[jax.Array], starts: tuple[int, ...], positions: jax.Array
) -> jax.Array:
    """``concat(parts)[positions]`` for increasing positions, read from the parts themselves.

    Part ``l`` holds positions ``starts[l] .. starts[l] + len(parts[l]) - 1`` (the parts may be
    separated by unused positions, e.g. the padded index space of ``_select``). Because the
    positions strictly increase, those inside part ``l`` are one contiguous run of at most
    ``len(part)`` entries of ``positions``: each part gathers only the window of
    ``min(n, len(part))`` entries from the first one at or past its start, instead of every
    part gathering all ``n`` (a 62-leaf ResNet-18 would read its ``k`` indices 62 times) or
    the parts being concatenated into one vector first.

    Args:
      parts: non-empty 1-D arrays of one dtype.
      starts: static, strictly increasing start position of each part.
      positions: int32[n], non-decreasing, and strictly increasing where inside a part (a
        position repeated inside a part may read 0); entries outside every part (e.g. a
        sentinel past the last part for unused slots, which may repeat) read 0.

    Returns:
      ``[n]`` values in the parts' dtype.
    """
    n = positions.shape[0]
    dtype = parts[0].dtype
    if len(parts) == 1:
        (part,), (start,) = parts, starts
        local = positions - start
        inside = (local >= 0) & (local < part.shape[0])
        return jnp.where(inside, part[jnp.clip(local, 0, part.shape[0] - 1)], 0).astype(dtype)
    windows = [min(n, part.shape[0]) for part in parts]
    pad = max(windows)
    # Past the last part: padding entries read 0 and no window below is ever clamped (see
    # scatter_add_leaves on what a clamped window did on XLA:CPU).
    beyond = starts[-1] + parts[-1].shape[0]
    padded = jnp.concatenate([positions, jnp.full((pad,), beyond, positions.dtype)])
    firsts = jnp.searchsorted(positions, jnp.asarray(starts, positions.dtype), side="left")
    out = jnp.zeros((n + pad,), dtype)
    for part, start, window, first in zip(parts, starts, windows, firsts, strict=True):
        size = part.shape[0]
        local = jax.lax.dynamic_slice(padded, (first,), (window,)) - start
        inside = local < size  # >= 0: the window starts at the part's first position
        values = part[jnp.minimum(local, size - 1)]
        current = jax.lax.dynamic_slice(out, (first,), (window,))
        out = jax.lax.dynamic_update_slice(out, jnp.where(inside, values, current), (first,))
    return out[:n]


def gather_flat(parts: list[jax.Array], indices: jax.Array) -> jax.Array:
    """``jnp.concatenate(parts)[indices]`` for strictly increasing ``indices`` in ``[0, d)``.

    The parts are 1-D (e.g. :func:`leaves`; empty ones allowed) and are never concatenated:
    see :func:`gather_parts`.
    """
    kept, starts, offset = [], [], 0
    for part in parts:
        if part.shape[0]:
            kept.append(part)
            starts.append(offset)
        offset += part.shape[0]
    return gather_parts(kept, tuple(starts), indices)


def pack_bits(layout: TreeLayout, bits: list[jax.Array]) -> jax.Array:
    """``jnp.packbits(concat(bits))`` (MSB first, zero padding) packed leaf by leaf.

    Args:
      layout: the update's layout; ``bits[j]`` belongs to leaf ``j`` (length ``sizes[j]``).
      bits: one boolean vector per leaf.

    Returns:
      uint8[ceil(d / 8)].
    """
    num_bytes = -(-layout.size // 8)
    out = jnp.zeros((num_bytes,), jnp.uint8)
    for offset, size, part in zip(layout.offsets, layout.sizes, bits, strict=True):
        if size == 0:
            continue
        lead = offset % 8
        if lead:
            part = jnp.pad(part, (lead, 0))
        piece = jnp.packbits(part)
        start = offset // 8
        if lead:  # the first byte is shared with the previous leaf: or them
            piece = piece.at[0].set(piece[0] | out[start])
        out = jax.lax.dynamic_update_slice(out, piece, (start,))
    return out


def unpack_leaf(packed: jax.Array, offset: int, size: int) -> jax.Array:
    """Bits ``offset .. offset + size - 1`` of ``jnp.unpackbits(packed)`` as booleans."""
    start, lead = offset // 8, offset % 8
    stop = -(-(offset + size) // 8)
    return jnp.unpackbits(packed[start:stop])[lead : lead + size].astype(bool)
