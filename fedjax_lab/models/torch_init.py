"""PyTorch's default and He initialisers as flax initialisers, for ports of PyTorch models.

FedML's ResNet-56 and MobileNet (PyTorch) are initialised by PyTorch's rules; flax's defaults
(LeCun normal weights, zero biases) differ. These functions reproduce the distributions (not
the random draws) so that a port starts from the same scale of weights.

References: He et al., "Delving Deep into Rectifiers", ICCV 2015 (``kaiming_normal_`` with
``mode='fan_out'``); PyTorch ``nn.Conv2d``/``nn.Linear.reset_parameters`` (``kaiming_uniform_``
with ``a=sqrt(5)``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for biases).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen import initializers

Initializer = Callable[..., jax.Array]

# kaiming_normal_(w, mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out), untruncated;
# jax's fan_out of an HWIO kernel is K*K*C_out, PyTorch's of an OIHW kernel the same product.
he_normal_fan_out: Initializer = initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default weight init: U(-b, b) with b = 1/sqrt(fan_in); a uniform of variance
# scale/fan_in has bound sqrt(3 scale / fan_in), hence scale 1/3. For a grouped (depthwise)
# conv the HWIO kernel [K, K, 1, C] gives jax fan_in K*K, as PyTorch's weight [C, 1, K, K].
torch_default_kernel: Initializer = initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of a layer's fan-in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
