"""The sharded round program (nodes over 4 forced CPU devices, tests/conftest.py) equals vmap."""

import jax
import numpy as np
import pytest

from fedjax_lab import topologies
from tests.topologies import reference as ref
from tests.topologies.test_pushsum import EDGES

DATA, PARAMS = ref.DATA, ref.PARAMS
ROUNDS = 2
CASES = {
    # Time-varying: shifts 1, 2, 4 of the one-peer cycle; with 2 nodes per device shift 1
    # moves part of a block, 2 and 4 whole blocks.
    "dsgd-one-peer-permute-4dev": ("dsgd", lambda: topologies.one_peer_exponential(8),
                                   "permute", 4),
    # Ring shifts +-1 cross device boundaries; the compressed x_hat is what is mixed.
    "choco-ring-permute-4dev": ("choco", lambda: topologies.ring(8), "permute", 4),
    # A directed graph with chords: "auto" picks the all-gather with rows of W here.
    "pushsum-directed-auto-2dev": ("pushsum", lambda: topologies.directed(8, EDGES), "auto", 2),
}


def _algorithm(name):
    if name == "dsgd":
        return ref.DSGD
    if name == "pushsum":
        return ref.PUSHSUM
    return ref.CHOCO_TOP_K


def _run(alg, topo, **backend):
    return topologies.run_decentralized(alg, topo, DATA, PARAMS, rounds=ROUNDS,
                                        batch_size=ref.BATCH, local_steps=ref.STEPS, **backend)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_vmap(case):
    name, make, exchange, num_devices = CASES[case]
    alg, topo = _algorithm(name), make()
    want = _run(alg, topo)
    got = _run(alg, topo, backend="sharded", devices=jax.devices()[:num_devices],
               exchange=exchange)
    for a, b in zip(jax.tree.leaves((want.state.params, want.state.extra)),
                    jax.tree.leaves((got.state.params, got.state.extra)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    for a, b in zip(want.history, got.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_sharded_refuses_uneven_blocks_and_unknown_exchange():
    alg = _algorithm("dsgd")
    with pytest.raises(ValueError, match="6 nodes do not split evenly over 4 devices"):
        topologies.sharded_round(alg, topologies.ring(6), jax.devices()[:4])
    with pytest.raises(ValueError, match="exchange must be one of"):
        topologies.sharded_round(alg, topologies.ring(8), exchange="mpi")


def test_auto_exchange_permutes_sparse_circulant_graphs_only():
    resolve = topologies.node_backends.resolve_exchange
    assert resolve(topologies.ring(16), 4) == "permute"  # 2 shifts x 4 rows < 12
    assert resolve(topologies.torus(4, 4), 4) == "gather"  # 6 shifts x 4 rows >= 12
    assert resolve(topologies.directed(8, EDGES), 2) == "gather"
    assert resolve(topologies.fully_connected(8), 4, "permute") == "permute"
