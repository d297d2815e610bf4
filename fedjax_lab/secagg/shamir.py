"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Bonawitz et al. (2017, §3, "Secret sharing") share each client's self-mask seed ``b_u`` and
key-agreement secret key ``s_u^SK`` so that any ``t`` surviving clients let the server rebuild
them, and fewer reveal nothing (Shamir, 1979). Secrets here are 32-byte values (< 2^256), so the
Mersenne prime ``p = 2^521 - 1`` holds them; a share is the point ``(x, f(x))`` of a random
polynomial of degree ``t - 1`` with ``f(0) = secret``, serialised as 66 bytes.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: int, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares ``secret`` at the distinct nonzero points ``xs``; any ``threshold`` rebuild it.

    Returns ``{x: f(x)}``. Coefficients come from the OS's CSPRNG (``secrets``).
    """
    if not 0 <= secret < PRIME:
        raise ValueError("secret must lie in [0, 2^521 - 1)")
    xs = [int(x) for x in xs]
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError(f"share points must be distinct and in [1, p), got {xs}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}] (the number of shares), "
                         f"got {threshold}")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """Lagrange interpolation at 0 from the ``threshold`` shares with the smallest ``x``.

    Raises ValueError naming the counts if fewer than ``threshold`` shares are given.
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


def to_bytes(y: int) -> bytes:
    """A field element as 66 big-endian bytes."""
    return int(y).to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    """Parses a 66-byte field element; raises ValueError if it is not in [0, p)."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("share value is not a field element (>= 2^521 - 1)")
    return y
