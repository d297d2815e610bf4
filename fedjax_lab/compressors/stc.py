"""Sparse Ternary Compression (Sattler et al., 2019)."""

from __future__ import annotations

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


@struct.dataclass
class STCPayload:
    """``μ`` and the ternary non-zeros: ``n`` ascending positions with signs, zero padded.

    The first ``n`` entries of ``indices``/``signs`` are the non-zero positions (strictly
    increasing) and their signs (±1); the remaining ``k - n`` entries are 0. ``n < k`` happens
    only when fewer than ``k`` kept coordinates are non-zero.
    """

    mu: jax.Array  # float32[]
    indices: jax.Array  # int32[k]
    signs: jax.Array  # int8[k]
    layout: TreeLayout = struct.field(pytree_node=False)
    k: int = struct.field(pytree_node=False)
    golomb_b: int = struct.field(pytree_node=False)

    @property
    def max_bits(self) -> int:
        return 32 + _codec.pad8(ternary_stream_max(self.k, self.layout.size, self.golomb_b))

    def check(self) -> None:
        check_array(self.mu, (), np.float32, "stc payload.mu")
        check_array(self.indices, (self.k,), np.int32, "stc payload.indices")
        check_array(self.signs, (self.k,), np.int8, "stc payload.signs")


# ---- pieces shared with sstc ------------------------------------------------------------------


def ternary_stream_max(cap: int, d: int, golomb_b: int) -> int:
    """Largest ternary index stream: count + Golomb gaps (summing to <= d) + sign bits."""
    return _codec.count_width(cap) + cap * (2 + golomb_b) + (d >> golomb_b)


def ternarize_top(
    x: list[jax.Array], k: int, score, aux=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """STC core: keeps the ``k`` largest ``score`` entries, ternarizes them with ``μ``.

    ``x`` is given in parts (the update's leaves as float32 vectors) and stands for their
    concatenation, which is never formed (see ``_leafwise.gather_flat``); ``score(i, x[i], aux)``
    gives part ``i``'s scores, elementwise and cheap (``_select.top_k_parts``).

    Returns ``(mu, positions[k], signs[k])`` with ascending flat ``positions`` (ties in
    ``score`` keep the lower position) and ``μ = mean |x|`` over the kept entries, computed as
    ``max · mean(|x|/max)`` so it cannot overflow (``μ = 0`` when ``k = 0``).
    """
    if k == 0:
        return jnp.float32(0), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int8)
    positions = _select.top_k_parts(x, k, score=score, aux=aux)
    kept = _leafwise.gather_flat(x, positions)
    magnitude = jnp.abs(kept)
    peak = jnp.max(magnitude)
    mu = peak * jnp.mean(magnitude / jnp.where(peak > 0, peak, 1.0))
    return mu, positions, jnp.sign(kept).astype(jnp.int8)


def compact(positions: jax.Array, signs: jax.Array, sentinel: int) -> tuple[jax.Array, jax.Array]:
    """Canonical order: non-zero signs first by ascending position, then zero entries."""
    keys = jnp.where(signs != 0, positions, sentinel)
    keys, signs = jax.lax.sort((keys, signs), num_keys=1)
    return jnp.where(signs != 0, keys, 0).astype(jnp.int32), signs


def compact_ascending(positions: jax.Array, signs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`compact` for ascending ``positions``: a stable partition, no sort."""
    nonzero = signs != 0
    order = jnp.nonzero(nonzero, size=signs.shape[0], fill_value=0)[0]
    valid = jnp.arange(signs.shape[0]) < jnp.sum(nonzero, dtype=jnp.int32)
    indices = jnp.where(valid, positions[order], 0).astype(jnp.int32)
    return indices, jnp.where(valid, signs[order], 0).astype(signs.dtype)


def ternary_stream_bits(indices: jax.Array, signs: jax.Array, cap: int, golomb_b: int):
    """jit-side length of :func:`write_ternary` for a canonical (indices, signs) pair."""
    valid = signs != 0
    gaps = jnp.diff(indices, prepend=-1) - 1
    per_entry = _codec.rice_length(jnp.where(valid, gaps, 0), golomb_b) + 1  # + sign bit
    return _codec.count_width(cap) + jnp.sum(jnp.where(valid, per_entry, 0))


def check_ternary(indices: np.ndarray, signs: np.ndarray, d: int, who: str) -> int:
    """Validates the canonical form; returns the number of non-zeros ``n``."""
    n = int(np.count_nonzero(signs))
    indices = indices.astype(np.int64)
    head = indices[:n]
    if (
        np.any(np.abs(signs[:n].astype(np.int16)) != 1)
        or np.any(signs[n:] != 0)
        or np.any(indices[n:] != 0)
        or (n and (head[0] < 0 or head[-1] >= d or np.any(np.diff(head) <= 0)))
    ):
        raise ValueError(
            f"{who}: ternary payload is not canonical (non-zero signs first with strictly "
            f"increasing indices in [0, {d}), zeros after)."
        )
    return n


def write_ternary(writer: _codec.BitWriter, indices, signs, cap: int, golomb_b: int) -> None:
    """Count, Golomb-coded gaps between non-zeros, one sign bit per non-zero (1 = negative)."""
    n = int(np.count_nonzero(signs))
    head = indices[:n].astype(np.int64)
    writer.fixed(np.array([n]), _codec.count_width(cap))
    writer.rice(np.diff(head, prepend=-1) - 1, golomb_b)
    writer.bits(signs[:n] < 0)


def read_ternary(reader: _codec.BitReader, cap: int, d: int, golomb_b: int, what: str):
    """Inverse of :func:`write_ternary`; returns canonical ``(indices, signs)`` of length cap."""
    n = int(reader.fixed(1, _codec.count_width(cap))[0])
    if n > cap:
        raise ValueError(f"from_bytes: {what}: {n} non-zeros exceed the capacity {cap}; corrupt.")
    positions = np.cumsum(reader.rice(n, golomb_b, max(d - n, 0)) + 1) - 1
    if n and positions[-1] >= d:
        raise ValueError(f"from_bytes: {what}: a position is >= {d}; corrupt.")
    indices = np.zeros(cap, dtype=np.int32)
    signs = np.zeros(cap, dtype=np.int8)
    indices[:n] = positions
    signs[:n] = np.where(reader.bits(n).astype(bool), -1, 1)
    return indices, signs


# ---- stc ---------------------------------------------------------------------------------------


def stc(sparsity: float) -> Compressor:
    """Sparse Ternary Compression: top-p sparsification, then ternarization to ``{-μ, 0, +μ}``.

    Sattler, Wiedemann, Müller, Samek (2019), "Robust and Communication-Efficient Federated
    Learning from Non-IID Data", IEEE TNNLS (Algorithm 1). Keeps the ``k = max(1, round(p d))``
    largest-magnitude coordinates, sets ``μ = mean |kept|`` and sends ``μ · sign(kept)``.
    Biased; the paper pairs it with residual accumulation: ``with_error_feedback(stc(p))``.

    Wire format (paper §V-B): float32 ``μ``; the number of non-zeros ``n`` in
    ``bit_length(k)`` bits; the gaps between non-zero positions (zeros skipped) Golomb-coded with
    divisor ``2**b*``, ``b* = 1 + floor(log2(ln(φ - 1)/ln(1 - p)))`` (φ = golden ratio,
    ``b* >= 0``); one sign bit per non-zero. ``n < k`` only if fewer than ``k`` kept entries are
    non-zero.

    Args:
      sparsity: ``p``, the fraction of coordinates kept, in ``(0, 1]``.

    Returns:
      A stateless :class:`Compressor`.
    """
    p = validate_fraction(sparsity, what="stc: sparsity")
    golomb_b = _codec.golomb_bits(p)

    def _shell(layout: TreeLayout) -> STCPayload:
        k = resolve_count(p, layout.size, what="stc")
        shell = STCPayload(None, None, None, layout, k, golomb_b)
        _codec.check_int32_bits(shell.max_bits, "stc")
        return shell

    def init(params):
        _shell(tree_layout(params, what="stc.init(params)"))
        return ()

    def encode(updates, state, *, key):
        del key  # deterministic
        layout = tree_layout(updates, what="stc.encode(updates)")
        shell = _shell(layout)
        parts = _leafwise.leaves(layout, updates)
        mu, positions, signs = ternarize_top(parts, shell.k, lambda i, part, aux: jnp.abs(part))
        indices, signs = compact_ascending(positions, signs)
        mu = poison(mu, _leafwise.all_finite(parts))
        return shell.replace(mu=mu, indices=indices, signs=signs), state

    def decode(payload: STCPayload):
        payload.check()
        values = payload.signs.astype(jnp.float32) * payload.mu
        # Zero-sign entries (canonical padding, index 0) only ever land in the first leaf.
        order = jnp.where(payload.signs != 0, payload.indices, payload.layout.size)
        return _leafwise.scatter_add_leaves(payload.layout, payload.indices, values, order)

    def bits(payload: STCPayload) -> jax.Array:
        payload.check()
        stream = ternary_stream_bits(payload.indices, payload.signs, payload.k, payload.golomb_b)
        return 32 + _codec.padded(stream)

    return Compressor(init, encode, decode, bits, _to_bytes, _from_bytes)


def _to_bytes(payload: STCPayload) -> bytes:
    payload.check()
    mu, indices, signs = host(payload.mu), host(payload.indices), host(payload.signs)
    head = _codec.floats_to_bytes(mu, "stc payload.mu")
    if np.signbit(mu):
        raise ValueError("to_bytes: stc payload.mu must be >= +0.")
    check_ternary(indices, signs, payload.layout.size, "to_bytes")
    writer = _codec.BitWriter()
    write_ternary(writer, indices, signs, payload.k, payload.golomb_b)
    return head + writer.to_bytes()


def _from_bytes(data: bytes, template: STCPayload) -> STCPayload:
    template.check()
    min_bytes = 4 + _codec.pad8(_codec.count_width(template.k)) // 8
    view = _codec.check_length(data, min_bytes, template.max_bits // 8, "stc payload")
    mu = _codec.floats_from_bytes(view, 0, 1, "stc payload.mu").reshape(())
    if np.signbit(mu):
        raise ValueError("from_bytes: stc payload.mu is negative; corrupt.")
    reader = _codec.BitReader(view[4:], "stc payload")
    indices, signs = read_ternary(
        reader, template.k, template.layout.size, template.golomb_b, "stc payload"
    )
    reader.finish()
    return template.replace(mu=mu, indices=indices, signs=signs)
