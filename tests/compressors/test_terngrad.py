"""Tests of TernGrad: unbiasedness, variance, the clipped (biased) variant, codec."""

import jax
import numpy as np
import pytest

from fedjax_lab.compressors import terngrad
from fedjax_lab.compressors.testing import check_compressor

NUM_KEYS = 10_000


def test_contract(tree):
    check_compressor(terngrad(), tree)


def test_contract_clipped(rich_tree):
    check_compressor(terngrad(2.5), rich_tree)


def test_unclipped_is_unbiased_with_variance_x_times_max_minus_x(vector, sample_decoded):
    samples = sample_decoded(terngrad(), vector, NUM_KEYS).astype(np.float64)
    x = np.asarray(vector, np.float64)
    peak = np.abs(x).max()
    var = np.abs(x) * (peak - np.abs(x))
    rounding = 4 * np.finfo(np.float32).eps * peak
    np.testing.assert_array_less(
        np.abs(samples.mean(0) - x), 5 * np.sqrt(var / NUM_KEYS) + rounding
    )
    errors = np.sum((samples - x) ** 2, axis=1)
    assert abs(errors.mean() - var.sum()) <= 5 * errors.std(ddof=1) / np.sqrt(NUM_KEYS)
    assert set(np.unique(samples / peak).round(6)) <= {-1.0, 0.0, 1.0}


def test_clipping_is_unbiased_for_the_clipped_vector_only(vector, sample_decoded):
    c = 1.0
    samples = sample_decoded(terngrad(c), vector, NUM_KEYS).astype(np.float64)
    x = np.asarray(vector, np.float64)
    bound = c * np.asarray(vector).std(dtype=np.float64)
    clipped = np.clip(x, -bound, bound)
    var = np.abs(clipped) * (bound - np.abs(clipped))
    se = np.sqrt(var / NUM_KEYS) + 4 * np.finfo(np.float32).eps * bound
    np.testing.assert_array_less(np.abs(samples.mean(0) - clipped), 5 * se)
    # The documented bias: coordinates beyond cσ are shrunk on average.
    beyond = np.abs(x) > bound
    assert beyond.any()
    assert np.all(np.abs(samples.mean(0) - x)[beyond] > 5 * se[beyond])


def test_codec_uses_two_bits_per_coordinate(make_step):
    c = terngrad()
    step = make_step(c)
    x = np.asarray([0.5, -1.0, 0.0, 0.25, -0.75], np.float32)
    for key in jax.random.split(jax.random.key(1), 8):
        payload, _, _, bits = step(x, (), key)
        data = c.to_bytes(payload)
        assert 8 * len(data) == bits == 32 + 16
        back = c.from_bytes(data, payload)
        np.testing.assert_array_equal(back.trits, payload.trits)


def test_from_bytes_rejects_the_unused_code(make_step):
    c = terngrad()
    payload = make_step(c)(np.ones(4, np.float32))[0]
    data = c.to_bytes(payload)
    with pytest.raises(ValueError, match="invalid trit"):
        c.from_bytes(data[:4] + bytes([0b01000000]), payload)  # sign bit without non-zero bit


def test_bad_clip():
    with pytest.raises(ValueError, match="clip_sigmas must be None or > 0"):
        terngrad(0.0)
