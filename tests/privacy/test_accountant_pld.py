"""The PLD accountant option and the fallback of the new accountants without dp_accounting."""

import math

import dp_accounting
import pytest

from fedjax_lab.privacy import analytic_gaussian_epsilon, dp_fedavg_privacy

ARGS = {"noise_multiplier": 2.0, "clients_per_round": 10, "num_clients": 500, "rounds": 50,
        "delta": 1e-5}


def test_dp_fedavg_pld_is_dp_accountings_pld_and_tighter_than_rdp():
    pld = dp_fedavg_privacy(**ARGS, accountant="dp_accounting_pld")
    rdp = dp_fedavg_privacy(**ARGS, accountant="dp_accounting")
    assert pld.accountant == "dp_accounting.pld.PLDAccountant" and math.isnan(pld.order)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(2.0)), 50)
    assert pld.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert 0 < pld.epsilon < rdp.epsilon


def test_full_participation_pld_is_the_analytic_gaussian():
    # q = 1: T rounds of the Gaussian mechanism = one Gaussian with multiplier z / sqrt(T).
    args = {**ARGS, "noise_multiplier": 5.0, "clients_per_round": 500, "rounds": 20}
    pld = dp_fedavg_privacy(**args, accountant="dp_accounting_pld")
    assert pld.epsilon == pytest.approx(analytic_gaussian_epsilon(5.0 / math.sqrt(20), 1e-5),
                                        rel=2e-3)


def test_new_accountants_fall_back_to_own_without_dp_accounting(monkeypatch):
    from fedjax_lab.privacy import accountant as accountant_lib
    from fedjax_lab.privacy import ldp_privacy
    from fedjax_lab.privacy.tree import dp_ftrl_privacy

    monkeypatch.setattr(accountant_lib, "dp_accounting_available", lambda: False)
    tree = dp_ftrl_privacy(noise_multiplier=2.0, rounds=100, delta=1e-5)
    local = ldp_privacy(mechanism="laplace", noise_multiplier=4.0, participations=3,
                        delta=1e-5)
    assert tree.accountant == local.accountant == "fedjax_lab.privacy.rdp"
    assert local.epsilon == pytest.approx(1.5) and local.delta == 0.0
    with pytest.raises(ValueError, match="dp_accounting package is not installed"):
        dp_fedavg_privacy(**ARGS, accountant="dp_accounting_pld")
