"""Secure aggregation as an algorithm's aggregate: the real protocol, run on the host.

:func:`with_secure_aggregation` replaces an additive algorithm's ``update_sum``/``weight_sum``
by the output of a full SecAgg (Bonawitz et al., 2017) or SecAgg+ (Bell et al., 2020) round
over the cohort's valid clients: each client's input is the fixed-point code of ``[w_i * u_i,
w_i]`` (its weighted contribution and its weight, so the server still divides the weighted sum
by the total weight), and the server's result is decoded. The protocol runs inside the jitted
round through ``jax.pure_callback``: masks cancel exactly, so the result is a deterministic
function of the inputs although the keys are fresh random draws each round.

Each round checks that the unmasked sum equals the plain sum of the clients' codes mod
``2^bits`` exactly (integers); the decoded sum then differs from the float sum by at most
``n * resolution / 2`` per coordinate. Coordinates beyond ``fixed_point.bound`` are clipped and
counted in the round metric ``secagg_clipped``. Client metrics (loss sums, bits) stay plain
sums: only the update and the weight are protected.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.algorithms.robust import client_contributions
from fedjax_lab.core.types import Aggregate, Algorithm, ClientOutput
from fedjax_lab.secagg.fixedpoint import FixedPoint
from fedjax_lab.secagg.protocol import SecAggConfig, default_threshold
from fedjax_lab.secagg.simulation import new_session, run_protocol

SECAGG_CLIPPED = "secagg_clipped"  # coordinates clipped to ±bound this round (all clients)
SECAGG_FAILED = "secagg_failed"  # 1 if the protocol could not run (fewer than min_clients)


def _threshold(holders: int, fraction: float | None) -> int:
    if fraction is None:
        return default_threshold(holders)
    return max(default_threshold(holders), min(holders, math.ceil(fraction * holders)))


def secure_sum(
    vectors: np.ndarray,
    fixed_point: FixedPoint,
    *,
    neighbours: int | None = None,
    threshold_fraction: float | None = None,
) -> tuple[np.ndarray, int, dict]:
    """Sums the rows of ``vectors [n, D]`` through one real SecAgg/SecAgg+ round.

    Returns ``(decoded_sum float64[D], num_clipped, info)``; ``info`` holds the result's
    ``bytes_per_client`` and ``rounds``. Raises RuntimeError if the unmasked sum is not the
    plain sum of the codes (it cannot be, unless the protocol is broken).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    n, dim = vectors.shape
    codes, clipped = {}, 0
    for i in range(n):
        codes[i], c = fixed_point.encode(vectors[i], clip=True)
        clipped += c
    k = neighbours if neighbours is not None and neighbours < n - 1 else None
    holders = n if k is None else k + 1
    config = SecAggConfig(
        num_clients=n, dim=dim, fixed_point=fixed_point,
        threshold=_threshold(holders, threshold_fraction), neighbours=k,
        graph_seed=int.from_bytes(new_session()[:8], "little"), session=new_session(),
    )
    result = run_protocol(config, codes)
    plain = fixed_point.reduce(np.sum(np.stack(list(codes.values())), axis=0, dtype=np.uint64))
    if len(result.survivors) != n or not np.array_equal(result.total, plain):
        raise RuntimeError("secure aggregation: the unmasked sum differs from the plain sum of "
                           "the clients' codes")
    return fixed_point.decode(result.total), clipped, {
        "bytes_per_client": result.bytes_per_client(), "rounds": result.rounds}


def with_secure_aggregation(
    algorithm: Algorithm,
    fixed_point: FixedPoint,
    *,
    neighbours: int | None = None,
    threshold_fraction: float | None = None,
    min_clients: int = 2,
) -> Algorithm:
    """Returns ``algorithm`` aggregating its weighted updates through SecAgg / SecAgg+.

    Args:
      algorithm: an additive algorithm whose aggregate is ``sum_i w_i u_i`` (FedAvg family).
      fixed_point: the code; ``bound`` must cover ``|w_i u_i|`` and ``w_i`` (example counts
        when weighting by examples), and ``bits`` the sum of the cohort
        (``FixedPoint.check_capacity``).
      neighbours: ``None`` for SecAgg, an even ``k`` for SecAgg+ (Bell et al., 2020).
      threshold_fraction: ``t = ceil(fraction * holders)``, at least a strict majority
        (default: the strict majority).
      min_clients: a round with fewer valid clients does not run the protocol (one client's
        "sum" would be its update): it contributes nothing and sets ``secagg_failed = 1``.

    Returns:
      An ``Algorithm`` with ``additive=False``: the protocol must run over the whole cohort at
      once (per-chunk or per-shard runs would reveal partial sums), so chunked, sharded and MPI
      backends refuse it; the ``vmap`` backend (any plan, no ``chunk_size``) runs it.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    if not algorithm.additive:
        raise ValueError(f"{algorithm.name} has a non-additive aggregate; secure aggregation "
                         "computes a sum, so wrap the plain algorithm")
    fixed_point.validate()
    if neighbours is not None and (not isinstance(neighbours, int) or neighbours < 2
                                   or neighbours % 2):
        raise ValueError(f"neighbours must be None (SecAgg) or an even integer >= 2 (SecAgg+), "
                         f"got {neighbours!r}")
    if threshold_fraction is not None and not 0.5 < threshold_fraction <= 1:
        raise ValueError(f"threshold_fraction must be in (0.5, 1], got {threshold_fraction!r}")
    if not isinstance(min_clients, int) or min_clients < 2:
        raise ValueError(f"min_clients must be an integer >= 2, got {min_clients!r}")

    def host(x, valid):
        x, valid = np.asarray(x), np.asarray(valid)
        rows = x[valid]
        if len(rows) < min_clients:
            return np.zeros(x.shape[1], np.float32), np.int32(0), np.int32(1)
        fixed_point.check_capacity(len(rows))
        total, clipped, _ = secure_sum(rows, fixed_point, neighbours=neighbours,
                                       threshold_fraction=threshold_fraction)
        return total.astype(np.float32), np.int32(clipped), np.int32(0)

    def aggregate(outputs: ClientOutput) -> Aggregate:
        # Every slot could be valid: refuse, while tracing, a ring the cohort's sum can wrap.
        fixed_point.check_capacity(outputs.weight.shape[0])
        base = algorithm.aggregate(outputs)
        contrib = client_contributions(algorithm, outputs)
        leaves, treedef = jax.tree.flatten(contrib)
        c = outputs.weight.shape[0]
        w = outputs.weight.astype(jnp.float32)
        valid = outputs.weight > 0
        flat = jnp.concatenate([x.reshape(c, -1).astype(jnp.float32) for x in leaves], axis=1)
        # Invalid rows never reach the protocol; zero them so NaN cannot travel to the host.
        x = jnp.where(valid[:, None], jnp.concatenate([flat * w[:, None], w[:, None]], 1), 0.0)
        out_shape = (jax.ShapeDtypeStruct((x.shape[1],), jnp.float32),
                     jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
        total, clipped, failed = jax.pure_callback(host, out_shape, x, valid,
                                                   vmap_method="sequential")
        sums, start = [], 0
        for leaf in leaves:
            size = math.prod(leaf.shape[1:])
            sums.append(total[start : start + size].reshape(leaf.shape[1:]).astype(leaf.dtype))
            start += size
        metric_sums = {**base.metric_sums, SECAGG_CLIPPED: clipped, SECAGG_FAILED: failed}
        return base._replace(update_sum=jax.tree.unflatten(treedef, sums),
                             weight_sum=total[-1].astype(base.weight_sum.dtype),
                             metric_sums=metric_sums)

    def server_update(state, agg: Aggregate):
        new_state, metrics = algorithm.server_update(state, agg)
        return new_state, {**metrics, SECAGG_CLIPPED: agg.metric_sums[SECAGG_CLIPPED],
                           SECAGG_FAILED: agg.metric_sums[SECAGG_FAILED]}

    name = algorithm.name + ("+secagg" if neighbours is None else f"+secagg+k{neighbours}")
    return algorithm._replace(aggregate=aggregate, server_update=server_update, name=name,
                              additive=False)

