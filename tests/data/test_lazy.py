"""Populations that read their examples on demand (RowSource): same cohorts and runs as in
memory, and a round reads only its clients' rows."""

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData, ReorderedSource
from fedjax_lab.runner import run
from tests.helpers import CountingSource, LinearModel, lazy_population, make_population

SIZES = [4, 9, 2, 7, 5]


def test_lazy_population_holds_the_same_clients():
    eager = make_population(SIZES)
    lazy, source = lazy_population(SIZES)
    assert lazy.is_lazy and not eager.is_lazy
    assert lazy.feature_spec() == eager.feature_spec()
    for c in range(len(SIZES)):
        for k, v in eager.client(c).items():
            np.testing.assert_array_equal(lazy.client(c)[k], v)
    rows = np.array([8, 3, 3, 20, 0])  # any order, repeats: each distinct row is read once
    before = len(source.reads)
    got = lazy.take(rows)
    for k, v in eager.take(rows).items():
        np.testing.assert_array_equal(got[k], v)
    assert [len(r) for r in source.reads[before:]] == [4]
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 27\)"):
        lazy.take([27])


def test_cohort_reads_only_the_rows_of_its_clients():
    eager = make_population(SIZES)
    lazy, source = lazy_population(SIZES)
    kw = dict(batch_size=3, local_epochs=2, cohort_size=4, seed=1, device_table=False)
    want = CohortBuilder(eager, **kw).build(5, [1, 3, 4])
    source.reads.clear()
    got = CohortBuilder(lazy, **kw).build(5, [1, 3, 4])
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.weight, want.weight)
    for k in want.arrays:
        np.testing.assert_array_equal(got.arrays[k], want.arrays[k])
        assert not np.any(got.arrays[k][got.mask == 0])  # padding holds zeros
    # One read of exactly the 9 + 7 + 5 rows of clients 1, 3 and 4 (2 epochs read once).
    assert len(source.reads) == 1
    disk_rows = source.reads[0]
    population_rows = np.concatenate([np.arange(lazy.offsets[c], lazy.offsets[c + 1])
                                      for c in (1, 3, 4)])
    np.testing.assert_array_equal(
        disk_rows, np.sort(lazy.arrays.order[population_rows]))


def test_a_lazy_population_cannot_be_a_device_table():
    lazy, _ = lazy_population(SIZES)
    with pytest.raises(ValueError, match="use device_table=False so that each round reads"):
        CohortBuilder(lazy, batch_size=3, cohort_size=2, seed=0, device_table=True)


def test_runs_on_lazy_data_equal_runs_in_memory():
    model = LinearModel(dim=5, classes=3)
    alg = fedavg(model, optax.sgd(0.3), batch_size=3)
    params = model.init(jax.random.key(0))
    kw = dict(rounds=3, clients_per_round=3, seed=2)
    want = run(alg, VmapBackend("vmap"), make_population(SIZES), params, **kw)
    lazy, source = lazy_population(SIZES)
    got = run(alg, VmapBackend("vmap"), lazy, params, **kw)  # table off: rows read per round
    assert len(source.reads) == 3
    np.testing.assert_allclose([h["train_loss"] for h in got.history],
                               [h["train_loss"] for h in want.history], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got.server_state.params),
                    jax.tree.leaves(want.server_state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bad_sources_are_rejected():
    with pytest.raises(TypeError, match="must be a dict of arrays or a RowSource"):
        FederatedData(("a",), [np.zeros(3)], np.array([0, 3]))
    source = CountingSource({"x": np.zeros((3, 2)), "y": np.zeros(3, np.int32)})
    with pytest.raises(ValueError, match=r"row order must lie in \[0, 3\)"):
        ReorderedSource(source, np.array([0, 3]))
    with pytest.raises(ValueError, match="must start at 0 and end at the example count"):
        FederatedData(("a",), source, np.array([0, 2]))
