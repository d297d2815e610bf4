"""Backends that run an ``Algorithm``'s rounds (vmap simulation, ...).

Every backend implements the :class:`Backend` protocol (``fedjax_lab.runner.run`` checks it with
:func:`check_backend`); single-process backends subclass :class:`SingleProcessBackend`.
"""

from fedjax_lab.backends._checks import require_additive
from fedjax_lab.backends.base import Backend, ProgramCache, SingleProcessBackend, check_backend
from fedjax_lab.backends.sharded import ShardedBackend
from fedjax_lab.backends.vmap import PLANS, VmapBackend

# MpiBackend is imported from fedjax_lab.backends.mpi explicitly: importing mpi4py initialises MPI.
# EdgeBackend lives in fedjax_lab.backends.edge (gRPC server + client processes), imported on use.
__all__ = [
    "PLANS",
    "Backend",
    "ProgramCache",
    "ShardedBackend",
    "SingleProcessBackend",
    "VmapBackend",
    "check_backend",
    "require_additive",
]
