"""Federated evaluation equals a plain numpy loop over clients; the held-out split is exact."""

import jax
import numpy as np
import pytest

from fedjax_lab.data.federated import FederatedData
from fedjax_lab.metrics.client_evaluation import (
    HeldOut,
    make_client_evaluator,
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
    accuracies, losses = [], []
    for i in range(len(sizes)):
        client = {k: v[offsets[i]:offsets[i + 1]] for k, v in data.arrays.items()}
        if not len(client["y"]):
            continue  # no held-out example: not evaluated
        logits = np.asarray(model.apply(params, client["x"]), np.float64)
        log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1,
                                           keepdims=True)) - logits.max(1, keepdims=True)
        accuracies.append(np.mean(np.argmax(logits, 1) == client["y"]))
        losses.append(-np.mean(log_probs[np.arange(len(client["y"])), client["y"]]))
    assert got["clients_evaluated"] == 5
    np.testing.assert_allclose(got["client_accuracy_mean"], np.mean(accuracies), rtol=1e-6)
    np.testing.assert_allclose(got["client_accuracy_p10"], np.percentile(accuracies, 10),
                               rtol=1e-6)
    np.testing.assert_allclose(got["client_accuracy_min"], np.min(accuracies), rtol=1e-6)
    np.testing.assert_allclose(got["client_loss_mean"], np.mean(losses), rtol=1e-5)
