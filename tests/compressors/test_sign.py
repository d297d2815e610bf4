"""Tests of sign (signSGD) and scaled_sign (EF-SignSGD's compressor)."""

import jax
import numpy as np
import pytest

from fedjax_lab.compressors import scaled_sign, sign
from fedjax_lab.compressors.testing import FAST_COMPILE, check_compressor


def test_contract(tree):
    check_compressor(scaled_sign(), tree)


def test_contract_unscaled(rich_tree):
    check_compressor(sign(), rich_tree)


def _round_trip(c):
    return jax.jit(
        lambda x: c.decode(c.encode(x, (), key=jax.random.key(0))[0]),
        compiler_options=FAST_COMPILE,
    )


def test_sign_matches_numpy_with_zero_mapped_to_plus_one(vector):
    got = np.asarray(_round_trip(sign())(vector))
    x = np.asarray(vector)
    np.testing.assert_array_equal(got, np.where(x < 0, -1.0, 1.0))


def test_scaled_sign_matches_numpy_and_its_exact_error(vector):
    run = _round_trip(scaled_sign())
    rng = np.random.default_rng(0)
    for x in (np.asarray(vector), rng.standard_normal(9).astype(np.float32) * 1e30):
        got = np.asarray(run(x), np.float64)
        x64 = x.astype(np.float64)
        scale = np.abs(x64).sum() / x.size
        np.testing.assert_allclose(got, np.where(x < 0, -scale, scale), rtol=1e-6)
        error = np.sum((x64 - got) ** 2)
        expected = np.sum(x64**2) - np.abs(x64).sum() ** 2 / x.size
        np.testing.assert_allclose(error, expected, rtol=1e-5)


@pytest.mark.parametrize("factory", [sign, scaled_sign], ids=["sign", "scaled_sign"])
@pytest.mark.parametrize("d", [1, 7, 8, 9, 64])
def test_codec_is_byte_exact(factory, d, make_step):
    c = factory()
    x = np.where(np.arange(d) % 3 == 0, -1.0, 2.0).astype(np.float32)
    payload, _, _, bits = make_step(c)(x)
    data = c.to_bytes(payload)
    assert 8 * len(data) == bits == 32 + 8 * -(-d // 8)
    back = c.from_bytes(data, payload)
    np.testing.assert_array_equal(back.signs, payload.signs)
    assert back.scale == payload.scale


def test_from_bytes_rejects_padding_bits_and_bad_scales(make_step):
    c = sign()
    payload = make_step(c)(np.ones(3, np.float32))[0]
    good = c.to_bytes(payload)
    with pytest.raises(ValueError, match="non-zero padding"):
        c.from_bytes(good[:4] + b"\x01", payload)
    with pytest.raises(ValueError, match=r"scale 0\.5 is invalid"):
        c.from_bytes(np.float32(0.5).tobytes() + good[4:], payload)
