"""Conv-part bit accounting of STC/SSTC payloads against brute-force numpy bit writers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import sstc, stc
from fedjax_lab.compressors._codec import count_width, pad8
from fedjax_lab.compressors.accounting import (
    conv_leaves,
    conv_size,
    sstc_conv_bits,
    sstc_conv_nonzeros,
    sstc_conv_size,
    stc_conv_bits,
    stc_conv_nonzeros,
)

SHAPES = {
    "conv_a": {"kernel": (3, 3, 2, 4), "bias": (4,)},
    "conv_b": {"kernel": (3, 3, 4, 3)},
    "dense": {"kernel": (10, 7), "bias": (7,)},
    "empty": (0, 3),
    "scale": (),
}


def _tree(seed, conv_scale=1.0, shapes=SHAPES):
    keys = iter(jax.random.split(jax.random.key(seed), 16))

    def leaf(shape):
        x = jax.random.normal(next(keys), shape)
        return conv_scale * x if len(shape) == 4 else x

    return jax.tree.map(leaf, shapes, is_leaf=lambda s: isinstance(s, tuple))


def _rice_bits(g, b):
    # A Golomb code with divisor 2**b written out as a string: unary quotient, then b bits.
    return "0" * (g >> b) + "1" + (format(g & ((1 << b) - 1), f"0{b}b") if b else "")


def _np_stc_conv_stream(payload, conv):
    """Bit string of the conv-restricted ternary vector, written one symbol at a time."""
    dense = np.zeros(payload.layout.size, np.int64)
    for i, s in zip(np.asarray(payload.indices), np.asarray(payload.signs), strict=True):
        if s:
            dense[i] = s
    restricted = []
    for offset, size, flag in zip(payload.layout.offsets, payload.layout.sizes, conv, strict=True):
        if flag:
            restricted.extend(dense[offset : offset + size])
    nonzero = [j for j, v in enumerate(restricted) if v]
    stream = format(len(nonzero), f"0{count_width(payload.k)}b")
    last = -1
    for j in nonzero:
        stream += _rice_bits(j - last - 1, payload.golomb_b)
        last = j
    stream += "".join("1" if restricted[j] < 0 else "0" for j in nonzero)
    return stream, len(nonzero)


def _np_sstc_conv_stream(payload):
    spec = payload.spec
    ids = np.asarray(payload.kernel_ids)
    trits = np.asarray(payload.kernel_trits)
    offsets = spec.kernel_offsets
    stream = ""
    per_layer = []
    for n, width in enumerate(spec.index_widths):
        local = [int(i) - offsets[n] for i in ids if offsets[n] <= i < offsets[n + 1]]
        per_layer.append(local)
        stream += format(len(local), f"0{width}b")
    for local, width in zip(per_layer, spec.index_widths, strict=True):
        stream += "".join(format(i, f"0{width}b") for i in local)
    for t in trits.ravel():
        stream += ("1" if t else "0") + ("1" if t < 0 else "0")
    return stream


@pytest.mark.parametrize("p", [0.02, 0.1, 0.5, 1.0], ids=["p2", "p10", "p50", "p100"])
@pytest.mark.parametrize("conv_scale", [0.3, 3.0], ids=["conv_small", "conv_large"])
def test_stc_conv_bits_equal_brute_force(p, conv_scale):
    updates = _tree(0, conv_scale)
    payload, _ = stc(p).encode(updates, (), key=jax.random.key(0))
    conv = conv_leaves(updates)
    assert conv == (False, True, True, False, False, False, False)  # jax.tree (sorted) order
    stream, n = _np_stc_conv_stream(payload, conv)
    assert int(stc_conv_bits(payload, conv)) == len(stream)
    assert int(stc_conv_nonzeros(payload, conv)) == n
    assert conv_size(payload.layout, conv) == 3 * 3 * 2 * 4 + 3 * 3 * 4 * 3


def test_stc_conv_bits_all_conv_tree_matches_the_wire_size():
    # With only conv leaves the conv part IS the whole stream: 32-bit μ + padded stream.
    shapes = {"a": (3, 3, 2, 4), "b": (2, 2, 3, 5)}
    updates = _tree(1, shapes=shapes)
    c = stc(0.1)
    payload, _ = c.encode(updates, (), key=jax.random.key(0))
    conv = conv_leaves(updates)
    bits = int(stc_conv_bits(payload, conv))
    assert 32 + pad8(bits) == int(c.bits(payload)) == 8 * len(c.to_bytes(payload))


def test_stc_conv_bits_no_conv_nonzeros_is_just_the_count():
    updates = _tree(2, conv_scale=0.0)
    payload, _ = stc(0.05).encode(updates, (), key=jax.random.key(0))
    conv = conv_leaves(updates)
    assert int(stc_conv_nonzeros(payload, conv)) == 0
    assert int(stc_conv_bits(payload, conv)) == count_width(payload.k)


def test_stc_conv_bits_vmap_over_clients():
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[_tree(s) for s in range(3)])
    c = stc(0.1)
    payloads = jax.vmap(lambda u: c.encode(u, (), key=jax.random.key(0))[0])(stacked)
    conv = conv_leaves(_tree(0))
    got = jax.jit(jax.vmap(lambda pl: stc_conv_bits(pl, conv)))(payloads)
    for s in range(3):
        one = jax.tree.map(lambda x, s=s: x[s], payloads)
        assert int(got[s]) == len(_np_stc_conv_stream(one, conv)[0])


@pytest.mark.parametrize("kf", [0.1, 0.5, 1.0], ids=["k10", "k50", "k100"])
def test_sstc_conv_bits_equal_brute_force(kf):
    updates = _tree(3)
    payload, _ = sstc(0.1, kf).encode(updates, (), key=jax.random.key(0))
    stream = _np_sstc_conv_stream(payload)
    assert int(sstc_conv_bits(payload)) == len(stream)
    assert int(sstc_conv_nonzeros(payload)) == int(np.count_nonzero(payload.kernel_trits))
    assert sstc_conv_size(payload) == 3 * 3 * 2 * 4 + 3 * 3 * 4 * 3


def test_sstc_conv_bits_all_conv_tree_matches_the_wire_size():
    shapes = {"a": (3, 3, 2, 4), "b": (3, 3, 3, 5)}
    updates = _tree(4, shapes=shapes)
    c = sstc(0.2, 0.5)
    payload, _ = c.encode(updates, (), key=jax.random.key(0))
    bits = int(sstc_conv_bits(payload))
    assert 32 + pad8(bits) == int(c.bits(payload)) == 8 * len(c.to_bytes(payload))


@pytest.mark.parametrize("seed", range(4), ids=[f"s{s}" for s in range(4)])
def test_guaranteed_bounds(seed):
    # What the codes guarantee: each STC conv non-zero costs >= b* + 2 bits (Rice code >= 1 + b*,
    # plus its sign), while SSTC's conv part is fixed up to which layers the kept kernels sit in.
    updates = _tree(seed, conv_scale=2.0)
    conv = conv_leaves(updates)
    payload, _ = stc(0.2).encode(updates, (), key=jax.random.key(0))
    n = int(stc_conv_nonzeros(payload, conv))
    assert int(stc_conv_bits(payload, conv)) >= count_width(payload.k) + n * (
        payload.golomb_b + 2
    )
    sp, _ = sstc(0.2, 0.3).encode(updates, (), key=jax.random.key(0))
    spec = sp.spec
    base = sum(spec.index_widths) + spec.num_keep * 2 * spec.kernel_size
    bits = int(sstc_conv_bits(sp))
    assert base + spec.num_keep * min(spec.index_widths) <= bits
    assert bits <= base + spec.num_keep * max(spec.index_widths)


def test_bad_conv_mask_raises():
    updates = _tree(0)
    payload, _ = stc(0.1).encode(updates, (), key=jax.random.key(0))
    with pytest.raises(ValueError, match="conv has 2 flags but the payload has 7 leaves"):
        stc_conv_bits(payload, (True, False))
    with pytest.raises(TypeError, match="is_conv must return a bool"):
        conv_leaves(updates, is_conv=lambda path, leaf: 1)


def test_custom_is_conv_selects_leaves():
    updates = _tree(0)
    conv = conv_leaves(updates, is_conv=lambda path, leaf: "dense" in jax.tree_util.keystr(path))
    assert conv == (False, False, False, True, True, False, False)
    payload, _ = stc(0.3).encode(updates, (), key=jax.random.key(0))
    stream, n = _np_stc_conv_stream(payload, conv)
    assert int(stc_conv_bits(payload, conv)) == len(stream)
    assert int(stc_conv_nonzeros(payload, conv)) == n
