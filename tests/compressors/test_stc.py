"""Tests of Sparse Ternary Compression against a plain-Python reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _codec, stc
from fedjax_lab.compressors.testing import check_compressor


def test_contract(tree):
    check_compressor(stc(0.1), tree)


def test_contract_dense(rich_tree):
    check_compressor(stc(1.0), rich_tree)


def _reference(x, p):
    """Plain-Python STC: top-k by |x| (lower index wins ties), μ = mean |kept|, μ·sign."""
    d = len(x)
    k = max(1, round(p * d))
    kept = sorted(range(d), key=lambda i: (-abs(float(x[i])), i))[:k]
    mu = sum(abs(float(x[i])) for i in kept) / k
    out = np.zeros(d)
    for i in kept:
        out[i] = mu * np.sign(x[i])
    return out, kept, mu


def _reference_bits(x, p):
    """Plain-Python wire size: μ + byte-padded (count, Golomb gaps, sign bits)."""
    d = len(x)
    k = max(1, round(p * d))
    out, _, _ = _reference(x, p)
    b = _codec.golomb_bits(p)
    stream, last = k.bit_length(), -1
    for i in range(d):
        if out[i] != 0:
            stream += ((i - last - 1) >> b) + 1 + b + 1
            last = i
    return 32 + 8 * -(-stream // 8)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.35, 1.0])
def test_matches_reference_decode_and_wire_size(p, make_step):
    c = stc(p)
    step = make_step(c)
    rng = np.random.default_rng(0)
    for trial in range(10):
        x = (rng.standard_normal(300) * rng.exponential(size=300)).astype(np.float32)
        if trial == 1:
            x[::3] = 0.0
        if trial == 2:
            x[:] = 0.0
            x[[4, 250]] = [-2.0, 3.0]  # fewer non-zeros than k
        payload, _, decoded, bits = step(x)
        want, _, mu = _reference(x, p)
        np.testing.assert_allclose(np.asarray(decoded, np.float64), want, rtol=1e-6)
        np.testing.assert_allclose(payload.mu, mu, rtol=1e-6)
        data = c.to_bytes(payload)
        assert 8 * len(data) == bits == _reference_bits(x, p)
        back = c.from_bytes(data, payload)
        for name in ("mu", "indices", "signs"):
            np.testing.assert_array_equal(getattr(back, name), getattr(payload, name))


def test_payload_is_canonical_when_fewer_than_k_entries_are_non_zero(make_step):
    x = np.asarray([0.0, 0.0, -1.0, 0.0, 0.0, 2.0, 0.0, 0.0], np.float32)
    payload = make_step(stc(0.5))(x)[0]
    np.testing.assert_array_equal(payload.indices, [2, 5, 0, 0])
    np.testing.assert_array_equal(payload.signs, [-1, 1, 0, 0])
    assert float(payload.mu) == pytest.approx(3.0 / 4)


def test_index_math_at_int32_scale_without_allocating():
    d = 2**31 - 1
    c = stc(1e-9)
    big = jax.ShapeDtypeStruct((d,), jnp.float32)
    template = jax.eval_shape(lambda x: c.encode(x, (), key=jax.random.key(0))[0], big)
    assert template.k == 2
    payload = template.replace(
        mu=np.float32(0.5),
        indices=np.asarray([7, d - 1], np.int32),
        signs=np.asarray([1, -1], np.int8),
    )
    data = c.to_bytes(payload)
    assert 8 * len(data) == int(jax.jit(c.bits)(payload))
    back = c.from_bytes(data, template)
    np.testing.assert_array_equal(back.indices, payload.indices)


@pytest.mark.parametrize(
    "indices,signs",
    [([2, 1], [1, 1]), ([1, 0], [0, 1]), ([1, 3], [1, 0]), ([1, 8], [1, -1]), ([1, 2], [2, 1])],
    ids=["unsorted", "zero-first", "padding-index", "out-of-range", "bad-sign"],
)
def test_to_bytes_rejects_non_canonical_payloads(indices, signs):
    c = stc(0.25)
    template = jax.eval_shape(lambda: c.encode(jnp.zeros(8), (), key=jax.random.key(0))[0])
    payload = template.replace(
        mu=np.float32(1.0),
        indices=np.asarray(indices, np.int32),
        signs=np.asarray(signs, np.int8),
    )
    with pytest.raises(ValueError, match="not canonical"):
        c.to_bytes(payload)


def test_bad_sparsity():
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"stc: sparsity must be a float in \(0, 1\]"):
            stc(bad)
