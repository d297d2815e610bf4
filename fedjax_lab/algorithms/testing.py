"""Shared contract checker for federated :class:`~fedjax_lab.core.types.Algorithm` objects.

Every algorithm's test calls :func:`check_algorithm` (as every compressor's test calls
:func:`fedjax_lab.compressors.testing.check_compressor`), and so should a researcher's own
algorithm: the contract below is what the backends, the runner and the experiment summary rely
on, and breaking it gives wrong numbers, not errors.
"""

from __future__ import annotations

import collections
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.algorithms.kit import CLIENT_METRICS, CLIENTS, REJECTED, ROUND_METRICS
from fedjax_lab.backends.base import ClientStateStore
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.backends.sharded import ShardedBackend
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core.local import is_local_update
from fedjax_lab.core.types import Algorithm, Batches, ClientOutput, ServerState
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.runner import run

# Round-record fields that describe how a backend laid a round out, not what it computed.
_LAYOUT_FIELDS = frozenset({"round_seconds", "computed_steps", "packed_slots"})


def _close(got: Any, want: Any, what: str, atol: float) -> None:
    try:
        chex.assert_trees_all_close(got, want, rtol=atol, atol=atol)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def _client(cohort: Any, i: int) -> Batches:
    return Batches({k: jnp.asarray(v[i]) for k, v in cohort.arrays.items()},
                   jnp.asarray(cohort.mask[i]), jnp.asarray(cohort.weight[i]))


def _padded(batches: Batches, extra_steps: int, extra_batch: int) -> Batches:
    """``batches`` with more steps and a larger batch whose new positions are masked out.

    The new positions hold copies of the client's first example, not zeros: in a real round a
    padded position reads some other example (row 0 of the device table).
    """

    def pad(x):
        filler = jnp.broadcast_to(
            x[0, 0], (x.shape[0] + extra_steps, x.shape[1] + extra_batch, *x.shape[2:]))
        return filler.at[: x.shape[0], : x.shape[1]].set(x)

    mask = jnp.zeros((batches.mask.shape[0] + extra_steps, batches.mask.shape[1] + extra_batch),
                     batches.mask.dtype).at[: batches.mask.shape[0], : batches.mask.shape[1]].set(
                         batches.mask)
    return Batches({k: pad(v) for k, v in batches.arrays.items()}, mask, batches.weight)


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _counted(fn, traces: collections.Counter, name: str):
    def wrapped(*args, **kwargs):
        traces[name] += 1
        return fn(*args, **kwargs)

    return wrapped


def _run(algorithm, backend, data, params, clients_per_round, rounds, seed):
    store = ClientStateStore(algorithm.client_init(params))
    result = run(algorithm, backend, data, params, rounds=rounds,
                 clients_per_round=clients_per_round, seed=seed, client_store=store)
    return result, store


def _same_run(got, want, what: str, atol: float) -> None:
    (got_result, got_store), (want_result, want_store) = got, want
    _close(got_result.server_state, want_result.server_state, f"{what}: server state", atol)
    for r, (a, b) in enumerate(zip(want_result.history, got_result.history, strict=True)):
        for k in set(a) - _LAYOUT_FIELDS:
            assert k in b and np.isclose(b[k], a[k], rtol=atol, atol=atol, equal_nan=True), (
                f"{what}: round {r} metric {k!r} is {b.get(k)}, expected {a[k]}"
            )
    assert set(got_store.states) == set(want_store.states), f"{what}: stored client states differ"
    for cid, state in want_store.states.items():
        _close(got_store.states[cid], state, f"{what}: state of client {cid}", atol)


def check_algorithm(
    algorithm: Algorithm,
    init_params: Any,
    data: FederatedData,
    *,
    clients_per_round: int = 4,
    rounds: int = 2,
    seed: int = 0,
    atol: float = 1e-5,
    packed: bool = True,
    sharded: bool = True,
) -> None:
    """Checks the algorithm contract on a small population; raises ``AssertionError``.

    Checks, in this order:

    * **metric names**: every client output holds :data:`~fedjax_lab.algorithms.kit.
      CLIENT_METRICS` and every round :data:`~fedjax_lab.algorithms.kit.ROUND_METRICS` (the
      runner and the experiment summary read them); client states keep ``client_init``'s
      structure, shapes and dtypes.
    * **padding is a no-op**: a client's output and new state do not change when its batches
      are padded to more steps and a larger batch (masked positions hold real-looking data);
      a padded client slot (weight 0, no real example) has weight 0 and zero client metrics.
    * **jit/vmap**: the vmapped client update equals the client-by-client one.
    * **one trace**: jitted ``client_update``, ``aggregate`` and ``server_update`` trace once
      over two rounds (the server state keeps its shapes, dtypes and weak types).
    * **additivity** (when ``algorithm.additive``): the aggregate of a cohort equals the sum of
      the aggregates of two parts.
    * **non-finite rejection**: a client whose examples are NaN is rejected (weight 0, counted
      in ``rejected``) and the round equals the round in which its slot is padding.
    * **packed == padded** (``packed`` and a ``LocalUpdate`` client update): the runner's packed
      rounds equal its padded ones.
    * **sharded == vmap** (``sharded``, additive, and at least two devices): the sharded
      backend's rounds equal the vmap backend's.

    Args:
      algorithm: the algorithm under test.
      init_params: initial model parameters.
      data: a small population (>= ``clients_per_round`` clients of different sizes, whose
        floating-point arrays feed the model so that NaN examples make the update non-finite).
      clients_per_round: cohort size of the checks (>= 2).
      rounds: rounds of the runner-level checks (>= 2).
      seed: run seed.
      atol: absolute and relative tolerance of every comparison (only float summation order
        may differ between the compared programs).
      packed: whether to compare packed and padded runs.
      sharded: whether to compare the sharded backend (needs two devices; skipped otherwise).
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm).__name__}")
    if clients_per_round < 2 or rounds < 2:
        raise ValueError(
            f"clients_per_round and rounds must be >= 2, got {clients_per_round} and {rounds}"
        )
    if data.num_clients < clients_per_round:
        raise ValueError(
            f"data has {data.num_clients} clients, fewer than clients_per_round="
            f"{clients_per_round}; pass a larger population"
        )
    spec = algorithm.data_spec
    cohort = CohortBuilder(
        data, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
        num_steps=spec.num_steps, cohort_size=clients_per_round, seed=seed, device_table=False,
    ).build(0, np.arange(clients_per_round))
    server = algorithm.init(init_params)
    initial = algorithm.client_init(init_params)
    states = _stack([initial] * clients_per_round)
    keys = jax.random.split(jax.random.key(seed), clients_per_round)
    traces: collections.Counter = collections.Counter()
    client_update = jax.jit(_counted(algorithm.client_update, traces, "client_update"))
    aggregate = jax.jit(_counted(algorithm.aggregate, traces, "aggregate"))
    server_update = jax.jit(_counted(algorithm.server_update, traces, "server_update"))

    # Metric names and state layout.
    singles = [client_update(server, initial, _client(cohort, i), key=keys[i])
               for i in range(clients_per_round)]
    for out, state in singles:
        missing = set(CLIENT_METRICS) - set(out.metrics)
        assert not missing, (
            f"client metrics lack {sorted(missing)}: report fedjax_lab.algorithms.kit."
            "CLIENT_METRICS (kit.upload does)"
        )
        chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
    outputs = _stack([o for o, _ in singles])
    new_states = _stack([s for _, s in singles])

    # Padding is a no-op; a padded slot contributes nothing.
    padded_update = jax.jit(algorithm.client_update)  # other shapes: not the counted program
    for i in range(clients_per_round):
        padded = padded_update(server, initial, _padded(_client(cohort, i), 2, 3), key=keys[i])
        _close(padded, singles[i], f"client {i} padded to more steps and a larger batch", atol)
    empty = _client(cohort, 0)
    empty = Batches(empty.arrays, jnp.zeros_like(empty.mask), jnp.zeros_like(empty.weight))
    slot, _ = client_update(server, initial, empty, key=keys[0])
    assert float(slot.weight) == 0.0, f"a padded client slot has weight {slot.weight}, not 0"
    for k in CLIENT_METRICS:
        assert float(slot.metrics[k]) == 0.0, f"a padded client slot reports {k}={slot.metrics[k]}"

    # jit/vmap: the vmapped cohort equals its clients one by one.
    batches = Batches({k: jnp.asarray(v) for k, v in cohort.arrays.items()},
                      jnp.asarray(cohort.mask), jnp.asarray(cohort.weight))
    vmapped = jax.jit(jax.vmap(lambda s, b, k: algorithm.client_update(server, s, b, key=k)))(
        states, batches, keys)
    _close(vmapped, (outputs, new_states), "vmapped client updates vs one by one", atol)

    # Metric names of a round; one trace over two rounds.
    agg = aggregate(outputs)
    server2, metrics = server_update(server, agg)
    missing = set(ROUND_METRICS) - set(metrics)
    assert not missing, (
        f"round metrics lack {sorted(missing)}: report fedjax_lab.algorithms.kit.ROUND_METRICS "
        "(kit.round_metrics does)"
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(server2, server)
    singles2 = [client_update(server2, s, _client(cohort, i), key=keys[(i + 1) % len(keys)])
                for i, (_, s) in enumerate(singles)]
    server_update(server2, aggregate(_stack([o for o, _ in singles2])))
    retraced = {k: n for k, n in traces.items() if n > 1}
    assert not retraced, (
        f"traced more than once over two rounds of the same shapes: {retraced} (a server or "
        "client state whose shape, dtype or weak type changes, or Python values in the state)"
    )

    # Additivity.
    if algorithm.additive:
        half = clients_per_round // 2
        parts = [algorithm.aggregate(jax.tree.map(lambda x, s=s: x[s], outputs))
                 for s in (slice(0, half), slice(half, None))]
        _close(jax.tree.map(jnp.add, *parts), agg,
               "algorithm.additive, but the aggregate of a cohort is not the sum of its parts",
               atol)

    # Non-finite client deltas are rejected: the round equals the one with that slot padded.
    nan_client = _client(cohort, 0)
    nan_client = nan_client._replace(arrays={
        k: jnp.full_like(v, jnp.nan) if jnp.issubdtype(v.dtype, jnp.floating) else v
        for k, v in nan_client.arrays.items()})
    bad, _ = client_update(server, initial, nan_client, key=keys[0])
    assert float(bad.weight) == 0.0 and float(bad.metrics[REJECTED]) == 1.0, (
        f"a client with NaN examples was not rejected: weight {bad.weight}, "
        f"{REJECTED}={bad.metrics[REJECTED]} (reject non-finite deltas: kit.upload)"
    )
    assert float(bad.metrics[CLIENTS]) == 1.0, f"a rejected client must count in {CLIENTS}"

    def round_with_first(first: ClientOutput) -> tuple[ServerState, Any]:
        cohort_out = jax.tree.map(lambda x, f: x.at[0].set(f), outputs, first)
        return algorithm.server_update(server, algorithm.aggregate(cohort_out))

    with_bad, bad_metrics = round_with_first(bad)
    with_slot, _ = round_with_first(slot)
    _close(with_bad, with_slot, "a round with a rejected client vs with that slot padded", atol)
    assert float(bad_metrics[REJECTED]) == 1.0, "the round does not count its rejected client"

    # Runner level: packed == padded, sharded == vmap.
    if not (packed and is_local_update(algorithm.client_update)) and not sharded:
        return
    args = (data, init_params, clients_per_round, rounds, seed)
    ref = _run(algorithm, VmapBackend("vmap", packing="off"), *args)
    for record in ref[0].history:
        missing = set(ROUND_METRICS) - set(record)
        assert not missing, f"the runner's round records lack {sorted(missing)}"
    if packed and is_local_update(algorithm.client_update):
        policy = PackingPolicy(slots=2, segment_steps=3)
        _same_run(_run(algorithm, VmapBackend("vmap", packing=policy), *args), ref,
                  "packed rounds vs padded rounds", atol)
    if sharded and algorithm.additive and len(jax.devices()) >= 2:
        backend = ShardedBackend(jax.devices()[:2], plan="vmap", packing="off")
        _same_run(_run(algorithm, backend, *args), ref, "sharded rounds vs vmap rounds", atol)
