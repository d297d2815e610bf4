"""CPU-only edge clients talking to a server over gRPC (DESIGN.md "Backends").

See :mod:`.server` (the service and the ``EdgeBackend``), :mod:`.client` (a client process),
:mod:`.protocol` (framing, authentication, limits), :mod:`.secagg` (SecAgg over the wire)
and ``python -m fedjax_lab.backends.edge``.
The exports are imported lazily so that :mod:`.protocol` (numpy only) loads without JAX.
"""

import importlib
from typing import Any

_EXPORTS = {
    "EdgeBackend": "server",
    "EdgeProblem": "_common",
    "EdgeServer": "server",
    "EdgeWorker": "client",
    "SecureAggregation": "secagg",
    "WorkerLauncher": "server",
    "run_client": "client",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
