"""Tests of per_leaf: each selected leaf compressed on its own, the rest sent raw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import (
    per_leaf,
    qsgd,
    scaled_sign,
    terngrad,
    top_k,
    with_error_feedback,
)
from fedjax_lab.compressors.testing import FAST_COMPILE, check_compressor


def not_bias(path, leaf):
    del path
    return leaf.ndim != 1


def test_contract(tree):
    check_compressor(per_leaf(top_k(0.5), not_bias), tree)


def test_contract_with_error_feedback_inside(rich_tree):
    check_compressor(per_leaf(with_error_feedback(top_k(0.3)), not_bias), rich_tree)


def test_each_leaf_is_compressed_alone_with_its_own_key_and_biases_are_raw(rich_tree, make_step):
    inner = terngrad()
    c = per_leaf(inner, not_bias)
    rng = np.random.default_rng(0)
    updates = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), rich_tree)
    key = jax.random.key(7)
    payload, _, decoded, total_bits = make_step(c)(updates, c.init(rich_tree), key)
    leaves = jax.tree.leaves(updates)
    selected = [not_bias(None, x) for x in leaves]
    keys = jax.random.split(key, sum(selected))
    # The same compressor on each selected leaf alone, in one program.
    alone = jax.jit(
        lambda ls, ks: [
            (inner.decode(p), inner.bits(p))
            for p in (inner.encode(x, (), key=k)[0] for x, k in zip(ls, ks, strict=True))
        ],
        compiler_options=FAST_COMPILE,
    )([x for x, s in zip(leaves, selected, strict=True) if s], list(keys))
    expected, bits = iter(alone), 0
    for leaf, got, chosen in zip(leaves, jax.tree.leaves(decoded), selected, strict=True):
        if chosen:
            want, part_bits = next(expected)
            np.testing.assert_array_equal(got, want)
            bits += int(part_bits)
        else:
            np.testing.assert_array_equal(got, leaf)
            bits += 32 * leaf.size
    header = sum(payload.header_widths)
    assert total_bits == bits + 8 * -(-header // 8)
    assert 8 * len(c.to_bytes(payload)) == total_bits


def test_a_count_larger_than_a_leaf_is_rejected():
    with pytest.raises(ValueError, match="k=5 exceeds the number of coordinates d=3"):
        per_leaf(top_k(5)).init({"big": jnp.zeros(10), "small": jnp.zeros(3)})


def test_bad_predicate_and_state():
    with pytest.raises(TypeError, match="must return a bool"):
        per_leaf(qsgd(2), lambda path, leaf: leaf.size).init({"w": jnp.zeros(3)})
    c = per_leaf(qsgd(2))
    with pytest.raises(ValueError, match="state must be the tuple from init"):
        c.encode({"w": jnp.zeros(3)}, (), key=jax.random.key(0))
    with pytest.raises(TypeError, match="expected a Compressor"):
        per_leaf("qsgd")


def test_from_bytes_rejects_inconsistent_part_lengths(rich_tree, make_step):
    c = per_leaf(scaled_sign(), not_bias)
    payload = make_step(c)(rich_tree, c.init(rich_tree))[0]
    data = c.to_bytes(payload)
    with pytest.raises(ValueError, match="part lengths do not match"):
        c.from_bytes(data[:-1], payload)


def test_leaves_are_indexed_separately_so_the_total_may_exceed_int32():
    big = {
        "a": jax.ShapeDtypeStruct((2**31 - 1,), jnp.float32),
        "b": jax.ShapeDtypeStruct((2**30,), jnp.float32),
    }
    c = per_leaf(top_k(3))
    c.init(big)
    template = jax.eval_shape(lambda t: c.encode(t, c.init(big), key=jax.random.key(0))[0], big)
    assert [p.k for p in template.parts] == [3, 3]
    assert template.max_bits < 1000
