"""SecAgg / SecAgg+ rounds: exact sums, dropouts, the threshold, the server's view, forgeries."""

import struct

import numpy as np
import pytest
from scipy import stats

from fedjax_lab.secagg import (
    FixedPoint,
    MessageError,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    messages,
    protocol,
    run_protocol,
)

FP = FixedPoint(bits=24, frac_bits=10, bound=8.0)


def make(n, dim=257, *, t, k=None, seed=0, fp=FP):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-fp.bound, fp.bound, (n, dim))
    codes = {i: fp.encode(x[i])[0] for i in range(n)}
    config = SecAggConfig(n, dim, fp, t, neighbours=k, graph_seed=seed,
                          session=rng.bytes(16))
    return config, codes


def plain_sum(codes, who, fp=FP):
    return fp.reduce(np.sum([codes[i] for i in who], axis=0, dtype=np.uint64))


@pytest.mark.parametrize(("n", "k", "t"), [(6, None, 4), (10, 4, 3)], ids=["secagg", "plus"])
def test_masks_cancel_exactly(n, k, t):
    config, codes = make(n, t=t, k=k)
    res = run_protocol(config, codes)
    assert res.survivors == tuple(range(n)) and not res.rejected and res.rounds == 4
    np.testing.assert_array_equal(res.total, plain_sum(codes, range(n)))


def spread_dropouts(config, count):
    """Up to ``count`` clients such that every client keeps ``t`` of its share holders."""
    graph = config.graph()
    slack = len(graph[0]) + 1 - config.threshold
    chosen = []
    for u in range(config.num_clients):
        trial = {*chosen, u}
        if all(len(({v} | set(g.tolist())) & trial) <= slack for v, g in enumerate(graph)):
            chosen.append(u)
        if len(chosen) == count:
            return chosen
    raise AssertionError("graph too small for the dropouts")


@pytest.mark.parametrize(("n", "k", "t"), [(8, None, 5), (12, 4, 3)], ids=["secagg", "plus"])
def test_dropouts_below_threshold_recover_survivors_sum(n, k, t):
    config, codes = make(n, t=t, k=k, seed=2)
    chosen = spread_dropouts(config, 3)
    dropouts = dict(zip(chosen, ["share", "masked", "unmask"], strict=True))
    res = run_protocol(config, codes, dropouts=dropouts)
    survivors = [u for u in range(n) if dropouts.get(u, "unmask") == "unmask"]
    assert res.survivors == tuple(survivors)
    np.testing.assert_array_equal(res.total, plain_sum(codes, survivors))


def test_secagg_plus_survivor_without_enough_live_holders_fails_cleanly():
    config, codes = make(12, t=3, k=4, seed=2)
    v = 5
    lost = config.graph()[v][:3].tolist()  # 3 of v's 4 neighbours leave before unmasking
    with pytest.raises(SecAggError, match=f"2 shares of survivor {v}'s self-mask arrived, "
                                          "fewer than the threshold t=3"):
        run_protocol(config, codes, dropouts=dict.fromkeys(lost, "unmask"))


def test_too_many_dropouts_fail_cleanly_with_counts():
    config, codes = make(5, t=3)
    with pytest.raises(SecAggError, match="2 of 5 clients sent masked inputs, fewer than the "
                                          "threshold t=3"):
        run_protocol(config, codes, dropouts={0: "masked", 1: "masked", 2: "share"})
    # Enough masked inputs, but too few clients left to unmask.
    with pytest.raises(SecAggError, match="3 of 5 clients answered the unmasking round, fewer "
                                          "than the threshold t=4"):
        run_protocol(make(5, t=4)[0], codes, dropouts={0: "unmask", 1: "unmask"})
    with pytest.raises(ValueError, match="strict majority of the 5 share holders"):
        make(5, t=2)[0].validate()


def test_server_view_of_one_upload_is_uniform():
    """Chi-square of one client's masked vector over 64 equal bins of Z_(2^16).

    The input is constant (all codes 0), so without masks every value lands in one bin;
    masked, the 64-bin statistic of 2^14 values follows chi2(63) and must stay below its
    1e-6 upper quantile (a false alarm once in a million runs).
    """
    fp = FixedPoint(16, 4, 1.0)
    n, dim = 4, 2**14
    config = SecAggConfig(n, dim, fp, 3, session=bytes(range(16)))
    seen = {}

    def spy(stage, client, data):
        if stage == "masked" and client == 2 and data[4] == messages.MASKED:
            seen["y"] = messages.unpack_vector(data[messages.HEADER.size:], dim, fp.bits)
        return data

    zeros = {i: np.zeros(dim, np.uint64) for i in range(n)}
    res = run_protocol(config, zeros, tamper=spy)
    assert not res.total.any()
    bound = stats.chi2.isf(1e-6, 63)

    def chi2(values):
        counts = np.bincount((values >> np.uint64(10)).astype(np.int64), minlength=64)
        return float(np.sum((counts - dim / 64) ** 2 / (dim / 64)))

    assert chi2(seen["y"]) < bound
    assert chi2(zeros[2]) > bound  # the test has power: the unmasked input is rejected


def test_forged_share_is_rejected_by_its_recipient_and_the_round_goes_on():
    config, codes = make(6, t=4, seed=3)

    def flip(stage, client, data):
        if stage == "masked" and client == 2 and data[4] == messages.FORWARD:
            data = bytearray(data)
            data[-1] ^= 1  # the last ciphertext's GCM tag
            return bytes(data)
        return data

    res = run_protocol(config, codes, tamper=flip)
    assert "fails authentication" in res.rejected[2]
    assert res.survivors == (0, 1, 3, 4, 5)
    np.testing.assert_array_equal(res.total, plain_sum(codes, res.survivors))


def test_malformed_and_forged_messages_to_the_server_are_rejected():
    config, codes = make(7, t=4, seed=4)
    other = SecAggConfig(*config[:-1], session=bytes(16))

    def corrupt(stage, client, data):
        if stage == "masked" and client == 1 and data[4] == messages.MASKED:
            return data[:-1]  # truncated vector
        if stage == "masked" and client == 3 and data[4] == messages.MASKED:
            return messages.pack(messages.MASKED, other.session, 3, data[messages.HEADER.size:])
        if stage == "share" and client == 5 and data[4] == messages.SHARES:
            return messages.pack(messages.SHARES, config.session, 4, data[messages.HEADER.size:])
        return data

    res = run_protocol(config, codes, tamper=corrupt)
    assert "expected" in res.rejected[1] and "another session" in res.rejected[3]
    assert "claims to be from client 4" in res.rejected[5]
    assert res.survivors == (0, 2, 4, 6)
    np.testing.assert_array_equal(res.total, plain_sum(codes, res.survivors))


def test_forged_unmasking_share_is_detected():
    config, codes = make(5, t=3, seed=5)

    def forge(stage, client, data):
        if stage == "unmask" and client == 0 and data[4] == messages.UNMASK:
            data = bytearray(data)
            data[messages.HEADER.size + 4 + 5 + 65] ^= 1  # own b-share (u = 0, x = 1)
            return bytes(data)
        return data

    with pytest.raises(SecAggError, match="does not match its commitment"):
        run_protocol(config, codes, tamper=forge)


def test_client_refuses_to_unmask_when_told_too_few_survived():
    config, codes = make(5, t=3, seed=6)
    server = SecAggServer(config)
    clients = [SecAggClient(config, i, codes[i]) for i in range(5)]
    keys = server.receive_advertise({c.index: c.advertise() for c in clients})
    fwd = server.receive_shares({c.index: c.share_keys(keys[c.index]) for c in clients})
    server.receive_masked({c.index: c.masked_input(fwd[c.index]) for c in clients})
    lie = messages.pack(messages.SURVIVORS, config.session, 0,
                        messages.join_records([struct.pack("<I", 0), struct.pack("<I", 1)]))
    with pytest.raises(SecAggError, match="only 2 of its share holders"):
        clients[0].unmask(lie)
    with pytest.raises(MessageError, match="unmask called at stage done"):
        clients[0].unmask(lie)  # and it never answers twice


def test_byte_counts_are_the_messages_sizes():
    n, dim, t = 5, 1000, 3
    config, codes = make(n, dim, t=t)
    res = run_protocol(config, codes)
    h = messages.HEADER.size
    per = res.bytes_per_client()
    assert per["advertise_up"] == h + 64
    assert per["share_down"] == h + 4 + (n - 1) * 68
    assert per["share_up"] == h + 32 + 4 + (n - 1) * (4 + protocol.CIPHERTEXT_BYTES)
    assert per["masked_up"] == h + dim * 3  # 24-bit ring: 3 bytes per coordinate
    assert per["unmask_up"] == h + 4 + n * (5 + 66)
