"""Federated topologies beyond one synchronous server round.

Hierarchical FL (client -> edge -> cloud) and asynchronous buffered FL (FedBuff). Each
topology is one module and runs the library's algorithms (:class:`~fedjax_lab.core.Algorithm`)
at its inner level; this package re-exports their public names.
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
from fedjax_lab.topologies.hierarchical import (
    HierarchicalResult,
    check_grouping,
    random_grouping,
    run_hierarchical,
)

__all__ = [
    "STALENESS_WEIGHTS",
    "ClientTimes",
    "FedBuffResult",
    "HierarchicalResult",
    "check_grouping",
    "constant_staleness",
    "polynomial_staleness",
    "random_grouping",
    "run_fedbuff",
    "run_hierarchical",
    "staleness_weight",
]
