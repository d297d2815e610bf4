"""Checks shared by backends, raised before anything is compiled."""

from __future__ import annotations

from fedjax_lab.core.types import Algorithm


def require_additive(algorithm: Algorithm, backend_name: str) -> None:
    """Raises ValueError if ``algorithm``'s aggregate cannot be reduced as a sum.

    Backends that aggregate per shard/rank/chunk and add the partial ``Aggregate``s (psum,
    allreduce, chunked scans) call this: robust rules (median, trimmed mean, Krum) need every
    client's update in one place and give wrong answers when summed piecewise.

    Args:
      algorithm: the algorithm about to be run.
      backend_name: the backend's name, used in the message.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    if not algorithm.additive:
        raise ValueError(
            f"the {backend_name} backend adds partial aggregates (psum/allreduce/chunks), but "
            f"{algorithm.name!r} has a non-additive aggregate (robust rules such as median, "
            "trimmed mean and Krum need every client's update in one place). Run it on the "
            "'vmap' backend without chunk_size."
        )
