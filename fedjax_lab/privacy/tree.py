"""(epsilon, delta) of DP-FTRL's tree aggregation (``fedjax_lab.algorithms.dp_ftrl``).

Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling or Shuffling"
(ICML), Sec. 4 and Appendix D. Over ``T`` rounds the tree has ``D = ceil(log2(T + 1))`` levels
and every round's contribution enters exactly one node per level. Neighbouring runs differ in
one client's updates, replaced by zeros (the denominator is fixed; ``dp_accounting``'s
``REPLACE_SPECIAL`` relation); each update has L2 norm ``<= C`` and each node has noise std
``z C``. If the client contributes to ``k`` rounds, a node at level ``l`` holds at most
``min(k, 2^l)`` of them, so the squared L2 sensitivity of all node releases is at most

    S^2 = sum_{l=0}^{D-1} ( floor(k / 2^l) 4^l + (k mod 2^l)^2 ) C^2      (= D C^2 for k = 1)

(per level, the participations packed into as few nodes as possible; rounds ``1..k`` reach it when
the tree is large enough, so it is the worst case, not a loose bound). The node releases are an
adaptive composition of Gaussian mechanisms, which is exactly the Gaussian mechanism with noise
multiplier ``z C / S`` (Dong, Roth & Su 2022, Cor. 3.3), so: RDP ``alpha S^2 / (2 z^2 C^2)`` — for
``k = 1`` this is ``dp_accounting``'s ``SingleEpochTreeAggregationDpEvent(z, T)``, used then — and
the exact analytic-Gaussian ``epsilon`` (``"dp_accounting_pld"``: the exact privacy-loss curve of
one Gaussian, ``dp_accounting.gaussian_mechanism``). No sampling amplification is
claimed: a client's contributions count whatever the cohort sampling was. Tree restarts are not
modelled (one tree over the whole run).
"""

from __future__ import annotations

import math

from fedjax_lab.privacy import rdp as rdp_lib
from fedjax_lab.privacy.accountant import (
    GAUSSIAN_PLD_NAME,
    OWN_NAME,
    RDP_NAME,
    AccountantName,
    PrivacyReport,
    event_epsilon,
    gaussian_event_epsilon,
    resolve_accountant,
)

TREE_SAMPLING = "none: tree aggregation, no sampling amplification"


def tree_depth(rounds: int) -> int:
    """``D = ceil(log2(rounds + 1))``: levels of the binary tree over ``rounds`` leaves."""
    return int(rounds).bit_length()


def tree_sensitivity_squared(rounds: int, participations: int) -> int:
    """``S^2 / C^2``: the worst-case squared L2 sensitivity of all node releases of a tree over
    ``rounds`` rounds for a client in ``participations`` of them (module docstring)."""
    k = min(participations, rounds)
    return sum((k >> level) * 4**level + (k % 2**level) ** 2 for level in range(tree_depth(rounds)))


def dp_ftrl_privacy(
    *,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    participations: int = 1,
    accountant: AccountantName = "auto",
) -> PrivacyReport:
    """(epsilon, delta) of a client after ``rounds`` rounds of DP-FTRL.

    Args:
      noise_multiplier: ``z``; each tree node's noise std is ``z C``.
      rounds: rounds released so far (``T``).
      delta: target delta in ``(0, 1)``.
      participations: the most rounds one client contributes to (``k``; ``rounds`` when every
        client may be in every round).
      accountant: ``"dp_accounting"`` (RDP; the tree event for ``k = 1``),
        ``"dp_accounting_pld"``, ``"rdp"`` (ours) or ``"auto"``.

    Returns:
      A ``PrivacyReport``; ``noise_multiplier`` is the EFFECTIVE one, ``z C / S``.
    """
    z = noise_multiplier
    if isinstance(z, bool) or not (isinstance(z, int | float) and math.isfinite(z) and z >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
    for name, value, low in (("rounds", rounds, 0), ("participations", participations, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    which = resolve_accountant(accountant)
    sens2 = tree_sensitivity_squared(rounds, participations)
    effective = z / math.sqrt(sens2) if sens2 else math.inf
    order = math.nan
    if rounds == 0:
        eps, name = 0.0, OWN_NAME
    elif z == 0:
        eps, name = math.inf, OWN_NAME
    elif which == "rdp":
        eps, order = rdp_lib.epsilon_subsampled_gaussian(1.0, effective, 1, delta)
        name = OWN_NAME
    else:
        import dp_accounting

        if which == "dp_accounting" and participations == 1:
            event = dp_accounting.SingleEpochTreeAggregationDpEvent(float(z), rounds)
            eps, order = event_epsilon(event, delta, which, replace_special=True)
        else:
            eps, order = gaussian_event_epsilon(effective, delta, which)
        name = RDP_NAME if which == "dp_accounting" else GAUSSIAN_PLD_NAME
    return PrivacyReport(epsilon=float(eps), delta=float(delta), noise_multiplier=effective,
                         sampling_rate=1.0, rounds=rounds, order=float(order), accountant=name,
                         sampling=TREE_SAMPLING)
