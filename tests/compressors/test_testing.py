"""The contract checker must catch broken compressors (and accept a correct one)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import Compressor, identity
from fedjax_lab.compressors.testing import check_compressor

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}


def _decode_plus_one(c):
    return c._replace(decode=lambda p: jax.tree.map(lambda x: x + 1, c.decode(p)))


def _bits_off_by_a_byte(c):
    return c._replace(bits=lambda p: c.bits(p) + 8)


def _lossy_codec(c):
    def from_bytes(data, template):
        p = c.from_bytes(data, template)
        return p.replace(values=p.values.astype(np.float16).astype(np.float32))

    return c._replace(from_bytes=from_bytes)


def _state_changes_dtype(c):
    return c._replace(
        init=lambda params: jnp.zeros((), jnp.float32),
        encode=lambda u, s, *, key: (c.encode(u, (), key=key)[0], jnp.zeros((), jnp.int32)),
    )


def _state_grows(c):
    def encode(u, s, *, key):
        return c.encode(u, (), key=key)[0], jnp.concatenate([s, s])

    return c._replace(init=lambda params: jnp.zeros(1), encode=encode)


def _hides_nans(c):
    def encode(u, s, *, key):
        return c.encode(jax.tree.map(jnp.nan_to_num, u), s, key=key)

    return c._replace(encode=encode)


def _accepts_nans_on_the_wire(c):
    def to_bytes(p):
        return np.asarray(p.values, "<f4").tobytes()

    return c._replace(to_bytes=to_bytes)


def _wrong_decode_shape(c):
    return c._replace(decode=lambda p: jax.tree.map(lambda x: x.reshape(-1), c.decode(p)))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_decode_plus_one, r"decode\(encode\(0\)\) != 0"),
        (_bits_off_by_a_byte, "but the wire has"),
        (_lossy_codec, "codec .* values differ"),
        (_state_changes_dtype, "state after encode"),
        (_state_grows, "state after encode"),
        (_hides_nans, "non-finite policy: an update with nan decoded to a finite update"),
        (_accepts_nans_on_the_wire, "to_bytes accepted a nan payload"),
        (_wrong_decode_shape, "decode .*shapes/dtypes"),
    ],
    ids=[
        "decode-zero",
        "bits",
        "codec",
        "state-dtype",
        "state-retrace",
        "nan-hidden",
        "nan-on-wire",
        "decode-shape",
    ],
)
def test_checker_catches(mutate, match):
    broken = mutate(identity())
    assert isinstance(broken, Compressor)
    with pytest.raises(AssertionError, match=match):
        check_compressor(broken, PARAMS)


def test_checker_accepts_identity():
    check_compressor(identity(), PARAMS)
