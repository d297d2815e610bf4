"""FedML's ResNet-56 for CIFAR: 3 stages x 6 Bottleneck blocks, GroupNorm for BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models._base import Model, check_positive_int, check_shape, from_flax
from fedjax_lab.models.torch_init import (
    he_normal_fan_out,
    torch_default_bias,
    torch_default_kernel,
)

PLANES = (16, 32, 64)  # bottleneck widths of the three stages (outputs are 4x these)
BLOCKS = (6, 6, 6)  # FedML: ResNet(Bottleneck, [6, 6, 6]); 3 convs x 18 blocks + stem + fc = 56
EXPANSION = 4
EPS = 1e-5  # PyTorch's BatchNorm2d/GroupNorm epsilon
PAD1 = ((1, 1), (1, 1))  # PyTorch padding=1 (flax 'SAME' pads (0, 1) for stride 2, not (1, 1))


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=PAD1 if kernel == 3 else "VALID", use_bias=False,
                   kernel_init=he_normal_fan_out, name=name)


class _Bottleneck(nn.Module):
    planes: int
    stride: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.planes * EXPANSION

        def norm(name: str) -> nn.GroupNorm:
            return nn.GroupNorm(num_groups=self.groups, epsilon=EPS, name=name)

        y = nn.relu(norm("norm_0")(_conv(self.planes, 1, 1, "conv_0")(x)))
        # torchvision v1.5 / FedML: the stride sits on the 3x3 conv, not the first 1x1.
        y = nn.relu(norm("norm_1")(_conv(self.planes, 3, self.stride, "conv_1")(y)))
        y = norm("norm_2")(_conv(out, 1, 1, "conv_2")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = norm("shortcut_norm")(_conv(out, 1, self.stride, "shortcut_conv")(x))
        return nn.relu(x + y)


class _ResNet56(nn.Module):
    num_classes: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(PLANES[0], 3, 1, "stem_conv")(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups, epsilon=EPS, name="stem_norm")(x))
        for stage, (planes, blocks) in enumerate(zip(PLANES, BLOCKS, strict=True)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _Bottleneck(planes, stride, self.groups, name=f"stage{stage}_block{block}")(x)
        x = jnp.mean(x, axis=(1, 2))
        width = PLANES[-1] * EXPANSION
        return nn.Dense(self.num_classes, kernel_init=torch_default_kernel,
                        bias_init=torch_default_bias(width), name="head")(x)


def resnet56(
    input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, groups: int = 2
) -> Model:
    """ResNet-56 as FedML defines it (``fedml_api/model/cv/resnet.py::resnet56``).

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2 describe the
    CIFAR ResNet-56 as 3 stages of 9 *basic* blocks (16/32/64 channels, ~0.85M parameters).
    FedML's ``resnet56`` -- the model of its cross-silo benchmark (He et al., "FedML: A
    Research Library and Benchmark for Federated Machine Learning", 2020) -- is instead
    ``ResNet(Bottleneck, [6, 6, 6])``: a 3x3 stride-1 stem of 16 channels, three stages of six
    Bottleneck blocks (1x1 -> 3x3 -> 1x1, widths 16/32/64 expanded 4x to 64/128/256 outputs;
    the stride-2 of stages 2 and 3 on the 3x3 conv; a 1x1 projection shortcut on each stage's
    first block), global average pool and a dense head. This port follows FedML, so the
    published accuracies refer to the same network: 591,322 parameters for 10 classes,
    614,452 for 100.

    Deviation: BatchNorm -> GroupNorm (Wu & He, ECCV 2018), because the library's models are
    pure functions without batch statistics (`Model`), and batch statistics break under
    non-IID clients (Hsieh et al., ICML 2020). GroupNorm has the same learnable scale and
    shift per channel, so the parameter count is FedML's exactly (BatchNorm's running
    mean/variance are buffers, not parameters). Convs are initialised as FedML's
    (``kaiming_normal_``, fan-out), the head with PyTorch's default.

    Args:
      input_shape: Per-example ``(height, width, channels)``; any positive size works (the
        two stride-2 stages round up and the head averages over space).
      num_classes: Number of classes (>= 1).
      groups: GroupNorm groups; must divide 16, the narrowest width.

    Returns:
      A `Model` with HWIO conv kernels, ``has_conv=True``, name ``'resnet56'``.

    Raises:
      ValueError, TypeError: On a malformed `input_shape`, `num_classes` or `groups`.
    """
    shape = check_shape(input_shape, rank=3)
    classes = check_positive_int(num_classes, "num_classes")
    num_groups = check_positive_int(groups, "groups")
    if PLANES[0] % num_groups:
        raise ValueError(f"groups must divide the narrowest width {PLANES[0]} (1, 2, 4, 8 or "
                         f"16), got {num_groups}.")
    return from_flax(_ResNet56(num_classes=classes, groups=num_groups), input_shape=shape,
                     input_dtype="float32", num_classes=classes, has_conv=True, name="resnet56")
