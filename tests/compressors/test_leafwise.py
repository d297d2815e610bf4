"""Leaf-by-leaf encoders (``_leafwise``) against the flatten-then-encode formulation, bit for bit.

The sign compressors encode and decode, and QSGD decodes, leaf by leaf for speed; these tests
pin every payload bit and every decoded bit to the straightforward formulation of earlier
versions (flatten the tree, ``jnp.packbits(x < 0)``, unflatten a decoded vector) on trees whose
leaves start in the middle of a byte, mixed dtypes, signed zeros and non-finite inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _leafwise, qsgd, scaled_sign, sign
from fedjax_lab.compressors._base import tree_layout
from fedjax_lab.compressors.testing import FAST_COMPILE


def _reference_sign(x: jax.Array, scaled: bool):
    """The earlier single-vector sign encoder: (scale, packed signs)."""
    finite = jnp.all(jnp.isfinite(x))
    if scaled:
        if x.shape[0] == 0:
            scale = jnp.float32(0.0)
        else:
            magnitude = jnp.abs(x)
            peak = jnp.max(magnitude)
            scale = peak * jnp.mean(magnitude / jnp.where(peak > 0, peak, 1.0))
    else:
        scale = jnp.where(jnp.any(x != 0), 1.0, 0.0).astype(jnp.float32)
    scale = jnp.where(finite, scale, jnp.nan).astype(jnp.float32)
    return scale, jnp.packbits(x < 0)


def _trees():
    rng = np.random.default_rng(0)

    def leaf(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    odd = {"a": leaf(3), "b": leaf(2, 5), "c": leaf(1), "d": leaf(0, 2), "e": leaf(13)}
    mixed = {"w": leaf(7, 3), "h": jnp.asarray(leaf(11), jnp.bfloat16), "s": leaf()}
    zeros = {"a": np.array([0.0, -0.0, 1.0, -2.0, 0.0], np.float32), "b": np.zeros(9, np.float32)}
    all_zero = {"a": np.zeros(5, np.float32), "b": -np.zeros(4, np.float32)}
    nan = {"a": leaf(6), "b": np.array([1.0, np.nan, -3.0], np.float32)}
    inf = {"a": np.array([-np.inf, 2.0], np.float32), "b": leaf(17)}
    empty = {"a": np.zeros((0,), np.float32)}
    return {
        "odd": odd,
        "mixed": mixed,
        "zeros": zeros,
        "all_zero": all_zero,
        "nan": nan,
        "inf": inf,
        "empty": empty,
    }


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(-1).view(np.uint8) if a.dtype != np.bool_ else a.reshape(-1)


@pytest.mark.parametrize("scaled", [False, True], ids=["sign", "scaled_sign"])
@pytest.mark.parametrize("name", sorted(_trees()))
def test_sign_leafwise_matches_flat_reference_bit_for_bit(name, scaled):
    tree = _trees()[name]
    c = scaled_sign() if scaled else sign()
    layout = tree_layout(tree, what="test")

    def both(t):
        payload = c.encode(t, (), key=jax.random.key(0))[0]
        x = layout.flatten(t)
        scale, signs = _reference_sign(x, scaled)
        decoded = layout.unflatten(
            jnp.where(jnp.unpackbits(signs)[: x.shape[0]] > 0, -scale, scale)
        )
        return payload, c.decode(payload), scale, signs, decoded

    payload, got, scale, signs, want = jax.jit(both, compiler_options=FAST_COMPILE)(tree)
    np.testing.assert_array_equal(_bits(payload.scale), _bits(scale))
    np.testing.assert_array_equal(np.asarray(payload.signs), np.asarray(signs))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_pack_bits_matches_numpy_for_unaligned_leaves():
    rng = np.random.default_rng(1)
    sizes = [1, 0, 3, 8, 5, 7, 9, 2, 16, 1]
    parts = [rng.random(n) < 0.5 for n in sizes]
    tree = [np.zeros(n, np.float32) for n in sizes]
    layout = tree_layout(tree, what="test")
    packed = jax.jit(lambda p: _leafwise.pack_bits(layout, p))(parts)
    np.testing.assert_array_equal(np.asarray(packed), np.packbits(np.concatenate(parts)))
    for offset, size, part in zip(layout.offsets, layout.sizes, parts, strict=True):
        np.testing.assert_array_equal(np.asarray(_leafwise.unpack_leaf(packed, offset, size)), part)


@pytest.mark.parametrize("name", ["odd", "mixed", "zeros"])
def test_qsgd_leafwise_decode_matches_flat_decode_bit_for_bit(name):
    tree = _trees()[name]
    layout = tree_layout(tree, what="test")
    c, s = qsgd(4), 4

    def both(t):
        payload = c.encode(t, (), key=jax.random.key(3))[0]
        # The earlier decode: one float vector, bucket-shaped, then unflattened.
        values = payload.levels.astype(jnp.float32)[None, :] * (payload.norms[:, None] / s)
        return c.decode(payload), layout.unflatten(values.reshape(-1)[: layout.size])

    got, want = jax.jit(both, compiler_options=FAST_COMPILE)(tree)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(_bits(g), _bits(w))


def _flat_scatter(layout, indices, values):
    dense = jnp.zeros((layout.size,), jnp.float32).at[indices].add(values)
    return layout.unflatten(dense)


# Jitted like the decoders that use them: XLA turns a one-entry scatter-add into a store, so
# a -0.0 value stays -0.0 there (eagerly it becomes 0 + -0 = +0) in both formulations.
_flat_scatter = jax.jit(_flat_scatter, static_argnums=0)


def test_scatter_add_leaves_equals_the_flat_scatter_bit_for_bit():
    tree = {
        "a": np.zeros((3, 5), np.float32),
        "b": np.zeros((0,), np.float32),  # empty leaf
        "c": np.zeros((40,), jnp.bfloat16),
        "d": np.zeros((2, 2, 3), np.float32),
        "e": np.zeros((1,), np.float32),
    }
    layout = tree_layout(tree, what="t")
    d = layout.size
    rng = np.random.default_rng(0)
    run = jax.jit(_leafwise.scatter_add_leaves, static_argnums=0)
    for k in (1, 3, 17, d):
        for trial in range(20):
            idx = np.sort(rng.choice(d, k, replace=False)).astype(np.int32)
            vals = rng.standard_normal(k).astype(np.float32)
            vals[rng.random(k) < 0.2] = -0.0
            if trial % 4 == 1:
                vals[rng.integers(k)] = np.nan
            order = idx
            if trial % 2:  # STC-like: trailing zero-value entries at index 0, ordered past d
                tail = rng.integers(0, k + 1)
                idx[k - tail :] = 0
                vals[k - tail :] = 0.0 if trial % 4 == 3 else np.nan
                order = np.where(np.arange(k) < k - tail, idx, d).astype(np.int32)
            got = run(layout, jnp.asarray(idx), jnp.asarray(vals), jnp.asarray(order))
            want = _flat_scatter(layout, jnp.asarray(idx), jnp.asarray(vals))
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape
                np.testing.assert_array_equal(
                    np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8)
                )


def test_scatter_add_leaves_poisons_a_decreasing_order():
    tree = {"a": np.zeros((4,), np.float32), "b": np.zeros((6,), np.float32)}
    layout = tree_layout(tree, what="t")
    idx = jnp.asarray([7, 2], jnp.int32)
    got = _leafwise.scatter_add_leaves(layout, idx, jnp.ones(2, jnp.float32), idx)
    assert all(np.isnan(np.asarray(leaf)).all() for leaf in jax.tree.leaves(got))


def test_gather_flat_equals_indexing_the_concatenation():
    # Leaves of every relation to the index count n: empty, shorter than n, longer than n.
    sizes = [15, 0, 40, 12, 1, 300]
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(size).astype(np.float32) for size in sizes]
    parts[2][[0, 39]] = [-0.0, np.nan]
    flat = np.concatenate(parts)
    d = flat.size
    run = jax.jit(_leafwise.gather_flat)
    for n in (1, 2, 13, 41, d):
        for _ in range(10):
            idx = np.sort(rng.choice(d, n, replace=False)).astype(np.int32)
            got = np.asarray(run([jnp.asarray(p) for p in parts], jnp.asarray(idx)))
            np.testing.assert_array_equal(got.view(np.uint32), flat[idx].view(np.uint32))
    # Every index at a leaf boundary.
    bounds = np.cumsum([0, *sizes])
    idx = np.unique(np.concatenate([bounds[:-1], bounds[1:] - 1]).clip(0, d - 1))
    got = np.asarray(run([jnp.asarray(p) for p in parts], jnp.asarray(idx, jnp.int32)))
    np.testing.assert_array_equal(got.view(np.uint32), flat[idx].view(np.uint32))


def test_gather_parts_reads_zero_between_and_past_the_parts():
    # Padded-space use (_select): positions in the gaps between parts or past the last one
    # (the unused-slot sentinel, repeated) read 0.
    parts = [jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([4.0, 5.0])]
    starts = (0, 32)
    positions = jnp.asarray([0, 2, 3, 31, 32, 33, 34, 34, 34], jnp.int32)
    got = jax.jit(_leafwise.gather_parts, static_argnums=1)(parts, starts, positions)
    np.testing.assert_array_equal(np.asarray(got), [1, 3, 0, 0, 4, 5, 0, 0, 0])
