"""FedML's cross-silo models: ResNet-56 (Bottleneck [6, 6, 6]) and MobileNet v1.

Parameter counts are checked against an independent count of FedML's PyTorch definitions
(``fedml_api/model/cv/resnet.py::resnet56``, ``model/cv/mobilenet.py``), layer by layer;
GroupNorm replaces BatchNorm with the same per-channel scale and shift. The deep nets are
compiled once each, on 8x8 inputs (one jitted function: init, loss, one SGD step, loss).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.models import get_model, mobilenet, resnet56


def _num_params(model) -> int:
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))


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
    assert _num_params(resnet56(num_classes=classes)) == _fedml_resnet56_count(classes)
    assert _num_params(mobilenet(num_classes=classes)) == _fedml_mobilenet_count(classes)
    # The figures the docstrings state.
    assert _fedml_resnet56_count(10) == 591_322 and _fedml_resnet56_count(100) == 614_452
    assert _fedml_mobilenet_count(10) == 3_223_178 and _fedml_mobilenet_count(100) == 3_315_428


@pytest.mark.parametrize("name", ["resnet56", "mobilenet"])
def test_cifar_forward_shape_and_registry(name):
    model = get_model(name, (32, 32, 3), 100)
    assert model.name == name and model.has_conv and model.input_shape == (32, 32, 3)
    params = jax.eval_shape(model.init, jax.random.key(0))
    logits = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert logits.shape == (2, 100) and logits.dtype == jnp.float32


def test_stage_resolutions_follow_pytorch_padding():
    # Kernels of the stride-2 convs see PyTorch's padding=1; the head input is 64*4 wide
    # (ResNet-56) and 1024 wide (MobileNet), and GroupNorm is the only norm.
    r = jax.eval_shape(resnet56().init, jax.random.key(0))
    assert r["head"]["kernel"].shape == (256, 10)
    assert r["stage1_block0"]["conv_1"]["kernel"].shape == (3, 3, 32, 32)
    assert r["stage0_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 64)
    assert "shortcut_conv" not in r["stage0_block1"]
    m = jax.eval_shape(mobilenet().init, jax.random.key(0))
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


@pytest.fixture(scope="module")
def one_step():
    """Per model: (logits shape, losses [before, after one SGD step]) on a tiny batch.

    One compiled program per model: init, then a two-iteration scan whose body is one
    forward/backward pass and an SGD step (so the body is compiled once).
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3])
    out = {}
    for factory in (resnet56, mobilenet):
        model = factory((8, 8, 3), 10)

        def run(key, model=model):
            def body(params, _):
                def loss(p):
                    logits = model.apply(p, x)
                    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

                (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
                return jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), (value, logits)

            _, (losses, logits) = jax.lax.scan(body, model.init(key), None, length=2)
            return logits.shape[-1], losses

        compiled = jax.jit(run).lower(jax.random.key(1)).compile(FAST_COMPILE)
        classes, losses = compiled(jax.random.key(1))
        out[model.name] = (int(classes), np.asarray(losses))
    return out


@pytest.mark.parametrize("name", ["resnet56", "mobilenet"])
def test_one_jitted_sgd_step_decreases_the_loss(one_step, name):
    classes, (before, after) = one_step[name]
    assert classes == 10
    assert np.isfinite(before) and np.isfinite(after)
    assert after < before
