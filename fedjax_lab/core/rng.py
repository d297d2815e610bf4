"""Explicit randomness (DESIGN.md "Randomness").

Round key = ``fold_in(root, round)``; client keys = ``split(round_key, C)`` BEFORE any sharding,
so results do not depend on how many devices or ranks run them. Host-side randomness (client
sampling, shuffling) uses numpy Generators seeded from ``(seed, stream, round, ...)`` so that any
round can be rebuilt without replaying the previous ones (needed for MPI ranks and resume).
"""

from __future__ import annotations

import jax
import numpy as np

# Distinct streams for host-side randomness so sampling and shuffling never share draws.
SAMPLING_STREAM = 1
SHUFFLE_STREAM = 2
PARTITION_STREAM = 3
SYSTEM_STREAM = 4
# Device-side stream of a client's local-step randomness (dropout), folded into its client key.
LOCAL_STEP_STREAM = 5
# Host-side stream of fedjax_lab.attacks: which clients are malicious (substream 0) and the
# label-flipping permutation (substream 1); drawn once per run from the seed, never per round.
ATTACK_STREAM = 6
# Device-side stream of a malicious client's Gaussian-noise upload, folded into its client key
# (so the compressor's and the local steps' draws are unchanged).
ATTACK_NOISE_STREAM = 7


def round_key(root: jax.Array, round_idx: int | jax.Array) -> jax.Array:
    """Key of one round: ``fold_in(root, round_idx)``."""
    return jax.random.fold_in(root, round_idx)


def client_keys(rkey: jax.Array, num_clients: int) -> jax.Array:
    """``[num_clients]`` keys of one round's client slots, split before any sharding."""
    return jax.random.split(rkey, num_clients)


def local_steps_key(client_key: jax.Array) -> jax.Array:
    """Key of a client's local-step randomness: ``fold_in(client_key, LOCAL_STEP_STREAM)``.

    Folded in rather than split off, so the client key that ``finish`` (the compressor) gets
    is unchanged and its draws stay what they were.
    """
    return jax.random.fold_in(client_key, LOCAL_STEP_STREAM)


def local_step_key(steps_key: jax.Array, step: jax.Array) -> jax.Array:
    """Key of the client's ``step``-th real local step: ``fold_in(steps_key, step)``.

    ``step`` counts the client's steps with at least one real example before this one, which
    padded and packed execution agree on (masked steps change nothing), so both draw the same
    dropout masks for the same client and step.
    """
    return jax.random.fold_in(steps_key, step)


def host_rng(seed: int, stream: int, *path: int) -> np.random.Generator:
    """A numpy Generator for ``(seed, stream, *path)``, independent of call order."""
    for value in (seed, stream, *path):
        if int(value) < 0:
            raise ValueError(f"host_rng: seed/stream/path entries must be >= 0, got {value}")
    return np.random.default_rng([int(seed), int(stream), *(int(p) for p in path)])
