"""Core types, randomness and pytree helpers."""

from fedjax_lab.core.local import LocalUpdate
from fedjax_lab.core.losses import correct_predictions, softmax_cross_entropy
from fedjax_lab.core.rng import client_keys, host_rng, round_key
from fedjax_lab.core.tree import tree_all_finite, tree_where
from fedjax_lab.core.types import (
    Aggregate,
    Algorithm,
    Batches,
    ClientOutput,
    Cohort,
    DataSpec,
    Metrics,
    Params,
    PRNGKey,
    PyTree,
    ServerState,
)

__all__ = [
    "Aggregate",
    "Algorithm",
    "Batches",
    "ClientOutput",
    "Cohort",
    "DataSpec",
    "LocalUpdate",
    "Metrics",
    "PRNGKey",
    "Params",
    "PyTree",
    "ServerState",
    "client_keys",
    "correct_predictions",
    "host_rng",
    "round_key",
    "softmax_cross_entropy",
    "tree_all_finite",
    "tree_where",
]
