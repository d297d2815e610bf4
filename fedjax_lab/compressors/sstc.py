"""Structured Sparse Ternary Compression for convolutional layers (Mora et al., 2022)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_lab.compressors import _codec, _leafwise, _select
from fedjax_lab.compressors._base import (
    Compressor,
    TreeLayout,
    check_array,
    host,
    poison,
    resolve_count,
    tree_layout,
    validate_fraction,
)
from fedjax_lab.compressors.stc import (
    check_ternary,
    read_ternary,
    ternarize_top,
    ternary_stream_bits,
    ternary_stream_max,
    write_ternary,
)


@dataclasses.dataclass(frozen=True)
class SSTCSpec:
    """Static plan of one SSTC payload: which leaves are conv kernels and all the counts."""

    layout: TreeLayout
    conv_leaves: tuple[int, ...]  # leaf numbers (jax.tree order) treated as conv kernels
    conv_channels: tuple[int, ...]  # C * F of each conv leaf (kernels per layer)
    kernel_size: int  # H * W, shared by all conv leaves
    num_keep: int  # kernels kept, over all conv layers
    union_k: int  # coordinates kept by the STC step on the union
    golomb_b: int

    @property
    def nc_leaves(self) -> tuple[int, ...]:
        conv = set(self.conv_leaves)
        return tuple(i for i in range(len(self.layout.shapes)) if i not in conv)

    @property
    def nc_size(self) -> int:
        return sum(self.layout.sizes[i] for i in self.nc_leaves)

    @property
    def num_kernels(self) -> int:
        return sum(self.conv_channels)

    @property
    def kernel_offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0, *self.conv_channels)))

    @property
    def index_widths(self) -> tuple[int, ...]:
        # b_k = 1 + floor(log2(C F)) bits per kernel index (and per-layer count) of a layer.
        return tuple(int(cf).bit_length() for cf in self.conv_channels)

    @property
    def nc_cap(self) -> int:
        return min(self.union_k, self.nc_size)


@struct.dataclass
class SSTCPayload:
    """μ, kept kernels with their ternary maps, and the STC-coded non-conv non-zeros."""

    mu: jax.Array  # float32[]
    kernel_ids: jax.Array  # int32[num_keep], strictly increasing global kernel ids
    kernel_trits: jax.Array  # int8[num_keep, H * W]
    nc_indices: jax.Array  # int32[nc_cap], canonical (see STCPayload)
    nc_signs: jax.Array  # int8[nc_cap]
    spec: SSTCSpec = struct.field(pytree_node=False)

    @property
    def max_bits(self) -> int:
        return 32 + _codec.pad8(_stream_max(self.spec))

    def check(self) -> None:
        spec = self.spec
        check_array(self.mu, (), np.float32, "sstc payload.mu")
        check_array(self.kernel_ids, (spec.num_keep,), np.int32, "sstc payload.kernel_ids")
        check_array(
            self.kernel_trits,
            (spec.num_keep, spec.kernel_size),
            np.int8,
            "sstc payload.kernel_trits",
        )
        check_array(self.nc_indices, (spec.nc_cap,), np.int32, "sstc payload.nc_indices")
        check_array(self.nc_signs, (spec.nc_cap,), np.int8, "sstc payload.nc_signs")


def _stream_max(spec: SSTCSpec) -> int:
    widths = spec.index_widths
    kernel_bits = spec.num_keep * (max(widths, default=0) + 2 * spec.kernel_size)
    nc_bits = ternary_stream_max(spec.nc_cap, spec.nc_size, spec.golomb_b)
    return sum(widths) + kernel_bits + nc_bits


def _is_conv_default(path: Any, leaf: Any) -> bool:
    del path
    return len(leaf.shape) == 4


def sstc(
    sparsity: float,
    kernel_fraction: float,
    is_conv: Callable[[Any, Any], bool] | None = None,
) -> Compressor:
    """Structured STC: keep whole conv kernels, then STC on what is left.

    Mora, Foschini, Bellavista (2022), "Structured Sparse Ternary Compression for
    Convolutional Layers in Federated Learning", IEEE VTC2022-Spring (Algorithm 1):

    1. Conv leaves are HWIO kernels ``[H, W, C, F]`` (flax layout); kernel ``(c, f)`` is the
       ``H x W`` slice. Over ALL conv layers, keep the ``max(1, round(kernel_fraction * N))``
       kernels with the largest mean ``|Δ|`` (``N`` = total number of kernels).
    2. Run STC (:func:`~fedjax_lab.compressors.stc`) with sparsity ``p`` on the union ``U`` of
       the kept kernels' coordinates and all non-conv parameters: keep the
       ``max(1, round(p |U|))`` largest ``|Δ|`` of ``U``, ``μ = mean |kept|``, send
       ``μ · sign``.
    3. Scatter back; everything else is 0.

    ``sstc(p, kernel_fraction=1.0)`` decodes to exactly ``stc(p)``'s update (only the wire
    format differs).

    Wire format (paper §IV-A): float32 ``μ``; per conv layer the number of kept kernels and
    each kept kernel's index within the layer, both in ``b_k = 1 + floor(log2(C F))`` bits; a
    2-bit ternary map per element of each kept kernel (non-zero bit, sign bit); then the
    non-conv part exactly as in STC (count, Golomb-coded gaps with the paper's ``b*``, sign
    bits).

    All conv leaves must share one kernel size ``H x W`` (so ``|U|`` and the payload shapes are
    static); with mixed sizes pass ``is_conv`` to choose the leaves treated as conv kernels
    (the others are coded as non-conv).

    Args:
      sparsity: ``p`` in ``(0, 1]``, the fraction of the union kept by the STC step.
      kernel_fraction: fraction of conv kernels kept, in ``(0, 1]``.
      is_conv: ``is_conv(path, leaf) -> bool`` picks the conv-kernel leaves (must be 4-D);
        default: every 4-D leaf.

    Returns:
      A stateless :class:`Compressor`.
    """
    p = validate_fraction(sparsity, what="sstc: sparsity")
    kf = validate_fraction(kernel_fraction, what="sstc: kernel_fraction")
    select = _is_conv_default if is_conv is None else is_conv
    golomb_b = _codec.golomb_bits(p)

    def _spec(tree, what: str) -> SSTCSpec:
        layout = tree_layout(tree, what=what)
        path_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        conv, channels, kernel_sizes = [], [], set()
        for i, (path, leaf) in enumerate(path_leaves):
            chosen = select(path, leaf)
            if not isinstance(chosen, (bool, np.bool_)):
                raise TypeError(f"{what}: is_conv must return a bool, got {chosen!r}.")
            if not chosen:
                continue
            shape = layout.shapes[i]
            if len(shape) != 4:
                raise ValueError(
                    f"{what}: is_conv selected leaf {layout.paths[i]} of shape {shape}; conv "
                    "kernels must be 4-D [H, W, C, F] (flax HWIO)."
                )
            if layout.sizes[i] == 0:
                continue  # no kernels to rank; its (zero) coordinates are trivially non-conv
            conv.append(i)
            channels.append(shape[2] * shape[3])
            kernel_sizes.add((shape[0], shape[1]))
        if len(kernel_sizes) > 1:
            raise ValueError(
                f"{what}: conv kernels have different spatial sizes {sorted(kernel_sizes)}; "
                "SSTC needs one H x W. Pass is_conv=... to treat only the leaves of one size as "
                "conv kernels (the rest are coded as non-conv parameters)."
            )
        ((h, w),) = kernel_sizes or {(0, 0)}
        num_kernels = sum(channels)
        num_keep = max(1, round(kf * num_kernels)) if num_kernels else 0
        nc_size = layout.size - sum(layout.sizes[i] for i in conv)
        union_k = resolve_count(p, num_keep * h * w + nc_size, what="sstc")
        spec = SSTCSpec(layout, tuple(conv), tuple(channels), h * w, num_keep, union_k, golomb_b)
        _codec.check_int32_bits(32 + _codec.pad8(_stream_max(spec)), "sstc")
        return spec

    def init(params):
        _spec(params, "sstc.init(params)")
        return ()

    def encode(updates, state, *, key):
        del key  # deterministic
        spec = _spec(updates, "sstc.encode(updates)")
        layout = spec.layout
        parts = _leafwise.leaves(layout, updates)
        finite = _leafwise.all_finite(parts)

        def conv_mat(i):  # HWIO kernel leaf i as [H W, C F]: column = kernel, row = element
            return jnp.abs(parts[i]).reshape(spec.kernel_size, -1)

        keep = {}
        if spec.num_keep:
            kernel_scores = jnp.concatenate([_row_mean(conv_mat(i)) for i in spec.conv_leaves])
            kernel_ids = _select.top_k_indices(kernel_scores, spec.num_keep)
            kept = jnp.zeros((spec.num_kernels,), bool).at[kernel_ids].set(True)
            offsets = spec.kernel_offsets
            for n, i in enumerate(spec.conv_leaves):
                keep[i] = kept[offsets[n] : offsets[n + 1]]
        else:
            kernel_ids = jnp.zeros((0,), jnp.int32)

        def score(i, part, keep):
            # |Δ| of the union U: kept kernels and non-conv coordinates; -1 ranks the
            # other kernels' coordinates below all of U.
            if i not in keep:
                return jnp.abs(part)
            mat = jnp.abs(part).reshape(spec.kernel_size, -1)
            return jnp.where(keep[i][None, :], mat, -1.0).reshape(-1)

        mu, positions, signs = ternarize_top(parts, spec.union_k, score, keep)
        # The kept coordinates are read off `positions` (union_k of them, ascending) instead
        # of scattering a d-long ternary vector and slicing, transposing and concatenating
        # its leaves: each of those was a pass over d.
        kernel, row, nc_index = _locate(spec, positions)
        if spec.num_keep:
            trits = jnp.zeros((spec.num_kernels, spec.kernel_size), jnp.int8)
            trits = trits.at[kernel, row].set(signs, mode="drop")  # non-conv: kernel past end
            kernel_trits = trits[kernel_ids]
        else:
            kernel_trits = jnp.zeros((0, spec.kernel_size), jnp.int8)
        # Non-conv non-zeros in ascending order of their index among the non-conv coordinates.
        picked, valid = _select.nonzero_positions((nc_index >= 0) & (signs != 0), spec.nc_cap)
        nc_signs = jnp.where(valid, signs[picked], 0).astype(jnp.int8)
        nc_indices = jnp.where(valid, nc_index[picked], 0).astype(jnp.int32)
        payload = SSTCPayload(
            poison(mu, finite), kernel_ids, kernel_trits, nc_indices, nc_signs, spec
        )
        return payload, state

    return Compressor(init, encode, _decode, _bits, _to_bytes, _from_bytes)


# Above this many columns XLA:CPU reduces ``[H W, C F]`` over its rows in row order with a
# scalar loop; at or below it, a vectorised reduction in another order (measured, jax 0.10).
_SEQUENTIAL_REDUCE_COLUMNS = 32768


def _row_mean(mat: jax.Array) -> jax.Array:
    """``jnp.mean(mat, axis=0)`` with the same bits on XLA:CPU, fast for wide ``mat``.

    Above :data:`_SEQUENTIAL_REDUCE_COLUMNS` columns XLA:CPU's reduction adds the rows in order
    one column at a time (13-28 ms for the 3.5M kernel coordinates of the 10M benchmark tree);
    ``H W - 1`` adds of whole rows in the same order vectorise (under 1 ms) and give the same
    bits, including the mean's division (both become a multiplication by ``1 / H W``). Tests
    pin the equality on both sides of the switch. Other backends reduce in their own order, so
    their last bit may differ from their ``jnp.mean``; it only matters for kernel scores
    within one ulp of each other.
    """
    if mat.shape[1] <= _SEQUENTIAL_REDUCE_COLUMNS:
        return jnp.mean(mat, axis=0)
    total = mat[0]
    for row in range(1, mat.shape[0]):
        total = total + mat[row]
    return total / jnp.float32(mat.shape[0])


def _locate(spec: SSTCSpec, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each flat position lies: ``(kernel, row, nc_index)``.

    A position inside conv leaf ``i`` (HWIO, viewed as ``[H W, C F]``) is row ``(p - o) //
    (C F)`` of global kernel ``kernel_offsets[n] + (p - o) % (C F)``, with ``nc_index = -1``;
    any other position has ``kernel = num_kernels`` (past the end) and ``nc_index`` = its index
    among the non-conv coordinates (the conv coordinates before it subtracted).
    """
    layout = spec.layout
    kernel = jnp.full(positions.shape, spec.num_kernels, jnp.int32)
    row = jnp.zeros(positions.shape, jnp.int32)
    conv_before = jnp.zeros(positions.shape, jnp.int32)
    for n, i in enumerate(spec.conv_leaves):
        offset, size, cols = layout.offsets[i], layout.sizes[i], spec.conv_channels[n]
        local = positions - offset
        inside = (local >= 0) & (local < size)
        kernel = jnp.where(inside, spec.kernel_offsets[n] + local % cols, kernel)
        row = jnp.where(inside, local // cols, row)
        conv_before = conv_before + jnp.where(local >= size, size, 0)
    is_nc = kernel == spec.num_kernels
    return kernel, row, jnp.where(is_nc, positions - conv_before, -1)


def _decode(payload: SSTCPayload):
    payload.check()
    spec, layout = payload.spec, payload.spec.layout
    mu = payload.mu
    leaves: list[Any] = [None] * len(layout.shapes)
    if spec.conv_leaves:
        # Each kept kernel is a column of its leaf viewed as [H W, C F]: scattered there
        # directly, instead of into a [kernels, H W] buffer that every leaf then transposes
        # (two more passes over the conv coordinates).
        columns = (payload.kernel_trits.astype(jnp.float32) * mu).T
        ids, offsets = payload.kernel_ids, spec.kernel_offsets
        for n, i in enumerate(spec.conv_leaves):
            cols = spec.conv_channels[n]
            local = ids - offsets[n]
            local = jnp.where((local >= 0) & (local < cols), local, cols)  # cols: dropped
            leaf = jnp.zeros((spec.kernel_size, cols), jnp.float32)
            leaf = leaf.at[:, local].add(columns, mode="drop")
            leaves[i] = leaf.reshape(layout.shapes[i])
    if spec.nc_leaves:
        # The non-conv leaves as a layout of their own: their entries scatter straight into
        # them (no nc_size-long buffer to slice), zero-sign padding only into the first.
        nc = spec.nc_leaves
        nc_layout = TreeLayout(
            jax.tree.structure([0] * len(nc)),
            tuple(layout.paths[i] for i in nc),
            tuple(layout.shapes[i] for i in nc),
            tuple(layout.dtypes[i] for i in nc),
        )
        signs = payload.nc_signs
        order = jnp.where(signs != 0, payload.nc_indices, spec.nc_size)
        parts = _leafwise.scatter_add_leaves(
            nc_layout, payload.nc_indices, signs.astype(jnp.float32) * mu, order
        )
        for i, part in zip(nc, parts, strict=True):
            leaves[i] = part
    leaves = [leaf.astype(dtype) for leaf, dtype in zip(leaves, layout.dtypes, strict=True)]
    return jax.tree.unflatten(layout.treedef, leaves)


def _bits(payload: SSTCPayload) -> jax.Array:
    payload.check()
    spec = payload.spec
    stream = sum(spec.index_widths) + spec.num_keep * 2 * spec.kernel_size
    if spec.num_keep:
        layer = jnp.searchsorted(
            jnp.asarray(spec.kernel_offsets[1:], jnp.int32), payload.kernel_ids, side="right"
        )
        stream = stream + jnp.sum(jnp.asarray(spec.index_widths, jnp.int32)[layer])
    stream = stream + ternary_stream_bits(
        payload.nc_indices, payload.nc_signs, spec.nc_cap, spec.golomb_b
    )
    return 32 + _codec.padded(jnp.int32(stream))


def _to_bytes(payload: SSTCPayload) -> bytes:
    payload.check()
    spec = payload.spec
    mu = host(payload.mu)
    ids = host(payload.kernel_ids).astype(np.int64)
    trits = host(payload.kernel_trits)
    head = _codec.floats_to_bytes(mu, "sstc payload.mu")
    if np.signbit(mu):
        raise ValueError("to_bytes: sstc payload.mu must be >= +0.")
    if ids.size and (ids[0] < 0 or ids[-1] >= spec.num_kernels or np.any(np.diff(ids) <= 0)):
        raise ValueError("to_bytes: sstc kernel_ids must be strictly increasing in range.")
    if np.any(np.abs(trits.astype(np.int16)) > 1):
        raise ValueError("to_bytes: sstc kernel_trits must be in {-1, 0, 1}.")
    nc_indices, nc_signs = host(payload.nc_indices), host(payload.nc_signs)
    check_ternary(nc_indices, nc_signs, spec.nc_size, "to_bytes")
    offsets = np.asarray(spec.kernel_offsets)
    layer = np.searchsorted(offsets[1:], ids, side="right")
    writer = _codec.BitWriter()
    for n, width in enumerate(spec.index_widths):
        writer.fixed(np.array([np.count_nonzero(layer == n)]), width)
    for n, width in enumerate(spec.index_widths):
        writer.fixed(ids[layer == n] - offsets[n], width)
    writer.bits(np.stack([trits != 0, trits < 0], axis=-1))
    write_ternary(writer, nc_indices, nc_signs, spec.nc_cap, spec.golomb_b)
    return head + writer.to_bytes()


def _from_bytes(data: bytes, template: SSTCPayload) -> SSTCPayload:
    template.check()
    spec = template.spec
    view = _codec.check_length(data, 4, template.max_bits // 8, "sstc payload")
    mu = _codec.floats_from_bytes(view, 0, 1, "sstc payload.mu").reshape(())
    if np.signbit(mu):
        raise ValueError("from_bytes: sstc payload.mu is negative; corrupt.")
    reader = _codec.BitReader(view[4:], "sstc payload")
    widths = spec.index_widths
    counts = [int(reader.fixed(1, width)[0]) for width in widths]
    if any(c > cf for c, cf in zip(counts, spec.conv_channels, strict=True)) or (
        sum(counts) != spec.num_keep
    ):
        raise ValueError(
            f"from_bytes: sstc payload kernel counts {counts} do not add up to "
            f"{spec.num_keep} within the layers; corrupt."
        )
    ids = []
    for n, (count, width) in enumerate(zip(counts, widths, strict=True)):
        local = reader.fixed(count, width)
        if count and (local[-1] >= spec.conv_channels[n] or np.any(np.diff(local) <= 0)):
            raise ValueError("from_bytes: sstc payload kernel indices are invalid; corrupt.")
        ids.append(local + spec.kernel_offsets[n])
    pairs = reader.bits(2 * spec.num_keep * spec.kernel_size).reshape(
        spec.num_keep, spec.kernel_size, 2
    )
    nonzero, negative = pairs[..., 0].astype(bool), pairs[..., 1].astype(bool)
    if np.any(negative & ~nonzero):
        raise ValueError("from_bytes: sstc payload has an invalid ternary code; corrupt.")
    nc_indices, nc_signs = read_ternary(
        reader, spec.nc_cap, spec.nc_size, spec.golomb_b, "sstc payload"
    )
    reader.finish()
    kernel_ids = (np.concatenate(ids) if ids else np.zeros(0, np.int64)).astype(np.int32)
    kernel_trits = np.where(negative, -1, nonzero.astype(np.int8)).astype(np.int8)
    return template.replace(
        mu=mu,
        kernel_ids=kernel_ids,
        kernel_trits=kernel_trits,
        nc_indices=nc_indices,
        nc_signs=nc_signs,
    )
