"""Tests of the reduced-bit stochastic rounding (``rounding_bits``) of QSGD and TernGrad.

Statistical checks use 10^4 keys in one jit(vmap) program and tolerances of 5 standard errors
of the claimed distribution; the default path (``rounding_bits=None``) is pinned to its
reference draws so its outputs cannot change silently.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _bernoulli, qsgd, terngrad
from fedjax_lab.compressors.qsgd import _host_streams
from fedjax_lab.compressors.testing import FAST_COMPILE, check_compressor
from tests.helpers import sparse_code_bits

NUM_KEYS = 10_000


@pytest.mark.parametrize("k", _bernoulli.ROUNDING_BITS)
def test_draw_probability_is_exact_including_the_tie_breaker(k):
    # p = 2**-(k+1) and 1 - 2**-(k+1) fall strictly between two k-bit levels: a plain k-bit
    # comparison would draw them with probability 0 and 1; only the shared 32-bit tie breaker
    # makes them exact. Each p fills whole tie-breaker groups (128 coordinates).
    half_step = 2.0 ** -(k + 1)
    probabilities = np.array([0.0, half_step, 3 * half_step, 0.3, 1 - half_step, 1.0], np.float32)
    per_p = 128
    p = jnp.asarray(np.repeat(probabilities, per_p))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def counts(keys):
        draws = jax.vmap(lambda key: _bernoulli.bernoulli(key, p, k))(keys)
        return jnp.sum(draws.reshape(keys.shape[0], probabilities.size, per_p), axis=(0, 2))

    observed = np.asarray(counts(jax.random.split(jax.random.key(7), NUM_KEYS)), np.float64)
    n = NUM_KEYS * per_p
    # All these p are >= 2**-(k+9) (or 0), where the claimed probability is p exactly.
    expected = n * probabilities.astype(np.float64)
    # Variance of a count: independent across keys and groups, within a group at most
    # (1 + (GROUP - 1) ρ) times the independent variance (the documented correlation bound).
    inflation = 1 + (_bernoulli.GROUP - 1) * _bernoulli.correlation_bound(k)
    se = np.sqrt(inflation * n * probabilities * (1 - probabilities))
    np.testing.assert_array_less(np.abs(observed - expected), 5 * se + 1e-9)
    assert observed[0] == 0 and observed[-1] == n


def _qsgd_variance(x, s):
    norm = np.linalg.norm(x)
    ratio = s * np.abs(x) / norm
    tau = ratio - np.floor(ratio)
    return (norm / s) ** 2 * tau * (1 - tau)


def _check_unbiased_with_variance(samples, x, var, rounding, k):
    # Per coordinate: draws across keys are independent, so the mean is within 5 standard
    # errors of the exact per-coordinate variance.
    np.testing.assert_array_less(
        np.abs(samples.mean(0) - x), 5 * np.sqrt(var / NUM_KEYS) + rounding
    )
    # E‖C(x) - x‖² is a sum of per-coordinate terms, so it is the independent-draw value.
    errors = np.sum((samples - x) ** 2, axis=1)
    assert abs(errors.mean() - var.sum()) <= 5 * errors.std(ddof=1) / np.sqrt(NUM_KEYS)
    # A linear functional (the coordinate sum) has at most the documented inflated variance;
    # its sample variance over 10^4 keys has relative standard error ~ sqrt(2 / n).
    bound = (1 + (_bernoulli.GROUP - 1) * _bernoulli.correlation_bound(k)) * var.sum()
    assert samples.sum(1).var(ddof=1) <= bound * (1 + 5 * np.sqrt(2 / (NUM_KEYS - 1)))


@pytest.mark.parametrize("k", _bernoulli.ROUNDING_BITS)
@pytest.mark.parametrize("s", [1, 4])
def test_qsgd_reduced_bits_is_unbiased_with_the_exact_variance(k, s, vector, sample_decoded):
    samples = sample_decoded(qsgd(s, rounding_bits=k), vector, NUM_KEYS).astype(np.float64)
    x = np.asarray(vector, np.float64)
    rounding = 8 * np.finfo(np.float32).eps * np.linalg.norm(x)
    _check_unbiased_with_variance(samples, x, _qsgd_variance(x, s), rounding, k)


@pytest.mark.parametrize("k", _bernoulli.ROUNDING_BITS)
def test_terngrad_reduced_bits_is_unbiased_with_the_exact_variance(k, vector, sample_decoded):
    samples = sample_decoded(terngrad(rounding_bits=k), vector, NUM_KEYS).astype(np.float64)
    x = np.asarray(vector, np.float64)
    peak = np.abs(x).max()
    var = np.abs(x) * (peak - np.abs(x))
    _check_unbiased_with_variance(samples, x, var, 4 * np.finfo(np.float32).eps * peak, k)


def test_contract_with_reduced_bits(rich_tree):
    # One contract run (TernGrad draws through the same helper; its statistics are above).
    check_compressor(qsgd(3, bucket_size=5, rounding_bits=8), rich_tree)


def test_terngrad_default_draws_are_one_float32_uniform_per_coordinate(vector, make_step):
    key = jax.random.key(5)
    payload = make_step(terngrad())(vector, (), key)[0]
    x = np.asarray(vector, np.float32)
    u = np.asarray(jax.jit(jax.random.uniform, static_argnums=1)(key, x.shape))
    expected = np.where(u < np.abs(x) / np.abs(x).max(), np.sign(x), 0)
    np.testing.assert_array_equal(payload.trits, expected)


@pytest.mark.parametrize("bad", [0, 4, 32, True, 16.0])
def test_rounding_bits_are_validated(bad):
    for make in (lambda: qsgd(4, rounding_bits=bad), lambda: terngrad(rounding_bits=bad)):
        with pytest.raises(ValueError, match="rounding_bits must be None or one of"):
            make()


@pytest.mark.parametrize("d", [1, 31, 32, 33, 95, 1000])
def test_packed_sparse_code_length_matches_the_host_stream(d):
    rng = np.random.default_rng(d)
    patterns = [np.zeros(d, np.int32), np.full(d, 3, np.int32)]
    for density in (0.001, 0.05, 0.5):
        patterns.append(np.where(rng.random(d) < density, rng.integers(1, 40, d), 0))
    spike = np.zeros(d, np.int32)
    spike[-1] = 7  # the only non-zero in the last bit of the last word
    patterns.append(spike)
    compute = jax.jit(sparse_code_bits)
    for lv in patterns:
        lv = lv.astype(np.int32)
        _, sparse, _, _ = _host_streams(lv, d)
        # _host_streams adds the count field to the per-non-zero codes.
        assert int(compute(jnp.asarray(lv))) + d.bit_length() == sparse


def _reduced_bits_reference(key, p, k):
    """The documented draws of ``rounding_bits=k`` from jax.random words, in numpy.

    Coordinate i sits in row r = i // GROUP, column g; rows are padded to a multiple of
    lanes = 32 // k, lane j of word (w, g) serves row j * rows / lanes + w (bits 32 - k (j + 1)
    and up), and row r has one 32-bit tie breaker.
    """
    group, lanes = _bernoulli.GROUP, 32 // k
    p = np.asarray(p, np.float32).reshape(-1)
    n = p.size
    rows = -(-max(n, 1) // group)
    rows = -(-rows // lanes) * lanes
    key_u, key_w = jax.random.split(key)
    words = np.asarray(jax.random.bits(key_u, (rows // lanes, group), jnp.uint32))
    ties = np.asarray(jax.random.bits(key_w, (rows,), jnp.uint32))
    i = np.arange(n)
    r, g = i // group, i % group
    lane, w = r // (rows // lanes), r % (rows // lanes)
    u = (words[w, g].astype(np.uint64) >> (32 - k * (lane + 1)).astype(np.uint64)) & ((1 << k) - 1)
    t = p * np.float32(2.0**k)
    a = np.floor(t)
    c = np.ceil((t - a) * np.float32(2.0**32))
    a, c = a.astype(np.uint64), c.astype(np.uint64)
    return (u < a) | ((u == a) & (ties[r].astype(np.uint64) < c))


@pytest.mark.parametrize("k", _bernoulli.ROUNDING_BITS)
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 64, 100, 1000, 4099])
def test_reduced_bits_draws_follow_the_documented_word_layout(k, n):
    # Pins the k-bit draws to an independent numpy reading of the layout (the fast path
    # writes the lanes and tie breakers out and reads them unpadded), at sizes that are not
    # multiples of GROUP * lanes, and vmapped over keys.
    rng = np.random.default_rng(n)
    p = rng.random(n).astype(np.float32)
    p[: n // 3] = np.round(p[: n // 3] * 2.0**k) / 2.0**k  # some exact k-bit probabilities
    keys = jax.random.split(jax.random.key(7 + n), 3)
    got = jax.jit(jax.vmap(lambda key: _bernoulli.bernoulli(key, jnp.asarray(p), k)))(keys)
    for row, key in zip(np.asarray(got), keys, strict=True):
        np.testing.assert_array_equal(row, _reduced_bits_reference(key, p, k))
