"""Pseudorandom mask vectors: AES-256 in counter mode, expanded with numpy.

Bonawitz et al. (2017, §3) mask with ``PRG(seed)``, a pseudorandom generator expanding a seed
into a vector over ``Z_R``. Here the PRG is AES-256-CTR (from ``cryptography``) keyed by the
32-byte seed, encrypting zeros: one call produces all ``8 * length`` bytes, read as
little-endian ``uint64`` words and reduced mod ``2^bits`` (the low bits of uniform words are
uniform, since ``2^bits`` divides ``2^64``). No per-element Python.
"""

from __future__ import annotations

import numpy as np

SEED_BYTES = 32


def expand(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudorandom elements of ``Z_{2^bits}`` from a 32-byte seed (``uint64``).

    Each seed must mask one vector only (the counter starts at 0); the protocol derives a fresh
    seed per pair and per round.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    return words
