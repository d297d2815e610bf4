"""Federated topologies beyond one server and its clients (hierarchical, ...).

Each topology runs any :class:`~fedjax_lab.core.Algorithm` of the library at its inner level.
"""

from fedjax_lab.topologies.hierarchical import (
    HierarchicalResult,
    check_grouping,
    random_grouping,
    run_hierarchical,
)

__all__ = [
    "HierarchicalResult",
    "check_grouping",
    "random_grouping",
    "run_hierarchical",
]
