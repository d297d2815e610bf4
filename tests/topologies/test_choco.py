"""CHOCO-SGD (Koloskova et al. 2019): identity + gamma = 1 is D-SGD; top-k vs numpy."""

import numpy as np
import optax
import pytest

from fedjax_lab import topologies
from fedjax_lab.compressors import identity
from tests.topologies import reference as ref

DATA, PARAMS, OBJECTIVE, W0, B0 = ref.DATA, ref.PARAMS, ref.OBJECTIVE, ref.W0, ref.B0
D = 5 * 3 + 3  # coordinates of one node's model


def _run(algorithm, topology):
    return topologies.run_decentralized(algorithm, topology, DATA, PARAMS, rounds=ref.ROUNDS,
                                        batch_size=ref.BATCH, local_steps=ref.STEPS)


def test_identity_compressor_and_unit_gamma_is_dsgd():
    topo = topologies.exponential(8)
    choco = _run(topologies.choco_sgd(OBJECTIVE, optax.sgd(ref.LR), identity(), gamma=1.0),
                 topo)
    dsgd = _run(ref.DSGD, topo)
    for k in ("w", "b"):
        # x_half + (W x_half - x_half) vs W x_half: equal up to one float32 rounding.
        np.testing.assert_allclose(choco.state.params[k], dsgd.state.params[k], atol=1e-6)
    for a, b in zip(choco.history, dsgd.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key


def test_top_k_matches_numpy():
    topo = topologies.ring(8)
    result = _run(ref.CHOCO_TOP_K, topo)
    w, b = ref.choco_top_k(DATA, W0, B0, topo.matrices[0], ref.TOP_K, ref.GAMMA)
    np.testing.assert_allclose(result.state.params["w"], w, atol=1e-5)
    np.testing.assert_allclose(result.state.params["b"], b, atol=1e-5)
    # Exact bits of the top-k payloads, far below dense gossip's 32 * D per node.
    assert 0 < result.history[-1]["gossip_bits"] < 8 * 32 * D / 2


@pytest.mark.parametrize("gamma", [0.0, 1.5, float("nan"), True], ids=["0", "1.5", "nan", "bool"])
def test_gamma_outside_unit_interval_is_refused(gamma):
    with pytest.raises(ValueError, match=r"gamma \(the consensus step size\) must be in \(0, 1\]"):
        topologies.choco_sgd(OBJECTIVE, optax.sgd(0.1), identity(), gamma=gamma)


def test_compressor_must_be_a_compressor():
    with pytest.raises(TypeError, match="compressor must be"):
        topologies.choco_sgd(OBJECTIVE, optax.sgd(0.1), "top_k", gamma=0.5)
