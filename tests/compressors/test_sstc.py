"""Tests of Structured STC against a plain-Python implementation of Mora et al., Alg. 1."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _codec, sstc, stc
from fedjax_lab.compressors.testing import check_compressor


def test_contract(tree):
    check_compressor(sstc(0.1, 0.5), tree)


def _model(rng):
    return {
        "a_conv": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "b_bias": rng.standard_normal(4).astype(np.float32),
        "c_conv": rng.standard_normal((3, 3, 4, 3)).astype(np.float32),
        "d_dense": rng.standard_normal((12, 5)).astype(np.float32),
    }


def _reference(tree, p, kf):
    """Algorithm 1 with Python loops. Returns (decoded dict, kept kernels, wire bits)."""
    names = sorted(tree)
    flat = np.concatenate([tree[n].ravel() for n in names]).astype(np.float64)
    offsets = dict(zip(names, np.cumsum([0] + [tree[n].size for n in names])[:-1], strict=True))
    kernels = []  # (score, name, c, f, flat positions)
    nc_positions = []
    for n in names:
        leaf = tree[n]
        if leaf.ndim == 4:
            h, w, cin, cout = leaf.shape
            for c in range(cin):
                for f in range(cout):
                    pos = [
                        offsets[n] + ((i * w + j) * cin + c) * cout + f
                        for i in range(h)
                        for j in range(w)
                    ]
                    kernels.append((np.mean(np.abs(flat[pos])), n, c, f, pos))
        else:
            nc_positions += list(range(offsets[n], offsets[n] + leaf.size))
    num_keep = max(1, round(kf * len(kernels)))
    order = sorted(range(len(kernels)), key=lambda j: (-kernels[j][0], j))[:num_keep]
    union = sorted(nc_positions + [q for j in order for q in kernels[j][4]])
    k = max(1, round(p * len(union)))
    chosen = sorted(union, key=lambda q: (-abs(flat[q]), q))[:k]
    mu = sum(abs(flat[q]) for q in chosen) / k
    out = np.zeros_like(flat)
    for q in chosen:
        out[q] = mu * np.sign(flat[q])
    decoded = {n: out[offsets[n] : offsets[n] + tree[n].size].reshape(tree[n].shape) for n in names}

    # Wire size: μ; per conv layer a count and the kept indices in 1 + floor(log2(C F)) bits;
    # 2 bits per element of each kept kernel; non-conv part as in STC.
    stream = 0
    for n in names:
        if tree[n].ndim == 4:
            width = 1 + math.floor(math.log2(tree[n].shape[2] * tree[n].shape[3]))
            stream += width * (1 + sum(kernels[j][1] == n for j in order))
    stream += num_keep * 9 * 2
    nc_cap = min(k, len(nc_positions))
    b = _codec.golomb_bits(p)
    stream += nc_cap.bit_length()
    last = -1
    for i, q in enumerate(nc_positions):
        if out[q] != 0:
            stream += ((i - last - 1) >> b) + 1 + b + 1
            last = i
    return (
        decoded,
        sorted((kernels[j][1], kernels[j][2], kernels[j][3]) for j in order),
        (32 + 8 * -(-stream // 8)),
    )


@pytest.mark.parametrize("p,kf", [(0.05, 0.25), (0.2, 0.5), (0.5, 0.1), (1.0, 1.0)])
def test_matches_reference_algorithm_and_wire_size(p, kf, make_step):
    c = sstc(p, kf)
    step = make_step(c)
    rng = np.random.default_rng(0)
    for _ in range(4):
        tree = _model(rng)
        payload, _, got, bits = step(tree)
        want, kept, want_bits = _reference(tree, p, kf)
        for name in tree:
            np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name], rtol=1e-6)
        spec = payload.spec
        layers = [("a_conv", 4), ("c_conv", 3)]
        got_kept = []
        for g in np.asarray(payload.kernel_ids):
            layer = int(np.searchsorted(spec.kernel_offsets[1:], g, side="right"))
            local = int(g) - spec.kernel_offsets[layer]
            name, cout = layers[layer]
            got_kept.append((name, local // cout, local % cout))
        assert got_kept == kept
        data = c.to_bytes(payload)
        assert 8 * len(data) == bits == want_bits
        back = c.from_bytes(data, payload)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(payload), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("p,kf", [(0.6, 0.5), (1.0, 0.25)])
def test_exact_zeros_are_kept_as_zero_trits_and_left_out_of_the_non_conv_list(p, kf, make_step):
    # Half the coordinates exactly 0: kept zeros (ties broken by index) have sign 0, which the
    # kernel maps carry as 0 and the non-conv list must skip, so the wire size and the decoded
    # update still match Algorithm 1.
    c = sstc(p, kf)
    step = make_step(c)
    rng = np.random.default_rng(1)
    for _ in range(3):
        tree = {
            name: np.where(rng.random(leaf.shape) < 0.5, 0.0, leaf).astype(np.float32)
            for name, leaf in _model(rng).items()
        }
        payload, _, got, bits = step(tree)
        want, _, want_bits = _reference(tree, p, kf)
        for name in tree:
            np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name], rtol=1e-6)
        assert bits == want_bits == 8 * len(c.to_bytes(payload))
        signs = np.asarray(payload.nc_signs)
        assert np.all(np.diff(np.asarray(payload.nc_indices)[signs != 0]) > 0)


@pytest.mark.parametrize("p", [0.02, 1.0])
def test_kernel_fraction_one_equals_stc(p, make_step):
    rng = np.random.default_rng(1)
    tree = _model(rng)
    tree["d_dense"][:3] = 0.5  # ties in magnitude
    got, want = make_step(sstc(p, 1.0))(tree)[2], make_step(stc(p))(tree)[2]
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)


def test_mixed_kernel_sizes_need_is_conv():
    tree = {"k3": jnp.zeros((3, 3, 2, 2)), "k5": jnp.zeros((5, 5, 2, 2)), "b": jnp.zeros(2)}
    with pytest.raises(
        ValueError, match=r"different spatial sizes \[\(3, 3\), \(5, 5\)\].*is_conv"
    ):
        sstc(0.1, 0.5).init(tree)
    only3 = sstc(0.1, 0.5, is_conv=lambda path, leaf: leaf.ndim == 4 and leaf.shape[0] == 3)
    check_compressor(only3, tree)


def test_is_conv_must_select_4d_leaves_and_return_bools():
    tree = {"w": jnp.zeros((3, 4)), "k": jnp.zeros((3, 3, 1, 1))}
    with pytest.raises(ValueError, match=r"selected leaf \['w'\] of shape \(3, 4\)"):
        sstc(0.1, 0.5, is_conv=lambda path, leaf: True).init(tree)
    with pytest.raises(TypeError, match="is_conv must return a bool"):
        sstc(0.1, 0.5, is_conv=lambda path, leaf: 1).init(tree)


def test_kernel_index_width_logic_at_int32_scale_without_allocating():
    # 3x3 kernels with C = F = 2**13: 2**26 kernels (604M coordinates), b_k = 27 bits.
    big = {
        "conv": jax.ShapeDtypeStruct((3, 3, 2**13, 2**13), jnp.float32),
        "bias": jax.ShapeDtypeStruct((10,), jnp.float32),
    }
    c = sstc(0.2, 1e-9)
    c.init(big)
    template = jax.eval_shape(lambda t: c.encode(t, (), key=jax.random.key(0))[0], big)
    spec = template.spec
    assert spec.num_keep == 1 and spec.index_widths == (27,)
    assert spec.index_widths[0] == 1 + math.floor(math.log2(2**26))
    for kernel in (0, 2**26 - 1):
        payload = template.replace(
            mu=np.float32(1.0),
            kernel_ids=np.asarray([kernel], np.int32),
            kernel_trits=np.asarray([[1, 0, -1, 0, 0, 0, 0, 0, 1]], np.int8),
            nc_indices=np.asarray([9, 0, 0, 0][: spec.nc_cap], np.int32),
            nc_signs=np.asarray([-1, 0, 0, 0][: spec.nc_cap], np.int8),
        )
        data = c.to_bytes(payload)
        assert 8 * len(data) == int(jax.jit(c.bits)(payload))
        back = c.from_bytes(data, template)
        np.testing.assert_array_equal(back.kernel_ids, [kernel])


def test_from_bytes_rejects_inconsistent_kernel_counts(make_step):
    c = sstc(0.2, 0.5)
    payload = make_step(c)(_model(np.random.default_rng(0)))[0]
    data = bytearray(c.to_bytes(payload))
    data[4] ^= 0b10000000  # first bit of the first layer's kept-kernel count
    with pytest.raises(ValueError, match="kernel counts"):
        c.from_bytes(bytes(data), payload)


def test_bad_fractions():
    with pytest.raises(ValueError, match=r"sstc: kernel_fraction must be a float in \(0, 1\]"):
        sstc(0.1, 0.0)
    with pytest.raises(ValueError, match=r"sstc: sparsity must be a float in \(0, 1\]"):
        sstc(2.0, 0.5)


@pytest.mark.parametrize("kernel_size", [(1, 1), (2, 2), (3, 3), (5, 5), (7, 7)])
def test_kernel_scores_equal_the_mean_over_rows_bit_for_bit(kernel_size):
    # SSTC ranks kernels by mean |Δ| over the H x W rows; wide layers take the vectorised row
    # adds, which must give the bits of jnp.mean (XLA:CPU's reduction) on both sides of the
    # switch and at the switch itself.
    from fedjax_lab.compressors.sstc import _SEQUENTIAL_REDUCE_COLUMNS, _row_mean

    rng = np.random.default_rng(sum(kernel_size))
    hw = kernel_size[0] * kernel_size[1]
    mean = jax.jit(lambda m: jnp.mean(m, axis=0))
    for columns in (
        4099,
        _SEQUENTIAL_REDUCE_COLUMNS,
        _SEQUENTIAL_REDUCE_COLUMNS + 1,
        3 * _SEQUENTIAL_REDUCE_COLUMNS + 5,
    ):
        scale = 10.0 ** rng.integers(-3, 4, (hw, columns))
        mat = np.abs(rng.standard_normal((hw, columns)) * scale).astype(np.float32)
        got = np.asarray(jax.jit(_row_mean)(mat))
        want = np.asarray(mean(mat))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=columns)
