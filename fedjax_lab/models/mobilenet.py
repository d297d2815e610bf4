"""FedML's MobileNet (v1, width 1.0) for CIFAR-sized images, GroupNorm for BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models._base import Model, check_positive_int, check_shape, from_flax
from fedjax_lab.models.torch_init import torch_default_bias, torch_default_kernel

STEM = 32
# (output channels, stride) of the 13 depthwise-separable layers: FedML's stem DS layer and
# its conv1..conv4 sequences, i.e. Howard et al. 2017, Table 1, with a stride-1 stem.
LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
          (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
EPS = 1e-5  # PyTorch's BatchNorm2d/GroupNorm epsilon
PAD1 = ((1, 1), (1, 1))  # PyTorch padding=1 (flax 'SAME' pads (0, 1) for stride 2)


class _DepthSeparable(nn.Module):
    features: int
    stride: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        # Depthwise 3x3 (one filter per channel, no bias: FedML passes bias=False to it).
        x = nn.Conv(cin, (3, 3), (self.stride, self.stride), padding=PAD1,
                    feature_group_count=cin, use_bias=False, kernel_init=torch_default_kernel,
                    name="depthwise")(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups, epsilon=EPS, name="depthwise_norm")(x))
        # Pointwise 1x1 WITH a bias: FedML's nn.Conv2d(cin, cout, 1) keeps PyTorch's default.
        x = nn.Conv(self.features, (1, 1), use_bias=True, kernel_init=torch_default_kernel,
                    bias_init=torch_default_bias(cin), name="pointwise")(x)
        return nn.relu(nn.GroupNorm(num_groups=self.groups, epsilon=EPS,
                                    name="pointwise_norm")(x))


class _MobileNet(nn.Module):
    num_classes: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(STEM, (3, 3), padding=PAD1, use_bias=False, kernel_init=torch_default_kernel,
                    name="stem_conv")(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups, epsilon=EPS, name="stem_norm")(x))
        for i, (features, stride) in enumerate(LAYERS):
            x = _DepthSeparable(features, stride, self.groups, name=f"ds{i}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_default_kernel,
                        bias_init=torch_default_bias(LAYERS[-1][0]), name="head")(x)


def mobilenet(
    input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, groups: int = 2
) -> Model:
    """MobileNet v1, width multiplier 1.0, as FedML defines it (``model/cv/mobilenet.py``).

    Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
    Applications", 2017: a 3x3 conv of 32 channels, then 13 depthwise-separable layers (a 3x3
    depthwise conv and a 1x1 pointwise conv, each followed by a norm and ReLU) with outputs
    64, 128, 128, 256, 256, 512 (x6), 1024, 1024, global average pool and a dense head.
    FedML's CIFAR variant (the model of its cross-silo benchmark) makes the stem stride 1, so
    the four stride-2 layers take 32x32 inputs to 2x2; its pointwise convs keep a bias (only
    the depthwise convs are built with ``bias=False``), which this port keeps, so that the
    parameter count is FedML's exactly: 3,223,178 for 10 classes, 3,315,428 for 100.

    Deviation: BatchNorm -> GroupNorm (Wu & He, ECCV 2018): the library's models are pure
    functions without batch statistics (`Model`); GroupNorm has the same learnable scale and
    shift per channel. Weights start from PyTorch's default initialisation, as FedML's.

    Args:
      input_shape: Per-example ``(height, width, channels)``; any positive size works.
      num_classes: Number of classes (>= 1).
      groups: GroupNorm groups; must divide 32, the narrowest width.

    Returns:
      A `Model` with HWIO conv kernels (depthwise kernels ``[3, 3, 1, C]``),
      ``has_conv=True``, name ``'mobilenet'``.

    Raises:
      ValueError, TypeError: On a malformed `input_shape`, `num_classes` or `groups`.
    """
    shape = check_shape(input_shape, rank=3)
    classes = check_positive_int(num_classes, "num_classes")
    num_groups = check_positive_int(groups, "groups")
    if STEM % num_groups:
        raise ValueError(f"groups must divide the narrowest width {STEM} (1, 2, 4, 8, 16 or "
                         f"32), got {num_groups}.")
    return from_flax(_MobileNet(num_classes=classes, groups=num_groups), input_shape=shape,
                     input_dtype="float32", num_classes=classes, has_conv=True, name="mobilenet")
