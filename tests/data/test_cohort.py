"""Cohort layout: fixed shapes, masks, per-client reshuffling, bad inputs."""

import numpy as np
import pytest

from fedjax_lab.data.cohort import CohortBuilder, padded_cohort_size
from fedjax_lab.data.federated import FederatedData, sample_clients
from tests.helpers import make_population


def test_epochs_visit_every_example_once_and_reshuffle():
    data = make_population([7, 3, 10])
    b = CohortBuilder(data, batch_size=4, local_epochs=2, cohort_size=3, seed=0,
                      device_table=False)
    assert (b.steps, b.batch) == (2 * 3, 4)  # from the largest client: ceil(10/4) = 3 per epoch
    idx = b.client_index(0, round_idx=0)
    lo, hi = data.offsets[0], data.offsets[1]
    epoch1, epoch2 = idx[:2], idx[2:4]  # client 0: ceil(7/4) = 2 batches per epoch
    for epoch in (epoch1, epoch2):
        np.testing.assert_array_equal(np.sort(epoch[epoch >= 0]), np.arange(lo, hi))
    assert not np.array_equal(epoch1, epoch2)  # per-epoch reshuffle
    assert np.all(idx[4:] == -1)  # padded steps
    assert not np.array_equal(b.client_index(0, 0), b.client_index(0, 1))  # per-round reshuffle
    np.testing.assert_array_equal(b.client_index(0, 5), b.client_index(0, 5))  # deterministic


def test_round_steps_follow_the_sampled_clients_on_a_ladder():
    # Steps per client (B=3): 1, 3, 2, 1. The ladder is anchored at the largest (3): 3, 2, 1.
    data = make_population([2, 9, 4, 1])
    b = CohortBuilder(data, batch_size=3, local_epochs=1, cohort_size=4, seed=0,
                      device_table=False)
    shapes = [b.build(r, c).arrays["x"].shape for r, c in enumerate([[0], [1, 3], [0, 2]])]
    assert shapes == [(4, 1, 3, 5), (4, 3, 3, 5), (4, 2, 3, 5)]
    assert [b.round_steps(c) for c in ([3], [0, 3], [2], [1])] == [1, 1, 2, 3]
    # ladder=None: every round has the population's largest shape (one padded program).
    flat = CohortBuilder(data, batch_size=3, local_epochs=1, cohort_size=4, seed=0,
                         device_table=False, ladder=None)
    assert {flat.build(0, c).arrays["x"].shape for c in ([0], [1, 3])} == {(4, 3, 3, 5)}


def test_ladder_rungs_bound_the_number_of_shapes():
    sizes = np.random.default_rng(0).lognormal(3, 2, 500).astype(int) + 1
    data = make_population(list(sizes))
    b = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=10, seed=0)
    rungs = {b.round_steps([c]) for c in range(data.num_clients)}
    # ratio 2 from the top: at most ceil(log2(S_max)) + 1 rungs, each below twice its client
    assert len(rungs) <= int(np.ceil(np.log2(b.steps))) + 1
    for c in range(data.num_clients):
        assert b.client_steps([c])[0] <= b.round_steps([c]) < 2 * b.client_steps([c])[0]


def test_per_round_layout_keeps_each_clients_batches():
    # A client's batches do not depend on which other clients share its round.
    data = make_population([2, 9, 4, 1])
    b = CohortBuilder(data, batch_size=3, local_epochs=2, cohort_size=2, seed=3)
    alone = b.build(7, [2]).index[0]
    with_big = b.build(7, [1, 2]).index[1]
    np.testing.assert_array_equal(alone[alone >= 0], with_big[: alone.shape[0]][alone >= 0])
    assert (b.build(7, [1, 2]).mask[1, alone.shape[0]:] == 0).all()


def test_masks_and_weights():
    data = make_population([5, 2])
    co = CohortBuilder(data, batch_size=2, local_epochs=1, cohort_size=3, seed=1,
                       device_table=False).build(0, [1, 0])
    np.testing.assert_array_equal(co.weight, [2.0, 5.0, 0.0])
    np.testing.assert_array_equal(co.mask.sum(axis=(1, 2)), [2.0, 5.0, 0.0])
    np.testing.assert_array_equal(co.client_ids, [1, 0, -1])
    # the examples under the mask are exactly the client's examples
    x = co.arrays["x"][1][co.mask[1] > 0]
    np.testing.assert_array_equal(np.sort(x, axis=0), np.sort(data.client(0)["x"], axis=0))


def test_fixed_steps_mode():
    data = make_population([5, 2])
    b = CohortBuilder(data, batch_size=3, local_epochs=None, num_steps=4, cohort_size=2, seed=0,
                      device_table=False)
    co = b.build(0, [0, 1])
    assert co.mask.shape == (2, 4, 3)
    np.testing.assert_array_equal(co.mask.sum(axis=(1, 2)), [12.0, 8.0])  # min(B, n) per step
    np.testing.assert_array_equal(co.weight, [5.0, 2.0])  # weights are dataset sizes


def test_device_table_and_host_cohorts_hold_the_same_examples():
    data = make_population([5, 8, 3])
    kw = {"batch_size": 3, "local_epochs": 1, "cohort_size": 3, "seed": 4}
    host = CohortBuilder(data, device_table=False, **kw).build(2, [0, 2])
    dev = CohortBuilder(data, device_table=True, **kw).build(2, [0, 2])
    gathered = np.asarray(dev.arrays["x"])[np.asarray(dev.index)]
    np.testing.assert_array_equal(gathered * host.mask[..., None], host.arrays["x"]
                                  * host.mask[..., None])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 2, "local_epochs": 0}, "local_epochs must be >= 1"),
        ({"batch_size": 2, "local_epochs": None}, "exactly one of"),
        ({"batch_size": 2, "cohort_size": 0}, "cohort_size must be >= 1"),
    ],
    ids=["batch0", "epochs0", "neither", "cohort0"],
)
def test_builder_rejects_bad_arguments(kwargs, match):
    data = make_population([3])
    kwargs = {"local_epochs": 1, "cohort_size": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        CohortBuilder(data, **kwargs)


def test_build_rejects_bad_clients():
    data = make_population([3, 3])
    b = CohortBuilder(data, batch_size=2, local_epochs=1, cohort_size=1, seed=0)
    with pytest.raises(ValueError, match="do not fit in cohort_size"):
        b.build(0, [0, 1])
    with pytest.raises(ValueError, match=r"client indices must lie in \[0, 2\)"):
        b.build(0, [5])


def test_sampling():
    rng = np.random.default_rng(0)
    s = sample_clients(10, 4, rng)
    assert len(set(s.tolist())) == 4 and s.max() < 10
    with pytest.raises(ValueError, match="clients_per_round=11 > num_clients=10"):
        sample_clients(10, 11, rng)
    with pytest.raises(ValueError, match="clients_per_round must be >= 1"):
        sample_clients(10, 0, rng)


def test_federated_data_validation():
    with pytest.raises(ValueError, match=r"clients \['b'\] have 0 examples"):
        FederatedData.from_clients({"a": {"x": np.ones((2, 3))}, "b": {"x": np.ones((0, 3))}})
    with pytest.raises(ValueError, match="mismatched feature shapes"):
        FederatedData.from_clients({"a": {"x": np.ones((2, 3))}, "b": {"x": np.ones((2, 4))}})
    with pytest.raises(ValueError, match="different lengths"):
        FederatedData.from_clients({"a": {"x": np.ones((2, 3)), "y": np.ones(3)}})


def test_padded_cohort_size():
    assert padded_cohort_size(10, None) == 10
    assert padded_cohort_size(10, 4) == 12
    assert padded_cohort_size(10, 4, multiple=3) == 12
    assert padded_cohort_size(5, None, multiple=4) == 8


def test_max_examples_per_client_trains_on_a_fresh_subset_each_round():
    data = make_population([50, 7], seed=0)
    b = CohortBuilder(data, batch_size=4, local_epochs=2, cohort_size=2, seed=0,
                      device_table=False, max_examples_per_client=10)
    assert b.steps == 2 * 3  # ceil(10 / 4) batches per epoch, from the capped size
    subsets = []
    for r in range(3):
        idx = b.client_index(0, r)
        epoch1, epoch2 = idx[:3], idx[3:6]
        subset = np.sort(epoch1[epoch1 >= 0])
        assert len(subset) == 10 and len(np.unique(subset)) == 10  # 10 distinct examples
        np.testing.assert_array_equal(np.sort(epoch2[epoch2 >= 0]), subset)  # same subset
        assert np.all((subset >= 0) & (subset < 50))
        subsets.append(tuple(subset))
    assert len(set(subsets)) == 3  # a new subset every round
    co = b.build(0, [0, 1])
    np.testing.assert_array_equal(co.weight, [10.0, 7.0])  # the capped size; 7 < 10 untouched
    assert b.cap_stats([0, 1]) == {"capped_clients": 1.0, "capped_steps": 2 * (13 - 3)}


def test_max_local_steps_stops_clients_and_weighs_what_they_visited():
    data = make_population([50, 7], seed=0)
    b = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=2, seed=0,
                      device_table=False, max_local_steps=3)
    co = b.build(0, [0, 1])
    np.testing.assert_array_equal((co.mask.sum(axis=2) > 0).sum(axis=1), [3, 2])
    # Client 0 stops after 3 of its 13 batches: it visited 12 distinct examples.
    np.testing.assert_array_equal(co.weight, [12.0, 7.0])
    uncapped = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=2, seed=0,
                             device_table=False).client_index(0, 0)
    np.testing.assert_array_equal(co.arrays["x"][0][:3], data.arrays["x"][uncapped[:3]])
    assert b.cap_stats([0, 1]) == {"capped_clients": 1.0, "capped_steps": 10.0}
    fixed = CohortBuilder(data, batch_size=4, local_epochs=None, num_steps=5, cohort_size=2,
                          seed=0, device_table=False, max_local_steps=3)
    # Fixed-step clients keep weighing their dataset size.
    np.testing.assert_array_equal(fixed.build(0, [0, 1]).weight, [50.0, 7.0])


def test_caps_are_reported_in_every_round_record():
    import jax
    import optax

    from fedjax_lab.algorithms import fedavg
    from fedjax_lab.backends import VmapBackend
    from fedjax_lab.runner import run
    from tests.helpers import LinearModel

    model = LinearModel(5, 3)
    data = make_population([50, 7, 30, 2], seed=0)
    result = run(fedavg(model, optax.sgd(0.1), batch_size=4), VmapBackend(), data,
                 model.init(jax.random.key(0)), rounds=3, clients_per_round=4, seed=0,
                 max_examples_per_client=20, max_local_steps=4)
    for h in result.history:
        assert h["capped_clients"] == 2.0  # clients of 50 and 30 examples
        assert h["train_examples"] == 16 + 7 + 16 + 2  # 4 steps of 4, or all their examples
