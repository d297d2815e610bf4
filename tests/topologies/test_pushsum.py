"""PushSum / SGP (Assran et al. 2019) on a directed graph against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import topologies
from fedjax_lab.topologies.gossip_run import node_batches
from tests.topologies import reference as ref

# A directed ring with two chords: column stochastic, rows NOT summing to 1, so the plain
# numerators are biased and only x / w reaches the average.
DATA, PARAMS, W0, B0 = ref.DATA, ref.PARAMS, ref.W0, ref.B0
EDGES = [(i, (i + 1) % 8) for i in range(8)] + [(0, 4), (5, 2)]


def _topology():
    topo = topologies.directed(8, EDGES)
    a = topo.matrices[0]
    np.testing.assert_allclose(a.sum(axis=0), 1.0)
    assert np.abs(a.sum(axis=1) - 1.0).max() > 0.1
    return topo


def test_sgp_matches_numpy_on_a_directed_graph():
    topo = _topology()
    alg = ref.PUSHSUM
    result = topologies.run_decentralized(alg, topo, DATA, PARAMS, rounds=ref.ROUNDS,
                                          batch_size=ref.BATCH, local_steps=ref.STEPS)
    zw, zb, weight = ref.pushsum(DATA, W0, B0, topo.matrices[0])
    z = alg.estimate(result.state)
    np.testing.assert_allclose(z["w"], zw, atol=1e-5)
    np.testing.assert_allclose(z["b"], zb, atol=1e-5)
    np.testing.assert_allclose(result.state.extra, weight, rtol=1e-5)
    assert result.history[-1]["consensus_distance"] == pytest.approx(
        ref.consensus(zw, zb), rel=1e-4)


def test_pure_consensus_debiased_average_converges_to_the_true_average():
    topo = _topology()
    alg = ref.PUSHSUM
    x0 = {"w": jax.random.normal(jax.random.key(3), (8, 5, 3)),
          "b": jax.random.normal(jax.random.key(4), (8, 3))}
    program = topologies.vmap_round(alg, 8)
    batches = node_batches(ref.builder(DATA), 0, 8)
    # Every example masked out: no gradient step (a fully masked step is a no-op), pure PushSum.
    batches = batches._replace(mask=jnp.zeros_like(batches.mask))
    keys = jax.random.split(jax.random.key(0), 8)
    a = jnp.asarray(topo.matrices[0], jnp.float32)
    state = alg.init(x0)
    for _ in range(150):
        state, metrics = program(state, a, batches, keys)
    assert metrics["train_examples"] == 0 and np.isnan(metrics["train_loss"])
    z = alg.estimate(state)
    for k in x0:
        mean = np.asarray(x0[k]).mean(axis=0)
        np.testing.assert_allclose(z[k], np.broadcast_to(mean, z[k].shape), atol=1e-5)
        # The numerators alone are biased by the stationary weights (not 1 on this graph).
        assert np.abs(np.asarray(state.params[k]) - mean).max() > 1e-2
    # Mass is preserved: sum_i x_i and sum_i w_i = n.
    np.testing.assert_allclose(np.asarray(state.params["w"]).sum(0),
                               np.asarray(x0["w"]).sum(0), atol=1e-4)
    np.testing.assert_allclose(float(jnp.sum(state.extra)), 8.0, rtol=1e-6)


def test_on_a_doubly_stochastic_graph_pushsum_is_dsgd():
    # Rows summing to 1 keep every weight at 1, so x / w = x and SGP's step is D-SGD's.
    topo = topologies.torus(2, 4)
    runs = [topologies.run_decentralized(alg, topo, DATA, PARAMS, rounds=ref.ROUNDS,
                                         batch_size=ref.BATCH, local_steps=ref.STEPS)
            for alg in (ref.PUSHSUM, ref.DSGD)]
    np.testing.assert_allclose(runs[0].state.extra, 1.0, atol=1e-6)
    for k in ("w", "b"):
        np.testing.assert_allclose(runs[0].state.params[k], runs[1].state.params[k], atol=1e-6)
    assert runs[0].history[-1]["consensus_distance"] == pytest.approx(
        runs[1].history[-1]["consensus_distance"], rel=1e-5)
