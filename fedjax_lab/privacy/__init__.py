"""Differential-privacy accounting: RDP/PLD accountants and privacy reports of DP-FedAvg
(fixed or adaptive clipping), local DP and DP-FTRL."""

from fedjax_lab.privacy.accountant import (
    ACCOUNTANTS,
    PrivacyReport,
    dp_accounting_available,
    dp_fedavg_privacy,
    event_epsilon,
    privacy_callback,
    resolve_accountant,
)
from fedjax_lab.privacy.gaussian import analytic_gaussian_epsilon
from fedjax_lab.privacy.ldp import ldp_privacy, ldp_round_epsilon
from fedjax_lab.privacy.rdp import (
    DEFAULT_ORDERS,
    epsilon_from_rdp,
    epsilon_subsampled_gaussian,
    rdp_subsampled_gaussian,
)
from fedjax_lab.privacy.tree import dp_ftrl_privacy, tree_depth, tree_sensitivity_squared

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "PrivacyReport",
    "analytic_gaussian_epsilon",
    "dp_accounting_available",
    "dp_fedavg_privacy",
    "dp_ftrl_privacy",
    "epsilon_from_rdp",
    "epsilon_subsampled_gaussian",
    "event_epsilon",
    "ldp_privacy",
    "ldp_round_epsilon",
    "privacy_callback",
    "rdp_subsampled_gaussian",
    "resolve_accountant",
    "tree_depth",
    "tree_sensitivity_squared",
]
