"""Fixed-point codes in Z_{2^b}: round trip, exact sums, range and capacity errors."""

import numpy as np
import pytest

from fedjax_lab.secagg import FixedPoint


@pytest.mark.parametrize("fp", [FixedPoint(32, 16, 4.0), FixedPoint(64, 40, 100.0),
                                FixedPoint(12, 4, 3.0)], ids=["b32", "b64", "b12"])
def test_round_trip_within_half_resolution(fp):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-fp.bound, fp.bound, 1000), [fp.bound, -fp.bound, 0.0]])
    codes, clipped = fp.encode(x)
    assert clipped == 0 and codes.dtype == np.uint64
    assert np.array_equal(fp.reduce(codes), codes)  # in [0, 2^bits)
    err = np.abs(fp.decode(codes) - x)
    assert np.max(err) <= fp.resolution / 2


def test_sum_of_codes_decodes_to_exact_sum_of_rounded_values():
    fp = FixedPoint(20, 8, 2.0)
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, (50, 64))
    codes = np.stack([fp.encode(row)[0] for row in x])
    total = fp.reduce(np.sum(codes, axis=0, dtype=np.uint64))  # wraps mod 2^64, then 2^b
    ints = np.rint(x * 2**8).astype(np.int64).sum(axis=0)  # plain integer reference
    np.testing.assert_array_equal(fp.decode(total), ints / 2**8)
    assert np.max(np.abs(fp.decode(total) - x.sum(0))) <= 50 * fp.resolution / 2


def test_out_of_range_raises_or_is_clipped_and_counted():
    fp = FixedPoint(32, 16, 1.0)
    x = np.array([0.5, 1.5, -3.0, 1.0])
    with pytest.raises(ValueError, match="2 coordinates exceed the fixed-point bound"):
        fp.encode(x)
    codes, clipped = fp.encode(x, clip=True)
    assert clipped == 2
    np.testing.assert_array_equal(fp.decode(codes), [0.5, 1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        fp.encode(np.array([np.nan, 0.0]), clip=True)


def test_capacity_and_field_validation():
    fp = FixedPoint(16, 8, 1.0)  # codes up to 256, 2^15 - 1 = 32767 -> 127 clients
    assert fp.max_clients() == 127
    fp.check_capacity(127)
    with pytest.raises(ValueError, match=r"128 clients .* can overflow"):
        fp.check_capacity(128)
    with pytest.raises(ValueError, match="bits must be"):
        FixedPoint(65, 8, 1.0).validate()
    with pytest.raises(ValueError, match="bound must be"):
        FixedPoint(32, 8, -1.0).validate()
    with pytest.raises(ValueError, match="do not fit"):
        FixedPoint(8, 8, 1.0).validate()
