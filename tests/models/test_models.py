"""Tests of fedjax_lab.models: contract, architectures against numpy references, errors."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab.models as models
from fedjax_lab.models import (
    Model,
    char_lstm,
    femnist_cnn,
    get_model,
    logistic_regression,
    mlp,
    resnet18_gn,
)

# float32 forward passes compared with float64 numpy: a few ulps of O(1) values per sum.
RTOL = ATOL = 1e-5

# Small configurations keep compile times low; architecture is independent of size.
SMALL = {
    "logreg": lambda: logistic_regression((2, 3), 4),
    "mlp": lambda: mlp((2, 3), 4, hidden=(5, 3)),
    "cnn": lambda: femnist_cnn((8, 8, 1), 10),
    "char_lstm": lambda: char_lstm(vocab_size=7, seq_len=5, embed_dim=3, hidden=4),
}
SMALL_IDS = list(SMALL)


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[Model, dict]]:
    """Each small model with params from key 0, built once for the module."""
    out = {}
    for name, factory in SMALL.items():
        model = factory()
        out[name] = (model, model.init(jax.random.key(0)))
    return out


def _inputs(model: Model, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (batch, *model.input_shape)
    if model.input_dtype == "int32":
        return rng.integers(0, model.num_classes, size=shape).astype(np.int32)
    return rng.normal(size=shape).astype(np.float32)


def _num_params(model: Model) -> int:
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))


def _resnet18_gn_count(in_channels: int, num_classes: int) -> int:
    """Independent count: 3x3/1x1 convs without bias, GroupNorm scale+bias, dense head."""
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    total = conv(3, in_channels, 64) + norm(64)
    cin = 64
    for width, first_stride in zip((64, 128, 256, 512), (1, 2, 2, 2), strict=True):
        for block in range(2):
            total += conv(3, cin, width) + norm(width) + conv(3, width, width) + norm(width)
            if block == 0 and (first_stride != 1 or cin != width):
                total += conv(1, cin, width) + norm(width)
            cin = width
    return total + 512 * num_classes + num_classes


def _lstm_count(vocab: int, embed: int, hidden: int, layers: int) -> int:
    total, width = vocab * embed, embed
    for _ in range(layers):
        total += 4 * (width * hidden + hidden * hidden + hidden)  # 4 gates, bias on h-path
        width = hidden
    return total + hidden * vocab + vocab


def test_public_api():
    assert sorted(models.__all__) == sorted(
        [
            "BatchNormMLP",
            "Model",
            "Params",
            "char_lstm",
            "cnn_dropout",
            "femnist_cnn",
            "get_model",
            "logistic_regression",
            "mlp",
            "mobilenet",
            "nwp_lstm",
            "resnet18_gn",
            "resnet56",
        ]
    )
    for name in models.__all__:
        assert hasattr(models, name)


@pytest.mark.parametrize(
    "factory,expected",
    [
        pytest.param(lambda: logistic_regression((28, 28, 1), 10), 784 * 10 + 10, id="logreg"),
        pytest.param(
            lambda: mlp((784,), 10), 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10, id="mlp"
        ),
        pytest.param(lambda: femnist_cnn(), 1_690_046, id="cnn-femnist"),
        pytest.param(
            lambda: femnist_cnn((8, 8, 1), 10),
            5 * 5 * 32 + 32 + 5 * 5 * 32 * 64 + 64 + 2 * 2 * 64 * 512 + 512 + 512 * 10 + 10,
            id="cnn-digits",
        ),
        pytest.param(lambda: resnet18_gn(), 11_220_132, id="resnet18-cifar100"),
        pytest.param(
            lambda: resnet18_gn((32, 32, 3), 10), _resnet18_gn_count(3, 10), id="resnet18-cifar10"
        ),
        pytest.param(lambda: char_lstm(), 817_872, id="char_lstm-leaf"),
        pytest.param(
            lambda: char_lstm(vocab_size=7, seq_len=5, embed_dim=3, hidden=4),
            _lstm_count(7, 3, 4, 2),
            id="char_lstm-small",
        ),
    ],
)
def test_param_counts(factory, expected):
    assert _num_params(factory()) == expected


def test_independent_counts_agree_with_quoted_numbers():
    # The quoted constants above are themselves checked against the layer-by-layer formulas.
    assert _resnet18_gn_count(3, 100) == 11_220_132
    assert _lstm_count(80, 8, 256, 2) == 817_872


@pytest.mark.parametrize(
    "factory,has_conv",
    [
        pytest.param(lambda: logistic_regression((28, 28, 1), 10), False, id="logreg"),
        pytest.param(lambda: mlp((784,), 10), False, id="mlp"),
        pytest.param(lambda: femnist_cnn(), True, id="cnn"),
        pytest.param(lambda: resnet18_gn(), True, id="resnet18"),
        pytest.param(lambda: char_lstm(), False, id="char_lstm"),
    ],
)
def test_has_conv_matches_4d_leaves(factory, has_conv):
    model = factory()
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    assert model.has_conv is has_conv
    assert any(leaf.ndim == 4 for leaf in jax.tree.leaves(abstract)) is has_conv


def test_conv_kernels_are_hwio():
    abstract = jax.eval_shape(femnist_cnn().init, jax.random.key(0))
    assert abstract["conv_0"]["kernel"].shape == (5, 5, 1, 32)
    assert abstract["conv_1"]["kernel"].shape == (5, 5, 32, 64)


@pytest.mark.parametrize("name", SMALL_IDS)
def test_params_are_plain_float32_dicts(built, name):
    _, params = built[name]

    def check(node):
        if isinstance(node, dict):
            assert type(node) is dict
            for child in node.values():
                check(child)
        else:
            assert isinstance(node, jax.Array) and node.dtype == jnp.float32

    check(params)
    assert "params" not in params


@pytest.mark.parametrize("name", SMALL_IDS)
@pytest.mark.parametrize("batch", [0, 1, 3], ids=["b0", "b1", "b3"])
def test_output_shape_dtype(built, name, batch):
    model, params = built[name]
    logits = model.apply(params, _inputs(model, batch))
    chex.assert_shape(logits, (batch, model.num_classes))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("name", SMALL_IDS)
def test_init_deterministic_in_key(built, name):
    model, params = built[name]
    chex.assert_trees_all_equal(model.init(jax.random.key(0)), params)
    other = model.init(jax.random.key(1))
    kernels = [
        (a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(other), strict=True)
        if np.any(np.asarray(a) != 0)
    ]
    assert kernels and all(np.any(np.asarray(a) != np.asarray(b)) for a, b in kernels)


def test_vmap_init_equals_loop():
    model = SMALL["logreg"]()
    keys = jax.random.split(jax.random.key(3), 3)
    stacked = jax.jit(jax.vmap(model.init))(keys)
    for i, key in enumerate(keys):
        chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], stacked), model.init(key))


def test_raw_uint32_key_accepted():
    model = SMALL["logreg"]()
    chex.assert_trees_all_equal(
        model.init(jax.random.PRNGKey(5)),
        model.init(jax.random.wrap_key_data(jax.random.PRNGKey(5))),
    )


@pytest.mark.parametrize("name", SMALL_IDS)
def test_jit_vmap_over_clients_equals_loop(built, name):
    model, _ = built[name]
    clients, batch = 3, 2
    per_client = [model.init(key) for key in jax.random.split(jax.random.key(7), clients)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_client)
    xs = np.stack([_inputs(model, batch, seed=c) for c in range(clients)])
    got = jax.jit(jax.vmap(model.apply))(stacked, xs)
    want = jnp.stack([model.apply(p, x) for p, x in zip(per_client, xs, strict=True)])
    chex.assert_shape(got, (clients, batch, model.num_classes))
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", SMALL_IDS)
def test_apply_traces_once_under_jit(built, name):
    model, params = built[name]
    other = model.init(jax.random.key(11))
    x = _inputs(model, 2)
    # chex keys its counter on the source of `apply`, shared by all models: reset per case.
    chex.clear_trace_counter()
    jitted = jax.jit(chex.assert_max_traces(model.apply, n=1))
    first, second = jitted(params, x), jitted(other, x)
    chex.assert_trees_all_close(first, model.apply(params, x), rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(second, model.apply(other, x), rtol=RTOL, atol=ATOL)
    assert np.any(np.asarray(first) != np.asarray(second))


@pytest.mark.parametrize("name", SMALL_IDS)
def test_examples_are_independent(built, name):
    # No batch statistics: each example's logits do not depend on the rest of the batch.
    model, params = built[name]
    x = _inputs(model, 4)
    full = model.apply(params, x)
    for i in range(4):
        chex.assert_trees_all_close(
            full[i], model.apply(params, x[i : i + 1])[0], rtol=RTOL, atol=ATOL
        )


# ---- forward passes against plain numpy ------------------------------------------------------


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _relu(x):
    return np.maximum(x, 0.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _conv_same(x, kernel, bias):
    k = kernel.shape[0]
    pad = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))
    return np.einsum("bhwcij,ijcf->bhwf", windows, kernel) + bias


def _maxpool2(x):
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    return x[:, : 2 * h2, : 2 * w2].reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


def _np_logreg(p, x):
    return _dense(p["dense"], x.reshape(x.shape[0], -1))


def _np_mlp(p, x):
    h = x.reshape(x.shape[0], -1)
    for i in range(2):
        h = _relu(_dense(p[f"dense_{i}"], h))
    return _dense(p["head"], h)


def _np_cnn(p, x):
    for i in range(2):
        x = _maxpool2(_relu(_conv_same(x, p[f"conv_{i}"]["kernel"], p[f"conv_{i}"]["bias"])))
    x = _relu(_dense(p["dense_0"], x.reshape(x.shape[0], -1)))
    return _dense(p["head"], x)


def _np_char_lstm(p, tokens):
    x = p["embed"]["embedding"][tokens]
    for layer in range(2):
        q = p[f"lstm_{layer}"]
        batch, steps, _ = x.shape
        hidden = q["hi"]["kernel"].shape[0]
        h, c = np.zeros((batch, hidden)), np.zeros((batch, hidden))
        outs = []
        for t in range(steps):
            pre = {g: x[:, t] @ q[f"i{g}"]["kernel"] + _dense(q[f"h{g}"], h) for g in "ifgo"}
            c = _sigmoid(pre["f"]) * c + _sigmoid(pre["i"]) * np.tanh(pre["g"])
            h = _sigmoid(pre["o"]) * np.tanh(c)
            outs.append(h)
        x = np.stack(outs, axis=1)
    return _dense(p["head"], x[:, -1])


@pytest.mark.parametrize(
    "name,reference",
    [
        pytest.param("logreg", _np_logreg, id="logreg"),
        pytest.param("mlp", _np_mlp, id="mlp"),
        pytest.param("cnn", _np_cnn, id="cnn"),
        pytest.param("char_lstm", _np_char_lstm, id="char_lstm"),
    ],
)
def test_forward_matches_numpy(built, name, reference):
    model, params = built[name]
    x = _inputs(model, 3, seed=5)
    want = reference(_np(params), x if model.input_dtype == "int32" else x.astype(np.float64))
    chex.assert_trees_all_close(
        model.apply(params, x), want.astype(np.float32), rtol=RTOL, atol=ATOL
    )


def test_cnn_odd_input_floors_pools():
    model = femnist_cnn((9, 7, 2), 3)
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    assert abstract["dense_0"]["kernel"].shape == ((9 // 2 // 2) * (7 // 2 // 2) * 64, 512)


def test_logreg_gradient_matches_closed_form(built):
    model, params = built["logreg"]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, *model.input_shape)).astype(np.float32)
    labels = rng.integers(0, model.num_classes, size=5)

    def loss(p):
        logits = model.apply(p, x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    grads = jax.jit(jax.grad(loss))(params)
    p = _np(params)
    flat = x.reshape(5, -1).astype(np.float64)
    logits = flat @ p["dense"]["kernel"] + p["dense"]["bias"]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    residual = (probs - np.eye(model.num_classes)[labels]) / 5  # d(mean CE)/d logits
    chex.assert_trees_all_close(
        grads,
        {"dense": {"kernel": flat.T @ residual, "bias": residual.sum(axis=0)}},
        atol=1e-5,
        rtol=0,
    )


def test_float_inputs_of_other_precisions_are_cast(built):
    model, params = built["logreg"]
    x = _inputs(model, 3).astype(np.float16)
    chex.assert_trees_all_equal(model.apply(params, x), model.apply(params, x.astype(np.float32)))


def test_nan_input_stays_in_its_example(built):
    model, params = built["mlp"]
    x = _inputs(model, 3)
    x[1, 0, 0] = np.nan
    logits = np.asarray(model.apply(params, x))
    assert np.all(np.isnan(logits[1]))
    chex.assert_trees_all_close(
        logits[[0, 2]], model.apply(params, x[[0, 2]]), rtol=RTOL, atol=ATOL
    )


def test_char_lstm_out_of_range_tokens_give_nan_under_jit(built):
    model, params = built["char_lstm"]
    x = _inputs(model, 3)
    bad = x.copy()
    bad[0, 2], bad[2, 4] = -1, model.num_classes  # wrap-around / one-past-the-end ids
    logits = np.asarray(jax.jit(model.apply)(params, bad))
    assert np.all(np.isnan(logits[[0, 2]]))
    chex.assert_trees_all_close(logits[1], model.apply(params, x)[1], rtol=RTOL, atol=ATOL)


def test_resnet18_forward_batch2():
    # Only an abstract init (structure) plus one forward: a real init compiles ~22 threefry
    # kernels and would dominate the suite. Weights come from numpy, scaled like fan-in init.
    model = resnet18_gn()
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(0)

    def make(leaf):
        if leaf.ndim == 1:
            return np.ones(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    params = jax.tree.map(make, abstract)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    logits = jax.jit(model.apply)(params, x)
    chex.assert_shape(logits, (2, 100))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    assert np.any(np.asarray(logits[0]) != np.asarray(logits[1]))


# ---- registry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,args,kwargs,direct",
    [
        pytest.param("logreg", ((2, 3), 4), {}, SMALL["logreg"], id="logreg"),
        pytest.param("mlp", ((2, 3), 4), {"hidden": (5, 3)}, SMALL["mlp"], id="mlp"),
        pytest.param("cnn", ((8, 8, 1), 10), {}, SMALL["cnn"], id="cnn"),
        pytest.param(
            "resnet18",
            ((32, 32, 3), 100),
            {"groups": 4},
            lambda: resnet18_gn((32, 32, 3), 100, groups=4),
            id="resnet18",
        ),
        pytest.param(
            "char_lstm",
            ((5,), 7),
            {"embed_dim": 3, "hidden": 4},
            SMALL["char_lstm"],
            id="char_lstm",
        ),
    ],
)
def test_get_model_matches_factory(name, args, kwargs, direct):
    got, want = get_model(name, *args, **kwargs), direct()
    assert got.name == want.name == name
    for field in ("input_shape", "input_dtype", "num_classes", "has_conv"):
        assert getattr(got, field) == getattr(want, field)
    key = jax.random.key(0)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.eval_shape(got.init, key), jax.eval_shape(want.init, key)
    )


def test_get_model_char_lstm_fields():
    model = get_model("char_lstm", (5,), 7, embed_dim=3, hidden=4)
    assert (model.input_shape, model.input_dtype, model.num_classes) == ((5,), "int32", 7)


# ---- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error,match",
    [
        pytest.param(
            lambda: get_model("lenet", (8,), 2),
            ValueError,
            r"Unknown model name 'lenet'; valid names are \['char_lstm', 'cnn', "
            r"'cnn_dropout', 'logreg', 'mlp', 'mobilenet', 'nwp_lstm', 'resnet18', 'resnet56'\]",
            id="unknown-name",
        ),
        pytest.param(
            lambda: get_model("mlp", (8, 0), 2),
            ValueError,
            r"input_shape\[1\] must be a positive integer, got 0",
            id="zero-dim",
        ),
        pytest.param(
            lambda: get_model("mlp", (8, -3), 2),
            ValueError,
            r"input_shape\[1\] must be a positive integer, got -3",
            id="negative-dim",
        ),
        pytest.param(
            lambda: get_model("mlp", (), 2),
            ValueError,
            "input_shape must have at least one dimension",
            id="empty-shape",
        ),
        pytest.param(
            lambda: get_model("mlp", 784, 2),
            TypeError,
            "input_shape must be a tuple of positive ints",
            id="int-shape",
        ),
        pytest.param(
            lambda: get_model("mlp", (8.0,), 2),
            TypeError,
            r"input_shape\[0\] must be a positive integer",
            id="float-dim",
        ),
        pytest.param(
            lambda: get_model("logreg", (8,), 0),
            ValueError,
            "num_classes must be a positive integer, got 0",
            id="zero-classes",
        ),
        pytest.param(
            lambda: get_model("logreg", (8,), -1),
            ValueError,
            "num_classes must be a positive integer, got -1",
            id="negative-classes",
        ),
        pytest.param(
            lambda: get_model("logreg", (8,), True),
            TypeError,
            "num_classes must be a positive integer, got the bool",
            id="bool-classes",
        ),
        pytest.param(
            lambda: get_model("logreg", (8,), 2.5),
            TypeError,
            "num_classes must be a positive integer, got 2.5",
            id="float-classes",
        ),
        pytest.param(
            lambda: get_model("cnn", (28, 28), 62),
            ValueError,
            r"input_shape must have rank 3 .* got \(28, 28\) of rank 2",
            id="cnn-rank",
        ),
        pytest.param(
            lambda: femnist_cnn((3, 8, 1), 10),
            ValueError,
            "two 2x2 max-pools need height and width >= 4",
            id="cnn-too-small",
        ),
        pytest.param(
            lambda: get_model("resnet18", (32, 32, 3, 1), 10),
            ValueError,
            "input_shape must have rank 3",
            id="resnet-rank",
        ),
        pytest.param(
            lambda: resnet18_gn(groups=3),
            ValueError,
            "groups must divide the narrowest width 64",
            id="resnet-groups",
        ),
        pytest.param(
            lambda: resnet18_gn(groups=0),
            ValueError,
            "groups must be a positive integer, got 0",
            id="resnet-groups-zero",
        ),
        pytest.param(
            lambda: mlp((4,), 2, hidden=(5, 0)),
            ValueError,
            r"hidden\[1\] must be a positive integer, got 0",
            id="mlp-hidden",
        ),
        pytest.param(
            lambda: mlp((4,), 2, hidden=200),
            TypeError,
            "hidden must be a sequence of positive ints",
            id="mlp-hidden-int",
        ),
        pytest.param(
            lambda: char_lstm(vocab_size=0),
            ValueError,
            "vocab_size must be a positive integer, got 0",
            id="lstm-vocab",
        ),
        pytest.param(
            lambda: char_lstm(num_layers=0),
            ValueError,
            "num_layers must be a positive integer, got 0",
            id="lstm-layers",
        ),
        pytest.param(
            lambda: get_model("char_lstm", (80, 1), 80),
            ValueError,
            "input_shape must have rank 1",
            id="lstm-rank",
        ),
        pytest.param(
            lambda: get_model("char_lstm", (80,), 80, seq_len=80),
            TypeError,
            "takes seq_len from input_shape",
            id="lstm-dup-seq-len",
        ),
        pytest.param(
            lambda: get_model("mlp", (8,), 2, widths=3),
            TypeError,
            "unexpected keyword argument 'widths'",
            id="bad-kwarg",
        ),
    ],
)
def test_bad_construction_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "name,make_x,error,match",
    [
        pytest.param(
            "cnn",
            lambda: np.zeros((2, 8, 8), np.float32),
            ValueError,
            r"x must have shape \[batch, \*\(8, 8, 1\)\] .* got \(2, 8, 8\)",
            id="missing-channel",
        ),
        pytest.param(
            "cnn",
            lambda: np.zeros((8, 8, 1), np.float32),
            ValueError,
            "Add a leading batch axis",
            id="missing-batch",
        ),
        pytest.param(
            "logreg",
            lambda: np.zeros((2, 3, 2), np.float32),
            ValueError,
            r"got \(2, 3, 2\)",
            id="transposed",
        ),
        pytest.param(
            "mlp",
            lambda: np.zeros((2, 2, 3), np.uint8),
            TypeError,
            "x must be floating point .* got dtype uint8",
            id="uint8-images",
        ),
        pytest.param(
            "char_lstm",
            lambda: np.zeros((2, 5), np.float32),
            TypeError,
            "x must hold integer token ids .* got dtype float32",
            id="float-tokens",
        ),
        pytest.param(
            "char_lstm",
            lambda: np.full((2, 5), 7, np.int32),
            ValueError,
            r"token ids outside \[0, vocab_size=7\): e.g. \[7, 7",
            id="token-too-big",
        ),
        pytest.param(
            "char_lstm",
            lambda: np.full((1, 5), -1, np.int32),
            ValueError,
            r"token ids outside \[0, vocab_size=7\): e.g. \[-1",
            id="token-negative",
        ),
        pytest.param(
            "char_lstm",
            lambda: np.full((1, 5), 2**40, np.int64),
            ValueError,
            r"token ids outside .* e.g. \[1099511627776",
            id="token-int64-overflow",
        ),
    ],
)
def test_bad_x_raises(built, name, make_x, error, match):
    model, params = built[name]
    with pytest.raises(error, match=match):
        model.apply(params, make_x())


def test_bad_params_raise(built):
    model, params = built["cnn"]
    x = _inputs(model, 1)
    with pytest.raises(ValueError, match=r"params do not match model 'cnn': tree structure"):
        model.apply({"params": params}, x)
    logreg_params = built["logreg"][1]
    with pytest.raises(ValueError, match=re.escape("no {'params': ...} wrapper")):
        model.apply(logreg_params, x)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
    with pytest.raises(
        ValueError,
        match=r"leaf \['conv_0'\]\['bias'\] has shape \(2, 32\), "
        r"expected \(32,\)",
    ):
        model.apply(stacked, x)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(0, id="int"),
        pytest.param(np.zeros(3, np.uint32), id="uint32-wrong-shape"),
        pytest.param(jax.random.split(jax.random.key(0), 2), id="batch-of-keys"),
    ],
)
def test_bad_key_raises(key):
    with pytest.raises(TypeError, match=r"(?s)key must be a single JAX PRNG key .* jax.vmap"):
        SMALL["logreg"]().init(key)


def test_nwp_lstm_shapes_and_the_papers_parameter_count():
    from fedjax_lab.models import get_model, nwp_lstm

    # Reddi et al. 2021 report 4,050,748 parameters (10,000 words + 4 special tokens).
    shapes = jax.eval_shape(nwp_lstm().init, jax.random.key(0))
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == 4_050_748
    model = get_model("nwp_lstm", (6,), 11, embed_dim=3, hidden=4, dense=2)
    params = model.init(jax.random.key(0))
    logits = model.apply(params, np.array([[1, 2, 3, 0, 0, 0], [10, 9, 8, 7, 6, 5]], np.int32))
    assert logits.shape == (2, 6, 11) and logits.dtype == jnp.float32
    # Per-position predictions: position t sees only tokens up to t.
    changed = model.apply(params, np.array([[1, 2, 3, 4, 4, 4], [10, 9, 8, 7, 6, 5]], np.int32))
    np.testing.assert_allclose(logits[0, :3], changed[0, :3], rtol=1e-6)
    with pytest.raises(ValueError, match="token ids outside"):
        model.apply(params, np.array([[11, 0, 0, 0, 0, 0]], np.int32))
