"""FedML's cross-silo models: ResNet-56 (Bottleneck [6, 6, 6]) and MobileNet v1.

Parameter counts are checked against an independent count of FedML's PyTorch definitions
(``fedml_api/model/cv/resnet.py::resnet56``, ``model/cv/mobilenet.py``), layer by layer;
GroupNorm replaces BatchNorm with the same per-channel scale and shift. The deep nets are
compiled once each, on 8x8 inputs (one jitted function: init, loss, one SGD step, loss).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.models import get_model, mobilenet, resnet56


@functools.cache
def _abstract(name: str, classes: int = 10):
    """The CIFAR-size model and its parameter shapes (traced once per module, not compiled)."""
    model = get_model(name, (32, 32, 3), classes)
    return model, jax.eval_shape(model.init, jax.random.key(0))


def _num_params(name: str, classes: int) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(_abstract(name, classes)[1]))


def _conv(k: int, cin: int, cout: int, bias: bool = False, groups: int = 1) -> int:
    return k * k * (cin // groups) * cout + (cout if bias else 0)


def _norm(c: int) -> int:
    return 2 * c  # BatchNorm2d / GroupNorm affine: weight and bias per channel


def _fedml_resnet56_count(num_classes: int) -> int:
    """FedML ResNet(Bottleneck, [6, 6, 6]): inplanes 16, planes 16/32/64, expansion 4."""
    total = _conv(3, 3, 16) + _norm(16)  # conv1 (bias=False) + bn1
    inplanes = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for block in range(6):
            total += _conv(1, inplanes, planes) + _norm(planes)
            total += _conv(3, planes, planes) + _norm(planes)
            total += _conv(1, planes, 4 * planes) + _norm(4 * planes)
            if block == 0 and (stride != 1 or inplanes != 4 * planes):  # downsample
                total += _conv(1, inplanes, 4 * planes) + _norm(4 * planes)
            inplanes = 4 * planes
    return total + 256 * num_classes + num_classes  # fc


def _fedml_mobilenet_count(num_classes: int) -> int:
    """FedML MobileNet(width_multiplier=1): BasicConv2d(3, 32) then 13 DepthSeperabelConv2d."""
    total = _conv(3, 3, 32) + _norm(32)
    widths = [32, 64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
    for cin, cout in itertools.pairwise(widths):
        total += _conv(3, cin, cin, groups=cin) + _norm(cin)  # depthwise, bias=False
        total += _conv(1, cin, cout, bias=True) + _norm(cout)  # pointwise: default bias
    return total + 1024 * num_classes + num_classes


@pytest.mark.parametrize("classes", [10, 100])
def test_parameter_counts_equal_fedml(classes):
    assert _num_params("resnet56", classes) == _fedml_resnet56_count(classes)
    assert _num_params("mobilenet", classes) == _fedml_mobilenet_count(classes)
    # The figures the docstrings state.
    assert _fedml_resnet56_count(10) == 591_322 and _fedml_resnet56_count(100) == 614_452
    assert _fedml_mobilenet_count(10) == 3_223_178 and _fedml_mobilenet_count(100) == 3_315_428


@pytest.mark.parametrize("name", ["resnet56", "mobilenet"])
def test_cifar_forward_shape_and_registry(name):
    model, params = _abstract(name, 100)
    assert model.name == name and model.has_conv and model.input_shape == (32, 32, 3)
    logits = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert logits.shape == (2, 100) and logits.dtype == jnp.float32


def test_parameter_layout_matches_fedml():
    # The stride sits on the bottleneck's 3x3 conv, projection shortcuts only on each stage's
    # first block, a 64*4-wide head; MobileNet's depthwise kernels are [3, 3, 1, C] without
    # bias and its pointwise convs carry one.
    r = _abstract("resnet56")[1]
    assert r["head"]["kernel"].shape == (256, 10)
    assert r["stage1_block0"]["conv_1"]["kernel"].shape == (3, 3, 32, 32)
    assert r["stage0_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 64)
    assert "shortcut_conv" not in r["stage0_block1"]
    m = _abstract("mobilenet")[1]
    assert m["ds0"]["depthwise"]["kernel"].shape == (3, 3, 1, 32)
    assert m["ds0"]["pointwise"]["bias"].shape == (64,)
    assert "bias" not in m["ds0"]["depthwise"]


@pytest.mark.parametrize(("factory", "groups", "message"), [
    (resnet56, 3, "divide the narrowest width 16"),
    (resnet56, 32, "divide the narrowest width 16"),
    (mobilenet, 64, "divide the narrowest width 32"),
])
def test_bad_groups_are_refused(factory, groups, message):
    with pytest.raises(ValueError, match=message):
        factory(groups=groups)


# The deep nets compile slowly on XLA:CPU; these options cut compile time without changing
# what is computed (no fast-math; only LLVM's expensive optimisation passes are skipped).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _host_params(model, rng):
    """Parameters of the init's tree and shapes, drawn on the host: compiling ``init`` (a
    whole forward pass plus ~170 random draws) would double the compile time of this module;
    the initialisers themselves are tested on their own below."""
    abstract = jax.eval_shape(model.init, jax.random.key(0))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:  # GroupNorm: scale 1, shift 0, as PyTorch's norm layers
            return jnp.ones(leaf.shape) if name.endswith("['scale']") else jnp.zeros(leaf.shape)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else leaf.shape[0]
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def one_step():
    """Per model: (logits shape, losses [before, after one SGD step]) on a tiny batch.

    One compiled program per model: a two-iteration scan whose body is one forward/backward
    pass and an SGD step (so the body is compiled once).
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3])
    out = {}
    for factory in (resnet56, mobilenet):
        model = factory((8, 8, 3), 10)
        params = _host_params(model, rng)

        def run(params, model=model):
            def body(params, _):
                def loss(p):
                    logits = model.apply(p, x)
                    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

                (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
                return jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), (value, logits)

            _, (losses, logits) = jax.lax.scan(body, params, None, length=2)
            return logits.shape[-1], losses

        classes, losses = jax.jit(run).lower(params).compile(FAST_COMPILE)(params)
        out[model.name] = (int(classes), np.asarray(losses))
    return out


# Compiling both networks' step takes ~27 s: `make test-slow` (which also trains both in the
# cross-silo presets' --quick runs).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet56", "mobilenet"])
def test_one_jitted_sgd_step_decreases_the_loss(one_step, name):
    classes, (before, after) = one_step[name]
    assert classes == 10
    assert np.isfinite(before) and np.isfinite(after)
    assert after < before


def test_initialisers_follow_pytorch():
    from fedjax_lab.models.torch_init import (
        he_normal_fan_out,
        torch_default_bias,
        torch_default_kernel,
    )

    key = jax.random.key(0)
    # kaiming_normal_(mode='fan_out'): std sqrt(2 / (K*K*C_out)).
    w = np.asarray(he_normal_fan_out(key, (3, 3, 32, 64)))  # 18,432 draws: std within 2 %
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 64)), rtol=0.02)
    # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    bound = 1 / np.sqrt(9 * 32)
    w = np.asarray(torch_default_kernel(key, (3, 3, 32, 64)))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    b = np.asarray(torch_default_bias(9 * 32)(key, (2048,)))
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.99 * bound
    # A depthwise kernel [3, 3, 1, C] has fan-in 9, as PyTorch's [C, 1, 3, 3].
    w = np.asarray(torch_default_kernel(key, (3, 3, 1, 2048)))
    assert np.abs(w).max() <= 1 / 3 and np.abs(w).max() > 0.99 / 3
