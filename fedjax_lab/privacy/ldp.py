"""(epsilon, delta) of local DP uploads (``fedjax_lab.algorithms.ldp_fedavg``), composed.

Sensitivity model (local DP, replace-one at the client: ANY two local datasets): the client's
clipped update lies in a ball of radius ``C`` (L2 for Gaussian noise, L1 for Laplace noise), so
two inputs differ by at most ``2 C`` in that norm. With noise ``m C`` per coordinate:

* Laplace (Dwork & Roth 2014, Thm. 3.6): one upload is pure ``epsilon_0 = 2 C / (m C) = 2 / m``;
  ``k`` uploads are ``k epsilon_0`` (basic composition, valid for every ``delta``), or the
  tighter ``(epsilon, delta)`` of ``dp_accounting``'s PLD / RDP accountants for
  ``LaplaceDpEvent(m / 2)`` composed ``k`` times.
* Gaussian: one upload is the Gaussian mechanism with noise multiplier ``m / 2``; ``k``
  uploads compose EXACTLY to the Gaussian mechanism with multiplier ``m / (2 sqrt(k))`` (Dong,
  Roth & Su 2022, Cor. 3.3), whose ``epsilon`` is the analytic Gaussian's
  (:func:`fedjax_lab.privacy.gaussian.analytic_gaussian_epsilon`); the RDP accountants give
  ``alpha k / (2 (m/2)^2)`` converted to ``(epsilon, delta)``, slightly larger.

``participations`` is the number of rounds one client uploads in (e.g. ``rounds`` when every
client takes part in every round); local DP gets no amplification from sampling here because a
client's own uploads are what is protected.
"""

from __future__ import annotations

import math

from fedjax_lab.privacy import rdp as rdp_lib
from fedjax_lab.privacy.accountant import (
    GAUSSIAN_PLD_NAME,
    OWN_NAME,
    PLD_NAME,
    RDP_NAME,
    AccountantName,
    PrivacyReport,
    event_epsilon,
    gaussian_event_epsilon,
    resolve_accountant,
)

LDP_SAMPLING = "none: local DP protects each upload; participations compose"


def ldp_round_epsilon(mechanism: str, noise_multiplier: float, delta: float | None = None
                      ) -> float:
    """The ``epsilon`` of ONE upload: ``2 / m`` (Laplace, pure) or the analytic Gaussian's
    ``epsilon(delta)`` for noise multiplier ``m / 2`` (Gaussian; needs ``delta``)."""
    from fedjax_lab.privacy.gaussian import analytic_gaussian_epsilon

    _check(mechanism, noise_multiplier, 1)
    if noise_multiplier == 0:
        return math.inf
    if mechanism == "laplace":
        return 2.0 / noise_multiplier
    if delta is None:
        raise ValueError("the Gaussian mechanism's epsilon needs delta in (0, 1)")
    return analytic_gaussian_epsilon(noise_multiplier / 2.0, delta)


def _check(mechanism: str, noise_multiplier: float, participations: int) -> None:
    if mechanism not in ("gaussian", "laplace"):
        raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
    if isinstance(noise_multiplier, bool) or not (
            isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier)
            and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got "
                         f"{noise_multiplier!r}")
    if isinstance(participations, bool) or not isinstance(participations, int) or (
            participations < 0):
        raise ValueError(f"participations must be an integer >= 0 (rounds one client uploads "
                         f"in), got {participations!r}")


def ldp_privacy(
    *,
    mechanism: str,
    noise_multiplier: float,
    participations: int,
    delta: float,
    accountant: AccountantName = "auto",
) -> PrivacyReport:
    """(epsilon, delta) of one client after ``participations`` local-DP uploads.

    Args:
      mechanism: ``"gaussian"`` or ``"laplace"``.
      noise_multiplier: ``m``: noise std / Laplace scale per coordinate over the clip norm.
      participations: uploads of one client (composition count ``k``).
      delta: target delta in ``(0, 1)``.
      accountant: ``"dp_accounting"`` (RDP), ``"dp_accounting_pld"`` (its PLD accountant for
        Laplace; for Gaussian the exact curve of the one equivalent Gaussian,
        ``dp_accounting.gaussian_mechanism``), ``"rdp"`` (ours: RDP of the Gaussian; basic
        composition of the pure ``2/m`` for Laplace, reported with ``delta = 0``) or ``"auto"``.

    Returns:
      A ``PrivacyReport`` (``rounds`` = participations, ``sampling_rate`` 1).
    """
    _check(mechanism, noise_multiplier, participations)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    which = resolve_accountant(accountant)
    k, m = participations, float(noise_multiplier)
    order, report_delta = math.nan, float(delta)
    if k == 0:
        eps, name = 0.0, OWN_NAME
    elif m == 0:
        eps, name = math.inf, OWN_NAME
    elif which == "rdp":
        name = OWN_NAME
        if mechanism == "laplace":
            eps, report_delta = k * 2.0 / m, 0.0
        else:
            eps, order = rdp_lib.epsilon_subsampled_gaussian(1.0, m / 2.0, k, delta)
    else:
        import dp_accounting

        if mechanism == "gaussian" and which == "dp_accounting_pld":
            # k Gaussian uploads are one Gaussian with multiplier m / (2 sqrt(k)), exactly.
            eps, order = gaussian_event_epsilon(m / (2.0 * math.sqrt(k)), delta, which)
            name = GAUSSIAN_PLD_NAME
        else:
            base = (dp_accounting.GaussianDpEvent(m / 2.0) if mechanism == "gaussian"
                    else dp_accounting.LaplaceDpEvent(m / 2.0))
            eps, order = event_epsilon(dp_accounting.SelfComposedDpEvent(base, k), delta, which)
            name = RDP_NAME if which == "dp_accounting" else PLD_NAME
    return PrivacyReport(epsilon=float(eps), delta=report_delta, noise_multiplier=m,
                         sampling_rate=1.0, rounds=k, order=float(order), accountant=name,
                         sampling=LDP_SAMPLING)
