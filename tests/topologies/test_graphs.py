"""Topology constructors: stochasticity, connectivity, spectral gaps, and clear errors."""

import math

import numpy as np
import pytest

from fedjax_lab import topologies


def _doubly(w):
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()


@pytest.mark.parametrize("n", [3, 8, 16])
def test_ring_is_metropolis_hastings_with_the_closed_form_gap(n):
    topo = topologies.ring(n)
    w = topo.matrices[0]
    _doubly(w)
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_allclose([w[0, 1], w[0, n - 1], w[0, 0]], 1 / 3, atol=1e-15)
    # Eigenvalues of the circulant (I + P + P^T) / 3: (1 + 2 cos(2 pi k / n)) / 3.
    lam = [abs((1 + 2 * math.cos(2 * math.pi * k / n)) / 3) for k in range(1, n)]
    assert topo.spectral_gap == pytest.approx(1 - max(lam), abs=1e-12)
    assert topo.offsets() == ((0, 1, 2) if n == 3 else (0, 1, n - 1))


def test_torus_fully_connected_and_exponential():
    torus = topologies.torus(4, 4)
    w = torus.matrices[0]
    _doubly(w)
    assert ((w > 0).sum(axis=1) == 5).all() and w[0, 1] == pytest.approx(1 / 5)
    assert torus.offsets() == (0, 1, 3, 4, 12, 13, 15)  # +-1 in a row, +-3 wrapping, +-4
    assert topologies.torus_shape(16) == (4, 4) and topologies.torus_shape(12) == (3, 4)
    full = topologies.fully_connected(5)
    np.testing.assert_allclose(full.matrices[0], 0.2)
    assert full.spectral_gap == pytest.approx(1.0)
    expo = topologies.exponential(8)  # offsets 1, 2, 4 and itself, weights 1/4
    _doubly(expo.matrices[0])
    assert expo.offsets() == (0, 1, 2, 4)
    assert expo.matrices[0][0, 4] == pytest.approx(0.25)
    # Denser graphs mix faster.
    gaps = [topologies.ring(16).spectral_gap, topologies.torus(4, 4).spectral_gap,
            topologies.exponential(16).spectral_gap, topologies.fully_connected(16).spectral_gap]
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1]


def test_one_peer_exponential_averages_exactly_over_one_period():
    # Ying et al. 2021: for n a power of 2, the product of the log2(n) one-peer matrices is the
    # exact average 11^T / n.
    topo = topologies.one_peer_exponential(8)
    assert topo.period == 3
    product = np.eye(8)
    for m in topo.matrices:
        _doubly(m)
        product = m @ product
    np.testing.assert_allclose(product, 1 / 8, atol=1e-12)
    assert topo.spectral_gap == pytest.approx(1.0, abs=1e-4)
    assert np.array_equal(topo.matrix(4), topo.matrices[1])


def test_erdos_renyi_is_seeded_and_refuses_disconnected_draws():
    a = topologies.erdos_renyi(12, 0.4, seed=3)
    b = topologies.erdos_renyi(12, 0.4, seed=3)
    np.testing.assert_array_equal(a.matrices, b.matrices)
    _doubly(a.matrices[0])
    np.testing.assert_array_equal(a.matrices[0], a.matrices[0].T)
    with pytest.raises(ValueError, match=r"not connected.*raise p or change the seed"):
        topologies.erdos_renyi(30, 0.01, seed=0)
    with pytest.raises(ValueError, match=r"p must be an edge probability in \(0, 1\]"):
        topologies.erdos_renyi(8, 0.0, seed=0)


def test_directed_is_column_stochastic_and_needs_strong_connectivity():
    topo = topologies.directed(4, [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)])
    a = topo.matrices[0]
    np.testing.assert_allclose(a.sum(axis=0), 1.0)
    np.testing.assert_allclose(a[[0, 1, 2], 0], 1 / 3)  # node 0 keeps 1/3, pushes to 1, 2
    assert topo.stochastic == "column"
    with pytest.raises(ValueError, match="not strongly connected"):
        topologies.directed(3, [(0, 1), (1, 2)])  # nobody reaches 0
    with pytest.raises(ValueError, match=r"edges must be \(source, destination\) pairs"):
        topologies.directed(3, [(0, 3)])


def test_spectral_gap_matches_numpy_eigenvalues():
    topo = topologies.erdos_renyi(10, 0.5, seed=1)
    moduli = np.sort(np.abs(np.linalg.eigvalsh(topo.matrices[0])))
    assert topo.spectral_gap == pytest.approx(1 - moduli[-2], abs=1e-12)


GOOD = topologies.ring(4).matrices[0]


def _with(i, j, value):
    w = GOOD.copy()
    w[i, j] = value
    return w


@pytest.mark.parametrize(
    ("matrix", "kwargs", "message"),
    [
        (np.ones((3, 4)) / 4, {}, r"must be a square \[n, n\] matrix"),
        (GOOD, {"num_nodes": 5}, r"is 4 x 4 but there are 5 nodes; build the topology with "
                                 r"num_nodes=5"),
        (_with(0, 0, np.nan), {}, r"non-finite entries \(NaN or inf\)"),
        (np.array([[1.5, -0.5], [-0.5, 1.5]]), {}, r"negative weight -0.5 at \[0, 1\]; mixing "
                                                    r"weights must be >= 0"),
        (_with(0, 0, 0.5), {}, r"column 0 sums to 1.16667, not 1"),
        (np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), {},
         "not connected"),
        (np.array([[0.5, 0.0], [0.5, 1.0]]), {}, r"not doubly stochastic: row 0 sums to 0.5"),
        ("ring", {}, r"must be a numeric \[n, n\] matrix"),
    ],
    ids=["not-square", "wrong-size", "nan", "negative", "not-stochastic", "disconnected",
         "column-only", "not-numeric"],
)
def test_bad_matrices_are_refused_with_the_fix(matrix, kwargs, message):
    with pytest.raises(ValueError, match=message):
        topologies.check_mixing(matrix, name="W", **kwargs)


def test_column_stochastic_check_and_names():
    a = np.array([[0.5, 0.0], [0.5, 1.0]])
    with pytest.raises(ValueError, match="not strongly connected"):
        topologies.check_mixing(a, stochastic="column")  # node 1 never sends to 0
    ok = np.array([[0.5, 1.0], [0.5, 0.0]])
    assert topologies.check_mixing(ok, stochastic="column").shape == (1, 2, 2)
    with pytest.raises(ValueError, match="num_nodes must be an integer >= 1"):
        topologies.ring(0)
    with pytest.raises(ValueError, match="unknown topology 'star'; valid names: ring, torus"):
        topologies.topology_by_name("star", 4)
    with pytest.raises(ValueError, match="adjacency must be symmetric"):
        topologies.from_adjacency(np.triu(np.ones((3, 3)), 1))
