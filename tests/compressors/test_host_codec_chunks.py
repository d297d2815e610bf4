"""The chunked host codec paths against plain-Python bit strings, across chunk boundaries.

The γ reader decodes ``_CHUNK_BITS`` prefix bits at a time after locating the field's end in
``_SCAN_BITS`` windows, the writer merges and packs ``_WRITE_CHUNK`` codes at a time (merging
adjacent codes through a twice-as-wide view), and QSGD scans for non-zeros in
``_NONZERO_CHUNK``-coordinate blocks and scatters ``_SCATTER_CHUNK`` non-zeros at a time. These
fields are long enough to cross those boundaries, with codes of extreme lengths (all one bit,
57 bits, values >= 2**16 and up to 2**56), odd bit offsets and sizes not a multiple of 8; the
hostile streams check that each failure is still reported (and in the old order).
"""

import numpy as np
import pytest

from fedjax_lab.compressors import _codec
from fedjax_lab.compressors import qsgd as make_qsgd
from fedjax_lab.compressors.qsgd import _NONZERO_CHUNK, _SCATTER_CHUNK
from tests.helpers import (
    bitstring_bytes,
    gamma_bits,
    qsgd_payload,
    qsgd_reference_stream,
    unary_bits,
)


def _varwidth_bits(values, widths) -> str:
    return "".join(
        format(int(v), f"0{int(w)}b") if w else "" for v, w in zip(values, widths, strict=True)
    )


def _gamma_cases():
    rng = np.random.default_rng(0)
    n = 3 * _codec._CHUNK_BITS + 5
    mixed = rng.integers(1, 4, n)
    mixed[rng.integers(0, n, 50)] = rng.integers(2**16, 2**20, 50)
    huge = rng.integers(1, 2**56, 2000, dtype=np.int64)
    huge[::7] = 1
    huge[5] = 2**56  # the largest value with a 56-zero prefix
    return {
        "all_ones": (np.ones(n, np.int64), 7),
        "mixed_small_and_2e16": (mixed, 2**20),
        "huge_values": (huge, 2**56),
        "all_at_max": (np.full(_codec._CHUNK_BITS + 9, 300), 300),
    }


GAMMA_CASES = _gamma_cases()


@pytest.mark.parametrize("name", sorted(GAMMA_CASES))
def test_gamma_reader_across_chunks_matches_the_bit_string(name):
    values, max_value = GAMMA_CASES[name]
    bits = "101" + gamma_bits(values) + "11"  # odd offsets on both sides
    reader = _codec.BitReader(memoryview(bitstring_bytes(bits)), "t")
    np.testing.assert_array_equal(reader.bits(3), [1, 0, 1])
    got = reader.gamma(values.size, max_value)
    np.testing.assert_array_equal(got, values)
    assert reader.position == len(bits) - 2
    np.testing.assert_array_equal(reader.bits(2), [1, 1])
    assert reader.finish() == len(bits)
    # The writer produces the same bytes (through its chunked, view-merged packer).
    writer = _codec.BitWriter()
    writer.bits(np.array([1, 0, 1]))
    writer.gamma(values)
    writer.bits(np.array([1, 1]))
    assert writer.to_bytes() == bitstring_bytes(bits)


def test_gamma_reader_rejects_hostile_fields_across_chunks():
    n = 3 * _codec._CHUNK_BITS
    values = np.full(n, 2)
    field = gamma_bits(values)

    def gamma(bits, n=n, max_value=3):
        return _codec.BitReader(memoryview(bitstring_bytes(bits)), "t").gamma(n, max_value)

    np.testing.assert_array_equal(gamma(field), values)
    # A run of more than a chunk of zeros inside the prefix field: whole chunks without a
    # one, then a count far above the maximum.
    long_run = "0" * (_codec._CHUNK_BITS + 100) + field
    with pytest.raises(ValueError, match="unary count exceeds its maximum 40"):
        gamma(long_run, max_value=2**40)
    with pytest.raises(ValueError, match="unary count exceeds its maximum 1"):
        gamma(long_run)
    # An over-long count in a later chunk, with the mantissa field also truncated: the count
    # is reported first (as before the reader was chunked).
    # (n + 6 prefix bits leave 2 bits of byte padding, fewer than the 6 the mantissa needs.)
    prefix = "1" * (n - 1001) + "0000001" + "1" * 1000
    with pytest.raises(ValueError, match="unary count exceeds its maximum 1"):
        gamma(prefix)
    with pytest.raises(ValueError, match="truncated"):
        gamma(prefix, max_value=127)
    got = gamma(prefix + "101101", max_value=127)
    np.testing.assert_array_equal(got[n - 1002 : n - 999], [1, 109, 1])
    # Truncated in the middle of the mantissa field.
    with pytest.raises(ValueError, match="truncated"):
        gamma(field[: len(field) - 9])
    # Truncated inside the prefix field, and a prefix field with one one too few.
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gamma(field[: n // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gamma("01" * (n - 1), max_value=2**20)
    # A value above the maximum in the last chunk only.
    over = gamma_bits(np.concatenate([values[:-1], [3]]))
    np.testing.assert_array_equal(gamma(over)[-1], 3)
    with pytest.raises(ValueError, match="exceeds its maximum 2"):
        gamma(over, max_value=2)
    # Trailing bytes and non-zero padding after a long field.
    for tail, message in (("0" * 8, "trailing byte"), ("1", "non-zero padding")):
        reader = _codec.BitReader(memoryview(bitstring_bytes("101" + field + tail)), "t")
        reader.bits(3)
        reader.gamma(n, 3)
        with pytest.raises(ValueError, match=message):
            reader.finish()


@pytest.mark.parametrize("seed", [0, 1])
def test_writer_chunks_and_view_merges_match_the_bit_string(seed):
    rng = np.random.default_rng(seed)
    n = _codec._WRITE_CHUNK + 12_345
    widths = rng.integers(0, 58, n)
    widths[: n // 3] = rng.integers(0, 3, n // 3)  # short codes: deep merges
    widths[n // 2 : n // 2 + 5000] = 0  # a long stretch of empty codes
    values = rng.integers(0, 2**62, n, dtype=np.int64) & ((1 << widths) - 1)
    counts = rng.integers(0, 5, n)
    counts[-3:] = [0, 56, 60]  # 61 bits: the unpacked path
    fixed = rng.integers(0, 2**13, n)
    writer = _codec.BitWriter()
    writer.bits(np.array([1]))
    writer.varwidth(values, widths)
    writer.unary(counts[:-1])
    writer.unary(counts)
    writer.fixed(fixed, 13)
    ref = "1" + _varwidth_bits(values, widths) + unary_bits(counts[:-1]) + unary_bits(counts)
    ref += "".join(format(int(v), "013b") for v in fixed)
    assert writer.length == len(ref)
    assert writer.to_bytes() == bitstring_bytes(ref)




def _qsgd_cases():
    rng = np.random.default_rng(3)
    d = 2 * _SCATTER_CHUNK + 1001  # more than two scatter chunks of non-zeros
    magnitude = rng.choice([1, 2, 3, 16], d, p=[0.9, 0.08, 0.019, 0.001])
    half = magnitude * rng.choice([-1, 1], d) * (rng.random(d) < 0.55)
    int16 = rng.integers(-300, 301, d) * (rng.random(d) < 0.02)
    far = np.zeros(_NONZERO_CHUNK + 2**17 + 3, np.int64)  # gaps across the scan chunks
    far[[0, _NONZERO_CHUNK - 1, _NONZERO_CHUNK, far.size - 1]] = [-2, 1, -16, 5]
    return {
        "half_dense_s16": (half, 16),
        "all_max_s16": (rng.choice([-16, 16], d), 16),
        "int16_s300_sparse": (int16, 300),
        "far_apart_s16": (far, 16),
    }


QSGD_CASES = _qsgd_cases()


@pytest.mark.parametrize("name", sorted(QSGD_CASES))
def test_qsgd_bytes_across_chunks_match_the_bit_string_and_invert(name):
    levels, s = QSGD_CASES[name]
    c = make_qsgd(s, bucket_size=4096)
    payload = qsgd_payload(np.asarray(levels), s, 4096)
    data = c.to_bytes(payload)
    head = np.asarray(payload.norms, "<f4").tobytes()
    assert data == head + bitstring_bytes(qsgd_reference_stream(np.asarray(levels)))
    back = c.from_bytes(data, payload)
    np.testing.assert_array_equal(back.levels, payload.levels)
    assert back.levels.dtype == payload.levels.dtype
    # A zero norm over a bucket with non-zero levels is not canonical, in both directions.
    norms = np.array(payload.norms)
    bucket = int(np.flatnonzero(payload.levels)[-1]) // 4096
    norms[bucket] = 0.0
    zeroed = payload.replace(norms=norms)
    with pytest.raises(ValueError, match="not canonical"):
        c.to_bytes(zeroed)
    with pytest.raises(ValueError, match="not canonical"):
        c.from_bytes(np.asarray(norms, "<f4").tobytes() + data[len(head) :], payload)


def test_qsgd_sparse_positions_past_the_end_are_rejected():
    d = _SCATTER_CHUNK + 10
    s = 16
    c = make_qsgd(s)
    template = qsgd_payload(np.zeros(d, np.int64), s)
    head = np.asarray(template.norms, "<f4").tobytes()
    n = 3
    count = format(n, f"0{_codec.count_width(d)}b")
    for gaps, ok in (([1, d - 2, 1], True), ([1, d - 2, 2], False), ([d, d, d], False)):
        bits = "1" + count + gamma_bits(gaps) + gamma_bits([1, 1, 1]) + "010"
        data = head + bitstring_bytes(bits)
        if ok:
            levels = c.from_bytes(data, template).levels
            np.testing.assert_array_equal(np.flatnonzero(levels), [0, d - 2, d - 1])
            np.testing.assert_array_equal(levels[[0, d - 2, d - 1]], [1, -1, 1])
        else:
            with pytest.raises(ValueError, match="out of range"):
                c.from_bytes(data, template)
