"""The sort-free top-k selection against lax.top_k on adversarial inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _select
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
