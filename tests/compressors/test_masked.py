"""Tests of masked: selected leaves compressed jointly, the rest sent raw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import masked, stc, with_error_feedback
from fedjax_lab.compressors.testing import check_compressor


def not_bias(path, leaf):
    del path
    return leaf.ndim != 1


def test_contract(tree):
    check_compressor(masked(stc(0.2), not_bias), tree)


def test_contract_with_error_feedback_inside(rich_tree):
    check_compressor(masked(with_error_feedback(stc(0.2)), not_bias), rich_tree)


def test_selected_leaves_are_compressed_jointly_and_biases_are_raw(rich_tree, make_step):
    inner = stc(0.1)
    c = masked(inner, not_bias)
    rng = np.random.default_rng(0)
    updates = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), rich_tree)
    _, _, decoded, bits = make_step(c)(updates)
    leaves = jax.tree.leaves(updates)
    chosen = tuple(x for x in leaves if not_bias(None, x))
    _, _, joint, joint_bits = make_step(inner)(chosen)
    want = iter(joint)
    for got, leaf in zip(jax.tree.leaves(decoded), leaves, strict=True):
        np.testing.assert_array_equal(got, next(want) if not_bias(None, leaf) else leaf)
    raw = sum(x.size for x in leaves if not not_bias(None, x))
    assert bits == 32 * raw + joint_bits


def test_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="selected no leaf; use identity"):
        masked(stc(0.1), lambda path, leaf: False).init({"b": jnp.zeros(3)})
    with pytest.raises(TypeError, match="compress must be a callable"):
        masked(stc(0.1), None)
