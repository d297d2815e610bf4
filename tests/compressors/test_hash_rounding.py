"""Tests of the counter-based hash rounding (``rounding_bits='hash'``) of QSGD and TernGrad.

The claim is exact per-coordinate marginals (not independence across coordinates), so the
statistical checks only use quantities that are sums of per-coordinate terms, each over 10^4
independent keys in one jit(vmap) program, with tolerances of 5 standard errors of the claimed
distribution; the same check rejects a deliberately biased rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _bernoulli, qsgd, terngrad
from fedjax_lab.compressors._base import tree_layout
from fedjax_lab.compressors.testing import FAST_COMPILE, check_compressor

NUM_KEYS = 10_000
M32 = 2**32


def _fmix32_np(h):
    h = h.astype(np.uint64)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % M32
    return h ^ (h >> 16)


def _inverse_fmix32_np(h):
    """The inverse of murmur3's finaliser: undo each xor-shift and odd multiplication."""
    h = h.astype(np.uint64)
    h ^= h >> 16
    h = (h * pow(0xC2B2AE35, -1, M32)) % M32
    h ^= (h >> 13) ^ (h >> 26)
    h = (h * pow(0x85EBCA6B, -1, M32)) % M32
    return h ^ (h >> 16)


def test_fmix32_is_the_reference_finaliser_and_invertible():
    rng = np.random.default_rng(0)
    words = rng.integers(0, M32, 100_000, dtype=np.uint64)
    got = np.asarray(jax.jit(_bernoulli.fmix32)(jnp.asarray(words, jnp.uint32)), np.uint64)
    np.testing.assert_array_equal(got, _fmix32_np(words))
    # An inverse exists, so fmix32 is a bijection and a uniform key gives a uniform word.
    np.testing.assert_array_equal(_inverse_fmix32_np(got), words)


def _key_words_for(u, t, index):
    """Key words ``K1, K2`` that make coordinate ``index`` draw ``U = u`` and ``T = t``."""
    k1 = (int(_inverse_fmix32_np(np.array([u]))[0]) - index * 0x9E3779B9) % M32
    return jnp.array([k1, u ^ t], jnp.uint32)


def test_tie_breaker_decides_exactly_when_the_main_word_ties():
    # p = (a + 0.5) / 2**32: U < a draws, U > a does not, and
    # U == a defers to T < c with c = 2**31. Key words are chosen through the inverse hash.
    a, index = 1234567, 5
    p = jnp.full((8,), (a + 0.5) / 2.0**32, jnp.float32)
    assert float(p[0]) * 2.0**32 == a + 0.5  # exact in float32
    draw = jax.jit(lambda kw: _bernoulli.hashed_draws(kw, p, 100))  # coordinates 100..107

    def at(u, t):
        return bool(draw(_key_words_for(u, t, 100 + index))[index])

    assert at(a - 1, M32 - 1) and not at(a + 1, 0)
    assert at(a, 2**31 - 1) and not at(a, 2**31)
    # p = 1 always draws; p = 0 never, whatever the words.
    ones = _bernoulli.hashed_draws(_key_words_for(M32 - 1, M32 - 1, 0), jnp.ones(3), 0)
    zeros = _bernoulli.hashed_draws(_key_words_for(0, 0, 0), jnp.zeros(3), 0)
    assert bool(jnp.all(ones)) and not bool(jnp.any(zeros))


PROBABILITIES = np.array([0.0, 2.0**-20, 0.01, 1 / 3, 0.5, 0.7, 1 - 2.0**-20, 1.0], np.float32)


def _check_marginals(counts, probabilities):
    """Each coordinate's count over independent keys is Binomial(NUM_KEYS, p) (5 SE)."""
    expected = NUM_KEYS * probabilities.astype(np.float64)
    se = np.sqrt(NUM_KEYS * probabilities * (1.0 - probabilities))
    np.testing.assert_array_less(np.abs(counts - expected), 5 * se + 1e-9)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _counts(draw, keys, p):
    return jnp.sum(jax.vmap(lambda key: draw(key, p))(keys).astype(jnp.int32), axis=0)


def _biased(key, p):  # one float32 uniform, but P(b) = min(1, p + 0.02): biased
    return jax.random.uniform(key, p.shape) < p + 0.02


def _far_apart(key, p):
    # Half the coordinates at the start, half near 2**31: the index mixing is exercised far
    # from 0 (as one call on a long vector would), with a vector small enough to sample.
    words = _bernoulli.hash_keys(key)
    half = p.shape[0] // 2
    return jnp.concatenate(
        [
            _bernoulli.hashed_draws(words, p[:half], 0),
            _bernoulli.hashed_draws(words, p[half:], 2**31 + 12_345),
        ]
    )


def test_marginals_are_exact_and_the_same_check_rejects_a_biased_rounding():
    p = np.repeat(PROBABILITIES, 4)
    keys = jax.random.split(jax.random.key(3), NUM_KEYS)
    for draw in (_bernoulli.hash_bernoulli, _far_apart):
        _check_marginals(np.asarray(_counts(draw, keys, jnp.asarray(p)), np.float64), p)
    with pytest.raises(AssertionError):
        _check_marginals(np.asarray(_counts(_biased, keys, jnp.asarray(p)), np.float64), p)


def _qsgd_variance(x, s):
    norm = np.linalg.norm(x)
    ratio = s * np.abs(x) / norm
    tau = ratio - np.floor(ratio)
    return (norm / s) ** 2 * tau * (1 - tau)


def _check_unbiased_with_variance(samples, x, var, rounding):
    # Per coordinate: independent over keys, so the mean is within 5 standard errors.
    np.testing.assert_array_less(
        np.abs(samples.mean(0) - x), 5 * np.sqrt(var / NUM_KEYS) + rounding
    )
    # E‖C(x) - x‖² is a sum of per-coordinate terms: the independent-draw value exactly.
    errors = np.sum((samples - x) ** 2, axis=1)
    assert abs(errors.mean() - var.sum()) <= 5 * errors.std(ddof=1) / np.sqrt(NUM_KEYS)


@pytest.fixture(scope="module")
def split_vector():
    """A 40-coordinate vector as a 3-leaf tree (QSGD's hash path works leaf by leaf)."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal(40).astype(np.float32)
    x[[3, 17, 25]] = 0.0
    x[7] = 4.0
    return {"a": x[:13], "b": x[13:14], "c": x[14:].reshape(2, 13)}, x


def _sample(compressor, tree, num_keys):
    layout = tree_layout(tree, what="test")

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(keys):
        def one(key):
            return layout.flatten(compressor.decode(compressor.encode(tree, (), key=key)[0]))

        return jax.vmap(one)(keys)

    return np.asarray(run(jax.random.split(jax.random.key(0), num_keys)), np.float64)


@pytest.mark.parametrize("s", [1, 4])
def test_qsgd_hash_is_unbiased_with_the_exact_variance(s, split_vector):
    tree, x = split_vector
    samples = _sample(qsgd(s, rounding_bits="hash"), tree, NUM_KEYS)
    x = x.astype(np.float64)
    rounding = 8 * np.finfo(np.float32).eps * np.linalg.norm(x)
    _check_unbiased_with_variance(samples, x, _qsgd_variance(x, s), rounding)


def test_terngrad_hash_is_unbiased_with_the_exact_variance(split_vector):
    tree, x = split_vector
    samples = _sample(terngrad(rounding_bits="hash"), tree, NUM_KEYS)
    x = x.astype(np.float64)
    peak = np.abs(x).max()
    var = np.abs(x) * (peak - np.abs(x))
    _check_unbiased_with_variance(samples, x, var, 4 * np.finfo(np.float32).eps * peak)


def test_qsgd_hash_leafwise_levels_equal_the_flat_formula():
    # Dyadic values: every sum of squares is exact in any order, so the leaf-by-leaf path
    # must reproduce the flat formulation (and one hash call over the whole vector) exactly.
    x = np.array([1.0, -2.0, 0.5, 0.0, -0.25, 3.0, 1.5, -1.0, 0.75], np.float32)
    tree = {"a": x[:2], "b": x[2:3].reshape(()), "c": x[3:].reshape(2, 3)}
    s, key = 5, jax.random.key(11)

    def both():
        payload = qsgd(s, rounding_bits="hash").encode(tree, (), key=key)[0]
        flat = jnp.asarray(x)
        peak = jnp.max(jnp.abs(flat))
        scaled = jnp.abs(flat) / peak
        norm = jnp.sqrt(jnp.sum(scaled * scaled))
        ratio = jnp.minimum(s * scaled / norm, float(s))
        lower = jnp.floor(ratio)
        level = lower + _bernoulli.hash_bernoulli(key, ratio - lower)
        return payload, jnp.where(flat < 0, -level, level).astype(jnp.int8), peak * norm

    payload, levels, norm = jax.jit(both, compiler_options=FAST_COMPILE)()
    np.testing.assert_array_equal(np.asarray(payload.levels), np.asarray(levels))
    np.testing.assert_array_equal(np.asarray(payload.norms), np.asarray(norm).reshape(1))


def test_contract_leafwise_and_bucketed_and_validation(rich_tree):
    check_compressor(qsgd(3, rounding_bits="hash"), rich_tree)  # one bucket: leaf by leaf
    check_compressor(qsgd(3, bucket_size=5, rounding_bits="hash"), rich_tree)  # flat
    for bad in ("Hash", "threefry", b"hash"):
        with pytest.raises(ValueError, match="rounding_bits must be None or one of"):
            qsgd(4, rounding_bits=bad)
    with pytest.raises(ValueError, match="no correlation bound"):
        _bernoulli.correlation_bound("hash")
