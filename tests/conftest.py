"""Test configuration: 4 forced host CPU devices, strict rank promotion."""

import os

# Must happen before jax initialises its backends: the sharded-backend tests need >1 device.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
