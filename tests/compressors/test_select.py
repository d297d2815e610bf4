"""The sort-free top-k selection against lax.top_k on adversarial inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _once, _select
from fedjax_lab.compressors.testing import FAST_COMPILE


def _inputs(d: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sign = rng.choice([-1.0, 1.0], d)
    tiny = np.float32(1e-45)  # the smallest denormal
    return {
        "normal": rng.standard_normal(d),
        "few_values": rng.integers(-3, 4, d).astype(np.float64),
        "all_equal": np.full(d, 2.5),
        "signed_zeros": np.where(rng.random(d) < 0.5, 0.0, -0.0),
        "denormals": rng.integers(0, 5, d) * tiny * sign,
        "infinities": np.where(rng.random(d) < 0.3, np.inf * sign, rng.standard_normal(d)),
        "negative": -np.abs(rng.standard_normal(d)) - 1.0,
        "ascending": np.arange(d, dtype=np.float64),
        "descending": -np.arange(d, dtype=np.float64),
        "mostly_zero": np.where(rng.random(d) < 0.01, rng.standard_normal(d), 0.0),
        # Values within one high-digit bin: the low-digit histogram decides.
        "one_bin": 1.0 + rng.integers(0, 100, d) * np.finfo(np.float32).eps,
        "max_float": np.where(rng.random(d) < 0.5, np.finfo(np.float32).max, -np.inf),
    }


def _reference(x: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1]))


@pytest.mark.parametrize("method", ["radix", "sort"])
@pytest.mark.parametrize("d", [1, 33, 1000, 5000])
def test_matches_lax_top_k_on_adversarial_inputs(d, method):
    # d=5000 has a 1024-slot bin buffer: all-equal and few-value inputs overflow it and take the
    # whole-vector histogram; the others fit.
    rng = np.random.default_rng(d)
    inputs = {name: x.astype(np.float32) for name, x in _inputs(d, rng).items()}
    for k in sorted({1, 2, d // 2, d - 1, d} & set(range(1, d + 1))):
        select = jax.jit(
            functools.partial(_select.top_k_indices, k=k, method=method),
            compiler_options=FAST_COMPILE,
        )
        for name, x in inputs.items():
            for score in (x, np.abs(x)):
                got = np.asarray(select(score))
                np.testing.assert_array_equal(got, _reference(score, k), err_msg=f"{name} k={k}")


def test_vmapped_rows_that_fit_and_do_not_fit_the_buffer():
    d, k = 5000, 700
    rng = np.random.default_rng(1)
    rows = np.stack(
        [rng.standard_normal(d), np.full(d, -1.0), rng.integers(0, 3, d) * 1.0, np.zeros(d)]
    ).astype(np.float32)
    select = jax.jit(
        jax.vmap(functools.partial(_select.top_k_indices, k=k, method="radix")),
        compiler_options=FAST_COMPILE,
    )
    got = np.asarray(select(rows))
    for row, indices in zip(rows, got, strict=True):
        np.testing.assert_array_equal(indices, _reference(row, k))


def test_sortable_keys_order_floats():
    values = np.array(
        [-np.inf, -3.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, np.finfo(np.float32).max, np.inf],
        np.float32,
    )
    keys = np.asarray(jax.jit(_select.sortable_keys)(values)).astype(np.int64)
    # IEEE total order, as lax.top_k: -0.0 ranks below +0.0.
    assert np.all(np.diff(keys) > 0)


def test_auto_method_switches_at_the_documented_size():
    small = jax.make_jaxpr(lambda s: _select.top_k_indices(s, 3))(jnp.zeros(1000))
    large = jax.make_jaxpr(lambda s: _select.top_k_indices(s, 3))(
        jnp.zeros(_select.RADIX_MIN_SIZE))
    assert "top_k" in str(small) and "scatter" not in str(small)
    assert "scatter" in str(large) and "top_k" not in str(large)
    with pytest.raises(ValueError, match="method must be"):
        _select.top_k_indices(jnp.zeros(5), 2, method="heap")


@pytest.mark.parametrize("k", [0, 6])
def test_rejects_counts_outside_one_to_d(k):
    with pytest.raises(ValueError, match="must be in"):
        _select.top_k_indices(jnp.zeros(5), k)


@pytest.mark.parametrize("d,size", [(0, 0), (5, 0), (1, 1), (70, 3), (70, 40), (1000, 64)])
def test_nonzero_positions_matches_jnp_nonzero(d, size):
    rng = np.random.default_rng(d + size)
    run = jax.jit(
        functools.partial(_select.nonzero_positions, size=size), compiler_options=FAST_COMPILE
    )
    for density in (0.0, 0.05, 0.5, 1.0):
        flags = rng.random(d) < density
        positions, valid = run(flags)
        want = np.flatnonzero(flags)[:size]
        np.testing.assert_array_equal(np.asarray(valid), np.arange(size) < want.size)
        np.testing.assert_array_equal(np.asarray(positions)[: want.size], want)
        assert not np.asarray(positions)[want.size :].any()


def _strided_outliers(d: int, rng: np.random.Generator) -> np.ndarray:
    # Large values only where the strided sample does not look: the sample's bracket sits far
    # below the true threshold, so the whole-vector histograms must take over.
    x = rng.standard_normal(d)
    stride = max(1, d // _select._SAMPLE)
    x[1::stride] = 100.0 + rng.random(x[1::stride].size)
    return x


@pytest.mark.parametrize("k_fraction", [0.01, 0.5, 1.0])
def test_sampled_bracket_matches_lax_top_k_at_strided_sizes(k_fraction):
    # d = 2^17: the bracket comes from every 4th key, so sampling, the bracket's counts and the
    # buffer compaction all differ from the small-d cases above (where the sample is the vector).
    d = 1 << 17
    k = min(d, max(1, round(k_fraction * d)))
    rng = np.random.default_rng(k)
    inputs = {name: x.astype(np.float32) for name, x in _inputs(d, rng).items()}
    inputs["strided_outliers"] = _strided_outliers(d, rng).astype(np.float32)
    select = jax.jit(
        functools.partial(_select.top_k_indices, k=k, method="radix"),
        compiler_options=FAST_COMPILE,
    )
    for name, x in inputs.items():
        for score in (x, np.abs(x)):
            np.testing.assert_array_equal(
                np.asarray(select(score)), _reference(score, k), err_msg=f"{name} k={k}"
            )


def test_bracket_holds_on_typical_data_and_falls_back_where_it_cannot():
    d, k = 1 << 17, 1311
    rng = np.random.default_rng(3)
    cases = {
        # Gaussian scores: the bracket holds T and fits its buffer.
        "normal": (np.abs(rng.standard_normal(d)), True),
        # The bracket is below T (the sample never sees the large values).
        "strided_outliers": (np.abs(_strided_outliers(d, rng)), False),
        # One key everywhere: the bracket holds T but all d keys, more than its buffer.
        "all_equal": (np.full(d, 2.5), False),
        # Few distinct values: T has many ties inside the bracket, which fits its buffer.
        "few_values": (rng.integers(0, 400, d) * 1.0, True),
    }

    def run(keys):
        whole = _select._whole_vector_threshold(keys, k)
        return (
            _select._sample_bracket(keys, k),
            _select._selected_words(keys, k),
            whole,
            _select._threshold_words(_select._as_keys(keys), k, *whole),
        )

    run = jax.jit(run, compiler_options=FAST_COMPILE)
    for name, (x, expect_ok) in cases.items():
        keys = _select.sortable_keys(jnp.asarray(x, jnp.float32))
        (ok, found, found_greater, bracket_words), got_words, want, want_words = run(keys)
        assert bool(ok) == expect_ok, name
        np.testing.assert_array_equal(np.asarray(got_words), np.asarray(want_words), name)
        if expect_ok:
            assert (int(found), int(found_greater)) == tuple(int(w) for w in want), name
            np.testing.assert_array_equal(np.asarray(bracket_words), np.asarray(want_words), name)
        # The definitions: T is the k-th largest key, `greater` counts the keys above it, the
        # words flag every key above T and the lowest-index ties up to k.
        ordered = np.sort(np.asarray(keys).astype(np.int64))[::-1]
        assert int(want[0]) == ordered[k - 1], name
        assert int(want[1]) == int(np.sum(ordered > ordered[k - 1])), name
        flags = np.unpackbits(np.asarray(want_words).view(np.uint8), bitorder="little")[:d]
        np.testing.assert_array_equal(np.flatnonzero(flags), _reference(x, k), name)


def test_vmapped_rows_some_bracketed_some_falling_back():
    d, k = 1 << 16, 655
    rng = np.random.default_rng(4)
    rows = np.stack(
        [
            rng.standard_normal(d),
            _strided_outliers(d, rng),
            np.full(d, -1.0),
            rng.integers(0, 3, d) * 1.0,
        ]
    ).astype(np.float32)
    select = jax.jit(
        jax.vmap(functools.partial(_select.top_k_indices, k=k, method="radix")),
        compiler_options=FAST_COMPILE,
    )
    for row, indices in zip(rows, np.asarray(select(rows)), strict=True):
        np.testing.assert_array_equal(indices, _reference(row, k))


@pytest.mark.parametrize("words", [31, 4097])
def test_expand_matches_flatnonzero_on_both_sides_of_the_recursion(words):
    # Above _DIRECT_WORDS words, _expand finds the non-zero words recursively.
    rng = np.random.default_rng(words)
    for density in (0.0, 0.001, 0.3, 1.0):
        flags = rng.random(32 * words) < density
        for size in (100, 32 * words):
            positions, valid = jax.jit(
                functools.partial(_select.nonzero_positions, size=size),
                compiler_options=FAST_COMPILE,
            )(flags)
            want = np.flatnonzero(flags)[:size]
            np.testing.assert_array_equal(np.asarray(valid), np.arange(size) < want.size)
            np.testing.assert_array_equal(np.asarray(positions)[: want.size], want)


def _split(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    assert sum(sizes) == x.size
    return np.split(x, np.cumsum(sizes)[:-1])


# Part sizes around the 32-coordinate flag words: empty parts, parts shorter than a word,
# unaligned parts (the padded space has gaps between them) and one aligned part.
_SMALL_PARTS = [0, 1, 31, 0, 33, 64, 5, 1000, 17, 3816]  # 5000 coordinates


@pytest.mark.parametrize("method", ["radix", "sort"])
def test_parts_match_the_concatenation_on_adversarial_inputs(method):
    # d = 5000: the whole-vector path (bin buffer 1024) with keys split over unaligned parts;
    # the tie rule (lower flat index) must hold across part boundaries (all_equal, few_values).
    d = sum(_SMALL_PARTS)
    rng = np.random.default_rng(11)
    inputs = {name: x.astype(np.float32) for name, x in _inputs(d, rng).items()}
    for k in (1, 2, 40, d // 2, d - 1, d):
        select = jax.jit(
            functools.partial(_select.top_k_parts, k=k, method=method),
            compiler_options=FAST_COMPILE,
        )
        for name, x in inputs.items():
            for score in (x, np.abs(x)):
                got = np.asarray(select(_split(score, _SMALL_PARTS)))
                np.testing.assert_array_equal(got, _reference(score, k), err_msg=f"{name} k={k}")


@pytest.mark.parametrize("k_fraction", [0.01, 0.5])
def test_parts_match_the_concatenation_at_strided_sizes(k_fraction):
    # d = 2^17 + 1000 in unaligned parts: the strided sample runs across part boundaries, the
    # bracket's buffer gathers keys from several parts, and strided outliers force the
    # whole-vector fallback on the parts.
    sizes = [40_001, 0, 7, 65_536, 17, 25_000, 1]
    sizes.append((1 << 17) + 1000 - sum(sizes))
    d = sum(sizes)
    k = max(1, round(k_fraction * d))
    rng = np.random.default_rng(12)
    inputs = {
        name: _inputs(d, rng)[name].astype(np.float32)
        for name in ("normal", "few_values", "all_equal", "one_bin", "mostly_zero")
    }
    inputs["strided_outliers"] = _strided_outliers(d, rng).astype(np.float32)
    select = jax.jit(functools.partial(_select.top_k_parts, k=k), compiler_options=FAST_COMPILE)
    for name, x in inputs.items():
        score = np.abs(x)
        got = np.asarray(select(_split(score, sizes)))
        np.testing.assert_array_equal(got, _reference(score, k), err_msg=f"{name} k={k}")


def test_parts_sample_is_the_flat_strided_sample():
    # The bracket's sample (and so which path runs) is exactly keys[::stride] of the flat order.
    sizes = [0, 13, 100, 1, 64, 333]
    keys = np.arange(sum(sizes), dtype=np.uint32)
    parts = _select._Keys([jnp.asarray(p) for p in _split(keys, sizes)])
    for stride in (1, 2, 7, 32, 500):
        np.testing.assert_array_equal(np.asarray(parts.sample(stride)), keys[::stride])


def test_vmapped_parts_match_the_concatenation():
    sizes = [20_000, 0, 31, 45_505]
    d, k = sum(sizes), 655
    rng = np.random.default_rng(13)
    rows = [rng.standard_normal(d), _strided_outliers(d, rng), np.full(d, -1.0)]
    rows = np.stack(rows).astype(np.float32)
    select = jax.jit(
        jax.vmap(lambda *parts: _select.top_k_parts(list(parts), k)),
        compiler_options=FAST_COMPILE,
    )
    got = np.asarray(select(*_split_rows(rows, sizes)))
    for row, indices in zip(rows, got, strict=True):
        np.testing.assert_array_equal(indices, _reference(row, k))


def _split_rows(rows: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(rows, np.cumsum(sizes)[:-1], axis=1)


def test_parts_near_the_int32_limit_fall_back_to_one_vector():
    # Padding each part to whole words would put positions past 2^31 - 1: traced without error.
    parts = [jax.ShapeDtypeStruct((2**30 + 1,), jnp.float32)] * 2
    parts[1] = jax.ShapeDtypeStruct((2**30 - 2,), jnp.float32)
    out = jax.eval_shape(lambda *p: _select.top_k_parts(list(p), 3), *parts)
    assert out.shape == (3,) and out.dtype == jnp.int32


def test_vmapped_selection_loops_with_unbatched_parts_and_nested_vmaps():
    # From LOOP_MIN_SIZE coordinates a vmapped selection runs as a loop over the batch: an
    # unbatched part is broadcast, a nested vmap nests the loops, and every row's indices
    # are the row's own selection.
    sizes = [40_000, 33, _once.LOOP_MIN_SIZE - 40_000]
    d, k = sum(sizes), 300
    rng = np.random.default_rng(14)
    rows = rng.standard_normal((2, 3, d)).astype(np.float32)
    rows[0, 1] = _strided_outliers(d, rng)  # this row takes the fallback inside the loop
    shared = rows[0, 0, sizes[0] : sizes[0] + sizes[1]]
    rows[:, :, sizes[0] : sizes[0] + sizes[1]] = shared

    def select(a, b, c):
        def score(i, part, aux):
            return jnp.abs(part) * aux

        return _select.top_k_parts([a, b, c], k, score=score, aux=jnp.float32(2.0))

    a, _, c = _split_rows(rows.reshape(6, d), sizes)
    nested = jax.jit(jax.vmap(jax.vmap(select, in_axes=(0, None, 0)), in_axes=(0, None, 0)))
    got = np.asarray(nested(a.reshape(2, 3, -1), shared, c.reshape(2, 3, -1)))
    for row, indices in zip(rows.reshape(6, d), got.reshape(6, k), strict=True):
        np.testing.assert_array_equal(indices, _reference(np.abs(row), k))
    # The loop over the batch is a lax.map: one scan more than the selection's own.
    def scans(jaxpr):
        return str(jaxpr).count("scan[")

    unbatched = scans(jax.make_jaxpr(select)(a[0], shared, c[0]))
    assert scans(jax.make_jaxpr(jax.vmap(select, in_axes=(0, None, 0)))(a, shared, c)) > unbatched
