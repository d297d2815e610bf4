"""The two-layer CNN of FedAvg / LEAF (FEMNIST) and FedML's CNN_DropOut."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models._base import Model, check_positive_int, check_shape, from_flax
from fedjax_lab.models.dropout import check_rate, dropout


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


class _CNNDropOut(nn.Module):
    num_classes: int
    conv_rate: float
    dense_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv_0")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv_1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        if key is not None:
            # One key per dropout layer (split, not reused), so the two masks are independent.
            conv_key, dense_key = jax.random.split(key)
            x = dropout(x, self.conv_rate, conv_key)
        x = jnp.reshape(x, (x.shape[0], x.shape[1] * x.shape[2] * x.shape[3]))
        x = nn.relu(nn.Dense(128, name="dense_0")(x))
        if key is not None:
            x = dropout(x, self.dense_rate, dense_key)
        return nn.Dense(self.num_classes, name="head")(x)


def cnn_dropout(
    input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 62, *,
    conv_rate: float = 0.25, dense_rate: float = 0.5,
) -> Model:
    """FedML's ``CNN_DropOut`` for (F)EMNIST: the CNN of Reddi et al. 2021 with dropout.

    Architecture (FedML ``fedml/model/cv/cnn.py``, class ``CNN_DropOut``): conv 3x3x32
    'VALID' + ReLU, conv 3x3x64 'VALID' + ReLU, max-pool 2x2, dropout ``conv_rate`` (0.25),
    flatten, dense 128 + ReLU, dropout ``dense_rate`` (0.5), dense `num_classes`. For 28x28x1
    inputs and 62 classes it has 1,206,590 parameters. Flattening is HWC (flax) instead of
    PyTorch's CHW, which permutes ``dense_0``'s rows and changes nothing else.

    ``apply(params, x)`` is the evaluation mode (no dropout); ``apply_train(params, x, *,
    key)`` the training mode, with inverted dropout (Srivastava et al. 2014) whose masks are
    drawn from ``split(key)`` (:func:`fedjax_lab.models.dropout.dropout`).

    References: Reddi et al., "Adaptive Federated Optimization", ICLR 2021; He et al.,
    "FedML: A Research Library and Benchmark for Federated Machine Learning", 2020;
    Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
    JMLR 2014.

    Args:
      input_shape: Per-example ``(height, width, channels)``; height and width must be >= 6
        (two 3x3 'VALID' convolutions and a 2x2 pool leave at least one pixel).
      num_classes: Number of classes (62 for FEMNIST, 10 for digits only).
      conv_rate: drop probability after the convolutions, in [0, 1).
      dense_rate: drop probability after the hidden dense layer, in [0, 1).

    Returns:
      A `Model` with ``apply_train``; HWIO conv kernels ``conv_0``/``conv_1`` and dense
      ``dense_0``/``head``.

    Raises:
      ValueError, TypeError: On a malformed or too small `input_shape`, bad `num_classes` or
        a rate outside [0, 1).
    """
    shape = check_shape(input_shape, rank=3)
    classes = check_positive_int(num_classes, "num_classes")
    conv_rate = check_rate(conv_rate, "conv_rate")
    dense_rate = check_rate(dense_rate, "dense_rate")
    height, width, _ = shape
    if height < 6 or width < 6:
        raise ValueError(
            f"input_shape {shape} is too small for cnn_dropout: two 3x3 'VALID' convolutions "
            "and a 2x2 max-pool need height and width >= 6."
        )
    return from_flax(
        _CNNDropOut(num_classes=classes, conv_rate=conv_rate, dense_rate=dense_rate),
        input_shape=shape,
        input_dtype="float32",
        num_classes=classes,
        has_conv=True,
        name="cnn_dropout",
        stochastic=True,
    )
