"""Shared fixtures of the compressor tests: example trees and a compiled sampler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors.testing import FAST_COMPILE


def _rich_tree():
    # Conv kernels (HWIO), a dense layer, a scalar and an empty leaf: every leaf kind at once.
    return {
        "conv1": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros((4,))},
        "conv2": {"kernel": jnp.zeros((3, 3, 4, 3))},
        "dense": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros((5,))},
        "scale": jnp.zeros(()),
        "empty": jnp.zeros((0, 3)),
    }


TREES = {
    "rich": _rich_tree,
    "scalar_d1": lambda: {"only": jnp.zeros(())},
    "empty_d0": lambda: {"a": jnp.zeros((0,)), "b": jnp.zeros((2, 0))},
}


@pytest.fixture(params=sorted(TREES), ids=sorted(TREES))
def tree(request):
    """Each example params tree in turn."""
    return TREES[request.param]()


@pytest.fixture
def rich_tree():
    return _rich_tree()


@pytest.fixture
def sample_decoded():
    """``sample(c, x, n)``: ``decode(encode(x))`` for ``n`` keys, one jit(vmap) compile."""

    def sample(compressor, x, num_keys, seed=0):
        state = compressor.init(x)

        @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
        def run(keys):
            def one(key):
                payload, _ = compressor.encode(x, state, key=key)
                return compressor.decode(payload)

            return jax.vmap(one)(keys)

        return np.asarray(run(jax.random.split(jax.random.key(seed), num_keys)))

    return sample


@pytest.fixture
def vector():
    """A fixed test vector with mixed magnitudes, exact zeros and both signs."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal(40).astype(np.float32)
    x[[3, 17, 25]] = 0.0
    x[7] = 4.0
    return jnp.asarray(x)


@pytest.fixture
def make_step():
    """``make_step(c)(updates, state=(), key=None) -> (payload, state, decoded, bits)`` on host.

    One compiled program (fast-compile options) per compressor: tests never run the
    compressors op-by-op, which would compile every primitive separately.
    """

    def make(compressor):
        @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
        def step(updates, state, key):
            payload, state = compressor.encode(updates, state, key=key)
            return payload, state, compressor.decode(payload), compressor.bits(payload)

        def run(updates, state=(), key=None):
            key = jax.random.key(0) if key is None else key
            payload, state, decoded, bits = jax.device_get(step(updates, state, key))
            return payload, state, decoded, int(bits)

        return run

    return make
