"""Trace-time execution hints set by backends (never part of the numbers computed).

XLA:CPU runs convolutions ~10x slower inside while loops than at top level (measured on the
FEMNIST CNN with jax 0.10.2), so a backend may ask local loops to be unrolled while it traces a
round. The hint is a ContextVar read during tracing only: the compiled program is pure.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_SCAN_UNROLL: contextvars.ContextVar[int | bool] = contextvars.ContextVar(
    "fedjax_lab_scan_unroll", default=1
)


def scan_unroll() -> int | bool:
    """The ``unroll`` argument local-step scans should use while being traced."""
    return _SCAN_UNROLL.get()


@contextlib.contextmanager
def unrolled_local_steps(unroll: int | bool = True) -> Iterator[None]:
    """Trace local-step loops with ``lax.scan(..., unroll=unroll)`` inside this block."""
    token = _SCAN_UNROLL.set(unroll)
    try:
        yield
    finally:
        _SCAN_UNROLL.reset(token)
