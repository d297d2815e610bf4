"""Host wire codecs at sizes that take the vectorised fast paths, against bit strings.

``to_bytes`` picks its coding from exponent sums (``_stream_lengths``) and ``from_bytes``
checks that choice from its field lengths; both must agree with the histogram reference
(``_host_streams``) and the bytes with a plain-Python bit-string encoder of the wire format
(QSGD, Alistarh et al. 2017, §3.2: a mode flag, then the shorter Elias-γ coding). The vectors
are large enough (> 4096 codes, gaps >= 2**16) to reach the uint8/int8/int64 exponent paths.
TernGrad's word-parallel trit packing is pinned against its two-bits-per-trit string.
"""

import numpy as np
import pytest

from fedjax_lab.compressors import _codec
from fedjax_lab.compressors import qsgd as make_qsgd
from fedjax_lab.compressors.qsgd import _host_streams, _stream_lengths
from tests.helpers import (
    bitstring_bytes,
    decode_or_reject,
    gamma_bits,
    qsgd_payload,
    qsgd_reference_stream,
)


def _cases():
    rng = np.random.default_rng(0)
    d = 20_000
    # The s=16 bucket-512 regime of a Gaussian update: half non-zero, mostly level 1, and the
    # sparse coding (γ gaps of ~1 to 3) narrowly shorter than the dense one.
    magnitude = rng.choice([1, 2, 3, 4], d, p=[0.9, 0.09, 0.008, 0.002])
    half = magnitude * rng.choice([-1, 1], d) * (rng.random(d) < 0.5)
    sparse = rng.integers(1, 3, d) * rng.choice([-1, 1], d) * (rng.random(d) < 0.01)
    long_gaps = np.zeros(70_000, np.int64)  # gaps >= 2**16: the int64 exponent path
    long_gaps[[0, 69_998, 69_999]] = [3, -1, 2]
    far = np.zeros(70_000, np.int64)
    far[-1] = -16
    return {
        "half_dense_s16": (half, 16),
        "sparse_s2": (sparse, 2),
        "all_zero": (np.zeros(d, np.int64), 16),
        "all_max": (rng.choice([-16, 16], d), 16),
        "dense_s127": (rng.integers(-127, 128, 6000), 127),
        "int16_s300": (rng.integers(-300, 301, 5000) * (rng.random(5000) < 0.3), 300),
        "long_gaps": (long_gaps, 3),
        "one_far_nonzero": (far, 16),
        "small": (np.array([0, 5, 0, 0, -1, 0, 0, 0, 2]), 5),
        "single_zero": (np.zeros(1, np.int64), 1),
    }


CASES = _cases()
_COMPRESSORS = {s: make_qsgd(s) for s in {s for _, s in CASES.values()}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bytes_match_the_bit_string_reference_and_invert(name):
    levels, s = CASES[name]
    c = _COMPRESSORS[s]
    payload = qsgd_payload(np.asarray(levels), s)
    data = c.to_bytes(payload)
    head = np.asarray(payload.norms, "<f4").tobytes()
    assert data == head + bitstring_bytes(qsgd_reference_stream(np.asarray(levels)))
    back = c.from_bytes(data, payload)
    np.testing.assert_array_equal(back.levels, payload.levels)
    np.testing.assert_array_equal(back.norms, payload.norms)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_lengths_match_the_histogram_reference(name):
    levels, _ = CASES[name]
    levels = np.asarray(levels, np.int16)
    positions = np.flatnonzero(levels)
    magnitudes = np.abs(levels[positions]).view(np.uint16)
    gaps = np.diff(positions, prepend=-1)

    def exp_sum(values):
        return int(sum(int(v).bit_length() - 1 for v in values))

    below = int(sum(1 for m in magnitudes if (int(m) + 1) & int(m) == 0))
    got = _stream_lengths(levels.size, positions.size, exp_sum(gaps), exp_sum(magnitudes), below)
    dense, sparse, _, _ = _host_streams(levels, levels.size)
    assert got == (dense, sparse)


@pytest.mark.parametrize("name", ["half_dense_s16", "long_gaps", "int16_s300"])
def test_hostile_streams_are_rejected_or_canonical(name):
    levels, s = CASES[name]
    c = _COMPRESSORS[s]
    template = qsgd_payload(np.asarray(levels), s)
    data = c.to_bytes(template)
    rng = np.random.default_rng(1)
    for cut in (len(data) - 1, len(data) // 2, 5, 4):
        with pytest.raises(ValueError):
            c.from_bytes(data[:cut], template)
    for extra in (b"\x00", b"\x80"):
        with pytest.raises(ValueError):
            c.from_bytes(data + extra, template)
    accepted = 0
    for _ in range(40):
        mutated = bytearray(data)
        for bit in rng.integers(32, 8 * len(data), rng.integers(1, 4)):
            mutated[bit // 8] ^= 0x80 >> (bit % 8)
        accepted += decode_or_reject(c, bytes(mutated), template)
    assert accepted < 40


@pytest.mark.parametrize("name", ["half_dense_s16", "sparse_s2", "one_far_nonzero"])
def test_the_longer_coding_is_rejected(name):
    levels, s = CASES[name]
    levels = np.asarray(levels)
    c = _COMPRESSORS[s]
    template = qsgd_payload(levels, s)
    chosen = qsgd_reference_stream(levels)
    # The same levels in the other coding: a well-formed stream that is not the shortest.
    nonzero = [(i, int(v)) for i, v in enumerate(levels) if v]
    signs = "".join("1" if v < 0 else "0" for _, v in nonzero)
    if chosen[0] == "1":
        other = "0" + gamma_bits(np.abs(levels) + 1) + signs
    else:
        gaps = np.diff([i for i, _ in nonzero], prepend=-1)
        count = format(len(nonzero), f"0{_codec.count_width(levels.size)}b")
        other = "1" + count + gamma_bits(gaps) + gamma_bits([abs(v) for _, v in nonzero])
        other += signs
    data = np.asarray(template.norms, "<f4").tobytes() + bitstring_bytes(other)
    if len(data) <= template.max_bits // 8:
        with pytest.raises(ValueError, match="longer of the two codings"):
            c.from_bytes(data, template)
    else:  # the longer coding does not even fit the size bound
        with pytest.raises(ValueError, match="too long"):
            c.from_bytes(data, template)


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.5, 1.0])
def test_flatnonzero_matches_numpy(dtype, density):
    rng = np.random.default_rng(2)
    for size in (0, 7, 1023, 5001):
        values = ((rng.random(size) < density) * rng.integers(1, 100, size)).astype(dtype)
        want = np.flatnonzero(values)
        np.testing.assert_array_equal(_codec.flatnonzero(values), want)
        np.testing.assert_array_equal(_codec.flatnonzero(values, want.size), want)


@pytest.mark.parametrize(
    "values",
    [
        np.arange(1, 5000) % 200 + 1,  # > 4096 values below 256: uint8 exponents
        np.arange(1, 3000),  # below 2**16, few: int8 table exponents
        np.array([1, 2**16, 2**40 + 3, 2**56 - 1]),  # int64 exponents
    ],
    ids=["uint8", "int8", "int64"],
)
def test_gamma_with_given_exponents_matches_the_reference(values):
    exps = _codec.gamma_exponents(values)
    np.testing.assert_array_equal(exps, [int(v).bit_length() - 1 for v in values])
    given, computed = _codec.BitWriter(), _codec.BitWriter()
    given.bits(np.array([1, 0, 1]))  # start mid-byte
    computed.bits(np.array([1, 0, 1]))
    given.gamma(values, exps)
    computed.gamma(values)
    assert given.to_bytes() == computed.to_bytes() == bitstring_bytes("101" + gamma_bits(values))


@pytest.mark.parametrize("d", [0, 1, 3, 4, 5, 4099])
def test_terngrad_trit_packing_matches_the_bit_string(d):
    from fedjax_lab.compressors.terngrad import _pack_trits

    trits = np.random.default_rng(d).integers(-1, 2, d).astype(np.int8)
    bits = "".join(("1" + ("1" if t < 0 else "0")) if t else "00" for t in trits.tolist())
    assert _pack_trits(trits) == bitstring_bytes(bits)
