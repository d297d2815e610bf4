"""Backends that run an ``Algorithm``'s rounds (vmap simulation, ...)."""

from fedjax_lab.backends.vmap import PLANS, VmapBackend

__all__ = ["PLANS", "VmapBackend"]
