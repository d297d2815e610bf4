"""Backends that run an ``Algorithm``'s rounds (vmap simulation, ...)."""

from fedjax_lab.backends.sharded import ShardedBackend
from fedjax_lab.backends.vmap import PLANS, VmapBackend

# MpiBackend is imported from fedjax_lab.backends.mpi explicitly: importing mpi4py initialises MPI.
# EdgeBackend lives in fedjax_lab.backends.edge (gRPC server + client processes), imported on use.
__all__ = ["PLANS", "ShardedBackend", "VmapBackend"]
