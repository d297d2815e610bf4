"""Differential-privacy accounting: an RDP accountant and DP-FedAvg privacy reports."""

from fedjax_lab.privacy.accountant import (
    PrivacyReport,
    dp_accounting_available,
    dp_fedavg_privacy,
    privacy_callback,
)
from fedjax_lab.privacy.rdp import (
    DEFAULT_ORDERS,
    epsilon_from_rdp,
    epsilon_subsampled_gaussian,
    rdp_subsampled_gaussian,
)

__all__ = [
    "DEFAULT_ORDERS",
    "PrivacyReport",
    "dp_accounting_available",
    "dp_fedavg_privacy",
    "epsilon_from_rdp",
    "epsilon_subsampled_gaussian",
    "privacy_callback",
    "rdp_subsampled_gaussian",
]
