"""The two-layer CNN of FedAvg / LEAF (FEMNIST)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models._base import Model, check_positive_int, check_shape, from_flax


class _FemnistCNN(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, features in enumerate((32, 64)):
            x = nn.relu(nn.Conv(features, (5, 5), padding="SAME", name=f"conv_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        # Explicit feature count (not -1) so that an empty batch [0, ...] still reshapes.
        x = jnp.reshape(x, (x.shape[0], x.shape[1] * x.shape[2] * x.shape[3]))
        x = nn.relu(nn.Dense(512, name="dense_0")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def femnist_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 62) -> Model:
    """CNN of McMahan et al. 2017 (FedAvg), as used for FEMNIST in LEAF.

    Architecture: conv 5x5x32 'SAME' + ReLU, max-pool 2x2, conv 5x5x64 'SAME' + ReLU,
    max-pool 2x2, dense 512 + ReLU, dense `num_classes`. For 28x28x1 inputs and 62 classes it
    has 1,690,046 parameters. References: McMahan et al., "Communication-Efficient Learning of
    Deep Networks from Decentralized Data", AISTATS 2017; Caldas et al., "LEAF: A Benchmark
    for Federated Settings", 2018.

    Args:
      input_shape: Per-example ``(height, width, channels)``; height and width must be >= 4
        so that both 2x2 pools keep at least one pixel (e.g. ``(8, 8, 1)`` for sklearn
        digits). Odd sizes are floored by the 'VALID' pools.
      num_classes: Number of classes (>= 1).

    Returns:
      A `Model` with HWIO conv kernels ``conv_0``/``conv_1`` and dense ``dense_0``/``head``.

    Raises:
      ValueError, TypeError: On a malformed or too small `input_shape`, or bad `num_classes`.
    """
    shape = check_shape(input_shape, rank=3)
    classes = check_positive_int(num_classes, "num_classes")
    height, width, _ = shape
    if height < 4 or width < 4:
        raise ValueError(
            f"input_shape {shape} is too small for femnist_cnn: its two 2x2 max-pools need "
            "height and width >= 4. Upsample or pad the images, or use the 'mlp' model."
        )
    return from_flax(
        _FemnistCNN(num_classes=classes),
        input_shape=shape,
        input_dtype="float32",
        num_classes=classes,
        has_conv=True,
        name="cnn",
    )
