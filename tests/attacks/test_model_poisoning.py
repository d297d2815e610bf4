"""Model-poisoning wrappers: malicious uploads against numpy references, flags as data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import median, with_aggregator
from fedjax_lab.attacks import (
    MALICIOUS_CLIENTS,
    alie,
    alie_z,
    ipm,
    mark_malicious,
    noise,
    scale,
    sign_flip,
    with_model_poisoning,
)
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import identity, qsgd
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.rng import client_keys
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.runner import run
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
SIZES = [6, 7, 5, 8, 6, 9]
MALICIOUS = [1, 4]
SLOTS = 6  # every client, plus padding below
COHORT = 8  # two padded slots


@pytest.fixture(scope="module")
def setup():
    data = mark_malicious(make_population(SIZES, seed=3), MALICIOUS)
    algo = fedavg(MODEL, optax.sgd(0.3), batch_size=4)
    params = MODEL.init(jax.random.key(0))
    builder = CohortBuilder(data, batch_size=4, local_epochs=1, num_steps=None,
                            cohort_size=COHORT, seed=0, device_table=True)
    cohort = builder.build(0, list(range(SLOTS)))
    keys = client_keys(jax.random.key(7), COHORT)
    backend = VmapBackend()
    state = algo.init(params)

    def outputs(a):
        out, _ = jax.jit(lambda s, c, k: backend.client_outputs(a, s, (), c, k))(
            state, cohort, keys)
        return out

    honest = outputs(algo)
    flat = np.concatenate([np.asarray(honest.update["b"]).reshape(COHORT, -1),
                           np.asarray(honest.update["w"]).reshape(COHORT, -1)], axis=1)
    mal = np.zeros(COHORT, bool)
    mal[MALICIOUS] = True  # slot i holds client i
    return dict(algo=algo, outputs=outputs, flat=flat.astype(np.float64), mal=mal,
                weight=np.asarray(honest.weight, np.float64), keys=keys, state=state)


def flat_update(update):
    return np.concatenate([np.asarray(update["b"]).reshape(COHORT, -1),
                           np.asarray(update["w"]).reshape(COHORT, -1)], axis=1)


@pytest.mark.parametrize("attack,reference", [
    (scale(10.0), lambda u, i: 10.0 * u),
    (sign_flip(), lambda u, i: -u),
    (sign_flip(2.5), lambda u, i: -2.5 * u),
])
def test_per_client_uploads_match_numpy(setup, attack, reference):
    out = setup["outputs"](with_model_poisoning(setup["algo"], attack))
    got = flat_update(out.update)
    for i in range(COHORT):
        want = reference(setup["flat"][i], i) if setup["mal"][i] else setup["flat"][i]
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.metrics["attack_malicious"]),
                                  setup["mal"].astype(np.float32))


def test_noise_upload_is_the_clients_noise_draw(setup):
    out = setup["outputs"](with_model_poisoning(setup["algo"], noise(0.5)))
    got = flat_update(out.update)
    d = got.shape[1]
    for i in range(COHORT):
        if not setup["mal"][i]:
            np.testing.assert_allclose(got[i], setup["flat"][i], rtol=1e-5, atol=1e-6)
            continue
        key = jax.random.fold_in(setup["keys"][i], rng_lib.ATTACK_NOISE_STREAM)
        want = 0.5 * np.asarray(jax.random.normal(key, (d,), jnp.float32))
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    # Two malicious clients draw different noise (distinct client keys).
    assert not np.allclose(got[MALICIOUS[0]], got[MALICIOUS[1]])


def np_moments(flat, honest):
    return flat[honest].mean(axis=0), flat[honest].std(axis=0)


def np_alie(flat, mal, valid, z=None):
    n, m = valid.sum(), (mal & valid).sum()
    if z is None:
        s = np.floor(n / 2 + 1) - m
        z = norm.ppf((n - s) / n)
    mu, sd = np_moments(flat, valid & ~mal)
    out = flat.copy()
    out[mal & valid] = mu - z * sd
    return out, z


def np_ipm(flat, mal, valid, eps):
    mu, _ = np_moments(flat, valid & ~mal)
    out = flat.copy()
    out[mal & valid] = -eps * mu
    return out


@pytest.mark.parametrize("which", ["alie", "alie_fixed", "ipm"])
def test_omniscient_aggregate_matches_numpy(setup, which):
    attack = {"alie": alie(), "alie_fixed": alie(1.5), "ipm": ipm(0.7)}[which]
    algo = with_model_poisoning(setup["algo"], attack)
    assert not algo.additive
    outputs = setup["outputs"](algo)
    agg = jax.jit(algo.aggregate)(outputs)
    flat, mal, w = setup["flat"], setup["mal"], setup["weight"]
    valid = w > 0
    if which == "ipm":
        poisoned = np_ipm(flat, mal, valid, 0.7)
    else:
        poisoned, z = np_alie(flat, mal, valid, None if which == "alie" else 1.5)
        np.testing.assert_allclose(float(agg.metric_sums["alie_z"]), z, rtol=1e-5)
    want = (w[:, None] * poisoned).sum(axis=0)
    got = np.concatenate([np.asarray(agg.update_sum["b"]).ravel(),
                          np.asarray(agg.update_sum["w"]).ravel()])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(agg.metric_sums["attack_malicious"]) == 2.0


def test_alie_z_formula():
    # Baruch et al. 2019, §3: n = 50, m = 12 -> s = 14, z = Phi^-1(36/50) ~ 0.58.
    np.testing.assert_allclose(float(alie_z(50, 12)), norm.ppf(36 / 50), rtol=1e-5)
    assert np.isinf(float(alie_z(10, 6)))  # s <= 0: the formula has no finite z


def test_omniscient_attack_feeds_the_robust_rule(setup):
    """with_model_poisoning over with_aggregator: the median sees the poisoned uploads."""
    algo = with_model_poisoning(with_aggregator(setup["algo"], median()), ipm(0.7))
    agg = jax.jit(algo.aggregate)(setup["outputs"](algo))
    flat, mal, w = setup["flat"], setup["mal"], setup["weight"]
    valid = w > 0
    est = np.median(np_ipm(flat, mal, valid, 0.7)[valid], axis=0)
    got = np.concatenate([np.asarray(agg.update_sum["b"]).ravel(),
                          np.asarray(agg.update_sum["w"]).ravel()])
    np.testing.assert_allclose(got, est * w.sum(), rtol=1e-5, atol=1e-5)


def test_packed_run_equals_padded_and_reports_malicious_clients():
    """Packing resets the carry (and its malicious flag) at each client boundary: packed and
    padded rounds of a poisoned algorithm compute the same numbers."""
    data = mark_malicious(make_population([2, 9, 3, 12, 4, 5], seed=3), MALICIOUS)
    # The identity compressor's flat payload is poisoned like the raw delta.
    algo = with_model_poisoning(
        fedavg(MODEL, optax.sgd(0.3), batch_size=2, compressor=identity()), scale(3.0))
    params = MODEL.init(jax.random.key(0))
    runs = {mode: run(algo, VmapBackend(packing=PackingPolicy(mode)), data, params, rounds=1,
                      clients_per_round=6, seed=1) for mode in ("on", "off")}
    assert runs["on"].history[0]["packed_slots"] > 0
    for packed, padded in zip(runs["on"].history, runs["off"].history, strict=True):
        assert packed[MALICIOUS_CLIENTS] == padded[MALICIOUS_CLIENTS] == 2.0  # all sampled
        np.testing.assert_allclose(packed["train_loss"], padded["train_loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs["on"].server_state.params),
                    jax.tree.leaves(runs["off"].server_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bad_inputs(setup):
    with pytest.raises(ValueError, match="boost"):
        scale(0.0)
    with pytest.raises(ValueError, match="sigma"):
        noise(float("nan"))
    with pytest.raises(ValueError, match="epsilon"):
        ipm(-1.0)
    marked = mark_malicious(make_population(SIZES, seed=3), MALICIOUS)
    compressed = with_model_poisoning(
        fedavg(MODEL, optax.sgd(0.3), batch_size=4, compressor=qsgd(4)), scale(2.0))
    with pytest.raises(ValueError, match="identity compressor"):
        run(compressed, VmapBackend(), marked, MODEL.init(jax.random.key(0)), rounds=1,
            clients_per_round=2, seed=0)
    unmarked = make_population(SIZES, seed=3)
    algo = with_model_poisoning(fedavg(MODEL, optax.sgd(0.3), batch_size=4), scale(2.0))
    with pytest.raises(ValueError, match="mark_malicious"):
        run(algo, VmapBackend(), unmarked, MODEL.init(jax.random.key(0)), rounds=1,
            clients_per_round=2, seed=0)
