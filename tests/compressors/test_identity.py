"""Tests of the identity (uncompressed) baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import identity
from fedjax_lab.compressors.testing import check_compressor


def test_contract(tree):
    check_compressor(identity(), tree)


def test_decode_is_exact_and_bits_are_32_per_float(rich_tree, make_step):
    c = identity()
    rng = np.random.default_rng(0)
    updates = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), rich_tree)
    payload, _, decoded, bits = make_step(c)(updates)
    for got, want in zip(jax.tree.leaves(decoded), jax.tree.leaves(updates), strict=True):
        np.testing.assert_array_equal(got, want)
    d = sum(x.size for x in jax.tree.leaves(rich_tree))
    assert bits == 32 * d == 8 * len(c.to_bytes(payload))


def test_codec_is_bit_exact_on_special_floats(make_step):
    c = identity()
    x = np.asarray([0.0, -0.0, 1e-45, -1e-40, 3.4e38, -3.4e38, 1.0, np.pi], np.float32)
    payload = make_step(c)(x)[0]
    back = c.from_bytes(c.to_bytes(payload), payload)
    assert np.asarray(back.values).tobytes() == np.asarray(x).tobytes()


def test_other_float_dtypes_round_trip_through_float32(make_step):
    c = identity()
    x = {"h": jnp.asarray([1.5, -2.25], jnp.bfloat16), "f": jnp.asarray([0.1], jnp.float16)}
    decoded = make_step(c)(x)[2]
    assert decoded["h"].dtype == jnp.bfloat16 and decoded["f"].dtype == jnp.float16
    np.testing.assert_array_equal(decoded["h"], x["h"])
    np.testing.assert_array_equal(decoded["f"], x["f"])


def test_integer_leaf_is_rejected_with_its_path():
    with pytest.raises(TypeError, match=r"\['steps'\].*int32.*floating"):
        identity().init({"w": jnp.zeros(3), "steps": jnp.zeros(2, jnp.int32)})


def test_model_too_large_for_int32_bits_is_rejected_without_allocating():
    huge = jax.ShapeDtypeStruct((2**26,), jnp.float32)  # 2**31 bits of float32
    with pytest.raises(ValueError, match="does not fit the int32"):
        identity().init(huge)
    identity().init(jax.ShapeDtypeStruct((2**26 - 1,), jnp.float32))


def test_to_bytes_rejects_a_stacked_payload():
    c = identity()
    payloads, _ = jax.vmap(lambda x: c.encode(x, (), key=jax.random.key(0)))(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="take ONE payload"):
        c.to_bytes(payloads)
