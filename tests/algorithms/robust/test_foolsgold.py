"""FoolsGold (Fung et al. 2020, Algorithm 1): weights against a port of the authors' numpy
code, whole runs (per-client histories across rounds) against a numpy loop, and a sybil
label-flip attack that FoolsGold blunts where FedAvg does not."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import median, with_aggregator, with_foolsgold
from fedjax_lab.algorithms.robust.foolsgold import foolsgold_weights
from fedjax_lab.attacks import label_flip, mark_malicious, with_malicious_flag
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.datasets import load_dataset
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from tests.algorithms._numpy_ref import (
    client_steps,
    local_sgd,
    make_builder,
    sampled_clients,
    to_np,
)
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
LR, BATCH = 0.3, 4


def np_foolsgold(histories, kappa=1.0):
    """The authors' ``foolsgold(grads)`` (DistSys/foolsgold), loops instead of sklearn."""
    n = len(histories)
    cs = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            a, b = histories[i], histories[j]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cs[i, j] = (a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
    cs -= np.eye(n)
    maxcs = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = 1 - cs.max(axis=1)
    wv = np.clip(wv, 0, 1)
    wv = wv / wv.max() if wv.max() > 0 else wv
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = kappa * (np.log(wv / (1 - wv)) + 0.5)
    wv[np.isinf(wv) & (wv > 0)] = 1
    return np.clip(wv, 0, 1)


@pytest.mark.parametrize("kappa", [1.0, 0.5])
def test_weights_match_the_authors_code(kappa):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(8, 6))
    h[[2, 5, 6]] = rng.normal(size=6) + 0.05 * rng.normal(size=(3, 6))  # three sybils
    h[3] = -h[0]  # negative similarity
    valid = np.ones(9, bool)
    valid[4] = False  # an invalid slot is nobody's neighbour
    padded = np.insert(h, 4, 1e6, axis=0)
    weights = jax.jit(foolsgold_weights, static_argnums=2)
    got = np.asarray(weights(jnp.asarray(padded, jnp.float32), jnp.asarray(valid), kappa))
    want = np_foolsgold(h, kappa)
    np.testing.assert_allclose(np.delete(got, 4), want, atol=1e-5)
    assert got[4] == 0.0
    assert np.all(want[[2, 5, 6]] == 0.0) and want.max() == 1.0  # sybils out, not everyone


def numpy_foolsgold_fedavg(data, params, *, rounds, clients_per_round, seed, kappa=1.0):
    """FedAvg in float64 whose server step is FoolsGold over per-client summed updates."""
    p = to_np(params)
    builder = make_builder(data, batch_size=BATCH, local_epochs=1, seed=seed)
    history = {}
    for r in range(rounds):
        clients = sampled_clients(data, clients_per_round, seed, r)
        deltas = []
        for c in clients:
            q = local_sgd(p, data, client_steps(builder, c, r), LR)
            deltas.append(np.concatenate([(q["b"] - p["b"]).ravel(),
                                          (q["w"] - p["w"]).ravel()]))
            history[c] = history.get(c, 0.0) + deltas[-1]
        alpha = np_foolsgold(np.stack([history[c] for c in clients]), kappa)
        est = alpha @ np.stack(deltas) / alpha.sum()
        nb = p["b"].size
        p = {"b": p["b"] + est[:nb], "w": p["w"] + est[nb:].reshape(p["w"].shape)}
    return p


def test_run_matches_numpy_loop_with_histories_across_rounds():
    # 6 clients, 4 a round, 4 rounds: clients come back and their histories accumulate.
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    alg = with_foolsgold(fedavg(MODEL, optax.sgd(LR), batch_size=BATCH), kappa=1.0)
    result = run(alg, VmapBackend("vmap"), data, params, rounds=4, clients_per_round=4, seed=7)
    want = numpy_foolsgold_fedavg(data, params, rounds=4, clients_per_round=4, seed=7)
    np.testing.assert_allclose(result.server_state.params["w"], want["w"], atol=1e-5)
    np.testing.assert_allclose(result.server_state.params["b"], want["b"], atol=1e-5)
    assert all(0.0 < h["foolsgold_mean_weight"] <= 1.0 for h in result.history)


def test_bad_arguments():
    base = fedavg(MODEL, optax.sgd(LR), batch_size=BATCH)
    with pytest.raises(ValueError, match="kappa"):
        with_foolsgold(base, kappa=0.0)
    with pytest.raises(ValueError, match="apply with_foolsgold to the plain algorithm"):
        with_foolsgold(with_aggregator(base, median()))


def test_sybil_label_flip_is_blunted():
    """Fung et al.'s MNIST 1-7 sybil attack on digits: 10 honest clients holding one class each
    (their non-IID setting), 5 sybils each holding 40 random 1s labelled 7. FedAvg
    learns to call the test 1s 7; FoolsGold gives every sybil weight 0 and does not."""
    ds = load_dataset("digits")
    x, y = ds.train["x"], ds.train["y"]
    rng = np.random.default_rng(0)
    clients = {f"honest{k}": {"x": x[y == k][:40], "y": y[y == k][:40]} for k in range(10)}
    ones = np.flatnonzero(y == 1)
    for s in range(5):
        pick = rng.choice(ones, size=40, replace=False)
        clients[f"sybil{s}"] = {"x": x[pick], "y": y[pick]}
    data = FederatedData.from_clients(clients, num_classes=10)
    sybils = np.arange(10, 15)
    one_to_seven = np.arange(10)
    one_to_seven[1] = 7
    poisoned = mark_malicious(label_flip(data, sybils, one_to_seven), sybils)
    model = get_model("logreg", ds.input_shape, ds.num_classes)
    params = model.init(jax.random.key(0))
    test_ones = ds.test["x"][ds.test["y"] == 1]
    # Attack success: the test 1s classified as 7.
    as_seven = make_evaluator(model.apply, {"x": test_ones,
                                            "y": np.full(len(test_ones), 7, np.int32)})
    base = fedavg(model, optax.sgd(0.1), batch_size=20)
    backend = VmapBackend("vmap", packing="off")
    success, history = {}, {}
    for name, alg in (("fedavg", with_malicious_flag(base)),
                      ("foolsgold", with_foolsgold(with_malicious_flag(base)))):
        res = run(alg, backend, poisoned, params, rounds=2, clients_per_round=15, seed=0,
                  step_ladder=None)
        success[name] = as_seven(res.server_state.params)["test_accuracy"]
        history[name] = res.history
    assert success["fedavg"] > 0.5 and success["foolsgold"] < 0.1, success
    # Every round, all 5 sybils weigh 0 (recall 1); any honest client dropped lowers precision.
    for h in history["foolsgold"]:
        assert h["malicious_valid"] == 5.0 and h["detection_recall"] == 1.0
        assert h["detection_precision"] > 0.5
