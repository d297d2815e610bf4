"""CIFAR ResNet-18 with GroupNorm (the FedML cross-device CIFAR-100 model)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models._base import Model, check_positive_int, check_shape, from_flax

_WIDTHS = (64, 128, 256, 512)
_BLOCKS = (2, 2, 2, 2)


class _BasicBlock(nn.Module):
    features: int
    stride: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        strides = (self.stride, self.stride)
        # Convs feeding a norm layer carry no bias: the norm's shift makes it redundant.
        y = nn.Conv(self.features, (3, 3), strides, padding="SAME", use_bias=False, name="conv_0")(
            x
        )
        y = nn.relu(nn.GroupNorm(num_groups=self.groups, name="norm_0")(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv_1")(y)
        y = nn.GroupNorm(num_groups=self.groups, name="norm_1")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides, use_bias=False, name="shortcut_conv")(x)
            x = nn.GroupNorm(num_groups=self.groups, name="shortcut_norm")(x)
        return nn.relu(x + y)


class _ResNet18GN(nn.Module):
    num_classes: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # CIFAR stem: one 3x3 stride-1 conv and no max-pool (32x32 inputs are already small).
        x = nn.Conv(_WIDTHS[0], (3, 3), padding="SAME", use_bias=False, name="stem_conv")(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups, name="stem_norm")(x))
        for stage, (width, blocks) in enumerate(zip(_WIDTHS, _BLOCKS, strict=True)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(width, stride, self.groups, name=f"stage{stage}_block{block}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def resnet18_gn(
    input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 100, groups: int = 2
) -> Model:
    """CIFAR-style ResNet-18 with GroupNorm in place of BatchNorm.

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, in its CIFAR form
    (3x3 stem, no stem max-pool, BasicBlocks [2, 2, 2, 2] of widths 64/128/256/512, global
    average pool, dense head). BatchNorm is replaced by GroupNorm (Wu & He, ECCV 2018)
    because batch statistics break under non-IID federated data (Hsieh et al., "The Non-IID
    Data Quagmire of Decentralized Machine Learning", ICML 2020); this is the model FedML and
    Reddi et al., "Adaptive Federated Optimization" (ICLR 2021) use for cross-device
    CIFAR-100. With 100 classes it has 11,220,132 parameters. GroupNorm has no running
    statistics, so `apply` is a pure function.

    Args:
      input_shape: Per-example ``(height, width, channels)``; any positive size works (the
        three stride-2 stages round up and the head averages over space).
      num_classes: Number of classes (>= 1).
      groups: GroupNorm groups; must divide 64 (and hence every stage width).

    Returns:
      A `Model` with HWIO conv kernels, ``has_conv=True``.

    Raises:
      ValueError, TypeError: On a malformed `input_shape`, `num_classes` or `groups`.
    """
    shape = check_shape(input_shape, rank=3)
    classes = check_positive_int(num_classes, "num_classes")
    num_groups = check_positive_int(groups, "groups")
    if _WIDTHS[0] % num_groups:
        raise ValueError(
            f"groups must divide the narrowest width {_WIDTHS[0]} (e.g. 1, 2, 4, 8, 16, 32), "
            f"got {num_groups}."
        )
    return from_flax(
        _ResNet18GN(num_classes=classes, groups=num_groups),
        input_shape=shape,
        input_dtype="float32",
        num_classes=classes,
        has_conv=True,
        name="resnet18",
    )
