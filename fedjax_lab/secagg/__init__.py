"""Secure aggregation: SecAgg (Bonawitz et al., 2017) and SecAgg+ (Bell et al., 2020).

Clients mask fixed-point encodings of their updates with pairwise masks (from X25519 key
agreement) and a self-mask, Shamir-share the secrets behind them, and the server learns only
the sum of the surviving clients' inputs, even when some drop out (up to a threshold).
:func:`with_secure_aggregation` makes any FedAvg-family algorithm aggregate through the real
protocol, run on the host inside the round. Needs the ``cryptography`` package (extra
``secagg``), imported only when a protocol runs.
"""

from fedjax_lab.secagg.aggregate import (
    SECAGG_CLIPPED,
    SECAGG_FAILED,
    secure_sum,
    with_secure_aggregation,
)
from fedjax_lab.secagg.fixedpoint import FixedPoint
from fedjax_lab.secagg.graph import neighbour_graph
from fedjax_lab.secagg.messages import MessageError
from fedjax_lab.secagg.protocol import (
    ROUNDS,
    STAGES,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    default_threshold,
)
from fedjax_lab.secagg.simulation import SecAggResult, new_session, run_protocol

__all__ = [
    "ROUNDS",
    "SECAGG_CLIPPED",
    "SECAGG_FAILED",
    "STAGES",
    "FixedPoint",
    "MessageError",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "SecAggServer",
    "default_threshold",
    "neighbour_graph",
    "new_session",
    "run_protocol",
    "secure_sum",
    "with_secure_aggregation",
]
