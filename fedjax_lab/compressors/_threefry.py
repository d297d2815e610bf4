"""``jax.random.bits``/``uniform`` (32-bit) with the same values, unrolled for XLA:CPU.

JAX lowers its threefry2x32 hash on CPU as a 5-step ``while`` loop (to keep compile times
short); every step reads and writes the two full-size uint32 state arrays, so drawing one word
per coordinate of a 10M-parameter update costs ~20 memory passes (~115 ms, most of QSGD's and
TernGrad's default encode). The same hash written as straight-line ``jnp`` code (JAX's own
unrolled lowering for other backends) fuses into one loop with the consumer of the words and
runs ~7x faster, with bit-identical output.

The values are those of ``jax.random.bits(key, shape, jnp.uint32)`` under JAX's
``jax_threefry_partitionable`` scheme (the default): element ``i`` (row-major) is
``x0 ^ x1`` with ``(x0, x1) = threefry2x32(key, (hi(i), lo(i)))``, ``i`` as a 64-bit counter.
Anything else (another key implementation, the legacy non-partitionable scheme, more than
``2**32`` elements) falls back to ``jax.random`` itself; tests pin both paths to it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Threefry-2x32's rotation constants (Salmon et al., 2011, "Parallel random numbers: as easy
# as 1, 2, 3", Table 4) and its key-schedule parity constant; the rounds alternate between
# the two groups of four.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
_THREEFRY = "threefry2x32"


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
    """Threefry-2x32 with 20 rounds, exactly JAX's ``threefry2x32`` primitive."""
    keys = (k0, k1, k0 ^ k1 ^ jnp.uint32(_PARITY))
    x0 = x0 + keys[0]
    x1 = x1 + keys[1]
    for step in range(5):
        for r in _ROTATIONS[step % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + keys[(step + 1) % 3]
        x1 = x1 + keys[(step + 2) % 3] + jnp.uint32(step + 1)
    return x0, x1


def _raw_threefry_key(key: jax.Array) -> jax.Array | None:
    """The key's two uint32 words if it is a threefry2x32 key (typed or raw), else ``None``."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != _THREEFRY:
            return None
        return jax.random.key_data(key)
    if key.dtype == jnp.uint32 and key.shape == (2,):
        # A raw key is read with the default implementation, as jax.random does.
        return key if jax.config.jax_default_prng_impl == _THREEFRY else None
    return None


def bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bits(key, shape, jnp.uint32)``, bit for bit, with an unrolled hash."""
    return bits_slice(key, math.prod(shape), 0, math.prod(shape)).reshape(shape)


def bits_slice(key: jax.Array, total: int, start: int, size: int) -> jax.Array:
    """``jax.random.bits(key, (total,), jnp.uint32)[start : start + size]``, bit for bit.

    Element ``i`` of the partitionable scheme depends on ``i`` only, so a slice is computed
    without the rest (a long vector can be drawn piece by piece, e.g. leaf by leaf).
    """
    words = _raw_threefry_key(key)
    if words is None or not jax.config.jax_threefry_partitionable or total >= 2**32:
        return jax.random.bits(key, (total,), jnp.uint32)[start : start + size]
    # The 64-bit counter i has high word 0 below 2**32 elements.
    counter = jax.lax.iota(jnp.uint32, size) + jnp.uint32(start)
    x0, x1 = _threefry2x32(words[0], words[1], jnp.zeros_like(counter), counter)
    return x0 ^ x1


def _to_unit_interval(words: jax.Array) -> jax.Array:
    # As JAX does: the top 23 bits of each word become the mantissa of a float in [1, 2),
    # minus 1 (exact); JAX's further ``* (1 - 0) + 0`` and ``max(0, .)`` change no value.
    one = jnp.uint32(0x3F800000)  # float32 1.0
    return jax.lax.bitcast_convert_type((words >> jnp.uint32(9)) | one, jnp.float32) - 1.0


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.uniform(key, shape)`` (float32 in [0, 1)), bit for bit."""
    return _to_unit_interval(bits(key, shape))


def uniform_slice(key: jax.Array, total: int, start: int, size: int) -> jax.Array:
    """``jax.random.uniform(key, (total,))[start : start + size]``, bit for bit."""
    return _to_unit_interval(bits_slice(key, total, start, size))
