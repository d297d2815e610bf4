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
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Literal, NamedTuple

from fedjax_lab.privacy import rdp as rdp_lib

AccountantName = Literal["auto", "dp_accounting", "rdp"]


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


def _dp_accounting_epsilon(q: float, z: float, rounds: int, delta: float) -> tuple[float, float]:
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds)
    eps, order = accountant.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


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
      accountant: ``"dp_accounting"``, ``"rdp"`` (ours) or ``"auto"`` (``dp_accounting`` when
        importable, else ours).
    """
    if accountant not in ("auto", "dp_accounting", "rdp"):
        raise ValueError(
            f"accountant must be 'auto', 'dp_accounting' or 'rdp', got {accountant!r}"
        )
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
    if accountant == "dp_accounting" and not dp_accounting_available():
        raise ValueError(
            "accountant='dp_accounting' but the dp_accounting package is not installed; "
            "pip install dp-accounting or use accountant='rdp'"
        )
    use_google = accountant == "dp_accounting" or (
        accountant == "auto" and dp_accounting_available()
    )
    if use_google and rounds > 0 and noise_multiplier > 0:
        eps, order = _dp_accounting_epsilon(q, float(noise_multiplier), rounds, delta)
        name = "dp_accounting.rdp.RdpAccountant"
    else:
        eps, order = rdp_lib.epsilon_subsampled_gaussian(
            q, float(noise_multiplier), rounds, delta
        )
        name = "fedjax_lab.privacy.rdp"
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
