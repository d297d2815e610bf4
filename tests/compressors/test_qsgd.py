"""Tests of the QSGD quantizer: contract, statistics, numpy reference, codec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import qsgd
from fedjax_lab.compressors.testing import check_compressor

NUM_KEYS = 10_000
EPS = np.finfo(np.float32).eps


def test_contract(tree):
    check_compressor(qsgd(4, bucket_size=7), tree)


def test_contract_int16_levels(rich_tree):
    check_compressor(qsgd(300), rich_tree)


def _exact_variance(x, s, bucket):
    """Per-coordinate variance (‖x_b‖/s)² τ(1-τ), τ = frac(s|x_i|/‖x_b‖), bucket by bucket."""
    x = np.asarray(x, np.float64)
    bucket = bucket or x.size
    var = np.zeros_like(x)
    for start in range(0, x.size, bucket):
        xb = x[start : start + bucket]
        norm = np.linalg.norm(xb)
        if norm == 0:
            continue
        ratio = s * np.abs(xb) / norm
        tau = ratio - np.floor(ratio)
        var[start : start + bucket] = (norm / s) ** 2 * tau * (1 - tau)
    return var


@pytest.mark.parametrize("s", [1, 2, 4, 16])
@pytest.mark.parametrize("bucket", [None, 7], ids=["whole", "bucket7"])
def test_unbiased_with_the_exact_variance(s, bucket, vector, sample_decoded):
    samples = sample_decoded(qsgd(s, bucket_size=bucket), vector, NUM_KEYS).astype(np.float64)
    x = np.asarray(vector, np.float64)
    var = _exact_variance(x, s, bucket)
    # Unbiased: |mean - x_i| within 5 standard errors of the exact variance (plus float32
    # rounding of ‖x‖·l/s where the variance is 0).
    rounding = 8 * EPS * np.linalg.norm(x)
    np.testing.assert_array_less(
        np.abs(samples.mean(0) - x), 5 * np.sqrt(var / NUM_KEYS) + rounding
    )
    # E‖Q - x‖² equals (‖x‖²/s²) Σ τ(1-τ) within 5 standard errors of the measured error.
    errors = np.sum((samples - x) ** 2, axis=1)
    tolerance = 5 * errors.std(ddof=1) / np.sqrt(NUM_KEYS)
    assert abs(errors.mean() - var.sum()) <= tolerance
    # ... and respects the QSGD bound min(d/s², √d/s)‖x_b‖², bucket by bucket.
    size = bucket or x.size
    bound = sum(
        min(len(xb) / s**2, np.sqrt(len(xb)) / s) * np.sum(xb**2)
        for xb in np.split(x, range(size, x.size, size))
    )
    assert var.sum() <= bound
    assert errors.mean() <= bound + tolerance


def test_matches_numpy_reference_for_the_same_uniform_draws(vector, make_step):
    s, bucket, key = 4, 7, jax.random.key(3)
    payload = make_step(qsgd(s, bucket_size=bucket))(vector, (), key)[0]
    x = np.asarray(vector, np.float32)
    pad = -x.size % bucket
    xb = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, bucket)
    u = np.asarray(jax.jit(jax.random.uniform, static_argnums=1)(key, xb.shape))
    norms = np.linalg.norm(xb.astype(np.float64), axis=1)
    ratio = s * np.abs(xb) / norms[:, None]
    lower = np.floor(ratio)
    levels = (lower + (u < ratio - lower)) * np.sign(xb)
    np.testing.assert_allclose(payload.norms, norms, rtol=1e-6)
    np.testing.assert_array_equal(payload.levels, levels.reshape(-1)[: x.size])


def _reference_bits(levels, num_buckets):
    """Plain-Python wire size: float32 norms + byte-padded (flag + shorter Elias-γ coding)."""
    gamma = lambda v: 2 * (int(v).bit_length() - 1) + 1  # noqa: E731
    d = len(levels)
    dense = sum(gamma(abs(v) + 1) + (v != 0) for v in levels)
    sparse, last = d.bit_length(), -1
    for i, v in enumerate(levels):
        if v:
            sparse += gamma(i - last) + 1 + gamma(abs(v))
            last = i
    stream = 1 + min(dense, sparse)
    return 32 * num_buckets + 8 * -(-stream // 8)


def _adversarial_inputs():
    d = 33
    spike = np.zeros(d, np.float32)
    spike[0] = 1e3
    last = np.zeros(d, np.float32)
    last[-1] = -2.0
    flat = np.where(np.arange(d) % 2 == 0, 1.0, -1.0).astype(np.float32)
    mixed = np.full(d, 1e-30, np.float32)
    mixed[5] = 3e30
    mixed[6] = -1e-38
    return {
        "spike": spike,
        "last_only": last,
        "flat_signs": flat,
        "tiny_and_huge": mixed,
        "zeros": np.zeros(d, np.float32),
        "normal": np.random.default_rng(0).standard_normal(d).astype(np.float32),
    }


@pytest.mark.parametrize("s", [1, 3, 16, 32767])
def test_codec_size_and_round_trip_on_adversarial_inputs(s, make_step):
    c = qsgd(s, bucket_size=None if s != 3 else 10)
    step = make_step(c)
    for name, x in _adversarial_inputs().items():
        payload, _, decoded, bits = step(x)
        assert np.all(np.isfinite(payload.norms)), name
        data = c.to_bytes(payload)
        num_buckets = payload.norms.size
        assert 8 * len(data) == bits, name
        assert 8 * len(data) == _reference_bits(payload.levels.tolist(), num_buckets), name
        back = c.from_bytes(data, payload)
        np.testing.assert_array_equal(back.levels, payload.levels)
        np.testing.assert_array_equal(back.norms, payload.norms)
        assert np.all(np.isfinite(decoded)), name


@pytest.mark.parametrize("s,mode", [(1, 1), (300, 0)], ids=["s1-sparse", "s300-dense"])
def test_the_shorter_coding_is_chosen(s, mode, make_step):
    c = qsgd(s)
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    payload = make_step(c)(x)[0]
    assert c.to_bytes(payload)[4] >> 7 == mode


def test_levels_never_exceed_s_when_one_coordinate_holds_the_norm(sample_decoded):
    x = jnp.asarray([0.0, -3.3e-3, 0.0], jnp.float32)
    samples = sample_decoded(qsgd(5), x, 64)
    # Level s exactly (s + 1 would decode to 1.2 x).
    np.testing.assert_allclose(samples, np.broadcast_to(x, samples.shape), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_levels": 0}, ValueError, r"num_levels=0 must be in \[1, 32767\]"),
        ({"num_levels": 32768}, ValueError, "must be in"),
        ({"num_levels": 2.0}, TypeError, "num_levels must be an int"),
        ({"num_levels": True}, TypeError, "num_levels must be an int"),
        ({"num_levels": 4, "bucket_size": 0}, ValueError, "bucket_size must be None or an int"),
    ],
    ids=["zero", "too-many", "float", "bool", "bucket0"],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        qsgd(**kwargs)


def test_from_bytes_rejects_the_longer_coding(make_step):
    c = qsgd(2)
    x = np.zeros(16, np.float32)
    x[3] = 1.0
    payload = make_step(c)(x)[0]
    data = c.to_bytes(payload)
    assert data[4] >> 7 == 1  # one non-zero: the sparse coding is shorter
    from fedjax_lab.compressors import _codec

    writer = _codec.BitWriter()
    writer.bits(np.array([0]))
    levels = np.abs(np.asarray(payload.levels, np.int64))
    writer.gamma(levels + 1)
    writer.bits(np.asarray(payload.levels)[levels > 0] < 0)
    dense = data[:4] + writer.to_bytes()
    with pytest.raises(ValueError, match="longer of the two codings"):
        c.from_bytes(dense, payload)
