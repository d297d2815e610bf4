"""Malicious-set selection, label flipping, the pixel backdoor and its end-to-end effect."""

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import median, with_aggregator
from fedjax_lab.attacks import (
    ATTACK_SUCCESS,
    MALICIOUS_KEY,
    add_trigger,
    attack_success_evaluator,
    backdoor,
    flip_map,
    label_flip,
    mark_malicious,
    num_malicious,
    select_malicious,
    triggered_test,
)
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from tests.helpers import make_population


def test_selection_is_seeded_and_sized():
    for n, fraction in [(10, 0.2), (37, 0.3), (5, 0.0), (100, 0.05)]:
        a = select_malicious(n, fraction, seed=4)
        assert len(a) == round(fraction * n) == num_malicious(n, fraction)
        assert len(np.unique(a)) == len(a) and np.all((a >= 0) & (a < n))
        np.testing.assert_array_equal(a, select_malicious(n, fraction, seed=4))
    draws = {tuple(select_malicious(50, 0.2, seed=s)) for s in range(5)}
    assert len(draws) > 1  # the seed matters


def test_mark_malicious_column():
    data = make_population([3, 2, 4])
    marked = mark_malicious(data, [2, 0])
    np.testing.assert_array_equal(marked.arrays[MALICIOUS_KEY],
                                  [1, 1, 1, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(marked.arrays["x"], data.arrays["x"])


def test_label_flip_by_hand():
    data = make_population([3, 2, 4], classes=3).with_num_classes(3)
    y = data.arrays["y"]
    flipped = label_flip(data, [1], "reverse").arrays["y"]
    want = y.copy()
    want[3:5] = [2 - v for v in y[3:5]]  # client 1 owns rows 3, 4; reverse of 3 classes
    np.testing.assert_array_equal(flipped, want)
    perm = flip_map("permutation", 3, seed=9)
    assert sorted(perm) == [0, 1, 2]
    np.testing.assert_array_equal(perm, flip_map("permutation", 3, seed=9))
    flipped = label_flip(data, [0, 2], "permutation", seed=9).arrays["y"]
    want = y.copy()
    want[:3], want[5:] = perm[y[:3]], perm[y[5:]]
    np.testing.assert_array_equal(flipped, want)
    explicit = label_flip(data, [1], [1, 2, 0]).arrays["y"]
    np.testing.assert_array_equal(explicit[3:5], [(v + 1) % 3 for v in y[3:5]])


def test_backdoor_touches_exactly_the_malicious_examples():
    rng = np.random.default_rng(0)
    clients = {f"c{i}": {"x": rng.uniform(0, 0.5, (n, 6, 5, 1)).astype(np.float32),
                         "y": rng.integers(0, 4, n).astype(np.int32)}
               for i, n in enumerate([3, 4, 2])}
    from fedjax_lab.data.federated import FederatedData
    data = FederatedData.from_clients(clients).with_num_classes(4)
    out = backdoor(data, [1], target=3, size=2, value=1.0)
    x0, x1 = data.arrays["x"], out.arrays["x"]
    rows = np.zeros(9, bool)
    rows[3:7] = True
    np.testing.assert_array_equal(x1[~rows], x0[~rows])
    np.testing.assert_array_equal(out.arrays["y"][~rows], data.arrays["y"][~rows])
    assert np.all(out.arrays["y"][rows] == 3)
    np.testing.assert_array_equal(x1[rows][:, 4:, 3:, :], 1.0)  # the 2x2 bottom-right patch
    patch = np.zeros((6, 5, 1), bool)
    patch[4:, 3:] = True
    np.testing.assert_array_equal(x1[rows][:, ~patch], x0[rows][:, ~patch])
    test = triggered_test({"x": x0, "y": data.arrays["y"]}, target=3, size=2)
    keep = data.arrays["y"] != 3
    np.testing.assert_array_equal(test["x"], add_trigger(x0[keep], 2))
    assert np.all(test["y"] == 3)


def test_bad_inputs():
    data = make_population([3, 2, 4])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_malicious(10, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_malicious(10, -0.1, seed=0)
    with pytest.raises(ValueError, match="outside the population"):
        mark_malicious(data, [3])
    with pytest.raises(ValueError, match="distinct"):
        mark_malicious(data, [1, 1])
    with pytest.raises(ValueError, match="image inputs"):
        backdoor(data.with_num_classes(3), [0], target=1)
    with pytest.raises(ValueError, match="flip map"):
        label_flip(data.with_num_classes(3), [0], "shuffle")
    with pytest.raises(ValueError, match="flip map"):
        label_flip(data.with_num_classes(3), [0], [0, 1, 3])


def test_backdoor_succeeds_without_defense_and_median_lowers_it():
    """Digits, logistic regression, 20 clients of which 4 (20%) are malicious, 10 per round.

    Thresholds are margins, not golden values: the attack must raise the success rate on the
    triggered test set by >= 0.3 over the same model trained without attack (the clean rate,
    measured here), and the coordinate-wise median (Yin et al. 2018) must cut the undefended
    rate by >= 0.3. Measured (seed 0): clean ~0.0x, undefended ~0.9, median ~0.1-0.2.
    """
    dataset = load_dataset("digits")
    train = federate(dataset, "iid", 20, seed=0)
    model = get_model("logreg", dataset.input_shape, dataset.num_classes)
    params = model.init(jax.random.key(0))
    malicious = select_malicious(train.num_clients, 0.2, seed=0)
    poisoned = backdoor(train, malicious, target=0, size=3)
    success = attack_success_evaluator(model.apply, dataset.test, target=0, size=3,
                                       num_classes=model.num_classes)
    clean_eval = make_evaluator(model.apply, dataset.test, num_classes=model.num_classes)
    algo = fedavg(model, optax.sgd(0.1), batch_size=20)

    def final(algorithm, data):
        # One padded program per algorithm (iid clients: the same step count every round).
        res = run(algorithm, VmapBackend(packing=PackingPolicy("off")), data, params,
                  rounds=8, clients_per_round=10, seed=0, step_ladder=None)
        p = res.server_state.params
        return success(p)[ATTACK_SUCCESS], clean_eval(p)["test_accuracy"]

    clean_rate, clean_acc = final(algo, train)
    attacked_rate, attacked_acc = final(algo, poisoned)
    defended_rate, _ = final(with_aggregator(algo, median()), poisoned)
    print(f"clean {clean_rate:.3f} (acc {clean_acc:.3f}), attacked {attacked_rate:.3f} "
          f"(acc {attacked_acc:.3f}), median {defended_rate:.3f}")
    assert attacked_rate >= clean_rate + 0.3
    assert defended_rate <= attacked_rate - 0.3
