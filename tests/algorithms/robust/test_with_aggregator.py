"""with_aggregator on FedAvg: numpy reference runs, masking, compressors, backends, Byzantines."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import (
    client_contributions,
    clip_norm,
    krum,
    mean,
    median,
    multi_krum,
    trimmed_mean,
    with_aggregator,
)
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.runner import run
from tests.algorithms._numpy_ref import (
    client_steps,
    local_sgd,
    make_builder,
    sampled_clients,
    to_np,
)
from tests.algorithms.robust._numpy_rules import (
    np_mean,
    np_median,
    np_multi_krum,
    np_trimmed_mean,
)
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
LR, BATCH, EPOCHS = 0.3, 4, 1


def np_clip(x, bound):
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def numpy_robust_fedavg(data, params, rule, *, rounds, clients_per_round, seed, clip=None):
    """FedAvg in float64 numpy whose server step applies ``rule(deltas, weights)``."""
    p = to_np(params)
    builder = make_builder(data, batch_size=BATCH, local_epochs=EPOCHS, seed=seed)
    for r in range(rounds):
        deltas, weights = [], []
        for c in sampled_clients(data, clients_per_round, seed, r):
            q = local_sgd(p, data, client_steps(builder, c, r), LR)
            # Same flattening order as jax.tree.flatten of {"b", "w"}.
            deltas.append(np.concatenate([(q["b"] - p["b"]).ravel(), (q["w"] - p["w"]).ravel()]))
            weights.append(float(data.sizes[c]))
        deltas, weights = np.stack(deltas), np.asarray(weights)
        if clip is not None:
            deltas = np_clip(deltas, clip)
        est = rule(deltas, weights)
        nb = p["b"].size
        p = {"b": p["b"] + est[:nb], "w": p["w"] + est[nb:].reshape(p["w"].shape)}
    return p["w"], p["b"]


def _all_valid(fn):
    return lambda x, w: fn(x, np.ones(len(x), bool))


RULES = {
    "median": (median(), _all_valid(np_median)),
    "trimmed": (trimmed_mean(0.2), _all_valid(lambda x, v: np_trimmed_mean(x, v, 0.2))),
    "krum": (krum(1), _all_valid(lambda x, v: np_multi_krum(x, v, 1, 1))),
    "multi_krum": (multi_krum(1, 3), _all_valid(lambda x, v: np_multi_krum(x, v, 1, 3))),
    "mean": (mean(), lambda x, w: np_mean(x, w, np.ones(len(x), bool))),
}


@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
@pytest.mark.parametrize("name", list(RULES))
def test_matches_numpy_reference(name, clip):
    rule, np_rule = RULES[name]
    data = make_population([7, 12, 3, 9, 15, 5, 8, 10], seed=1)
    params = MODEL.init(jax.random.key(0))
    transforms = () if clip is None else (clip_norm(clip),)
    alg = with_aggregator(fedavg(MODEL, optax.sgd(LR), batch_size=BATCH), rule,
                          transforms=transforms)
    result = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=6, seed=7)
    w, b = numpy_robust_fedavg(data, params, np_rule, rounds=3, clients_per_round=6, seed=7,
                               clip=clip)
    np.testing.assert_allclose(result.server_state.params["w"], w, atol=1e-5)
    np.testing.assert_allclose(result.server_state.params["b"], b, atol=1e-5)
    if clip is not None:
        assert all(h["clipped_clients"] > 0 for h in result.history)  # the clip was active


def test_mean_without_transforms_is_fedavg():
    data = make_population([7, 12, 3, 9], seed=2)
    params = MODEL.init(jax.random.key(1))
    base = fedavg(MODEL, optax.sgd(LR), batch_size=BATCH)
    a = run(base, VmapBackend("vmap"), data, params, rounds=2, clients_per_round=3, seed=0)
    b = run(with_aggregator(base, mean()), VmapBackend("vmap"), data, params, rounds=2,
            clients_per_round=3, seed=0)
    chex.assert_trees_all_close(a.server_state.params, b.server_state.params, atol=1e-6)


@pytest.mark.parametrize("rule", [median(), trimmed_mean(0.2), krum(0)],
                         ids=["median", "trimmed", "krum"])
def test_padded_and_rejected_slots_are_excluded(rule):
    good = make_population([6, 8, 5, 9, 7], seed=5)
    x = good.arrays["x"].copy()
    x[good.offsets[4]] = np.nan  # client 4: NaN delta -> rejected (weight 0)
    bad = FederatedData(good.client_ids, {"x": x, "y": good.arrays["y"]}, good.offsets)
    alg = with_aggregator(fedavg(MODEL, optax.sgd(0.2), batch_size=4), rule)
    params = MODEL.init(jax.random.key(3))
    be, key = VmapBackend("vmap"), jax.random.key(9)
    ref_cohort = CohortBuilder(good, batch_size=4, local_epochs=1, cohort_size=4,
                               seed=0).build(0, [0, 1, 2, 3])
    # 5 real clients (one rejected) in 8 slots (3 padded).
    cohort = CohortBuilder(bad, batch_size=4, local_epochs=1, cohort_size=8,
                           seed=0).build(0, [0, 1, 2, 3, 4])
    s_ref, _, _ = be.run_round(alg, alg.init(params), (), ref_cohort, key)
    s, _, m = be.run_round(alg, alg.init(params), (), cohort, key)
    chex.assert_trees_all_close(s.params, s_ref.params, atol=1e-6)
    assert float(m["rejected"]) == 1.0


def test_contributions_decode_compressed_payloads():
    comp = qsgd(num_levels=4)
    alg = fedavg(MODEL, optax.sgd(0.2), batch_size=4, compressor=comp)
    data = make_population([6, 8, 5], seed=6)
    params = MODEL.init(jax.random.key(4))
    cohort = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=3,
                           seed=0).build(0, [0, 1, 2])
    states = jax.tree.map(lambda x: jnp.stack([x] * 3), alg.client_init(params))
    outputs, _ = VmapBackend("vmap").client_outputs(alg, alg.init(params), states, cohort,
                                                   jax.random.split(jax.random.key(0), 3))
    got = jax.jit(lambda o: client_contributions(alg, o))(outputs)
    want = jax.vmap(comp.decode)(outputs.update)
    chex.assert_trees_all_close(got, want, atol=0, rtol=0)
    robust = with_aggregator(alg, median())
    _, metrics = jax.jit(lambda o: robust.server_update(alg.init(params),
                                                        robust.aggregate(o)))(outputs)
    assert float(metrics["clients"]) == 3.0


def _byzantine_population(num_honest, num_attackers, seed=0):
    """Attackers' features are scaled by 1e6, so their local deltas are ~1e6 times larger."""
    honest = make_population([10] * (num_honest + num_attackers), seed=seed)
    x = honest.arrays["x"].copy()
    for c in range(num_honest, num_honest + num_attackers):
        x[honest.offsets[c]: honest.offsets[c + 1]] *= 1e6
    return FederatedData(honest.client_ids, {"x": x, "y": honest.arrays["y"]}, honest.offsets)


@pytest.mark.parametrize(
    ("rule", "attackers", "bounded"),
    [
        (None, 1, False),
        (median(), 4, True),
        (median(), 5, False),
        (trimmed_mean(0.2), 2, True),
        (trimmed_mean(0.2), 3, False),
        (krum(3), 3, True),
    ],
    ids=["mean_a1", "median_a4", "median_a5", "trim_a2", "trim_a3", "krum_a3"],
)
def test_byzantine_clients_end_to_end(rule, attackers, bounded):
    data = _byzantine_population(10 - attackers, attackers)
    params = MODEL.init(jax.random.key(5))
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=10)
    if rule is not None:
        alg = with_aggregator(alg, rule)
    result = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=10, seed=0)
    size = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(result.server_state.params))
    assert (size < 10.0) == bounded, size


def test_non_additive_rules_refuse_chunking_but_clipped_mean_chunks_exactly():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    base = fedavg(MODEL, optax.sgd(LR), batch_size=BATCH)
    robust = with_aggregator(base, median())
    assert not robust.additive
    with pytest.raises(ValueError, match="not additive"):
        run(robust, VmapBackend("vmap", chunk_size=2), data, params, rounds=1,
            clients_per_round=4, seed=0)
    clipped = with_aggregator(base, mean(), transforms=(clip_norm(0.05),))
    assert clipped.additive
    whole = run(clipped, VmapBackend("vmap"), data, params, rounds=2, clients_per_round=4,
                seed=0)
    chunked = run(clipped, VmapBackend("vmap", chunk_size=2), data, params, rounds=2,
                  clients_per_round=4, seed=0)
    chex.assert_trees_all_close(whole.server_state.params, chunked.server_state.params,
                                atol=1e-6)
    assert whole.history[-1]["clipped_clients"] == chunked.history[-1]["clipped_clients"] > 0


@pytest.mark.parametrize("plan", ["unrolled", "loop"])
def test_other_vmap_plans_agree(plan):
    data = make_population([3, 5, 2, 4, 6], seed=3)
    params = MODEL.init(jax.random.key(0))
    alg = with_aggregator(fedavg(MODEL, optax.sgd(LR), batch_size=BATCH), trimmed_mean(0.2))
    ref = run(alg, VmapBackend("vmap"), data, params, rounds=2, clients_per_round=5, seed=1)
    other = run(alg, VmapBackend(plan), data, params, rounds=2, clients_per_round=5, seed=1)
    chex.assert_trees_all_close(ref.server_state.params, other.server_state.params, atol=1e-6)


def test_krum_cohort_too_small_raises_before_running():
    data = make_population([5] * 6, seed=0)
    alg = with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=5), krum(2))
    with pytest.raises(ValueError, match="needs at least 7 client slots"):
        run(alg, VmapBackend("vmap"), data, MODEL.init(jax.random.key(0)), rounds=1,
            clients_per_round=5, seed=0)


def test_krum_reports_underfull_rounds():
    good = make_population([6, 8, 5, 9, 7], seed=5)
    x = good.arrays["x"].copy()
    x[good.offsets[4]] = np.nan  # one rejection leaves 4 valid clients < 2f + 3 = 5
    bad = FederatedData(good.client_ids, {"x": x, "y": good.arrays["y"]}, good.offsets)
    alg = with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=4), krum(1))
    params = MODEL.init(jax.random.key(0))
    full = run(alg, VmapBackend("vmap"), good, params, rounds=1, clients_per_round=5, seed=0)
    short = run(alg, VmapBackend("vmap"), bad, params, rounds=1, clients_per_round=5, seed=0)
    assert full.history[0]["krum_underfull"] == 0.0
    assert short.history[0]["krum_underfull"] == 1.0


def test_bad_arguments_raise():
    base = fedavg(MODEL, optax.sgd(0.1), batch_size=4)
    with pytest.raises(TypeError, match="algorithm must be a fedjax_lab Algorithm"):
        with_aggregator("fedavg", median())
    with pytest.raises(TypeError, match="aggregator must be an Aggregator"):
        with_aggregator(base, np.median)
    with pytest.raises(TypeError, match="transforms must be Transform objects"):
        with_aggregator(base, median(), transforms=(1.0,))
    with pytest.raises(ValueError, match="already has a non-additive aggregate"):
        with_aggregator(with_aggregator(base, median()), krum(1))
