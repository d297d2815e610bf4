"""Tests of the bit-level codec primitives against a plain-Python bit-string reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _codec
from fedjax_lab.compressors.testing import FAST_COMPILE
from tests.helpers import decode_or_reject


def _to_bytes(bitstring: str) -> bytes:
    bitstring += "0" * (-len(bitstring) % 8)
    return bytes(int(bitstring[i : i + 8], 2) for i in range(0, len(bitstring), 8))


def _ref_fixed(values, width):
    return "".join(format(int(v), f"0{width}b") if width else "" for v in values)


def _ref_unary(counts):
    return "".join("0" * int(q) + "1" for q in counts)


def _ref_gamma(values):
    # Separated order: every unary prefix first, then every mantissa.
    exps = [int(v).bit_length() - 1 for v in values]
    mantissas = "".join(format(int(v), "b")[1:] for v in values)
    return _ref_unary(exps) + mantissas


def _ref_rice(values, b):
    return _ref_unary([int(v) >> b for v in values]) + _ref_fixed(
        [int(v) & ((1 << b) - 1) for v in values], b
    )


def _random_field(rng):
    """(kind, parameter, values, reference bits) of one random field."""
    kind = str(rng.choice(["bits", "fixed", "unary", "gamma", "rice", "varwidth"]))
    n = int(rng.integers(0, 12))
    if kind == "bits":
        values = rng.integers(0, 2, n)
        return kind, None, values, _ref_fixed(values, 1)
    if kind == "fixed":
        width = int(rng.choice([0, 1, 3, 8, 9, 16, 17, 31, 33, 63]))
        values = rng.integers(0, 2**63 - 1, n, dtype=np.int64) >> (63 - width)
        return kind, width, values, _ref_fixed(values, width)
    if kind == "unary":
        values = rng.integers(0, 40, n)
        return kind, 39, values, _ref_unary(values)
    if kind == "gamma":
        values = np.maximum(rng.integers(1, 2**62, n, dtype=np.int64) >> rng.integers(0, 62, n), 1)
        return kind, 2**62, values, _ref_gamma(values)
    if kind == "rice":
        b = int(rng.integers(0, 12))
        values = rng.integers(0, 5000, n)
        return kind, b, values, _ref_rice(values, b)
    widths = rng.integers(0, 64, n)
    values = np.array(
        [int(rng.integers(0, 2**63 - 1)) >> (63 - int(w)) for w in widths], dtype=np.int64
    )
    return (
        kind,
        widths,
        values,
        "".join(_ref_fixed([v], int(w)) for v, w in zip(values, widths, strict=True)),
    )


@pytest.mark.parametrize("seed", range(20))
def test_writer_matches_reference_and_reader_inverts_it(seed):
    rng = np.random.default_rng(seed)
    fields = [_random_field(rng) for _ in range(6)]
    writer = _codec.BitWriter()
    for kind, param, values, _ in fields:
        if kind == "bits":
            writer.bits(values)
        elif kind in ("fixed", "varwidth"):
            getattr(writer, kind)(values, param)
        elif kind == "rice":
            writer.rice(values, param)
        else:
            getattr(writer, kind)(values)
    ref = "".join(f[3] for f in fields)
    data = writer.to_bytes()
    assert data == _to_bytes(ref)
    assert writer.length == len(ref)

    reader = _codec.BitReader(memoryview(data), "test")
    for kind, param, values, _ in fields:
        n = len(values)
        if kind == "bits":
            got = reader.bits(n)
        elif kind == "fixed":
            got = reader.fixed(n, param)
        elif kind == "unary":
            got = reader.unary(n, param)
        elif kind == "gamma":
            got = reader.gamma(n, param)
        elif kind == "rice":
            got = reader.rice(n, param, 4999)
        else:
            got = reader.varwidth(param)
        np.testing.assert_array_equal(got, values)
    assert reader.finish() == len(ref)


def test_reader_rejects_truncation_bad_counts_padding_and_trailing_bytes():
    writer = _codec.BitWriter()
    writer.gamma(np.array([5, 1, 300]))
    data = writer.to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        _codec.BitReader(memoryview(data[:1]), "t").gamma(3, 300)
    with pytest.raises(ValueError, match="exceeds its maximum 299"):
        _codec.BitReader(memoryview(data), "t").gamma(3, 299)
    with pytest.raises(ValueError, match="unary count exceeds"):
        _codec.BitReader(memoryview(data), "t").unary(3, 1)
    with pytest.raises(ValueError, match="unterminated"):
        _codec.BitReader(memoryview(b"\x00\x00"), "t").unary(1, 100)
    with pytest.raises(ValueError, match="trailing byte"):
        reader = _codec.BitReader(memoryview(data + b"\x00"), "t")
        reader.gamma(3, 300)
        reader.finish()
    with pytest.raises(ValueError, match="non-zero padding"):
        reader = _codec.BitReader(memoryview(b"\x81"), "t")
        reader.bits(1)
        reader.finish()


def test_jit_code_lengths_match_python_integers():
    values = np.array([1, 2, 3, 4, 7, 8, 1000, 2**20, 2**30 + 17, 2**31 - 1], np.int64)
    got = jax.jit(_codec.gamma_length)(jnp.asarray(values, jnp.int32))
    np.testing.assert_array_equal(got, [2 * (int(v).bit_length() - 1) + 1 for v in values])
    gaps = np.array([0, 1, 5, 63, 64, 2**31 - 2], np.int64)
    for b in (0, 3, 30):
        got = jax.jit(lambda g, b=b: _codec.rice_length(g, b))(jnp.asarray(gaps, jnp.int32))
        np.testing.assert_array_equal(got, [(int(g) >> b) + 1 + b for g in gaps])
    big = np.array([1, 2, 2**32 - 1, 2**32, 2**63 + 12345], np.uint64)
    np.testing.assert_array_equal(_codec.floor_log2_np(big), [int(v).bit_length() - 1 for v in big])


@pytest.mark.parametrize(
    "p,expected", [(0.0005, 10), (0.001, 9), (0.01, 6), (0.1, 3), (0.3, 1), (0.5, 0), (1.0, 0)]
)
def test_golomb_parameter_is_the_papers_and_optimal_for_geometric_gaps(p, expected):
    b = _codec.golomb_bits(p)
    assert b == expected

    # Expected Rice length of a geometric gap (P(g) = (1-p)^g p): 1 + b + q/(1-q), q=(1-p)^2^b.
    def mean_length(b):
        q = (1.0 - p) ** (2**b)
        return 1 + b + (q / (1.0 - q) if q < 1 else math.inf)

    assert mean_length(b) == min(mean_length(c) for c in range(40))


def test_golomb_parameter_rejects_bad_density():
    with pytest.raises(ValueError, match=r"density p must be in \(0, 1\]"):
        _codec.golomb_bits(0.0)


def test_index_and_count_widths_for_int32_scale_sizes():
    # Index math for 2**31 - 1 coordinates, without allocating anything.
    assert _codec.index_width(1) == 0
    assert _codec.index_width(2) == 1
    assert _codec.index_width(2**31 - 1) == 31
    assert _codec.index_width(2**31) == 31
    assert _codec.index_width(2**31 + 1) == 32
    assert _codec.count_width(0) == 0
    assert _codec.count_width(2**31 - 1) == 31
    with pytest.raises(ValueError, match="does not fit the int32"):
        _codec.check_int32_bits(2**31, "x")
    _codec.check_int32_bits(2**31 - 1, "x")


def test_check_length_rejects_non_bytes():
    with pytest.raises(TypeError, match="data must be bytes"):
        _codec.check_length("abc", 0, 10, "x")


# ------------------------------------------------------------------------------------------------
# Hostile bytes: every compressor's from_bytes on truncated, extended, random and bit-flipped data.

_SMALL = {
    "conv": jnp.zeros((3, 3, 1, 2)),
    "w": jnp.zeros((4, 3)),
    "b": jnp.zeros((3,)),
    "s": jnp.zeros(()),
}


def _not_bias(path, leaf):
    del path
    return leaf.ndim != 1


def _all_compressors():
    from fedjax_lab import compressors as C

    return {
        "identity": C.identity(),
        "qsgd1": C.qsgd(1),
        "qsgd16-bucket5": C.qsgd(16, bucket_size=5),
        "rand_k": C.rand_k(0.2),
        "top_k": C.top_k(6),
        "sign": C.sign(),
        "scaled_sign": C.scaled_sign(),
        "terngrad": C.terngrad(),
        "stc": C.stc(0.15),
        "sstc": C.sstc(0.2, 0.5),
        "per_leaf": C.per_leaf(C.qsgd(2), _not_bias),
        "masked": C.masked(C.stc(0.3), _not_bias),
    }


_COMPRESSORS = _all_compressors()
_FUZZ_PER_COMPRESSOR = 900  # x 12 compressors: > 10^4 random byte strings in total


def _valid_encodings(c):
    """A few valid (data, template) pairs: random, sparse/spiky and all-zero updates."""
    rng = np.random.default_rng(0)
    state = c.init(_SMALL)
    encode = jax.jit(lambda u, k: c.encode(u, state, key=k)[0], compiler_options=FAST_COMPILE)
    template = jax.eval_shape(lambda: c.encode(_SMALL, state, key=jax.random.key(0))[0])
    updates = [
        jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), _SMALL)
        for _ in range(2)
    ]
    spike = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), _SMALL)
    spike["w"][3, 2] = -5.0
    updates += [spike, jax.tree.map(lambda x: np.zeros(x.shape, np.float32), _SMALL)]
    return [
        c.to_bytes(jax.device_get(encode(u, jax.random.key(i)))) for i, u in enumerate(updates)
    ], template


@pytest.mark.parametrize("name", sorted(_COMPRESSORS))
def test_from_bytes_on_hostile_data(name):
    c = _COMPRESSORS[name]
    datas, template = _valid_encodings(c)
    rng = np.random.default_rng(1)
    for data in datas:
        assert decode_or_reject(c, data, template)
        for cut in range(len(data)):
            with pytest.raises(ValueError):
                c.from_bytes(data[:cut], template)
        for extra in (b"\x00", b"\xff", bytes(rng.integers(0, 256, 7, dtype=np.uint8))):
            with pytest.raises(ValueError):
                c.from_bytes(data + extra, template)
    max_len = max(len(d) for d in datas) + 3
    accepted = 0
    for i in range(_FUZZ_PER_COMPRESSOR):
        if i % 3 == 0:  # random bytes of any length
            data = bytes(rng.integers(0, 256, rng.integers(0, max_len + 1), dtype=np.uint8))
        else:  # a valid encoding with 1-3 flipped bits
            base = bytearray(datas[i % len(datas)])
            for bit in rng.integers(0, 8 * len(base), rng.integers(1, 4)):
                base[bit // 8] ^= 0x80 >> (bit % 8)
            data = bytes(base)
        accepted += decode_or_reject(c, data, template)
    assert accepted < _FUZZ_PER_COMPRESSOR


def test_from_bytes_memory_is_bounded_by_the_template():
    import tracemalloc

    from fedjax_lab import compressors as C

    big = {"w": jnp.zeros((200, 100)), "b": jnp.zeros(100)}
    rng = np.random.default_rng(0)
    for c in (C.qsgd(4), C.stc(0.01), C.top_k(0.01), C.per_leaf(C.qsgd(2))):
        template = jax.eval_shape(lambda c=c: c.encode(big, c.init(big), key=jax.random.key(0))[0])
        max_bytes = template.max_bits // 8
        for length in (max_bytes, 50 * 2**20):
            data = bytes(rng.integers(0, 256, length, dtype=np.uint8))
            tracemalloc.start()
            with pytest.raises(ValueError):
                c.from_bytes(data, template)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            # Never more than a small multiple of the template's largest wire size.
            assert peak <= 80 * max_bytes + 2**16, (c, length, peak, max_bytes)


def _adversarial_trees():
    def tree_from(flat):
        flat = np.asarray(flat, np.float32)
        out, start = {}, 0
        for name in sorted(_SMALL):
            shape = _SMALL[name].shape
            size = int(np.prod(shape))
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out

    d = sum(int(np.prod(x.shape)) for x in _SMALL.values())
    first, last = np.zeros(d), np.zeros(d)
    first[0], last[-1] = 7.0, -7.0
    ties = np.where(np.arange(d) % 2 == 0, 0.5, -0.5)
    huge = np.full(d, -3e37)
    huge[::3] = 1e30
    tiny = np.full(d, 1e-40)  # subnormal
    tiny[5] = -1e-45
    mixed = np.random.default_rng(0).standard_normal(d) * np.logspace(-20, 20, d)
    return {
        "first-only": tree_from(first),
        "last-only": tree_from(last),
        "ties": tree_from(ties),
        "huge": tree_from(huge),
        "subnormal": tree_from(tiny),
        "mixed-scales": tree_from(mixed),
        "zeros": tree_from(np.zeros(d)),
    }


@pytest.mark.parametrize("name", sorted(_COMPRESSORS))
def test_wire_size_and_round_trip_on_adversarial_inputs(name, make_step):
    c = _COMPRESSORS[name]
    step = make_step(c)
    state = c.init(_SMALL)
    for case, tree in _adversarial_trees().items():
        payload, _, decoded, bits = step(tree, state)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(decoded)), case
        data = c.to_bytes(payload)
        assert 8 * len(data) == bits, case
        back = c.from_bytes(data, payload)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(payload), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=case)


@pytest.mark.parametrize("seed", range(4))
def test_short_code_paths_match_reference_and_invert(seed):
    # Fields whose codes are all <= 8 bits take the byte-row paths of varwidth (QSGD's γ
    # mantissas of small levels); the random fields above almost never do.
    rng = np.random.default_rng(100 + seed)
    n = 200
    widths = rng.integers(0, 9, n)
    widths[:3] = [0, 8, 1]
    values = np.array([int(rng.integers(0, 1 << int(w))) if w else 0 for w in widths])
    gammas = rng.integers(1, 512, n)
    writer = _codec.BitWriter()
    writer.bits(np.array([1]))  # an odd offset, so no field starts on a byte boundary
    writer.varwidth(values, widths)
    writer.gamma(gammas)
    ref = "1" + "".join(_ref_fixed([v], int(w)) for v, w in zip(values, widths, strict=True))
    ref += _ref_gamma(gammas)
    data = writer.to_bytes()
    assert data == _to_bytes(ref)
    reader = _codec.BitReader(memoryview(data), "test")
    assert reader.bits(1)[0] == 1
    np.testing.assert_array_equal(reader.varwidth(widths), values)
    np.testing.assert_array_equal(reader.gamma(n, 511), gammas)
    assert reader.finish() == len(ref)


def _ref_varwidth(values, widths):
    return "".join(_ref_fixed([v], int(w)) for v, w in zip(values, widths, strict=True))


@pytest.mark.parametrize("seed", range(3))
def test_long_fields_take_the_merged_and_uint8_paths_and_match_reference(seed):
    # Thousands of codes per field: the writer merges up to 64 codes per packed word, stores
    # short codes in interleaved lanes, and writes γ codes of values < 256 through its uint8
    # path (fields of > 4096 values); the reader's windowed γ uses 2-, 4- and 8-byte windows.
    rng = np.random.default_rng(200 + seed)
    n = 5000
    small = rng.integers(1, 18, n)
    small[rng.random(n) < 0.5] = 1  # QSGD-like: mostly γ(1) = "1"
    mid = np.maximum(rng.integers(1, 2**20, n) >> rng.integers(0, 20, n), 1)
    big = np.maximum(rng.integers(1, 2**56, n, dtype=np.int64) >> rng.integers(0, 56, n), 1)
    widths = rng.integers(0, 3, n)  # mostly 0- and 1-bit codes: several lanes per byte
    values = np.array([int(rng.integers(0, 1 << int(w))) for w in widths])
    flags = rng.integers(0, 2, n)
    writer = _codec.BitWriter()
    writer.bits(np.array([1, 0, 1]))  # an odd offset, so no field starts on a byte boundary
    writer.gamma(small)
    writer.gamma(mid)
    writer.gamma(big)
    writer.varwidth(values, widths)
    writer.unary(np.minimum(widths * 20, 56))
    writer.bits(flags)
    ref = "101" + _ref_gamma(small) + _ref_gamma(mid) + _ref_gamma(big)
    ref += _ref_varwidth(values, widths) + _ref_unary(np.minimum(widths * 20, 56))
    ref += _ref_fixed(flags, 1)
    data = writer.to_bytes()
    assert data == _to_bytes(ref)
    assert writer.length == len(ref)
    reader = _codec.BitReader(memoryview(data), "test")
    np.testing.assert_array_equal(reader.bits(3), [1, 0, 1])
    got = reader.gamma(n, 17, dtype=np.uint8)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, small)
    np.testing.assert_array_equal(reader.gamma(n, 2**20), mid)
    np.testing.assert_array_equal(reader.gamma(n, 2**56), big)
    np.testing.assert_array_equal(reader.varwidth(widths), values)
    np.testing.assert_array_equal(reader.unary(n, 56), np.minimum(widths * 20, 56))
    np.testing.assert_array_equal(reader.bits(n), flags)
    assert reader.finish() == len(ref)

    # Hostile versions of the long uint8 γ field: every failure is a ValueError, and a value
    # over the maximum, a truncation or a flipped bit never decodes silently to other values.
    head = _codec.BitWriter()
    head.gamma(small)
    field = head.to_bytes()
    with pytest.raises(ValueError, match="exceeds its maximum 16"):
        _codec.BitReader(memoryview(field), "t").gamma(n, 16)
    with pytest.raises(ValueError, match="truncated"):
        _codec.BitReader(memoryview(field[: len(field) // 2]), "t").gamma(n, 17)
    for position in rng.integers(0, 8 * len(field), 20):
        corrupt = bytearray(field)
        corrupt[position // 8] ^= 0x80 >> (position % 8)
        reader = _codec.BitReader(memoryview(bytes(corrupt)), "t")
        try:
            got = reader.gamma(n, 17)
            reader.finish()
        except ValueError:
            continue
        assert not np.array_equal(got, small)  # decoded, but visibly different values
