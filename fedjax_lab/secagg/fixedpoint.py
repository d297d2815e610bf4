"""Fixed-point encoding of float updates into the ring Z_{2^b} for secure aggregation.

Secure aggregation (Bonawitz et al., 2017, §3: inputs are vectors over Z_R) sums integers
modulo ``R = 2^b``; a float ``x`` is sent as ``round(x * 2^f) mod 2^b`` (two's complement), and
the server decodes the *sum* of ``n`` such values back to a float. Decoding is exact as long as
the true integer sum lies in ``[-2^(b-1), 2^(b-1))``; :meth:`FixedPoint.check_capacity` refuses
a cohort size for which ``n`` values of magnitude ``bound`` could wrap around (a wrapped sum is
silently wrong, so it is ruled out up front instead).

Out-of-range values: :meth:`FixedPoint.encode` raises by default; with ``clip=True`` it clips
to ``[-bound, bound]`` and returns how many coordinates it clipped, which the caller must report
(``with_secure_aggregation`` reports it as the round metric ``secagg_clipped``). Non-finite
values always raise: they have no fixed-point code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class FixedPoint(NamedTuple):
    """A fixed-point code: ``bits``-bit ring, ``frac_bits`` fractional bits, ``|x| <= bound``.

    Attributes:
      bits: the modulus is ``2^bits`` (``2 <= bits <= 64``); codes are ``uint64`` words.
      frac_bits: resolution ``2^-frac_bits``; a coordinate's round-trip error is at most half
        of it (round to nearest).
      bound: largest magnitude a client's coordinate may have.
    """

    bits: int = 32
    frac_bits: int = 16
    bound: float = 1.0

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def resolution(self) -> float:
        return 2.0 ** -self.frac_bits

    def validate(self) -> FixedPoint:
        """Raises ValueError naming the field if the code is nonsense; returns ``self``."""
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 64:
            raise ValueError(f"bits must be an integer in [2, 64], got {self.bits!r}")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 52:
            raise ValueError(f"frac_bits must be an integer in [0, 52], got {self.frac_bits!r}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"bound must be a finite positive number, got {self.bound!r}")
        if self.max_code() >= 2 ** (self.bits - 1):
            raise ValueError(
                f"bound={self.bound} at frac_bits={self.frac_bits} needs codes up to "
                f"{self.max_code()}, which do not fit a signed {self.bits}-bit ring; raise bits "
                "or lower frac_bits/bound"
            )
        return self

    def max_code(self) -> int:
        """Largest integer code magnitude, ``round(bound * 2^frac_bits)``."""
        return round(self.bound * 2.0**self.frac_bits)

    def max_clients(self) -> int:
        """Most clients whose sum cannot wrap: ``n * max_code < 2^(bits-1)``."""
        return (2 ** (self.bits - 1) - 1) // max(self.max_code(), 1)

    def check_capacity(self, num_clients: int) -> None:
        """Raises ValueError if the sum of ``num_clients`` in-range codes could wrap around."""
        self.validate()
        if num_clients > self.max_clients():
            raise ValueError(
                f"{num_clients} clients with |x| <= {self.bound} at frac_bits={self.frac_bits} "
                f"can overflow the {self.bits}-bit ring (at most {self.max_clients()} fit); "
                "raise bits or lower frac_bits/bound"
            )

    def encode(self, x: np.ndarray, *, clip: bool = False) -> tuple[np.ndarray, int]:
        """Encodes floats to ``uint64`` codes in ``[0, 2^bits)``.

        Args:
          x: float array (any shape).
          clip: if False (default), a coordinate with ``|x| > bound`` raises ValueError; if
            True it is clipped to ``±bound`` and counted.

        Returns:
          ``(codes, num_clipped)``.
        """
        self.validate()
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError(
                f"cannot fixed-point encode non-finite values ({int(np.sum(~np.isfinite(x)))} "
                "NaN/inf coordinates)"
            )
        over = np.abs(x) > self.bound
        num_clipped = int(np.sum(over))
        if num_clipped and not clip:
            raise ValueError(
                f"{num_clipped} coordinates exceed the fixed-point bound {self.bound} (largest "
                f"|x| = {float(np.max(np.abs(x)))}); raise bound or pass clip=True and report "
                "the count"
            )
        q = np.rint(np.clip(x, -self.bound, self.bound) * 2.0**self.frac_bits).astype(np.int64)
        return self.reduce(q.view(np.uint64)), num_clipped

    def reduce(self, words: np.ndarray) -> np.ndarray:
        """``words mod 2^bits`` for ``uint64`` words (uint64 arithmetic wraps mod 2^64)."""
        if self.bits == 64:
            return words
        return words & np.uint64(self.modulus - 1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Decodes ring elements (e.g. a sum of codes) to float64 by two's complement."""
        codes = self.reduce(np.asarray(codes, dtype=np.uint64))
        if self.bits == 64:
            signed = codes.view(np.int64)
        else:
            signed = codes.astype(np.int64)
            signed = np.where(signed >= 2 ** (self.bits - 1), signed - self.modulus, signed)
        return signed.astype(np.float64) * 2.0**-self.frac_bits
