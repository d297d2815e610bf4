"""Federated algorithms as pure functions (DESIGN.md ``Algorithm``)."""

from fedjax_lab.algorithms.fedavg import fedavg

__all__ = ["fedavg"]
