"""DP-FedAvg privacy reports: which accountant, agreement, validation."""

import dp_accounting
import pytest

from fedjax_lab.privacy import dp_accounting_available, dp_fedavg_privacy
from fedjax_lab.privacy.rdp import epsilon_subsampled_gaussian

ARGS = {"noise_multiplier": 1.0, "clients_per_round": 10, "num_clients": 500, "rounds": 200,
        "delta": 1e-3}


def test_auto_uses_dp_accounting_when_importable():
    assert dp_accounting_available()
    report = dp_fedavg_privacy(**ARGS)
    assert report.accountant == "dp_accounting.rdp.RdpAccountant"
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        0.02, dp_accounting.GaussianDpEvent(1.0)), 200)
    assert report.epsilon == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-12)
    assert report.sampling_rate == 0.02 and report.rounds == 200


def test_own_accountant_agrees_with_dp_accounting():
    ours = dp_fedavg_privacy(**ARGS, accountant="rdp")
    google = dp_fedavg_privacy(**ARGS, accountant="dp_accounting")
    assert ours.accountant == "fedjax_lab.privacy.rdp"
    direct, order = epsilon_subsampled_gaussian(0.02, 1.0, 200, 1e-3)
    assert ours.epsilon == direct and ours.order == order
    # Same RDP curve on different order grids: theirs adds fractional orders below 11 where
    # this optimum lies (order 6 vs 6.2), so ours is slightly larger, by the grid resolution.
    assert google.epsilon <= ours.epsilon <= 1.005 * google.epsilon


def test_more_rounds_cost_more_privacy():
    few = dp_fedavg_privacy(**{**ARGS, "rounds": 10})
    many = dp_fedavg_privacy(**ARGS)
    assert 0 < few.epsilon < many.epsilon
    assert dp_fedavg_privacy(**{**ARGS, "rounds": 0}).epsilon == 0.0


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"clients_per_round": 0}, "clients_per_round must be a positive integer"),
        ({"clients_per_round": 600}, "sampling rate would exceed 1"),
        ({"rounds": -1}, "rounds must be an integer >= 0"),
        ({"delta": 1.0}, "delta must be in"),
        ({"noise_multiplier": -0.5}, "noise_multiplier must be a number >= 0"),
        ({"accountant": "moments"}, "accountant must be"),
    ],
    ids=["cpr0", "cpr_gt_n", "rounds", "delta", "z", "accountant"],
)
def test_bad_input_raises(override, match):
    with pytest.raises(ValueError, match=match):
        dp_fedavg_privacy(**{**ARGS, **override})


def test_auto_falls_back_to_own_accountant_without_dp_accounting(monkeypatch):
    from fedjax_lab.privacy import accountant as accountant_lib

    monkeypatch.setattr(accountant_lib, "dp_accounting_available", lambda: False)
    report = accountant_lib.dp_fedavg_privacy(**ARGS)
    assert report.accountant == "fedjax_lab.privacy.rdp"
    with pytest.raises(ValueError, match="dp_accounting package is not installed"):
        accountant_lib.dp_fedavg_privacy(**ARGS, accountant="dp_accounting")
