"""Task losses and metrics (next-word, tag prediction) against numpy, and the evaluator."""

import jax
import numpy as np
import pytest

from fedjax_lab.metrics import tasks
from fedjax_lab.metrics.evaluation import make_evaluator

SPECIAL = (0, 7, 8, 9)  # pad, oov, bos, eos of a 6-word vocabulary


def test_masked_top1_excludes_special_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 10)).astype(np.float32)
    targets = np.array([[1, 2, 9, 0, 0], [7, 3, 3, 8, 4], [0, 0, 0, 0, 0]], np.int32)
    logits[0, 0, 1] = logits[1, 1, 3] = logits[1, 4, 2] = 10.0  # 2 hits, 1 miss made sure
    num, den = tasks.masked_top1(SPECIAL)(logits, targets)
    pred = logits.argmax(-1)
    counted = ~np.isin(targets, SPECIAL)
    np.testing.assert_array_equal(num, ((pred == targets) & counted).sum(1))
    np.testing.assert_array_equal(den, [2, 3, 0])


def test_precision_and_recall_at_5_by_hand():
    scores = np.array([[9, 8, 7, 6, 5, 4, 3, 2.0],    # top 5: tags 0-4
                       [1, 2, 3, 4, 5, 6, 7, 8.0]])   # top 5: tags 3-7
    targets = np.array([[1, 0, 1, 0, 0, 0, 0, 1],     # 2 of its 3 tags in the top 5
                        [0, 0, 0, 0, 0, 0, 0, 0.0]])  # no tag in the vocabulary
    p_num, p_den = tasks.precision_at(5)(scores, targets)
    r_num, r_den = tasks.recall_at(5)(scores, targets)
    np.testing.assert_array_equal(p_num, [2, 0])
    np.testing.assert_array_equal(p_den, [5, 5])
    np.testing.assert_array_equal(r_num, [2, 0])
    np.testing.assert_array_equal(r_den, [3, 0])


def test_sigmoid_cross_entropy_matches_numpy():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)
    y = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(1)
    np.testing.assert_allclose(tasks.sigmoid_cross_entropy(logits, y), want, rtol=1e-5)


def test_evaluator_sums_metrics_over_batches():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    x = rng.normal(size=(7, 4)).astype(np.float32)
    y = (rng.random((7, 6)) < 0.3).astype(np.float32)
    task = tasks.tag_prediction_task(5)

    def apply(params, x):
        return x @ params

    got = make_evaluator(apply, {"x": x, "y": y}, batch_size=3, per_example_loss=task.loss,
                         metrics=task.metrics)(w)  # 3 batches, the last one padded
    logits = x @ w
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hits = np.take_along_axis(y, top5, 1).sum(1)
    top1 = y[np.arange(7), logits.argmax(1)]
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert got["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["test_accuracy"] == pytest.approx(top1.mean(), rel=1e-6)
    assert got["test_precision_at_5"] == pytest.approx(hits.sum() / 35, rel=1e-6)
    assert got["test_recall_at_5"] == pytest.approx(hits.sum() / y.sum(), rel=1e-6)
    # No countable target at all: the ratio is NaN, never 0.
    empty = make_evaluator(apply, {"x": x, "y": np.zeros_like(y)}, per_example_loss=task.loss,
                           metrics={"recall_at_5": tasks.recall_at(5)})(w)
    assert np.isnan(empty["test_recall_at_5"])


def test_task_of_the_next_word_layout():
    class Data:  # what task_of reads of a Dataset
        target_kind, num_classes = "sequence", 10

    task = tasks.task_of(Data)
    logits = jax.nn.one_hot(np.array([[7, 1, 9]]), 10) * 5
    num, den = task.metrics["accuracy"](logits, np.array([[7, 1, 9]]))
    assert (float(num[0]), float(den[0])) == (1.0, 1.0)  # oov and eos are not counted
    assert tasks.training_loss("multi_hot") is tasks.sigmoid_cross_entropy
    assert tasks.training_loss("sequence") is None and tasks.training_loss("class") is None
