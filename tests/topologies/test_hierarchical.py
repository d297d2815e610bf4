"""Hierarchical FL (HierFAVG, Liu et al. 2020) against FedAvg, a numpy loop and itself sharded."""

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, median, with_aggregator
from fedjax_lab.algorithms.kit import UPLOAD_BITS
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd, with_error_feedback
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import Batches
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.runner import run
from fedjax_lab.topologies import check_grouping, random_grouping, run_hierarchical
from tests.algorithms._numpy_ref import client_steps, local_sgd, make_builder, sampled_clients
from tests.helpers import LinearModel, lazy_population, make_population

MODEL = LinearModel(dim=5, classes=3)
SIZES = [4, 9, 2, 7, 5, 11, 3, 6]
# Unequal groups (2, 3, 3 clients): the group of 2 runs with a padded slot.
GROUPING = [0, 1, 2, 1, 0, 2, 1, 2]
LR = 0.3


def _data():
    return make_population(SIZES, seed=2)


def _params():
    return MODEL.init(jax.random.key(0))


def _compressed():
    # QSGD draws from the client keys and error feedback keeps a per-client residual: client
    # keys and the gather/scatter of client states are both exercised.
    return fedavg(MODEL, optax.sgd(LR, momentum=0.5), batch_size=3, local_epochs=1,
                  compressor=with_error_feedback(qsgd(num_levels=2)))


def test_one_group_is_fedavg_through_the_runner():
    """One edge with kappa_2 = 2 for 2 cloud rounds is 4 FedAvg rounds of the runner (client
    keys and states against the runner's: test_compressed_hop_and_padded_slots_...)."""
    data, params = _data(), _params()
    alg = fedavg(MODEL, optax.sgd(LR, momentum=0.5), batch_size=3, local_epochs=1)
    ref = run(alg, VmapBackend("vmap", packing="off"), data, params, rounds=4,
              clients_per_round=5, seed=0)
    got = run_hierarchical(alg, data, params, np.zeros(len(SIZES), int), cloud_rounds=2,
                           edge_rounds=2, clients_per_edge_round=5, seed=0)
    chex.assert_trees_all_close(got.params, ref.server_state.params, atol=1e-5)
    for c, record in enumerate(got.history):
        pair = ref.history[2 * c: 2 * c + 2]
        for key in ("upload_bits", "train_examples", "clients", "rejected"):
            assert record[key] == pytest.approx(sum(r[key] for r in pair), rel=1e-6), key
        loss_sum = sum(r["train_loss"] * r["train_examples"] for r in pair)
        assert record["train_loss"] == pytest.approx(loss_sum / record["train_examples"],
                                                     rel=1e-5)
        assert record["edge_cloud_bytes"] == 4 * (5 * 3 + 3)  # one float32 model
    assert got.compiles == 1


@pytest.mark.parametrize("per_edge", [None, 2], ids=["full", "sampled"])
def test_matches_numpy_hierfavg(per_edge):
    """kappa_2 = 2 against a float64 Python loop of Liu et al.'s Algorithm 1 (edge average of
    client models weighted by examples, cloud average weighted by the edges' examples)."""
    data, params = _data(), _params()
    alg = fedavg(MODEL, optax.sgd(LR), batch_size=3, local_epochs=2)
    kappa2, rounds = 2, 2
    got = run_hierarchical(alg, data, params, GROUPING, cloud_rounds=rounds,
                           edge_rounds=kappa2, clients_per_edge_round=per_edge, seed=3)
    builder = make_builder(data, batch_size=3, local_epochs=2, seed=3)
    members = [np.flatnonzero(np.asarray(GROUPING) == g) for g in range(3)]
    cloud = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for c in range(rounds):
        edges, edge_weights = [], []
        for k in range(kappa2):
            t = c * kappa2 + k
            rng = rng_lib.host_rng(3, rng_lib.SAMPLING_STREAM, t)
            for g, m in enumerate(members):
                if k == 0:
                    edges.append(dict(cloud))
                    edge_weights.append(0.0)
                chosen = m if per_edge is None else m[np.sort(
                    rng.choice(len(m), per_edge, replace=False))]
                start, acc, total = edges[g], {kk: 0.0 for kk in cloud}, 0.0
                for client in chosen:
                    n = float(SIZES[client])
                    local = local_sgd(start, data, client_steps(builder, client, t), LR)
                    for kk in acc:
                        acc[kk] = acc[kk] + n * local[kk]
                    total += n
                edges[g] = {kk: acc[kk] / total for kk in acc}
                edge_weights[g] += total
        weights = np.asarray(edge_weights) / sum(edge_weights)
        cloud = {kk: sum(w * e[kk] for w, e in zip(weights, edges, strict=True)) for kk in cloud}
    chex.assert_trees_all_close(got.params, cloud, atol=1e-5)
    real = len(SIZES) if per_edge is None else 3 * per_edge
    assert [r["clients"] for r in got.history] == [kappa2 * real] * rounds


def test_numpy_reference_replays_the_runner_sampling():
    # The reference above samples a group of size n like sample_clients does on n clients.
    data = _data()
    rng = rng_lib.host_rng(0, rng_lib.SAMPLING_STREAM, 5)
    assert np.array_equal(np.sort(rng.choice(len(SIZES), 3, replace=False)),
                          sampled_clients(data, 3, 0, 5))


# Group sizes 1, 3, 4: groups 0 and 1 run with padded slots; client 0 is alone.
UNEVEN = [0, 1, 2, 1, 2, 2, 1, 2]


@pytest.fixture(scope="module")
def compressed():
    """One cloud round of kappa_2 = 2 edge rounds over UNEVEN with QSGD + error feedback."""
    alg, data, params = _compressed(), _data(), _params()
    return alg, run_hierarchical(alg, data, params, UNEVEN, cloud_rounds=1, edge_rounds=2,
                                 seed=1)


def test_compressed_hop_and_padded_slots_client_by_client(compressed):
    """Against the library's own client_update / aggregate / server_update called client by
    client in a Python loop: every client's state and key, the edges' models, the cloud average
    and the upload bits. Padded slots alias client 0's state: writing theirs back would change
    client 0's."""
    alg, got = compressed
    data, params = _data(), _params()
    builder = CohortBuilder(data, batch_size=3, local_epochs=1, cohort_size=1, seed=1,
                            device_table=False, ladder=None)
    update = jax.jit(lambda s, cs, b, k: alg.client_update(s, cs, b, key=k))
    # One client at a time: the aggregate is additive, so the group's is the sum (one compile).
    aggregate = jax.jit(lambda out: alg.aggregate(jax.tree.map(lambda x: x[None], out)))
    server_update = jax.jit(alg.server_update)
    members = [np.flatnonzero(np.asarray(UNEVEN) == g) for g in range(3)]
    states = [alg.client_init(params) for _ in SIZES]
    servers = [alg.init(params)] * 3
    weights, bits = [0.0] * 3, 0.0
    for t in range(2):
        keys = rng_lib.client_keys(rng_lib.round_key(jax.random.key(1), t), 3 * 4)
        for g, m in enumerate(members):
            aggs = []
            for j, client in enumerate(m):
                cohort = builder.build(t, [client])
                batches = Batches({k: v[0] for k, v in cohort.arrays.items()}, cohort.mask[0],
                                  cohort.weight[0])
                out, states[client] = update(servers[g], states[client], batches,
                                             keys[g * 4 + j])
                aggs.append(aggregate(out))
                bits += float(out.metrics[UPLOAD_BITS])
            agg = jax.tree.map(lambda *x: sum(x), *aggs)
            servers[g] = server_update(servers[g], agg)[0]
            weights[g] += float(agg.weight_sum)
    for client, state in enumerate(states):
        chex.assert_trees_all_close(jax.tree.map(lambda s, c=client: s[c], got.client_states),
                                    state, atol=1e-5)
    share = np.asarray(weights) / sum(weights)
    cloud = jax.tree.map(lambda *e: sum(w * x for w, x in zip(share, e, strict=True)),
                         *[s.params for s in servers])
    chex.assert_trees_all_close(got.params, cloud, atol=1e-5)
    assert got.history[0]["upload_bits"] == pytest.approx(bits)
    assert got.history[0]["clients"] == 2 * len(SIZES)
    assert got.history[0]["train_examples"] == 2 * sum(SIZES)


def test_sharded_equals_vmap(compressed):
    """Each group's 4 client slots over 3 devices (padded to 6) with psum = one device."""
    alg, ref = compressed
    got = run_hierarchical(alg, _data(), _params(), UNEVEN, cloud_rounds=1, edge_rounds=2,
                           seed=1, devices=jax.devices()[:3])
    chex.assert_trees_all_close(got.params, ref.params, atol=1e-5)
    chex.assert_trees_all_close(got.client_states, ref.client_states, atol=1e-5)
    chex.assert_trees_all_close(got.edge_states, ref.edge_states, atol=1e-5)
    for a, b in zip(ref.history, got.history, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k


def test_sharded_rejects_non_additive_aggregate():
    alg = with_aggregator(fedavg(MODEL, optax.sgd(LR), batch_size=3), median())
    with pytest.raises(ValueError, match="non-additive"):
        run_hierarchical(alg, _data(), _params(), GROUPING, cloud_rounds=1, edge_rounds=1,
                         seed=0, devices=jax.devices()[:2])


def test_random_grouping_is_balanced_and_seeded():
    a = random_grouping(10, 4, np.random.default_rng(0))
    assert np.array_equal(a, random_grouping(10, 4, np.random.default_rng(0)))
    assert sorted(np.bincount(a).tolist()) == [2, 2, 3, 3]
    assert np.array_equal(check_grouping(a, 10), a)


def test_member_lists_equal_group_ids():
    lists = [[0, 4], [1, 3, 6], [2, 5, 7]]
    assert check_grouping(lists, 8).tolist() == GROUPING


@pytest.mark.parametrize(
    ("grouping", "match"),
    [
        ([0, 1, 0], "one group id per client"),
        ([0, 2, 0, 2], r"groups \[1\] have no client"),
        ([0, -1, 0, 1], ">= 0"),
        ([0.0, 1.0, 0.0, 1.0], "integers"),
        ([[0, 1], [1, 2, 3]], r"clients \[1\] are in more than one group"),
        ([[0, 1], [2]], r"clients \[3\] are in no group"),
        ([[0, 1, 2, 3], []], "group 1 is empty"),
        ([[0, 1, 2], [3, 4]], "outside"),
        ([], "sequence of group ids"),
    ],
    ids=["short", "gap", "negative", "float", "twice", "missing", "empty", "range", "none"],
)
def test_bad_groupings_rejected(grouping, match):
    with pytest.raises(ValueError, match=match):
        check_grouping(grouping, 4)


def test_bad_sizes_rejected_before_compiling():
    data, params = _data(), _params()
    alg = fedavg(MODEL, optax.sgd(LR), batch_size=3)
    with pytest.raises(ValueError, match="smallest group"):
        run_hierarchical(alg, data, params, GROUPING, cloud_rounds=1, edge_rounds=1, seed=0,
                         clients_per_edge_round=3)
    with pytest.raises(ValueError, match="edge_rounds"):
        run_hierarchical(alg, data, params, GROUPING, cloud_rounds=1, edge_rounds=0, seed=0)
    with pytest.raises(ValueError, match="num_groups=9 > num_clients=8"):
        random_grouping(8, 9, np.random.default_rng(0))
    lazy, _ = lazy_population(SIZES)
    with pytest.raises(ValueError, match="on demand"):
        run_hierarchical(alg, lazy, params, GROUPING, cloud_rounds=1, edge_rounds=1, seed=0)
