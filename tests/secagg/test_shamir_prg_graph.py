"""Shamir sharing, the AES-CTR PRG and the SecAgg+ neighbour graph against references."""

import itertools

import numpy as np
import pytest

from fedjax_lab.secagg import neighbour_graph, prg, shamir


def test_shamir_any_t_shares_rebuild_and_fewer_fail():
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6], threshold=4)
    for subset in itertools.combinations(shares, 4):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 4) == secret
    for subset in itertools.combinations(shares, 3):
        with pytest.raises(ValueError, match="need 4 shares to reconstruct, got 3"):
            shamir.reconstruct({x: shares[x] for x in subset}, 4)
    # Three shares interpolated as if t were 3 give a different value (degree-3 polynomial).
    assert shamir.reconstruct({x: shares[x] for x in (1, 2, 3)}, 3) != secret


def test_shamir_serialisation_rejects_non_field_elements():
    y = shamir.PRIME - 1
    assert shamir.from_bytes(shamir.to_bytes(y)) == y
    with pytest.raises(ValueError, match="not a field element"):
        shamir.from_bytes(shamir.PRIME.to_bytes(66, "big"))
    with pytest.raises(ValueError, match="66 bytes"):
        shamir.from_bytes(bytes(65))


def test_prg_is_aes_ctr_keystream():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(32))
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    # Reference: the first two counter blocks encrypted one by one, read as 4 LE uint64 words.
    blocks = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(2))
    want = [int.from_bytes(blocks[8 * j: 8 * j + 8], "little") for j in range(4)]
    assert prg.expand(seed, 4, 64).tolist() == want
    assert prg.expand(seed, 4, 20).tolist() == [w % 2**20 for w in want]
    assert not np.array_equal(prg.expand(bytes(32), 4, 64), prg.expand(seed, 4, 64))


@pytest.mark.parametrize(("n", "k"), [(10, 4), (11, 6), (7, 2), (30, 8)])
def test_harary_graph_is_k_regular_symmetric_and_connected(n, k):
    g = neighbour_graph(n, k, seed=3)
    adj = np.zeros((n, n), bool)
    for i, nb in enumerate(g):
        adj[i, nb] = True
    assert np.all(adj.sum(1) == k) and np.array_equal(adj, adj.T) and not np.any(np.diag(adj))
    reach = np.eye(n, dtype=bool)
    for _ in range(n):
        reach = reach | (reach.astype(int) @ adj.astype(int) > 0)
    assert reach.all()
    assert [x.tolist() for x in neighbour_graph(n, k, seed=4)] != [x.tolist() for x in g]


def test_graph_complete_and_errors():
    assert [x.tolist() for x in neighbour_graph(4, None, 0)] == [[1, 2, 3], [0, 2, 3],
                                                                 [0, 1, 3], [0, 1, 2]]
    assert [x.tolist() for x in neighbour_graph(4, 6, 0)] == [
        x.tolist() for x in neighbour_graph(4, None, 0)]
    with pytest.raises(ValueError, match="even"):
        neighbour_graph(10, 3, 0)
