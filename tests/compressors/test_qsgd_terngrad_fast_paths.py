"""Pins the XLA:CPU fast paths of QSGD/TernGrad to the formulations they replaced, bit for bit.

* ``_threefry``: the unrolled threefry hash against ``jax.random.bits``/``uniform``;
* ``_once.computed_once``: ``fn(*args)`` exactly, also under (nested) ``vmap``;
* whole encoders against the same encoders with ``jax.random`` draws and no ``computed_once``
  (the previous formulation), on adversarial inputs;
* QSGD's packed-word ``bits`` against the host codec's histogram form (``_host_streams``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.compressors import _once, _threefry, qsgd, terngrad
from fedjax_lab.compressors._base import tree_layout
from fedjax_lab.compressors.qsgd import QSGDPayload, _host_streams
from fedjax_lab.compressors.testing import FAST_COMPILE
from tests.helpers import sparse_code_bits

KEYS = [jax.random.key(0), jax.random.key(2**31 + 5), jax.random.PRNGKey(7)]


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (33, 16)])
@pytest.mark.parametrize("key_index", range(len(KEYS)))
def test_threefry_bits_and_uniform_equal_jax_random(shape, key_index):
    key = KEYS[key_index]
    ours = jax.jit(lambda k: (_threefry.bits(k, shape), _threefry.uniform(k, shape)))(key)
    bits = jax.random.bits(key, shape, jnp.uint32)
    uniform = jax.random.uniform(key, shape)
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(bits))
    np.testing.assert_array_equal(
        np.asarray(ours[1]).view(np.uint32), np.asarray(uniform).view(np.uint32)
    )


def test_threefry_slices_and_batched_keys_equal_jax_random():
    key = jax.random.key(11)
    got = jax.jit(lambda k: _threefry.uniform_slice(k, 100, 37, 20))(key)
    want = jax.random.uniform(key, (100,))[37:57]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    keys = jax.random.split(key, 5)
    got = jax.jit(jax.vmap(lambda k: _threefry.bits(k, (4, 9))))(keys)
    want = jax.vmap(lambda k: jax.random.bits(k, (4, 9), jnp.uint32))(keys)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_threefry_falls_back_to_jax_random_for_other_key_implementations():
    key = jax.random.key(3, impl="rbg")
    got = jax.jit(lambda k: _threefry.uniform(k, (10,)))(key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.uniform(key, (10,))))


def _fn(key, x, scale):
    return (jax.random.uniform(key, x.shape) < jnp.abs(x) / scale).astype(jnp.int8), x * scale


@pytest.mark.parametrize("pred", [True, False])
def test_computed_once_returns_fn_of_args(pred):
    key, x, scale = jax.random.key(1), jnp.linspace(-1.0, 1.0, 50), jnp.float32(2.0)
    got = jax.jit(lambda p, *a: _once.computed_once(p, _fn, *a))(pred, key, x, scale)
    want = _fn(key, x, scale)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_computed_once_under_vmap_batched_and_unbatched_operands():
    keys = jax.random.split(jax.random.key(2), 4)
    xs = jnp.linspace(-1.0, 1.0, 4 * 30).reshape(4, 30)
    preds = jnp.array([True, False, True, False])
    scale = jnp.float32(1.5)
    once = jax.jit(
        jax.vmap(lambda p, k, x: _once.computed_once(p, _fn, k, x, scale), in_axes=(0, 0, 0))
    )
    plain = jax.vmap(lambda k, x: _fn(k, x, scale))
    for g, w in zip(once(preds, keys, xs), plain(keys, xs), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # Unbatched predicate and key, batched x; then nested vmaps.
    one = jax.jit(jax.vmap(lambda x: _once.computed_once(jnp.all(x > -2), _fn, keys[0], x, scale)))
    for g, w in zip(one(xs), jax.vmap(lambda x: _fn(keys[0], x, scale))(xs), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    nested = jax.jit(
        jax.vmap(jax.vmap(lambda k, x: _once.computed_once(x[0] > 0, _fn, k, x, scale)))
    )
    keys2 = jax.random.split(jax.random.key(4), 6).reshape(2, 3)
    xs2 = jnp.linspace(-1.0, 1.0, 2 * 3 * 8).reshape(2, 3, 8)
    want = jax.vmap(jax.vmap(lambda k, x: _fn(k, x, scale)))(keys2, xs2)
    for g, w in zip(nested(keys2, xs2), want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _tree(kind):
    rng = np.random.default_rng(5)
    tree = {
        "kernel": rng.standard_normal((3, 3, 2, 5)).astype(np.float32),
        "bias": rng.standard_normal((7,)).astype(np.float32),
        "half": jnp.asarray(rng.standard_normal((4, 9)), jnp.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float32(0.3),
    }
    if kind == "zeros":
        tree = jax.tree.map(jnp.zeros_like, tree)
    elif kind == "equal":  # every |x_i| equal: QSGD ratios hit s exactly with one bucket
        tree = jax.tree.map(
            lambda v: jnp.where(jnp.arange(v.size).reshape(v.shape) % 2, 1, -1).astype(v.dtype),
            tree,
        )
    elif kind in ("nan", "inf"):
        bad = np.nan if kind == "nan" else -np.inf
        tree["bias"] = tree["bias"].copy()
        tree["bias"][3] = bad
    return jax.tree.map(jnp.asarray, tree)


COMPRESSORS = {
    "qsgd_s4": lambda: qsgd(4),
    "qsgd_s4_b5": lambda: qsgd(4, bucket_size=5),
    "qsgd_s300_b32": lambda: qsgd(300, bucket_size=32),
    "qsgd_s3_b7_rb8": lambda: qsgd(3, bucket_size=7, rounding_bits=8),
    "qsgd_s2_rb16": lambda: qsgd(2, rounding_bits=16),
    "qsgd_s4_b5_hash": lambda: qsgd(4, bucket_size=5, rounding_bits="hash"),
    "terngrad": lambda: terngrad(),
    "terngrad_clip": lambda: terngrad(2.5),
    "terngrad_rb8": lambda: terngrad(rounding_bits=8),
}


def _previous_formulation(monkeypatch):
    """Route the draws through jax.random and drop computed_once, as before the fast paths."""
    monkeypatch.setattr(_threefry, "bits", lambda k, shape: jax.random.bits(k, shape, jnp.uint32))
    monkeypatch.setattr(_threefry, "uniform", jax.random.uniform)
    monkeypatch.setattr(_once, "computed_once", lambda pred, fn, *args: fn(*args))


def _run(compressor, tree, key, batched=False):
    def step(tree, key):
        payload, _ = compressor.encode(tree, (), key=key)
        return payload, compressor.decode(payload), compressor.bits(payload)

    step = jax.jit(jax.vmap(step) if batched else step, compiler_options=FAST_COMPILE)
    return jax.device_get(step(tree, key))


def _assert_same_bits(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("kind", ["random", "zeros", "equal", "nan", "inf"])
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_encoders_equal_the_previous_formulation(name, kind, monkeypatch):
    tree, key = _tree(kind), jax.random.key(9)
    new = _run(COMPRESSORS[name](), tree, key)
    with monkeypatch.context() as patch:
        _previous_formulation(patch)
        old = _run(COMPRESSORS[name](), tree, key)
    _assert_same_bits(new, old)


@pytest.mark.parametrize("name", ["qsgd_s4", "qsgd_s3_b7_rb8", "terngrad"])
def test_vmapped_encoders_equal_the_previous_formulation(name, monkeypatch):
    trees = [_tree("random"), _tree("nan"), _tree("zeros")]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *trees)
    keys = jax.random.split(jax.random.key(1), len(trees))
    new = _run(COMPRESSORS[name](), stacked, keys, batched=True)
    with monkeypatch.context() as patch:
        _previous_formulation(patch)
        old = _run(COMPRESSORS[name](), stacked, keys, batched=True)
    _assert_same_bits(new, old)


def _level_patterns(d, s, rng):
    yield np.zeros(d, np.int64)
    yield np.full(d, s)
    yield np.where(np.arange(d) % 2, s, -s)
    last = np.zeros(d, np.int64)
    last[-1] = -s
    yield last
    first = np.zeros(d, np.int64)
    first[0] = 1
    yield first
    for density in (0.01, 0.3, 0.9):
        yield rng.integers(-s, s + 1, d) * (rng.random(d) < density)


@pytest.mark.parametrize("s", [1, 2, 3, 4, 7, 8, 15, 16, 127, 128, 255, 4096, 32767])
def test_bits_equal_the_host_stream_lengths(s):
    rng = np.random.default_rng(s)
    dtype = np.int8 if s <= 127 else np.int16
    for d in (1, 31, 33, 1029):
        for bucket in {d, 5}:
            layout = tree_layout({"v": jnp.zeros((d,))}, what="test")
            num_buckets = -(-d // bucket)
            compressor = qsgd(s, bucket_size=bucket)
            bits = jax.jit(compressor.bits, compiler_options=FAST_COMPILE)
            for levels in _level_patterns(d, s, rng):
                levels = levels.astype(dtype)
                payload = QSGDPayload(jnp.ones(num_buckets), levels, layout, s, bucket)
                dense, sparse, _, _ = _host_streams(levels, d)
                want = 32 * num_buckets + 8 * -(-(1 + min(dense, sparse)) // 8)
                assert int(bits(payload)) == want, (d, bucket, levels)


def test_bits_of_stacked_payloads_and_long_gaps():
    # Non-zeros thousands of coordinates apart: gaps across many all-zero packed words.
    d, s = 9000, 4
    rows = np.zeros((3, d), np.int8)
    rows[0, [0, 4097, 8999]] = [1, -4, 2]
    rows[1, [31, 32, 63, 64, 5000]] = [4, -4, 3, -1, 2]
    layout = tree_layout({"v": jnp.zeros((d,))}, what="test")
    payloads = QSGDPayload(jnp.ones((3, 1)), jnp.asarray(rows), layout, s, d)
    got = jax.jit(jax.vmap(qsgd(s).bits))(payloads)
    for row, bits in zip(rows, np.asarray(got), strict=True):
        dense, sparse, _, _ = _host_streams(row, d)
        assert int(bits) == 32 + 8 * -(-(1 + min(dense, sparse)) // 8)


def test_sparse_code_bits_for_large_magnitudes_and_gaps():
    d = 70_000
    lv = np.zeros(d, np.int32)
    lv[[5, 6, 40, 33_000, 69_999]] = [1, 2**20, 3, 2**15 + 1, 7]
    _, sparse, _, _ = _host_streams(lv, d)
    assert int(jax.jit(sparse_code_bits)(jnp.asarray(lv))) + d.bit_length() == sparse


@pytest.mark.parametrize("bucket", [None, 5, 64])
def test_qsgd_norms_equal_the_abs_formulation(bucket):
    # encode squares x / peak instead of |x| / peak (the same squares): pin the norms to the
    # formula with the abs, including -0, negative-only buckets, ties and a non-finite entry.
    rng = np.random.default_rng(3)
    x = rng.standard_normal(301).astype(np.float32) * np.float32(1e-3)
    x[:5] = [-0.0, 0.0, -2.0, -2.0, 2.0]
    x[40:50] = -np.abs(x[40:50])
    size = bucket or x.size
    for vector in (x, np.where(np.arange(301) == 200, np.inf, x).astype(np.float32)):
        payload, _ = jax.jit(
            lambda v: qsgd(4, size if bucket else None).encode(v, (), key=KEYS[0])
        )(jnp.asarray(vector))

        @jax.jit
        def reference(v):
            b = jnp.pad(v, (0, -v.size % size)).reshape(-1, size)
            magnitude = jnp.abs(b)
            peak = jnp.max(magnitude, axis=1, keepdims=True, initial=0.0)
            scaled = magnitude / jnp.where(peak > 0, peak, 1.0)
            return (peak * jnp.sqrt(jnp.sum(scaled * scaled, axis=1, keepdims=True)))[:, 0]

        want = np.asarray(reference(jnp.asarray(vector)))
        if not np.all(np.isfinite(vector)):
            want = np.full_like(want, np.nan)
        np.testing.assert_array_equal(np.asarray(payload.norms), want)


def test_public_random_bits_and_uniform_equal_jax_random():
    from fedjax_lab.compressors import random_bits, random_uniform

    keys = jax.random.split(jax.random.key(5), 3)
    got = jax.jit(jax.vmap(lambda k: (random_bits(k, (6, 7)), random_uniform(k, (6, 7)))))(keys)
    np.testing.assert_array_equal(
        np.asarray(got[0]), np.asarray(jax.vmap(lambda k: jax.random.bits(k, (6, 7)))(keys))
    )
    want = jax.vmap(lambda k: jax.random.uniform(k, (6, 7)))(keys)
    np.testing.assert_array_equal(np.asarray(got[1]).view(np.uint32),
                                  np.asarray(want).view(np.uint32))


def _terngrad_flat_reference(tree, key, hashed):
    """TernGrad on the concatenated float32 update, as a flat formulation (Wen et al., 2017)."""
    from fedjax_lab.compressors import _bernoulli

    x = jnp.concatenate([jnp.ravel(v).astype(jnp.float32) for v in jax.tree.leaves(tree)])
    scale = jnp.max(jnp.abs(x), initial=0.0)
    p = jnp.abs(x) / jnp.where(scale > 0, scale, 1.0)
    keep = _bernoulli.hash_bernoulli(key, p) if hashed else jax.random.uniform(key, x.shape) < p
    finite = jnp.all(jnp.isfinite(x))
    return jnp.where(finite, scale, jnp.nan), jnp.where(keep, jnp.sign(x), 0.0).astype(jnp.int8)


@pytest.mark.parametrize("kind", ["random", "zeros", "equal", "nan", "inf"])
@pytest.mark.parametrize("hashed", [False, True], ids=["threefry", "hash"])
def test_leafwise_terngrad_equals_the_flat_formulation(kind, hashed):
    # Without clipping TernGrad ternarizes leaf by leaf (no flat vector): the scale, trits and
    # decoded update must be the flat formulation's bit for bit, one update and vmapped.
    compressor = terngrad(rounding_bits="hash" if hashed else None)
    tree, key = _tree(kind), jax.random.key(9)
    payload, decoded, _ = _run(compressor, tree, key)
    scale, trits = jax.jit(lambda t, k: _terngrad_flat_reference(t, k, hashed))(tree, key)
    _assert_same_bits((payload.scale, payload.trits), (scale, trits))
    want = tree_layout(tree, what="t").unflatten(trits.astype(jnp.float32) * scale)
    _assert_same_bits(decoded, want)
    _assert_vmapped_terngrad_is_the_reference(compressor, [_tree("random"), _tree(kind)], hashed)


def _assert_vmapped_terngrad_is_the_reference(compressor, trees, hashed):
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *trees)
    keys = jax.random.split(jax.random.key(1), len(trees))
    batched, decoded, _ = _run(compressor, stacked, keys, batched=True)
    for i, one in enumerate(trees):
        scale, trits = _terngrad_flat_reference(one, keys[i], hashed)
        _assert_same_bits((batched.scale[i], batched.trits[i]), (scale, trits))
        want = tree_layout(one, what="t").unflatten(trits.astype(jnp.float32) * scale)
        _assert_same_bits(jax.tree.map(lambda x, i=i: x[i], decoded), want)


@pytest.mark.parametrize("hashed", [False, True], ids=["threefry", "hash"])
def test_terngrad_large_vmapped_updates_have_the_flat_bits(hashed):
    # Vmapped, TernGrad dispatches to the flat formulation (_once.vmapped_as); past
    # LOOP_MIN_SIZE its flatten loops over the batch.
    from fedjax_lab.compressors import _once

    compressor = terngrad(rounding_bits="hash" if hashed else None)
    rng = np.random.default_rng(3)
    trees = [
        {"w": rng.standard_normal((260, 255)).astype(np.float32),
         "b": rng.standard_normal((33,)).astype(np.float32)}
        for _ in range(2)
    ]
    assert sum(v.size for v in trees[0].values()) >= _once.LOOP_MIN_SIZE  # the looped path
    _assert_vmapped_terngrad_is_the_reference(compressor, trees, hashed)


def test_vmapped_as_dispatches_on_batching():
    # fn unbatched, batched_fn under vmap (unbatched arguments stay unbatched; nested vmaps).
    run = _once.vmapped_as(lambda x, y: x + y, lambda x, y: x * y)
    x, y = jnp.arange(6.0).reshape(2, 3), jnp.float32(3.0)
    np.testing.assert_array_equal(np.asarray(jax.jit(run)(x, y)), np.asarray(x + y))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(run, (0, None)))(x, y)),
                                  np.asarray(x * y))
    nested = jax.jit(jax.vmap(jax.vmap(run, (0, None)), (0, None)))(x, y)
    np.testing.assert_array_equal(np.asarray(nested), np.asarray(x * y))

