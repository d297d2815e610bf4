"""D-SGD (Lian et al. 2017; Koloskova et al. 2020) against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import topologies
from fedjax_lab.topologies.gossip_run import node_batches
from tests.topologies import reference as ref

DATA, PARAMS, OBJECTIVE, W0, B0 = ref.DATA, ref.PARAMS, ref.OBJECTIVE, ref.W0, ref.B0


def _run(algorithm, topology, steps=ref.STEPS, rounds=ref.ROUNDS):
    return topologies.run_decentralized(
        algorithm, topology, DATA, PARAMS, rounds=rounds, batch_size=ref.BATCH,
        local_steps=steps)


def test_time_varying_gossip_matches_numpy():
    # A cycle of two different doubly stochastic matrices (one not symmetric): checks the
    # local steps, the direction of W @ x and the cycling by round.
    cycle = np.stack([topologies.ring(8).matrices[0], topologies.exponential(8).matrices[0]])
    topo = topologies.from_matrices(cycle, name="ring/exponential")
    result = _run(ref.DSGD, topo)
    w, b = ref.dsgd(DATA, W0, B0, topo.matrices)
    np.testing.assert_allclose(result.state.params["w"], w, atol=1e-5)
    np.testing.assert_allclose(result.state.params["b"], b, atol=1e-5)
    last = result.history[-1]
    assert last["consensus_distance"] == pytest.approx(ref.consensus(w, b), rel=1e-4)
    assert last["consensus_distance"] > 1e-4  # a ring does not average in 3 rounds
    np.testing.assert_allclose(result.average["w"], w.mean(0), atol=1e-5)
    assert last["train_examples"] == 8 * ref.STEPS * ref.BATCH - (ref.BATCH - 3) * ref.STEPS
    d = 5 * 3 + 3
    assert last["gossip_bits"] == 8 * 32 * d


def test_fully_connected_one_step_is_centralized_gradient_averaging():
    result = _run(ref.DSGD,
                  topologies.fully_connected(8), steps=1)
    w, b = ref.centralized_average_sgd(DATA, W0, B0)
    for i in range(8):
        np.testing.assert_allclose(result.state.params["w"][i], w, atol=1e-5)
        np.testing.assert_allclose(result.state.params["b"][i], b, atol=1e-5)
    assert all(h["consensus_distance"] < 1e-10 for h in result.history)


def test_sparse_neighbour_gather_equals_dense_mix():
    topo = topologies.torus(2, 4)
    tree = {"a": jax.random.normal(jax.random.key(1), (8, 3, 2)),
            "b": jax.random.normal(jax.random.key(2), (8,))}
    idx, val = topologies.sparse_rows(topo.matrices[0])
    assert idx.shape == (8, 4)  # 2 x 4 torus: 3 distinct neighbours + self
    w = jnp.asarray(topo.matrices[0], jnp.float32)
    got = topologies.sparse_mix(jnp.asarray(idx), jnp.asarray(val), tree)
    want = topologies.dense_mix(w, tree)
    for k in tree:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6)
    np.testing.assert_allclose(want["a"], np.einsum("ij,jkl->ikl", topo.matrices[0],
                                                    np.asarray(tree["a"])), atol=1e-5)
    # The round program with the neighbour gather instead of the dense einsum.
    alg = ref.DSGD
    state = alg.init(topologies.replicate(PARAMS, 8))
    args = (w, node_batches(ref.builder(DATA), 0, 8), jax.random.split(jax.random.key(0), 8))
    dense, _ = topologies.vmap_round(alg, 8)(state, *args)
    sparse, _ = topologies.vmap_round(alg, 8, sparse=(idx, val))(state, *args)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_refuses_mismatched_population_and_column_stochastic_graphs():
    alg = ref.DSGD
    with pytest.raises(ValueError, match="has 6 nodes but the population has 8 clients"):
        _run(alg, topologies.ring(6))
    skewed = topologies.directed(8, [(i, (i + 1) % 8) for i in range(8)] + [(0, 4)])
    with pytest.raises(ValueError, match=r"not doubly stochastic.*PushSum"):
        _run(alg, skewed)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        _run(alg, topologies.ring(8), rounds=0)
