"""Hierarchical federated learning: clients -> edge servers -> cloud (HierFAVG).

Liu, Zhang, Song, Letaief (2020), "Client-Edge-Cloud Hierarchical Federated Learning", IEEE ICC
(Algorithm 1, HierFAVG; FedML's ``hierarchical_fl``). Clients are grouped under edge servers.
Every client runs ``kappa_1`` local steps (the client algorithm's :class:`DataSpec`); every edge
aggregates its clients' models after each such period, and after ``kappa_2`` edge aggregations
the cloud averages the edge models::

    w^l <- sum_{i in C^l} |D_i| w_i / |D^l|          (edge aggregation, every kappa_1 steps)
    w   <- sum_l |D^l| w^l / |D|                      (cloud aggregation, every kappa_1 kappa_2)

Here the edge step is ANY fedjax_lab :class:`Algorithm`: an edge round is the algorithm's round
(``client_update`` of the sampled clients of the group, ``aggregate`` with its compressor on the
client -> edge hop, ``server_update`` of that edge's server state), so HierFAVG is
``hierarchical`` over ``fedavg``, and FedProx, SCAFFOLD, FedPAQ, ... work at the edge unchanged.

Cloud weighting: edge ``l`` weighs the sum of the aggregation weights its edge rounds of this
cloud round aggregated (``Aggregate.weight_sum``, i.e. example counts for the default
``weighting="examples"``). With full participation (``clients_per_edge_round=None``) that is
``kappa_2 |D^l|``, proportional to the paper's ``|D^l|``; with sampling it is the data the edge
actually aggregated. An edge that aggregated nothing (every client rejected) weighs 0; a cloud
round in which no edge aggregated anything leaves the cloud model unchanged.

Limitation: server-side randomness that an algorithm draws from the round number alone (DP-FedAvg's
Gaussian noise, ``fold_in(key, round)``) is the same at every edge, so the cloud could cancel it
by differencing edge models; the CLI refuses such algorithms (tag ``noisy_aggregate``).

Each edge keeps its algorithm server state between cloud rounds (optimizer moments, SCAFFOLD's
control variate, the round counter) and only its model is replaced by the cloud model at the
start of a cloud round. Client states (compressor residuals, control variates) live in one
device-resident table over the population and are gathered/scattered by client id inside the
compiled program.

Execution: one cloud round is ONE jitted program. Its cohort is shaped
``[kappa_2, groups, clients_per_group, S, B]`` (built by :class:`~fedjax_lab.data.CohortBuilder`
per group and edge round, padded with weight-0 slots and masks); a ``lax.scan`` runs the
``kappa_2`` edge rounds, each a ``vmap`` over groups of a ``vmap`` over the group's clients,
``aggregate`` vmapped over groups (a segment sum) and ``server_update`` vmapped over the stacked
edge server states. With ``devices`` the client slots of every group are sharded over the
devices with ``shard_map`` and the per-group partial aggregates are ``psum``-reduced (additive
aggregates only), which computes the same numbers.

Randomness: edge round ``t = cloud_round * kappa_2 + k`` samples each group's clients from
``host_rng(seed, SAMPLING_STREAM, t)`` (groups in order), shuffles client data as the runner does
(``CohortBuilder``: ``host_rng(seed, SHUFFLE_STREAM, t, client)``) and gives slot ``j`` of group
``g`` the client key ``split(fold_in(PRNGKey(seed), t), .)[g * clients_per_group + j]``. With one
group this is exactly the round ``t`` of :func:`fedjax_lab.runner.run`, so one group of HierFAVG
is FedAvg (tested to 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_lab.algorithms.kit import (
    CLIENTS,
    REJECTED,
    TRAIN_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_LOSS_SUM,
    UPLOAD_BITS,
)
from fedjax_lab.backends import require_additive
from fedjax_lab.backends.vmap import client_batches, per_client_inputs
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.local import call_client_update
from fedjax_lab.core.types import Algorithm, Cohort, ServerState
from fedjax_lab.data.budget import check_cohort_memory
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData, sample_clients

#: ``host_rng(seed, PARTITION_STREAM, GROUPING_SUBSTREAM)`` draws a random grouping in the CLI
#: (sub-stream 1 is the client-evaluation split's): the grouping never shares draws with the
#: partition.
GROUPING_SUBSTREAM = 2
#: Per cloud round: bytes of the edge models sent to the cloud (float32 models, uncompressed).
EDGE_CLOUD_BYTES = "edge_cloud_bytes"
#: Per cloud round: groups whose edge aggregated at least one client update.
ACTIVE_EDGES = "active_edges"
#: The metric sums a cloud round adds up over its edges and edge rounds.
SUMMED = (TRAIN_LOSS_SUM, TRAIN_EXAMPLES, CLIENTS, REJECTED, UPLOAD_BITS)


# ------------------------------------------------------------------------------- groupings
def random_grouping(num_clients: int, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced random edge assignment: group ids ``[num_clients]`` in ``[0, num_groups)``.

    A random permutation of the clients dealt round-robin to the groups, so group sizes differ
    by at most one (Liu et al. 2020 place clients under edges uniformly).

    Args:
      num_clients: population size (>= ``num_groups``).
      num_groups: number of edge servers (>= 1).
      rng: an explicit numpy Generator (e.g. ``host_rng(seed, PARTITION_STREAM,
        GROUPING_SUBSTREAM)``).
    """
    for name, value in (("num_clients", num_clients), ("num_groups", num_groups)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_groups > num_clients:
        raise ValueError(
            f"num_groups={num_groups} > num_clients={num_clients}: some edge would have no "
            "client; use at most as many groups as clients"
        )
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    groups = np.empty(num_clients, np.int64)
    groups[rng.permutation(num_clients)] = np.arange(num_clients) % num_groups
    return groups


def check_grouping(grouping: Any, num_clients: int) -> np.ndarray:
    """Validates a given grouping; returns the group id of every client, ``[num_clients]``.

    Args:
      grouping: either a 1-D integer sequence of ``num_clients`` group ids (client ``i`` is under
        edge ``grouping[i]``; ids ``0..G-1``, each used), or a sequence of ``G`` member lists
        (client indices of each edge; together every client exactly once).
      num_clients: population size.

    Raises:
      ValueError: naming the problem: a client in no group or in two, an id or index out of
        range, an empty group, non-integer entries.
    """
    if (isinstance(grouping, np.ndarray) and grouping.ndim == 1) or (
        isinstance(grouping, Sequence) and not isinstance(grouping, str) and len(grouping)
        and all(np.ndim(g) == 0 for g in grouping)
    ):
        ids = np.asarray(grouping)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"grouping: group ids must be integers, got dtype {ids.dtype}")
        if ids.shape != (num_clients,):
            raise ValueError(
                f"grouping: give one group id per client ({num_clients}), got {ids.shape[0]}; "
                "every client must be in exactly one group"
            )
        if ids.min() < 0:
            raise ValueError(f"grouping: group ids must be >= 0, got {int(ids.min())}")
        num_groups = int(ids.max()) + 1
        empty = np.flatnonzero(np.bincount(ids, minlength=num_groups) == 0)
        if len(empty):
            raise ValueError(
                f"grouping: groups {empty.tolist()} have no client; number the groups "
                f"0..G-1 without gaps (got ids up to {num_groups - 1})"
            )
        return ids.astype(np.int64)
    if not isinstance(grouping, Sequence | np.ndarray) or isinstance(grouping, str) or not len(
        grouping
    ):
        raise ValueError(
            "grouping must be a sequence of group ids (one per client) or of member lists "
            f"(client indices per group), got {grouping!r}"
        )
    lists = []
    for g, members in enumerate(grouping):
        members = np.asarray(members)
        if members.ndim != 1 or (len(members) and not np.issubdtype(members.dtype, np.integer)):
            raise ValueError(f"grouping: group {g} must be a 1-D list of client indices")
        if not len(members):
            raise ValueError(f"grouping: group {g} is empty; every edge needs a client")
        bad = members[(members < 0) | (members >= num_clients)]
        if len(bad):
            raise ValueError(
                f"grouping: group {g} has client indices {bad.tolist()} outside "
                f"[0, {num_clients})"
            )
        lists.append(members.astype(np.int64))
    counts = np.bincount(np.concatenate(lists), minlength=num_clients)
    for what, clients in (("in more than one group (or twice in one)", counts > 1),
                          ("in no group", counts == 0)):
        clients = np.flatnonzero(clients)
        if len(clients):
            more = " ..." if len(clients) > 10 else ""
            raise ValueError(f"grouping: clients {clients[:10].tolist()}{more} are {what}; "
                             "every client must be in exactly one group")
    ids = np.empty(num_clients, np.int64)
    for g, members in enumerate(lists):
        ids[members] = g
    return ids


# ---------------------------------------------------------------------------------- result
@dataclass
class HierarchicalResult:
    """What :func:`run_hierarchical` produced.

    Attributes:
      params: the final cloud model.
      edge_states: the edge servers' algorithm states, stacked over groups.
      client_states: every client's algorithm state (compressor residuals, ...), stacked over
        the population (client ``i`` at index ``i``).
      history: one record per cloud round (``round``, ``train_loss``, ``train_examples``,
        ``clients``, ``rejected``, ``upload_bits`` (client -> edge, all edge rounds),
        ``edge_cloud_bytes``, ``active_edges``, the cumulative ``cum_upload_bits`` and
        ``cum_edge_cloud_bytes``, and the evaluation's metrics of the cloud model).
      compiles: programs traced (one per distinct padded step count ``S``).
    """

    params: Any
    edge_states: ServerState
    client_states: Any = ()
    history: list[dict[str, float]] = field(default_factory=list)
    compiles: int = 0


# ---------------------------------------------------------------------------- the program
def _group_clients(algorithm: Algorithm, table: Any, unroll: int):
    """``(edge states [G], client states [G, C], per-client cohort [G, C], keys [G, C]) ->
    (per-group Aggregate [G], new client states [G, C])``: vmap over groups of vmap over
    clients, then ``aggregate`` vmapped over groups (a segment sum over each group's slots)."""

    def one_group(edge_state, states, per_client, mask, weight, keys):
        def one_client(state, inputs, m, w, k):
            batches = client_batches(table, inputs, m, w)
            return call_client_update(algorithm.client_update, edge_state, state, batches,
                                      key=k, unroll=unroll)

        outputs, new_states = jax.vmap(one_client)(states, per_client, mask, weight, keys)
        return algorithm.aggregate(outputs), new_states

    return jax.vmap(one_group)


def _cloud_round_fn(
    algorithm: Algorithm, num_clients: int, key_index: np.ndarray, mesh: Mesh | None,
    unroll: int,
) -> Callable[..., Any]:
    """The traced cloud round (see the module docstring)."""
    axis = None if mesh is None else mesh.axis_names[0]

    def edge_aggregates(edge_states, states, per_client, table, mask, weight, keys):
        agg, new_states = _group_clients(algorithm, table, unroll)(
            edge_states, states, per_client, mask, weight, keys)
        if axis is not None:  # partial per-group sums of this device's slots
            agg = jax.lax.psum(agg, axis)
        return agg, new_states

    if mesh is not None:
        clients = P(None, axis)
        edge_aggregates = jax.shard_map(
            edge_aggregates, mesh=mesh,
            in_specs=(P(), clients, clients, P(), clients, clients, clients),
            out_specs=(P(), clients),
            # As the sharded backend: local loops start from replicated values and carry
            # per-device ones; the psum output is replicated by construction.
            check_vma=False,
        )

    def cloud_round(cloud_params, edge_states, store, per_client, table, mask, weight, ids,
                    rounds, root):
        groups = weight.shape[1]
        edge_states = edge_states._replace(params=jax.tree.map(
            lambda p: jnp.broadcast_to(p, (groups, *p.shape)), cloud_params))

        def edge_round(carry, xs):
            edge_states, store = carry
            per_client, mask, weight, ids, t = xs
            # Keys of the real slots do not depend on the padding (split(k, n)[i] is
            # independent of n), so sharded padding and one-group runs match the runner.
            keys = rng_lib.client_keys(rng_lib.round_key(root, t), key_index.size)[key_index]
            safe = jnp.where(ids >= 0, ids, 0)
            states = jax.tree.map(lambda s: s[safe], store)
            agg, new_states = edge_aggregates(edge_states, states, per_client, table, mask,
                                              weight, keys)
            edge_states, _ = jax.vmap(algorithm.server_update)(edge_states, agg)
            drop = jnp.where(ids >= 0, ids, num_clients)  # padded slots write nothing
            store = jax.tree.map(lambda s, n: s.at[drop].set(n, mode="drop"), store,
                                 new_states)
            sums = {k: jnp.sum(agg.metric_sums[k]) for k in SUMMED}
            return (edge_states, store), (agg.weight_sum, sums)

        (edge_states, store), (weight_sums, sums) = jax.lax.scan(
            edge_round, (edge_states, store), (per_client, mask, weight, ids, rounds))
        edge_weight = jnp.sum(weight_sums, axis=0)  # [G]: data each edge aggregated
        total = jnp.sum(edge_weight)
        share = edge_weight / jnp.maximum(total, 1e-30)
        averaged = jax.tree.map(
            lambda e: jnp.tensordot(share, e, axes=(0, 0)).astype(e.dtype), edge_states.params)
        new_params = jax.tree.map(lambda a, c: jnp.where(total > 0, a, c), averaged,
                                  cloud_params)
        sums = {k: jnp.sum(v) for k, v in sums.items()}
        metrics = {
            **sums,
            TRAIN_LOSS: jnp.where(
                sums[TRAIN_EXAMPLES] > 0,
                sums[TRAIN_LOSS_SUM] / jnp.maximum(sums[TRAIN_EXAMPLES], 1.0), jnp.nan),
            ACTIVE_EDGES: jnp.sum(edge_weight > 0).astype(jnp.float32),
        }
        return new_params, edge_states, store, metrics

    return cloud_round


# -------------------------------------------------------------------------------- the loop
def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def run_hierarchical(
    algorithm: Algorithm,
    data: FederatedData,
    init_params: Any,
    grouping: Any,
    *,
    cloud_rounds: int,
    edge_rounds: int,
    seed: int,
    clients_per_edge_round: int | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 1,
    devices: Sequence[jax.Device] | None = None,
    step_unroll: int = 1,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> HierarchicalResult:
    """HierFAVG (Liu et al. 2020, Algorithm 1) with any edge algorithm; see the module doc.

    Args:
      algorithm: the client/edge algorithm (its ``DataSpec`` is ``kappa_1``: local epochs or
        steps per edge round; its compressor encodes the client -> edge uploads).
      data: the client population (in memory: its examples live on the device).
      init_params: the initial cloud model.
      grouping: group id per client, or member lists per group (:func:`check_grouping`).
      cloud_rounds: cloud aggregations to run (>= 0).
      edge_rounds: ``kappa_2``, edge aggregations per cloud aggregation (>= 1).
      seed: run seed (sampling, shuffles, client keys; see the module doc).
      clients_per_edge_round: clients each edge samples per edge round, at most its smallest
        group's size; None: every client of the group (the paper's full participation).
      evaluate: ``params -> metrics`` of the cloud model (e.g. test accuracy).
      eval_every: evaluate every N cloud rounds and after the last (0: never).
      devices: None runs on one device; a device list shards each group's client slots over
        them (``shard_map`` + ``psum``; additive aggregates only; slots padded to a multiple).
      step_unroll: unroll factor of the local-step loop (never changes the numbers).
      callbacks: ``(cloud round index, record) -> None`` after each cloud round.

    Returns:
      a :class:`HierarchicalResult`.

    Raises:
      ValueError: before anything compiles, for a bad grouping, sizes, lazy population or a
        non-additive algorithm with ``devices``.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    groups = check_grouping(grouping, data.num_clients)
    cloud_rounds = int(cloud_rounds)
    if cloud_rounds < 0:
        raise ValueError(f"cloud_rounds must be >= 0, got {cloud_rounds}")
    edge_rounds = _positive_int(edge_rounds, "edge_rounds (kappa_2)")
    if not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every must be an integer >= 0, got {eval_every!r}")
    num_groups = int(groups.max()) + 1
    members = [np.flatnonzero(groups == g) for g in range(num_groups)]
    smallest = min(len(m) for m in members)
    if clients_per_edge_round is not None:
        clients_per_edge_round = _positive_int(clients_per_edge_round, "clients_per_edge_round")
        if clients_per_edge_round > smallest:
            raise ValueError(
                f"clients_per_edge_round={clients_per_edge_round} > {smallest} clients of the "
                "smallest group; lower it or pass None (every client of each group)"
            )
    if data.is_lazy:
        raise ValueError(
            "run_hierarchical keeps the population on the device (one example table); this "
            "population reads its examples on demand: load it in memory"
        )
    mesh = None
    if devices is not None:
        devices = list(devices)
        if not devices or not all(isinstance(d, jax.Device) for d in devices):
            raise ValueError("devices must be a non-empty list of jax.Device (or None)")
        require_additive(algorithm, "hierarchical (sharded)")
        mesh = Mesh(np.array(devices), ("clients",))
    real_slots = clients_per_edge_round or max(len(m) for m in members)
    multiple = 1 if mesh is None else len(devices)
    slots = -(-real_slots // multiple) * multiple
    # Slot (g, j)'s key index: g * real_slots + j for real slots (the runner's for one group),
    # past every real one for padding slots.
    key_index = np.empty((num_groups, slots), np.int64)
    key_index[:, :real_slots] = np.arange(num_groups * real_slots).reshape(num_groups, -1)
    key_index[:, real_slots:] = num_groups * real_slots + np.arange(
        num_groups * (slots - real_slots)).reshape(num_groups, -1)
    spec = algorithm.data_spec
    check_cohort_memory(data, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
                        num_steps=spec.num_steps, cohort_size=edge_rounds * num_groups * slots,
                        with_examples=False)
    builder = CohortBuilder(data, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
                            num_steps=spec.num_steps, cohort_size=slots, seed=seed)

    traced = [0]
    round_fn = _cloud_round_fn(algorithm, data.num_clients, key_index, mesh, step_unroll)

    def counted(*args):
        traced[0] += 1
        return round_fn(*args)

    if mesh is None:
        program = jax.jit(counted)
    else:
        program = jax.jit(counted, out_shardings=(NamedSharding(mesh, P()),) * 4)

    cloud = init_params
    edge = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_groups, *jnp.shape(x))),
                        algorithm.init(init_params))
    store = jax.tree.map(lambda x: jnp.broadcast_to(x, (data.num_clients, *jnp.shape(x))),
                         algorithm.client_init(init_params))
    model_bytes = float(sum(np.size(x) * np.dtype(x.dtype).itemsize
                            for x in jax.tree.leaves(init_params)))
    root = jax.random.key(seed)
    result = HierarchicalResult(params=cloud, edge_states=edge, client_states=store)
    cum_bits = cum_bytes = 0.0
    for c in range(cloud_rounds):
        cohorts = []
        for k in range(edge_rounds):
            t = c * edge_rounds + k
            rng = rng_lib.host_rng(seed, rng_lib.SAMPLING_STREAM, t)
            cohorts.append([
                builder.build(t, m if clients_per_edge_round is None else m[
                    sample_clients(len(m), clients_per_edge_round, rng)])
                for m in members
            ])
        per_client, mask, weight, ids = _stack(cohorts)
        cloud, edge, store, metrics = program(
            cloud, edge, store, per_client, builder.table, mask, weight, ids,
            np.arange(c * edge_rounds, (c + 1) * edge_rounds, dtype=np.int32), root)
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record[EDGE_CLOUD_BYTES] = num_groups * model_bytes
        cum_bits += record[UPLOAD_BITS]
        cum_bytes += record[EDGE_CLOUD_BYTES]
        record.update(round=c + 1, cum_upload_bits=cum_bits, cum_edge_cloud_bytes=cum_bytes)
        if evaluate is not None and eval_every and (
            (c + 1) % eval_every == 0 or c == cloud_rounds - 1
        ):
            record.update(evaluate(cloud))
        result.history.append(record)
        for cb in callbacks:
            cb(c, record)
    result.params, result.edge_states, result.client_states = cloud, edge, store
    result.compiles = traced[0]
    return result


def _stack(cohorts: list[list[Cohort]]) -> tuple[np.ndarray, ...]:
    """``[K][G]`` cohorts ``[C, S_kg, B]`` -> index, mask ``[K, G, C, S, B]`` (S: the largest
    rung among them, steps past a cohort's own S are padding), weight and ids ``[K, G, C]``."""
    steps = max(c.mask.shape[1] for row in cohorts for c in row)

    def pad(x):
        return np.pad(x, [(0, 0), (0, steps - x.shape[1]), (0, 0)])

    index = np.stack([np.stack([pad(c.index) for c in row]) for row in cohorts])
    mask = np.stack([np.stack([pad(c.mask) for c in row]) for row in cohorts])
    weight = np.stack([np.stack([c.weight for c in row]) for row in cohorts])
    ids = np.stack([np.stack([c.client_ids for c in row]) for row in cohorts])
    return per_client_inputs(Cohort(None, index, mask, weight, ids)), mask, weight, ids
