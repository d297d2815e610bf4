"""fedjax_lab: federated-learning research in JAX with pure-function algorithms.

The public API is what this module and each subpackage's ``__init__`` re-export
(``tests/test_public_api.py`` pins it). MPI and edge backends are imported from their modules
(``fedjax_lab.backends.mpi``, ``fedjax_lab.backends.edge``) because importing them starts MPI or
needs gRPC.
"""

from fedjax_lab import (
    algorithms,
    attacks,
    backends,
    compressors,
    core,
    data,
    models,
    privacy,
    systems,
    topologies,
)
from fedjax_lab.core.types import (
    Aggregate,
    Algorithm,
    Batches,
    ClientOutput,
    Cohort,
    DataSpec,
    ServerState,
)
from fedjax_lab.runner import ClientStateStore, RunResult, run

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "Algorithm",
    "Batches",
    "ClientOutput",
    "ClientStateStore",
    "Cohort",
    "DataSpec",
    "RunResult",
    "ServerState",
    "__version__",
    "algorithms",
    "attacks",
    "backends",
    "compressors",
    "core",
    "data",
    "models",
    "privacy",
    "run",
    "systems",
    "topologies",
]
