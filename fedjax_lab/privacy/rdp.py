"""A small Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism.

RDP of one step at integer order ``alpha >= 2`` (Mironov, Talwar & Zhang 2019, "Rényi
Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3; the moments accountant of
Abadi et al. 2016, "Deep Learning with Differential Privacy"), for sampling rate ``q`` and noise
multiplier ``sigma`` (noise std / L2 sensitivity), add-or-remove-one neighbours:

    A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))
    rdp(alpha) = log(A_alpha) / (alpha - 1)

computed in log space. RDP composes additively over steps. Conversion to (epsilon, delta):

* ``"classic"``: epsilon = min_alpha rdp(alpha) + log(1/delta) / (alpha - 1) (Mironov 2017,
  "Rényi Differential Privacy", Prop. 3) — the conversion behind Abadi et al.'s and the
  TF Privacy tutorial's published numbers.
* ``"improved"``: epsilon = min_alpha rdp + log1p(-1/alpha) - log(delta * alpha) / (alpha - 1)
  (Canonne, Kamath & Steinke 2020, Prop. 12; Asoodeh et al. 2020), never larger; with the
  Bretagnolle-Huber bound delta >= sqrt(1 - exp(-rdp)) => epsilon = 0. This is what the
  ``dp_accounting`` package reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

Conversion = Literal["classic", "improved"]
# Integer orders: dense where optima usually lie (small epsilon -> large orders).
DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 192, 256, 512, 1024)


def _check_rate_and_sigma(q: float, noise_multiplier: float) -> None:
    if not (isinstance(q, int | float) and 0.0 <= q <= 1.0):
        raise ValueError(f"sampling rate q must be a number in [0, 1], got {q!r}")
    if not (isinstance(noise_multiplier, int | float) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")


def _check_orders(orders: Sequence[int]) -> list[int]:
    out = []
    for a in orders:
        if isinstance(a, bool) or int(a) != a or a < 2:
            raise ValueError(f"RDP orders must be integers >= 2, got {a!r}")
        out.append(int(a))
    if not out:
        raise ValueError("orders is empty; pass integer orders >= 2 (e.g. DEFAULT_ORDERS)")
    return out


def _log_a(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha of the sampled Gaussian mechanism (binomial expansion, log-sum-exp)."""
    log_q, log_1mq = math.log(q), math.log1p(-q)
    terms = [
        math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        + (alpha - k) * log_1mq + k * log_q + (k * k - k) / (2.0 * sigma * sigma)
        for k in range(alpha + 1)
    ]
    top = max(terms)
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


def rdp_subsampled_gaussian(
    q: float, noise_multiplier: float, orders: Sequence[int] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP of ONE step of the Poisson-subsampled Gaussian mechanism at each order.

    Args:
      q: sampling rate in ``[0, 1]``.
      noise_multiplier: Gaussian noise std divided by the L2 sensitivity.
      orders: integer Rényi orders ``>= 2``.

    Returns:
      ``[len(orders)]`` float64 RDP values (``inf`` when ``noise_multiplier == 0 < q``).
    """
    _check_rate_and_sigma(q, noise_multiplier)
    orders = _check_orders(orders)
    if q == 0:
        return np.zeros(len(orders))
    if noise_multiplier == 0:
        return np.full(len(orders), np.inf)
    if q == 1:  # the plain Gaussian mechanism: alpha / (2 sigma^2)
        return np.asarray([a / (2.0 * noise_multiplier**2) for a in orders])
    return np.asarray([_log_a(q, noise_multiplier, a) / (a - 1) for a in orders])


def epsilon_from_rdp(
    orders: Sequence[int], rdp: Sequence[float], delta: float,
    conversion: Conversion = "improved",
) -> tuple[float, int]:
    """The smallest epsilon over ``orders`` for ``delta``, and the order achieving it."""
    orders = _check_orders(orders)
    rdp = np.asarray(rdp, np.float64)
    if rdp.shape != (len(orders),):
        raise ValueError(f"rdp must have one value per order ({len(orders)}), got {rdp.shape}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if conversion not in ("classic", "improved"):
        raise ValueError(f"conversion must be 'classic' or 'improved', got {conversion!r}")
    a = np.asarray(orders, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if conversion == "classic":
            eps = rdp + math.log(1.0 / delta) / (a - 1)
        else:
            eps = rdp + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1)
            # delta >= sqrt(1 - exp(-rdp)) bounds the total variation by delta: epsilon 0.
            eps = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, eps)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), orders[best]


def epsilon_subsampled_gaussian(
    q: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    *,
    orders: Sequence[int] = DEFAULT_ORDERS,
    conversion: Conversion = "improved",
) -> tuple[float, int]:
    """(epsilon, optimal order) after ``steps`` compositions of the subsampled Gaussian."""
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if steps == 0:  # nothing released yet (avoids 0 * inf when noise_multiplier == 0)
        _check_rate_and_sigma(q, noise_multiplier)
        return 0.0, _check_orders(orders)[0]
    rdp = rdp_subsampled_gaussian(q, noise_multiplier, orders) * int(steps)
    return epsilon_from_rdp(orders, rdp, delta, conversion)
