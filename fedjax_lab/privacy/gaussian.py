"""Exact (epsilon, delta) of the Gaussian mechanism: the analytic Gaussian mechanism.

Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential Privacy: Analytical
Calibration and Optimal Denoising" (ICML), Theorem 8: the Gaussian mechanism with L2
sensitivity ``Delta`` and noise std ``sigma`` (noise multiplier ``s = sigma / Delta``) is
``(epsilon, delta)``-DP if and only if

    delta >= Phi(1/(2s) - epsilon s) - exp(epsilon) Phi(-1/(2s) - epsilon s).

This is the closed form the accountants are checked against wherever a release is one Gaussian
mechanism (local DP with Gaussian noise, DP-FTRL's tree, whose adaptive composition of
Gaussian node releases is again exactly Gaussian: Dong, Roth & Su 2022, "Gaussian Differential
Privacy", Cor. 3.3). ``epsilon`` is found by bracketing and Brent's method on ``log delta``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special


def analytic_gaussian_log_delta(noise_multiplier: float, epsilon: float) -> float:
    """``log delta(epsilon)`` of the Gaussian mechanism (Balle & Wang 2018, Thm. 8)."""
    s = float(noise_multiplier)
    a = special.log_ndtr(1.0 / (2.0 * s) - epsilon * s)
    b = epsilon + special.log_ndtr(-1.0 / (2.0 * s) - epsilon * s)
    return float(a + np.log1p(-np.exp(b - a))) if b < a else -math.inf


def analytic_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """The smallest ``epsilon`` for which the Gaussian mechanism is ``(epsilon, delta)``-DP.

    Args:
      noise_multiplier: noise std divided by the L2 sensitivity (``> 0``; 0 gives ``inf``).
      delta: in ``(0, 1)``.
    """
    if not (isinstance(noise_multiplier, int | float) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if noise_multiplier == 0:
        return math.inf
    log_delta = math.log(delta)
    if analytic_gaussian_log_delta(noise_multiplier, 0.0) <= log_delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while analytic_gaussian_log_delta(noise_multiplier, hi) > log_delta:
        lo, hi = hi, 2.0 * hi
    return float(optimize.brentq(
        lambda e: analytic_gaussian_log_delta(noise_multiplier, e) - log_delta, lo, hi,
        xtol=1e-12))
