"""Class labels are checked on the host on every path into a run (JAX clamps bad indices).

Each case below trained or evaluated silently wrong before: -1 trained class C-1, a label C gave
a NaN loss with finite parameters, 2.7 was truncated to 2, a [n, 1] label array broke inside
JAX, an out-of-range test label counted as a wrong prediction.
"""

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.datasets import Dataset, federate
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.runner import run
from tests.helpers import CountingSource, LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
RNG = np.random.default_rng(0)

# Client "b"'s labels (3 classes), and what the error must say.
BAD_LABELS = {
    "negative": (np.array([0, -1, 2, 1], np.int32), r"1 class label\(s\) outside "
                 r"\[0, num_classes\): client 'b' example 1=-1"),
    "float": (np.array([0.0, 2.7, 1.0, 2.0]), "integer dtype, got float64"),
    "column": (np.array([[0], [1], [2], [1]], np.int32), r"shape \[n\].*y.reshape\(-1\)"),
}


def _clients(y_b):
    y_a = np.array([0, 1, 2], np.int32).reshape(-1, *y_b.shape[1:])  # same layout as b's
    return {"a": {"x": RNG.normal(size=(3, 5)).astype(np.float32), "y": y_a},
            "b": {"x": RNG.normal(size=(4, 5)).astype(np.float32), "y": y_b}}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_from_clients_refuses_bad_labels(case):
    y_b, message = BAD_LABELS[case]
    with pytest.raises(ValueError, match=message) as e:
        FederatedData.from_clients(_clients(y_b))
    assert "label array 'y'" in str(e.value)


def test_labels_above_num_classes_are_refused_with_positions():
    y_b = np.array([0, 3, 2, 7], np.int32)
    with pytest.raises(ValueError, match=r"2 class label\(s\) outside \[0, 3\): client 'b' "
                                         r"example 1=3, client 'b' example 3=7"):
        FederatedData.from_clients(_clients(y_b), num_classes=3)
    ok = FederatedData.from_clients(_clients(y_b), num_classes=8)
    assert ok.num_classes == 8
    with pytest.raises(ValueError, match="model outputs 3 classes"):
        ok.with_num_classes(3)
    # A population without class labels says so and is not checked.
    targets = {c: {"x": v["x"], "t": np.full(len(v["x"]), 0.5)} for c, v in _clients(y_b).items()}
    assert FederatedData.from_clients(targets, label_key=None).label_key is None


def _dataset(train_y, test_y, num_classes=3):
    n, m = len(train_y), len(test_y)
    return Dataset("toy", {"x": RNG.normal(size=(n, 5)).astype(np.float32), "y": train_y},
                   {"x": RNG.normal(size=(m, 5)).astype(np.float32), "y": test_y},
                   num_classes, (5,), None)


def test_federate_refuses_a_label_equal_to_num_classes():
    train_y = np.array([0, 1, 2, 1, 3, 0, 2, 1], np.int32)  # 3 == num_classes: a NaN loss
    with pytest.raises(ValueError, match=r"federate\('toy'\): train labels 'y': 1 class "
                                         r"label\(s\) outside \[0, 3\): \[4\]=3"):
        federate(_dataset(train_y, np.zeros(2, np.int32)), "iid", 2, seed=0)
    good = federate(_dataset(np.minimum(train_y, 2), np.zeros(2, np.int32)), "iid", 2, seed=0)
    assert good.num_classes == 3


def test_lazy_population_checks_the_labels_it_reads():
    data = make_population([4, 5, 3], seed=1)
    y = data.arrays["y"].copy()
    y[6] = -1  # client c1, its example 2
    source = CountingSource({"x": data.arrays["x"], "y": y})
    parts = [np.arange(data.offsets[i], data.offsets[i + 1]) for i in range(3)]
    lazy = FederatedData.from_partition(source, parts, data.client_ids)  # nothing read yet
    np.testing.assert_array_equal(lazy.take([0, 1, 9])["y"], y[[0, 1, 9]])
    with pytest.raises(ValueError, match=r"FederatedData.take: labels 'y' read from the source:"
                                         r" 1 class label\(s\) .*client 'c1' example 2=-1"):
        lazy.take([5, 6, 7])
    float_source = CountingSource({"x": data.arrays["x"], "y": y.astype(np.float32)})
    with pytest.raises(ValueError, match="integer dtype, got float32"):
        FederatedData.from_partition(float_source, parts, data.client_ids)


def test_evaluation_labels_are_checked_against_the_model():
    params = MODEL.init(jax.random.key(0))
    arrays = {"x": RNG.normal(size=(6, 5)).astype(np.float32),
              "y": np.array([0, 1, 2, 3, 1, 0], np.int32)}  # 3 classes: 3 is out of range
    with pytest.raises(ValueError, match=r"against the model's 3 outputs.*\[3\]=3"):
        make_evaluator(MODEL.apply, arrays)(params)  # learnt from the logits, not compiled
    with pytest.raises(ValueError, match=r"evaluation set: labels 'y': 1 class label"):
        make_evaluator(MODEL.apply, arrays, num_classes=3)
    arrays["y"][3] = 2
    scores = make_evaluator(MODEL.apply, arrays)(params)
    assert 0.0 <= scores["test_accuracy"] <= 1.0


def test_run_checks_the_population_against_the_model_output_size():
    data = make_population([4, 5, 3], seed=2)  # labels in [0, 3)
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=4)
    params = MODEL.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        run(alg, VmapBackend("vmap"), data, params, rounds=1, clients_per_round=2, seed=0,
            num_classes=2)
    with pytest.raises(ValueError, match="num_classes=4, but the model outputs 3 classes"):
        run(alg, VmapBackend("vmap"), data.with_num_classes(4), params, rounds=1,
            clients_per_round=2, seed=0, num_classes=3)
