"""Federated evaluation equals a plain numpy loop over clients; the held-out split is exact;
natural evaluation gives every client the dataset's own test examples of that client."""

import json

import jax
import numpy as np
import pytest

from fedjax_lab.data.datasets import federate, leaf
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.metrics.client_evaluation import (
    HeldOut,
    make_client_evaluator,
    natural_client_examples,
    split_client_examples,
)
from fedjax_lab.models import get_model


def _population(sizes, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    arrays = {"x": rng.normal(size=(n, 5)).astype(np.float32),
              "y": rng.integers(0, 3, size=n).astype(np.int32)}
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return FederatedData(tuple(str(i) for i in range(len(sizes))), arrays, offsets, 3)


def test_split_holds_out_a_seeded_fraction_of_every_client_and_loses_nothing():
    data = _population([10, 3, 25, 1])
    train, test = split_client_examples(data, 0.3, seed=4)
    assert list(np.diff(test.offsets)) == [3, 0, 7, 0]  # floor(0.3 n)
    assert list(np.diff(train.offsets)) == [7, 3, 18, 1]
    for i in range(data.num_clients):
        whole = {tuple(r) for r in data.client(i)["x"]}
        held = test.arrays["x"][test.offsets[i]:test.offsets[i + 1]]
        parts = [tuple(r) for r in train.client(i)["x"]] + [tuple(r) for r in held]
        assert len(parts) == len(whole) and set(parts) == whole  # a partition of the client
    again, _ = split_client_examples(data, 0.3, seed=4)
    np.testing.assert_array_equal(again.arrays["x"], train.arrays["x"])
    other, _ = split_client_examples(data, 0.3, seed=5)
    assert not np.array_equal(other.arrays["x"], train.arrays["x"])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        split_client_examples(data, 1.0, seed=0)


def test_client_metrics_equal_a_numpy_loop_over_clients():
    sizes = [4, 9, 1, 6, 0, 12]
    whole = _population([s or 1 for s in sizes], seed=1)  # FederatedData has no empty client
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    data = HeldOut(whole.client_ids, {k: v[: offsets[-1]] for k, v in whole.arrays.items()},
                   offsets)
    model = get_model("logreg", (5,), 3)
    params = model.init(jax.random.key(2))
    got = make_client_evaluator(model.apply, data, num_classes=3)(params)
    clients = [{k: v[offsets[i]:offsets[i + 1]] for k, v in data.arrays.items()}
               for i in range(len(sizes))]
    _assert_numpy_loop(got, model, params, clients, evaluated=5)


def _assert_numpy_loop(got, model, params, clients, evaluated):
    """``got`` (an evaluator's metrics) equals a numpy loop over ``clients`` (x, y dicts);
    clients without an example are not evaluated (not counted as accuracy 0)."""
    accuracies, losses = [], []
    for client in clients:
        if not len(client["y"]):
            continue
        logits = np.asarray(model.apply(params, client["x"]), np.float64)
        log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1,
                                           keepdims=True)) - logits.max(1, keepdims=True)
        accuracies.append(np.mean(np.argmax(logits, 1) == client["y"]))
        losses.append(-np.mean(log_probs[np.arange(len(client["y"])), client["y"]]))
    assert got["clients_evaluated"] == evaluated == len(accuracies)
    np.testing.assert_allclose(got["client_accuracy_mean"], np.mean(accuracies), rtol=1e-6)
    np.testing.assert_allclose(got["client_accuracy_p10"], np.percentile(accuracies, 10),
                               rtol=1e-6)
    np.testing.assert_allclose(got["client_accuracy_min"], np.min(accuracies), rtol=1e-6)
    np.testing.assert_allclose(got["client_loss_mean"], np.mean(losses), rtol=1e-5)


def _write_leaf(root, split, users):
    (root / split).mkdir(parents=True)
    blob = {"users": list(users), "num_samples": [len(u["y"]) for u in users.values()],
            "user_data": users}
    (root / split / "data.json").write_text(json.dumps(blob))


def test_natural_client_metrics_equal_a_numpy_loop_over_the_users_test_files(tmp_path):
    """LEAF JSON written here: each user is evaluated on its own test entries. A user with
    train data only is not evaluated; one with test data only is no client."""
    rng = np.random.default_rng(3)

    def user(n):
        return {"x": rng.normal(size=(n, 4)).round(3).tolist(),
                "y": rng.integers(0, 3, n).tolist()}

    train = {"u3": user(5), "u1": user(4), "only_train": user(3), "u2": user(6)}
    test = {"u2": user(3), "only_test": user(2), "u1": user(1), "u3": user(4)}
    test["u1"]["y"][0] = 2  # the largest label appears, as num_classes = 1 + max label
    _write_leaf(tmp_path, "train", train)
    _write_leaf(tmp_path, "test", test)
    ds = leaf(tmp_path, "synthetic")
    population = federate(ds, "natural", None, seed=0)
    held = natural_client_examples(population, ds.test, ds.test_client_ids)
    assert held.client_ids == population.client_ids == ("only_train", "u1", "u2", "u3")
    assert list(np.diff(held.offsets)) == [0, 1, 3, 4]
    model = get_model("logreg", ds.input_shape, ds.num_classes)
    params = model.init(jax.random.key(1))
    got = make_client_evaluator(model.apply, held, num_classes=ds.num_classes)(params)
    clients = [{"x": np.asarray(test[u]["x"], np.float32), "y": np.asarray(test[u]["y"])}
               for u in ("u1", "u2", "u3")]
    _assert_numpy_loop(got, model, params, clients, evaluated=3)


def test_natural_client_examples_bad_input():
    data = _population([3, 2])  # clients "0" and "1"
    test = {"x": np.zeros((3, 5), np.float32), "y": np.zeros(3, np.int32)}
    with pytest.raises(ValueError, match=r"test_client_ids is None.*--client-eval split"):
        natural_client_examples(data, test, None)
    with pytest.raises(ValueError, match="one id per test example"):
        natural_client_examples(data, test, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="no client of the population has a test example"):
        natural_client_examples(data, test, np.array(["a", "b", "c"]))
    held = natural_client_examples(data, test, np.array([1, 1, 0]))  # ids compared as strings
    assert list(np.diff(held.offsets)) == [1, 2]
