"""(epsilon, delta) of DP-FedAvg runs from an RDP accountant.

DP-FedAvg (McMahan et al. 2018) releases one Gaussian-noised sum of clipped client updates per
round, with noise std ``z * S`` for clip norm ``S``: the Gaussian mechanism with noise multiplier
``z``, applied to a sample of the population. Rounds compose. The accountant treats client
sampling as Poisson with rate ``q = clients_per_round / num_clients`` (the analysis of McMahan
et al. 2018 and of ``tf_privacy.compute_dp_sgd_privacy``); our runner samples a FIXED number of
clients uniformly without replacement, for which this is the standard approximation rather than
a proof (see the "How to DP-fy ML" guide, Sec. 5.6), and the report says so in
``sampling``.

Two accountants compute the same RDP quantity: the ``dp_accounting`` package (Google's
``RdpAccountant``, used when it is importable) and our own :mod:`fedjax_lab.privacy.rdp`
(integer orders), which the tests check against published values and against ``dp_accounting``.
``accountant="dp_accounting_pld"`` uses ``dp_accounting``'s privacy-loss-distribution
accountant instead (Koskela et al. 2020; Doroshenko et al. 2022, "Connect the Dots"), which is
tighter than any RDP conversion. :func:`event_epsilon` runs any ``dp_accounting`` event through
either, for the other mechanisms (:mod:`fedjax_lab.privacy.ldp`, :mod:`fedjax_lab.privacy.tree`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

from fedjax_lab.privacy import rdp as rdp_lib

AccountantName = Literal["auto", "dp_accounting", "dp_accounting_pld", "rdp"]
ACCOUNTANTS = ("auto", "dp_accounting", "dp_accounting_pld", "rdp")
RDP_NAME = "dp_accounting.rdp.RdpAccountant"
PLD_NAME = "dp_accounting.pld.PLDAccountant"
GAUSSIAN_PLD_NAME = "dp_accounting.gaussian_mechanism"
OWN_NAME = "fedjax_lab.privacy.rdp"


class PrivacyReport(NamedTuple):
    """The privacy guarantee of a DP-FedAvg run (user-level, add-or-remove one client)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sampling_rate: float
    rounds: int
    order: float
    accountant: str
    sampling: str = "poisson (approximates fixed-size uniform sampling)"

    def as_dict(self) -> dict[str, float | int | str]:
        return self._asdict()


def dp_accounting_available() -> bool:
    """Whether Google's ``dp_accounting`` package can be imported."""
    return importlib.util.find_spec("dp_accounting") is not None


def resolve_accountant(accountant: str) -> str:
    """``"dp_accounting"`` (its RDP), ``"dp_accounting_pld"`` or ``"rdp"`` (ours) for a name;
    ``"auto"`` is ``dp_accounting``'s RDP when importable, else ours.

    Raises:
      ValueError: an unknown name, or a ``dp_accounting`` one without the package.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be 'auto', 'dp_accounting', 'dp_accounting_pld' or "
                         f"'rdp', got {accountant!r}")
    if accountant == "auto":
        return "dp_accounting" if dp_accounting_available() else "rdp"
    if accountant != "rdp" and not dp_accounting_available():
        raise ValueError(
            f"accountant={accountant!r} but the dp_accounting package is not installed; "
            "pip install dp-accounting or use accountant='rdp'"
        )
    return accountant


def event_epsilon(event: object, delta: float, accountant: str, *,
                  replace_special: bool = False) -> tuple[float, float]:
    """``(epsilon, optimal order)`` of a ``dp_accounting`` ``DpEvent`` at ``delta``.

    Args:
      event: e.g. ``SelfComposedDpEvent(GaussianDpEvent(z), rounds)``.
      delta: target delta in ``(0, 1)``.
      accountant: ``"dp_accounting"`` (RDP) or ``"dp_accounting_pld"`` (PLD; order is NaN).
      replace_special: use the ``REPLACE_SPECIAL`` neighbouring relation (replace one record
        by a special zero record), which tree aggregation requires; else add-or-remove-one.
    """
    import dp_accounting

    relation = (dp_accounting.NeighboringRelation.REPLACE_SPECIAL if replace_special
                else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    if accountant == "dp_accounting_pld":
        pld = dp_accounting.pld.PLDAccountant(neighboring_relation=relation)
        pld.compose(event)
        return float(pld.get_epsilon(delta)), math.nan
    rdp = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    rdp.compose(event)
    eps, order = rdp.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


def gaussian_event_epsilon(noise_multiplier: float, delta: float, accountant: str
                           ) -> tuple[float, float]:
    """``(epsilon, order)`` of ONE Gaussian mechanism with ``noise_multiplier`` (the whole
    release of local DP with Gaussian noise, or of a DP-FTRL tree).

    ``"dp_accounting_pld"``: its exact privacy-loss curve, ``dp_accounting.gaussian_mechanism.
    get_epsilon_gaussian`` (what the PLD accountant discretises; the discretised PLD of a
    noise multiplier far below 1 takes minutes). ``"dp_accounting"``: its RDP accountant.
    """
    import dp_accounting

    if accountant == "dp_accounting_pld":
        from dp_accounting import gaussian_mechanism

        return float(gaussian_mechanism.get_epsilon_gaussian(noise_multiplier, delta)), math.nan
    return event_epsilon(dp_accounting.GaussianDpEvent(noise_multiplier), delta, accountant)


def _dp_accounting_epsilon(q: float, z: float, rounds: int, delta: float,
                           accountant: str = "dp_accounting") -> tuple[float, float]:
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return event_epsilon(event, delta, accountant)


def dp_fedavg_privacy(
    *,
    noise_multiplier: float,
    clients_per_round: int,
    num_clients: int,
    rounds: int,
    delta: float,
    accountant: AccountantName = "auto",
) -> PrivacyReport:
    """(epsilon, delta) after ``rounds`` rounds of DP-FedAvg.

    Args:
      noise_multiplier: ``z``; the noise std on the sum is ``z * clip_norm``.
      clients_per_round: expected clients per round (the fixed denominator).
      num_clients: population size; ``q = clients_per_round / num_clients``.
      rounds: rounds run so far.
      delta: target delta in (0, 1), e.g. below ``1 / num_clients``.
      accountant: ``"dp_accounting"`` (its RDP), ``"dp_accounting_pld"``, ``"rdp"`` (ours) or
        ``"auto"`` (``dp_accounting``'s RDP when importable, else ours). The same report serves
        DP-FedAvg with adaptive clipping (``fedjax_lab.algorithms.dp_fedavg_adaptive``) with
        its OVERALL noise multiplier (Andrew et al. 2021, Sec. 3.1).
    """
    if accountant not in ACCOUNTANTS:
        resolve_accountant(accountant)  # the error naming the choices
    for name, value in (("clients_per_round", clients_per_round), ("num_clients", num_clients)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if clients_per_round > num_clients:
        raise ValueError(
            f"clients_per_round={clients_per_round} > num_clients={num_clients}; the sampling "
            "rate would exceed 1"
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not isinstance(noise_multiplier, int | float) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    q = clients_per_round / num_clients
    which = resolve_accountant(accountant)
    if which != "rdp" and rounds > 0 and noise_multiplier > 0:
        eps, order = _dp_accounting_epsilon(q, float(noise_multiplier), rounds, delta, which)
        name = RDP_NAME if which == "dp_accounting" else PLD_NAME
    else:
        eps, order = rdp_lib.epsilon_subsampled_gaussian(
            q, float(noise_multiplier), rounds, delta
        )
        name = OWN_NAME
    return PrivacyReport(
        epsilon=eps,
        delta=float(delta),
        noise_multiplier=float(noise_multiplier),
        sampling_rate=q,
        rounds=rounds,
        order=float(order),
        accountant=name,
    )


def privacy_callback(
    *,
    noise_multiplier: float,
    clients_per_round: int,
    num_clients: int,
    delta: float,
    accountant: AccountantName = "auto",
) -> Callable[[int, dict[str, float]], None]:
    """A ``runner.run`` callback adding ``dp_epsilon`` and ``dp_delta`` to every round record.

    Put it before writers in ``callbacks`` so the written records include the budget spent
    after rounds ``0..r`` (absolute round index, so resumed runs account for earlier rounds).
    """
    dp_fedavg_privacy(  # validate now, not after the first round
        noise_multiplier=noise_multiplier, clients_per_round=clients_per_round,
        num_clients=num_clients, rounds=0, delta=delta, accountant=accountant,
    )

    def callback(round_idx: int, record: dict[str, float]) -> None:
        report = dp_fedavg_privacy(
            noise_multiplier=noise_multiplier, clients_per_round=clients_per_round,
            num_clients=num_clients, rounds=round_idx + 1, delta=delta, accountant=accountant,
        )
        record["dp_epsilon"] = report.epsilon
        record["dp_delta"] = report.delta

    return callback
