"""Sparsifiers: unbiased random-k and biased top-k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_lab.compressors import _codec, _leafwise, _once, _select, _threefry
from fedjax_lab.compressors._base import (
    Compressor,
    TreeLayout,
    check_array,
    host,
    poison,
    resolve_count,
    tree_layout,
    validate_count_spec,
)


@struct.dataclass
class SparsePayload:
    """``k`` kept coordinates: strictly increasing indices and their (unscaled) values."""

    indices: jax.Array  # int32[k], strictly increasing
    values: jax.Array  # float32[k]
    layout: TreeLayout = struct.field(pytree_node=False)
    k: int = struct.field(pytree_node=False)
    scale: float = struct.field(pytree_node=False)  # decode multiplies values by this
    golomb_b: int = struct.field(pytree_node=False)

    @property
    def flag_bits(self) -> int:
        return 1 if self.k else 0

    @property
    def fixed_index_bits(self) -> int:
        return self.k * _codec.index_width(self.layout.size)

    @property
    def golomb_max(self) -> int:
        # Gaps (zeros between kept indices) sum to at most d - k.
        return self.k * (1 + self.golomb_b) + ((self.layout.size - self.k) >> self.golomb_b)

    @property
    def max_bits(self) -> int:
        return 32 * self.k + _codec.pad8(self.flag_bits + self.fixed_index_bits)

    def check(self) -> None:
        check_array(self.indices, (self.k,), np.int32, "sparse payload.indices")
        check_array(self.values, (self.k,), np.float32, "sparse payload.values")


def _shell(layout: TreeLayout, k_spec: int | float, scaled: bool, name: str) -> SparsePayload:
    d = layout.size
    k = resolve_count(k_spec, d, what=name)
    golomb_b = _codec.golomb_bits(k / d) if k else 0
    shell = SparsePayload(None, None, layout, k, d / k if (scaled and k) else 1.0, golomb_b)
    _codec.check_int32_bits(
        32 * k + _codec.pad8(shell.flag_bits + max(shell.fixed_index_bits, shell.golomb_max)),
        name,
    )
    return shell


def _sparsifier(k_spec: int | float, *, scaled: bool, name: str, select) -> Compressor:
    # select(parts, k, key) returns the k kept flat indices in ascending order; the parts are
    # the update's leaves as float32 vectors (never concatenated: see _leafwise).
    validate_count_spec(k_spec, what=name)

    def init(params):
        _shell(tree_layout(params, what=f"{name}.init(params)"), k_spec, scaled, name)
        return ()

    def encode(updates, state, *, key):
        layout = tree_layout(updates, what=f"{name}.encode(updates)")
        shell = _shell(layout, k_spec, scaled, name)
        parts = _leafwise.leaves(layout, updates)
        if shell.k:
            indices = select(parts, shell.k, key).astype(jnp.int32)
            values = _leafwise.gather_flat(parts, indices)
        else:
            indices, values = jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
        values = poison(values, _leafwise.all_finite(parts))
        return shell.replace(indices=indices, values=values), state

    def decode(payload: SparsePayload):
        payload.check()
        values = payload.values * jnp.float32(payload.scale)
        return _leafwise.scatter_add_leaves(
            payload.layout, payload.indices, values, payload.indices
        )

    def bits(payload: SparsePayload) -> jax.Array:
        payload.check()
        if payload.k == 0:
            return jnp.int32(0)
        gaps = jnp.diff(payload.indices, prepend=-1) - 1
        golomb = jnp.sum(_codec.rice_length(gaps, payload.golomb_b))
        stream = 1 + jnp.minimum(golomb, payload.fixed_index_bits)
        return 32 * payload.k + _codec.padded(stream)

    return Compressor(init, encode, decode, bits, _to_bytes, _from_bytes)


def rotate(indices: jax.Array, shift: jax.Array, d: int) -> jax.Array:
    """``(indices + shift) mod d`` for int32 values in ``[0, d)`` without int32 overflow.

    ``indices + shift`` can exceed 2**31 - 1 once ``d > 2**30``, so wrap before adding.
    """
    room = d - shift  # in [1, d]
    return jnp.where(indices >= room, indices - room, indices + shift)


def rand_k(k: int | float) -> Compressor:
    """Random-k sparsification, unbiased: keeps ``k`` uniformly chosen coordinates × ``d/k``.

    Stich, Cordonnier, Jaggi (2018), "Sparsified SGD with Memory", NeurIPS; Wangni et al.
    (2018), "Gradient Sparsification for Communication-Efficient Distributed Optimization".
    ``C(x)_i = (d/k) x_i 1[i ∈ S]`` with ``|S| = k``, so ``E C(x) = x`` and
    ``E‖C(x) - x‖² = (d/k - 1)‖x‖²``.

    ``S`` is the top-k of ``d`` i.i.d. 30-bit random keys, rotated by an independent uniform
    offset. The rotation makes every coordinate's inclusion probability exactly ``k/d`` even
    when keys tie (which both properties above depend on, and which a plain permutation would
    need an O(d log d) shuffle for).

    Wire format: ``k`` float32 values, a one-bit flag, then the indices either fixed-width
    (``ceil(log2 d)`` bits each) or as Golomb-coded gaps (parameter ``b*`` of Sattler et al.
    at density ``k/d``), whichever is shorter (ties: fixed-width).

    Args:
      k: an ``int`` count in ``[1, d]`` or a ``float`` fraction in ``(0, 1]`` (``round(k d)``,
        at least 1).

    Returns:
      A stateless :class:`Compressor`.
    """

    def select(parts, count, key):
        d = sum(part.shape[0] for part in parts)
        key_bits, key_shift = jax.random.split(key)

        def scores(key_bits):
            # 30 random bits reinterpreted as a positive finite float32 keep their order.
            # jax.random.bits' words from the unrolled hash (_threefry: ~7x faster on CPU).
            random_bits = _threefry.bits(key_bits, (d,)) >> 2
            return jax.lax.bitcast_convert_type(random_bits, jnp.float32)

        # Hashed once into memory: the selection reads the scores in several passes, and XLA
        # would otherwise fuse the hash into each of them (see _once).
        # Any traced predicate serves (both branches are the same); encode computes this one.
        score = _once.computed_once(_leafwise.all_finite(parts), scores, key_bits)
        picked = _select.top_k_indices(score, count)
        shift = jax.random.randint(key_shift, (), 0, d, dtype=jnp.int32)
        # Rotating an ascending list leaves two ascending runs; the wrapped one goes first.
        wrapped = jnp.sum(picked >= d - shift, dtype=jnp.int32)
        return jnp.roll(rotate(picked, shift, d), wrapped)

    return _sparsifier(k, scaled=True, name="rand_k", select=select)


def top_k(k: int | float) -> Compressor:
    """Top-k sparsification (biased): keeps the ``k`` largest-magnitude coordinates.

    Aji & Heafield (2017), "Sparse Communication for Distributed Gradient Descent", EMNLP;
    Stich, Cordonnier, Jaggi (2018). Deterministic and biased, a contraction:
    ``‖x - top_k(x)‖² <= (1 - k/d)‖x‖²``. Ties in magnitude keep the lower index. Pair it with
    :func:`~fedjax_lab.compressors.with_error_feedback`.

    Wire format: as :func:`rand_k` (values, flag, fixed-width or Golomb-coded indices).

    Args:
      k: an ``int`` count in ``[1, d]`` or a ``float`` fraction in ``(0, 1]``.

    Returns:
      A stateless :class:`Compressor`.
    """

    def select(parts, count, key):
        del key  # deterministic
        # Exact k largest |x| in ascending order, by radix selection instead of a sort.
        return _select.top_k_parts(parts, count, score=lambda i, part, aux: jnp.abs(part))

    return _sparsifier(k, scaled=False, name="top_k", select=select)


def _to_bytes(payload: SparsePayload) -> bytes:
    payload.check()
    indices = host(payload.indices).astype(np.int64)
    values = host(payload.values)
    head = _codec.floats_to_bytes(values, "sparse payload.values")
    d = payload.layout.size
    if payload.k and (indices[0] < 0 or indices[-1] >= d or np.any(np.diff(indices) <= 0)):
        raise ValueError(
            f"to_bytes: sparse payload indices must be strictly increasing in [0, {d})."
        )
    writer = _codec.BitWriter()
    if payload.k:
        gaps = np.diff(indices, prepend=-1) - 1
        golomb = int(np.sum((gaps >> payload.golomb_b) + 1 + payload.golomb_b))
        use_golomb = golomb < payload.fixed_index_bits
        writer.bits(np.array([use_golomb]))
        if use_golomb:
            writer.rice(gaps, payload.golomb_b)
        else:
            writer.fixed(indices, _codec.index_width(d))
    return head + writer.to_bytes()


def _from_bytes(data: bytes, template: SparsePayload) -> SparsePayload:
    template.check()
    k, d = template.k, template.layout.size
    view = _codec.check_length(
        data, 4 * k + template.flag_bits, template.max_bits // 8, "sparse payload"
    )
    values = _codec.floats_from_bytes(view, 0, k, "sparse payload.values")
    reader = _codec.BitReader(view[4 * k :], "sparse payload")
    indices = np.zeros(0, dtype=np.int64)
    if k:
        use_golomb = bool(reader.bits(1)[0])
        if use_golomb:
            gaps = reader.rice(k, template.golomb_b, d - k)
            indices = np.cumsum(gaps + 1) - 1
            golomb = int(np.sum((gaps >> template.golomb_b) + 1 + template.golomb_b))
            if golomb >= template.fixed_index_bits:
                raise ValueError("from_bytes: sparse payload uses the longer index coding.")
        else:
            indices = reader.fixed(k, _codec.index_width(d))
            gaps = np.diff(indices, prepend=-1) - 1
            golomb = int(np.sum((np.maximum(gaps, 0) >> template.golomb_b) + 1 + template.golomb_b))
            if np.any(gaps < 0) or golomb < template.fixed_index_bits:
                raise ValueError(
                    "from_bytes: sparse payload indices are not strictly increasing or use the "
                    "longer index coding; data is corrupt."
                )
        if indices[-1] >= d:
            raise ValueError(f"from_bytes: sparse payload index {indices[-1]} >= d={d}; corrupt.")
    reader.finish()
    return template.replace(indices=indices.astype(np.int32), values=values)
