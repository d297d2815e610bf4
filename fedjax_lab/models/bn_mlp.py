"""A one-hidden-layer MLP with BatchNorm: a model with mutable state (running statistics).

Ioffe & Szegedy 2015, "Batch Normalization". The model is pure jnp (no flax) so that its
masked batch statistics are explicit: padded examples (mask 0) never enter a mean or variance,
which keeps padding a no-op for the algorithms that train it (FedBN).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

BN = "bn"  # the parameter and state subtree of the BatchNorm layer


class BatchNormMLP(NamedTuple):
    """``x -> relu(BN(x W1 + b1)) W2 + b2`` with BatchNorm statistics as model state.

    Attributes:
      dim: input features (inputs are flattened).
      hidden: hidden units.
      num_classes: output logits.
      momentum: running-statistics decay: ``r <- momentum r + (1 - momentum) batch``.
      eps: variance offset of the normalisation.
    """

    dim: int
    hidden: int
    num_classes: int
    momentum: float = 0.9
    eps: float = 1e-5

    def init(self, key: jax.Array) -> dict[str, Any]:
        """Parameters: ``dense1``, ``bn`` (``scale``, ``bias``) and ``dense2``."""
        k1, k2 = jax.random.split(key)
        return {
            "dense1": {"w": jax.random.normal(k1, (self.dim, self.hidden)) / self.dim ** 0.5,
                       "b": jnp.zeros(self.hidden)},
            BN: {"scale": jnp.ones(self.hidden), "bias": jnp.zeros(self.hidden)},
            "dense2": {"w": jax.random.normal(k2, (self.hidden, self.num_classes))
                       / self.hidden ** 0.5, "b": jnp.zeros(self.num_classes)},
        }

    def init_state(self) -> dict[str, Any]:
        """Running statistics: ``{"bn": {"mean": 0, "var": 1}}``."""
        return {BN: {"mean": jnp.zeros(self.hidden), "var": jnp.ones(self.hidden)}}

    def apply(self, params: dict[str, Any], state: dict[str, Any], x: jax.Array, *,
              train: bool, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """``(logits [B, num_classes], new state)``.

        With ``train``, BatchNorm normalises with the statistics of the batch's real examples
        (``mask``, default all) and updates the running ones; otherwise it uses the running
        statistics and returns ``state`` unchanged.
        """
        # Explicit [None, :] broadcasts: the library runs with jax_numpy_rank_promotion="raise".
        h = x.reshape(x.shape[0], -1) @ params["dense1"]["w"] + params["dense1"]["b"][None, :]
        if train:
            m = jnp.ones(x.shape[0], h.dtype) if mask is None else mask.astype(h.dtype)
            n = jnp.maximum(jnp.sum(m), 1.0)
            mean = jnp.sum(m[:, None] * h, axis=0) / n
            var = jnp.sum(m[:, None] * jnp.square(h - mean[None, :]), axis=0) / n
            run = state[BN]
            state = {BN: {"mean": self.momentum * run["mean"] + (1 - self.momentum) * mean,
                          "var": self.momentum * run["var"] + (1 - self.momentum) * var}}
        else:
            mean, var = state[BN]["mean"], state[BN]["var"]
        scale = params[BN]["scale"] / jnp.sqrt(var + self.eps)
        h = (h - mean[None, :]) * scale[None, :] + params[BN]["bias"][None, :]
        return jax.nn.relu(h) @ params["dense2"]["w"] + params["dense2"]["b"][None, :], state
