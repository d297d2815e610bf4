"""Exclusion and detection metrics of selecting rules (Krum, Multi-Krum, Bulyan) against numpy
loops, through with_aggregator, and in a real attacked run (runner + CLI)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.kit import CLIENT_METRICS
from fedjax_lab.algorithms.robust import bulyan, krum, median, multi_krum, with_aggregator
from fedjax_lab.algorithms.robust.detection import slot_metric
from fedjax_lab.attacks import (
    mark_malicious,
    scale,
    select_malicious,
    with_malicious_flag,
    with_model_poisoning,
)
from fedjax_lab.attacks.model_poisoning import MALICIOUS_METRIC
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import ClientOutput
from fedjax_lab.data.federated import sample_clients
from fedjax_lab.runner import run
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=3, classes=2)


def np_krum_chosen(x, valid, f, m):
    """Indices Multi-Krum keeps (Blanchard et al. 2017), a plain loop; ties by slot."""
    idx = [i for i in range(len(x)) if valid[i]]
    n = len(idx)
    k = min(max(n - f - 2, 1), n - 1)
    scores = [sum(sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in idx if j != i)[:k])
              for i in idx]
    order = sorted(range(n), key=lambda t: (scores[t], t))
    return {idx[t] for t in order[: min(m, n)]}


def np_bulyan_picked(x, valid, f):
    """Bulyan's theta = n - 2f recursive Krum picks (El Mhamdi et al. 2018), a plain loop."""
    remaining = [i for i in range(len(x)) if valid[i]]
    picked = set()
    for _ in range(max(len(remaining) - 2 * f, 1)):
        r = len(remaining)
        k = min(max(r - f - 2, 1), r - 1)
        scores = [sum(sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in remaining
                             if j != i)[:k]) for i in remaining]
        best = remaining[min(range(r), key=lambda t: (scores[t], remaining[t]))]
        picked.add(best)
        remaining.remove(best)
    return picked


def np_detection(chosen, valid, malicious):
    """(excluded per slot, precision, recall) with NaN for an empty denominator."""
    excluded = np.array([bool(v) and i not in chosen for i, v in enumerate(valid)])
    bad = malicious & valid
    hits = np.sum(excluded & bad)
    precision = hits / excluded.sum() if excluded.sum() else np.nan
    recall = hits / bad.sum() if bad.sum() else np.nan
    return excluded.astype(np.float32), precision, recall


def outputs_of(updates, valid, malicious):
    """Stacked FedAvg ClientOutputs whose raw updates are ``updates`` ({"b", "w"} rows)."""
    c = len(updates)
    nb = MODEL.classes
    tree = {"b": jnp.asarray(updates[:, :nb]),
            "w": jnp.asarray(updates[:, nb:]).reshape(c, MODEL.dim, MODEL.classes)}
    weight = jnp.asarray(np.where(valid, 5.0, 0.0), jnp.float32)
    metrics = {k: jnp.zeros(c) for k in CLIENT_METRICS}
    metrics[MALICIOUS_METRIC] = jnp.asarray(malicious, jnp.float32)
    return ClientOutput(update=tree, weight=weight, metrics=metrics)


def server_metrics(alg, outputs):
    """The round metrics of aggregate + server_update, jitted (as the backends run them)."""
    state = alg.init(MODEL.init(jax.random.key(0)))
    return jax.jit(lambda o: alg.server_update(state, alg.aggregate(o))[1])(outputs)


CASES = {
    # Two far-away malicious rows (slots 1, 4), one invalid slot; Krum f=2 keeps one.
    "krum": (krum(2), lambda x, v: np_krum_chosen(x, v, 2, 1)),
    "multi_krum": (multi_krum(2, 4), lambda x, v: np_krum_chosen(x, v, 2, 4)),
    "bulyan": (bulyan(1), lambda x, v: np_bulyan_picked(x, v, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_detection_metrics_match_numpy(name):
    rule, reference = CASES[name]
    rng = np.random.default_rng(0)
    c, d = 9, MODEL.classes * (MODEL.dim + 1)
    x = rng.normal(size=(c, d))
    malicious = np.zeros(c, bool)
    malicious[[1, 4, 7]] = True
    x[1] += 30.0  # far from everyone, each other included
    x[4] -= 30.0  # slot 7 is malicious but looks honest: a miss
    valid = np.ones(c, bool)
    valid[6] = False
    x[6] = np.nan  # an invalid row never leaks into the selection
    alg = with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=2), rule)
    outputs = outputs_of(x.astype(np.float32), valid, malicious)
    metrics = server_metrics(alg, outputs)
    chosen = reference(np.where(valid[:, None], x, 0.0), valid)
    excluded, precision, recall = np_detection(chosen, valid, malicious)
    got = np.array([float(metrics[slot_metric(i)]) for i in range(c)])
    np.testing.assert_array_equal(got, excluded)
    assert float(metrics["excluded_clients"]) == excluded.sum()
    assert float(metrics["malicious_valid"]) == 3.0
    np.testing.assert_allclose(float(metrics["detection_precision"]), precision, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["detection_recall"]), recall, rtol=1e-6)
    # 8 valid slots: Krum keeps 1, Multi-Krum 4, Bulyan theta = n - 2f = 6.
    assert excluded.sum() == {"krum": 7, "multi_krum": 4, "bulyan": 2}[name]
    if name != "bulyan":  # Bulyan's last recursive pick (3 left, 1 neighbour) may be an outlier
        assert excluded[1] == excluded[4] == 1.0


def test_undefined_precision_and_recall_are_nan_not_zero():
    # Multi-Krum keeping every valid slot excludes nothing; no malicious client reports.
    x = np.random.default_rng(1).normal(size=(5, MODEL.classes * (MODEL.dim + 1)))
    alg = with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=2), multi_krum(1, 5))
    metrics = server_metrics(
        alg, outputs_of(x.astype(np.float32), np.ones(5, bool), np.zeros(5, bool)))
    assert float(metrics["excluded_clients"]) == 0.0
    assert np.isnan(float(metrics["detection_precision"]))
    assert np.isnan(float(metrics["detection_recall"]))


def test_without_a_malicious_flag_only_exclusions_are_reported():
    x = np.random.default_rng(2).normal(size=(5, MODEL.classes * (MODEL.dim + 1)))
    alg = with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=2), krum(1))
    outputs = outputs_of(x.astype(np.float32), np.ones(5, bool), np.zeros(5, bool))
    outputs = outputs._replace(metrics={k: v for k, v in outputs.metrics.items()
                                        if k != MALICIOUS_METRIC})
    metrics = server_metrics(alg, outputs)
    assert float(metrics["excluded_clients"]) == 4.0
    assert "detection_recall" not in metrics
    # Rules that weigh coordinates, not clients, select nothing.
    assert not median().selects and krum(1).selects


@pytest.fixture(scope="module")
def attacked_run():
    data = make_population([12, 20, 8, 15, 10, 14, 9, 11, 13, 16], dim=MODEL.dim,
                           classes=MODEL.classes, seed=4)
    malicious = select_malicious(data.num_clients, 0.3, seed=5)
    base = with_aggregator(fedavg(MODEL, optax.sgd(0.2), batch_size=4), krum(2))
    alg = with_model_poisoning(base, scale(50.0))
    result = run(alg, VmapBackend("vmap", packing="off"), mark_malicious(data, malicious),
                 MODEL.init(jax.random.key(0)), rounds=3, clients_per_round=7, seed=5)
    return data, malicious, result


def test_run_reports_which_slots_krum_excluded(attacked_run):
    data, malicious, result = attacked_run
    for r, rec in enumerate(result.history):
        clients = sample_clients(data.num_clients, 7, rng_lib.host_rng(5, rng_lib.SAMPLING_STREAM,
                                                                      r))
        bad = np.isin(clients, malicious)
        assert rec["malicious_valid"] == bad.sum() == rec["malicious_clients"]
        slots = np.array([rec[slot_metric(i)] for i in range(7)])
        # Krum keeps exactly one of the 7 slots; 50x boosted uploads are never the one kept.
        assert rec["excluded_clients"] == slots.sum() == 6.0
        assert np.all(slots[bad] == 1.0)
        if bad.any():
            assert rec["detection_recall"] == 1.0
            assert rec["detection_precision"] == pytest.approx(bad.sum() / 6.0)
        else:
            assert np.isnan(rec["detection_recall"])


def test_data_attack_flag_leaves_training_unchanged():
    # with_malicious_flag adds the flag, not a change: same model as the unflagged run.
    data = make_population([12, 20, 8, 15, 10], dim=MODEL.dim, classes=MODEL.classes, seed=6)
    marked = mark_malicious(data, [1, 3])
    base = with_aggregator(fedavg(MODEL, optax.sgd(0.2), batch_size=4), krum(1))
    params = MODEL.init(jax.random.key(1))
    backend = VmapBackend("vmap", packing="off")
    plain = run(base, backend, data, params, rounds=2, clients_per_round=5, seed=2)
    flagged = run(with_malicious_flag(base), backend, marked, params, rounds=2,
                  clients_per_round=5, seed=2)
    for a, b in zip(jax.tree.leaves(plain.server_state.params),
                    jax.tree.leaves(flagged.server_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert [h["malicious_clients"] for h in flagged.history] == [2.0, 2.0]
    assert all(h["malicious_valid"] == 2.0 for h in flagged.history)


def test_train_cli_flags_a_data_attack_under_a_selecting_aggregator():
    """train.py marks and flags label-flipped clients when the aggregator selects (the flag
    wrapper's effect on a run is tested above); nothing is compiled here."""
    from fedjax_lab.experiment import build_problem
    from fedjax_lab.train import TrainConfig

    flags = ["--num-clients", "10", "--clients-per-round", "5", "--model", "logreg",
             "--seed", "3", "--attack", "label_flip", "--malicious-fraction", "0.3",
             "--out", "unused"]
    krum_cfg = TrainConfig.parse([*flags, "--aggregator", "krum", "--byzantine-clients", "1"])
    median_cfg = TrainConfig.parse([*flags, "--aggregator", "median"])
    assert krum_cfg.scores_detection() and not median_cfg.scores_detection()
    _, train, model, _, _ = build_problem(krum_cfg)
    rows = np.repeat(np.arange(10), np.diff(train.offsets))
    np.testing.assert_array_equal(train.arrays["malicious"],
                                  np.isin(rows, select_malicious(10, 0.3, 3)))
    alg = krum_cfg.make_algorithm(model)
    assert alg.name.endswith("krum1")
    assert alg.client_update is not median_cfg.make_algorithm(model).client_update
