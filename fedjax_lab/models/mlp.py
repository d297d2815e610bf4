"""Fully connected ReLU network (the "2NN" of FedAvg)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models._base import Model, check_positive_int, check_shape, flat_size, from_flax


class _MLP(nn.Module):
    hidden: tuple[int, ...]
    num_classes: int
    num_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Explicit feature count (not -1) so that an empty batch [0, ...] still reshapes.
        x = jnp.reshape(x, (x.shape[0], self.num_features))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (200, 200)) -> Model:
    """Multilayer perceptron with ReLU hidden layers.

    With the defaults on MNIST this is the "2NN" of McMahan et al., "Communication-Efficient
    Learning of Deep Networks from Decentralized Data" (FedAvg), AISTATS 2017: two hidden
    layers of 200 units, 199,210 parameters.

    Args:
      input_shape: Per-example input shape (any rank >= 1); flattened first.
      num_classes: Number of classes (>= 1).
      hidden: Widths of the hidden layers (each >= 1); an empty tuple gives logistic
        regression.

    Returns:
      A `Model` with params ``{'dense_0': ..., ..., 'head': ...}``.

    Raises:
      ValueError, TypeError: On a malformed `input_shape`, `num_classes` or `hidden`.
    """
    shape = check_shape(input_shape)
    classes = check_positive_int(num_classes, "num_classes")
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise TypeError(f"hidden must be a sequence of positive ints, got {hidden!r}.")
    widths = tuple(check_positive_int(w, f"hidden[{i}]") for i, w in enumerate(hidden))
    return from_flax(
        _MLP(hidden=widths, num_classes=classes, num_features=flat_size(shape)),
        input_shape=shape,
        input_dtype="float32",
        num_classes=classes,
        has_conv=False,
        name="mlp",
    )
