"""Federated topologies beyond one synchronous server round: asynchronous buffered FL (FedBuff).

Each topology is one module; this package re-exports their public names.
"""

from fedjax_lab.topologies.fedbuff import (
    STALENESS_WEIGHTS,
    ClientTimes,
    FedBuffResult,
    constant_staleness,
    polynomial_staleness,
    run_fedbuff,
    staleness_weight,
)

__all__ = [
    "STALENESS_WEIGHTS",
    "ClientTimes",
    "FedBuffResult",
    "constant_staleness",
    "polynomial_staleness",
    "run_fedbuff",
    "staleness_weight",
]
