"""Tests of rand_k (unbiased) and top_k (biased contraction)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _codec, rand_k, top_k
from fedjax_lab.compressors.testing import FAST_COMPILE, check_compressor

NUM_KEYS = 10_000


@pytest.mark.parametrize("factory", [rand_k, top_k], ids=["rand_k", "top_k"])
def test_contract(factory, tree):
    check_compressor(factory(0.3), tree)


def test_contract_with_a_count(rich_tree):
    check_compressor(top_k(7), rich_tree)


@pytest.mark.parametrize("k", [1, 10, 39])
def test_rand_k_is_unbiased_with_variance_d_over_k_minus_one(k, vector, sample_decoded):
    samples = sample_decoded(rand_k(k), vector, NUM_KEYS).astype(np.float64)
    x = np.asarray(vector, np.float64)
    d = x.size
    var = x**2 * (d / k - 1)
    np.testing.assert_array_less(np.abs(samples.mean(0) - x), 5 * np.sqrt(var / NUM_KEYS) + 1e-6)
    # Each coordinate is kept with probability exactly k/d (binomial standard error).
    kept = (samples != 0)[:, x != 0].mean(0)
    np.testing.assert_array_less(np.abs(kept - k / d), 5 * np.sqrt(k / d * (1 - k / d) / NUM_KEYS))
    errors = np.sum((samples - x) ** 2, axis=1)
    expected = (d / k - 1) * np.sum(x**2)
    assert abs(errors.mean() - expected) <= 5 * errors.std(ddof=1) / np.sqrt(NUM_KEYS)


def test_rand_k_keeps_exactly_k_distinct_sorted_indices():
    c = rand_k(5)
    encode = jax.jit(
        jax.vmap(lambda k: c.encode(jnp.ones(23), (), key=k)[0].indices),
        compiler_options=FAST_COMPILE,
    )
    indices = np.asarray(encode(jax.random.split(jax.random.key(0), 200)))
    assert np.all(np.diff(indices, axis=1) > 0) and indices.min() >= 0 and indices.max() < 23


def _numpy_top_k(x, k):
    order = sorted(range(len(x)), key=lambda i: (-abs(float(x[i])), i))[:k]
    out = np.zeros_like(x)
    out[order] = x[order]
    return out


@pytest.mark.parametrize("k", [1, 5, 0.5, 40])
def test_top_k_matches_numpy_reference_and_contracts(k):
    c = top_k(k)
    run = jax.jit(
        lambda x: c.decode(c.encode(x, (), key=jax.random.key(0))[0]), compiler_options=FAST_COMPILE
    )
    rng = np.random.default_rng(0)
    for trial in range(20):
        x = rng.standard_normal(40).astype(np.float32) * rng.exponential(size=40).astype(np.float32)
        if trial == 0:
            x[:10] = 1.5  # ties: the lower index wins
        got = np.asarray(run(x))
        kk = k if isinstance(k, int) else round(k * 40)
        np.testing.assert_array_equal(got, _numpy_top_k(x, kk))
        residual = np.sum((x.astype(np.float64) - got) ** 2)
        assert residual <= (1 - kk / 40) * np.sum(x.astype(np.float64) ** 2) * (1 + 1e-6)


@pytest.mark.parametrize("factory", [rand_k, top_k], ids=["rand_k", "top_k"])
def test_count_and_fraction_validation(factory):
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        factory(0)
    with pytest.raises(ValueError, match=r"fraction k=1.5 must be in \(0, 1\]"):
        factory(1.5)
    with pytest.raises(TypeError, match="k must be an int count or a float fraction"):
        factory(True)
    with pytest.raises(ValueError, match="k=11 exceeds the number of coordinates d=10"):
        factory(11).init({"w": jnp.zeros(10)})
    with pytest.raises(ValueError, match="k=1 exceeds the number of coordinates d=0"):
        factory(1).init({"w": jnp.zeros((0, 4))})


@pytest.mark.parametrize(
    "fraction,d,k", [(1e-6, 10, 1), (0.3, 10, 3), (0.0125, 1000, 12), (0.0135, 1000, 14)]
)
def test_fraction_is_rounded_to_nearest_and_at_least_one(fraction, d, k):
    c = top_k(fraction)
    payload = jax.eval_shape(lambda: c.encode(jnp.zeros(d), (), key=jax.random.key(0))[0])
    assert payload.k == k


@pytest.mark.parametrize(
    "indices,golomb",
    [([0, 1, 2, 3, 4, 5, 6, 7], True), ([3, 500, 501, 998], True), ([0], False), ([999], False)],
    ids=["dense-run", "spread", "first-tie", "last"],
)
@pytest.mark.parametrize("factory", [rand_k, top_k], ids=["rand_k", "top_k"])
def test_codec_on_chosen_index_patterns(factory, indices, golomb):
    c = factory(len(indices))
    template = jax.eval_shape(lambda: c.encode(jnp.zeros(1000), (), key=jax.random.key(0))[0])
    payload = template.replace(
        indices=np.asarray(indices, np.int32),
        values=np.linspace(-1, 1, len(indices)).astype(np.float32),
    )
    data = c.to_bytes(payload)
    assert 8 * len(data) == int(jax.jit(c.bits)(payload))
    back = c.from_bytes(data, template)
    np.testing.assert_array_equal(back.indices, payload.indices)
    np.testing.assert_array_equal(back.values, payload.values)
    # The flag bit after the values says which coding won: Golomb iff strictly shorter than
    # fixed width (plain-Python lengths; b* = golomb_bits(k/d)).
    b = _codec.golomb_bits(len(indices) / 1000)
    gaps = np.diff(indices, prepend=-1) - 1
    shorter = sum((int(g) >> b) + 1 + b for g in gaps) < 10 * len(indices)
    assert shorter == golomb
    assert (data[4 * len(indices)] >> 7) == golomb


@pytest.mark.parametrize("factory", [rand_k, top_k], ids=["rand_k", "top_k"])
def test_index_math_at_int32_scale_without_allocating(factory):
    d = 2**31 - 1
    c = factory(3)
    big = jax.ShapeDtypeStruct((d,), jnp.float32)
    c.init(big)
    template = jax.eval_shape(lambda x: c.encode(x, (), key=jax.random.key(0))[0], big)
    for indices in ([0, 2**30, d - 1], [d - 3, d - 2, d - 1], [0, 1, 2]):
        payload = template.replace(
            indices=np.asarray(indices, np.int32), values=np.ones(3, np.float32)
        )
        data = c.to_bytes(payload)
        assert 8 * len(data) == int(jax.jit(c.bits)(payload))
        np.testing.assert_array_equal(c.from_bytes(data, template).indices, indices)
    with pytest.raises(ValueError, match="one compressed vector has at most 2147483647"):
        c.init(jax.ShapeDtypeStruct((2**31,), jnp.float32))


def test_to_bytes_rejects_unsorted_or_out_of_range_indices():
    c = top_k(2)
    template = jax.eval_shape(lambda: c.encode(jnp.zeros(8), (), key=jax.random.key(0))[0])
    for bad in ([3, 3], [4, 2], [1, 8]):
        payload = template.replace(indices=np.asarray(bad, np.int32), values=np.ones(2, np.float32))
        with pytest.raises(ValueError, match="strictly increasing"):
            c.to_bytes(payload)


def test_rand_k_index_rotation_does_not_overflow_int32():
    from fedjax_lab.compressors.sparsify import rotate

    d = 2**31 - 1
    indices = np.asarray([0, 1, 2**30, d - 2, d - 1], np.int32)
    for shift in (0, 1, 2**30 + 5, d - 1):
        got = jax.jit(rotate, static_argnums=2)(indices, np.int32(shift), d)
        want = (indices.astype(np.int64) + shift) % d
        np.testing.assert_array_equal(got, want)
