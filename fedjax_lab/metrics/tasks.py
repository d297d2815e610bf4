"""Training losses and evaluation metrics of tasks whose targets are not one class per example.

A dataset whose targets are classes (``Dataset.target_kind == "class"``) trains with softmax
cross-entropy and reports ``test_accuracy``. StackOverflow's two tasks (Reddi et al. 2021,
"Adaptive Federated Optimization", §5 and App. C; TFF's baselines) are different:

* next-word prediction (``"sequence"`` targets, int32 ``[n, T]`` token ids): softmax
  cross-entropy averaged over the ``T`` positions (pad targets included, as TFF's Keras loss
  does), and top-1 accuracy over the positions whose target is not pad, out-of-vocabulary,
  bos or eos (TFF's ``MaskedCategoricalAccuracy``);
* tag prediction (``"multi_hot"`` targets, float32 ``[n, K]`` in {0, 1}): sigmoid
  cross-entropy averaged over the ``K`` tags (Keras ``BinaryCrossentropy(from_logits=True)``),
  and precision and recall at 5.

A metric is ``fn(logits, targets) -> (numerator [B], denominator [B])``: the evaluator sums both
over the test set and reports their ratio (NaN when the denominator sums to 0, e.g. no
countable target), so metrics with per-example weights (masked positions, tag counts) are exact
ratios over the whole set, not means of per-example ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.losses import softmax_cross_entropy

Metric = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class Task(NamedTuple):
    """What a dataset's targets train with and are evaluated by.

    Attributes:
      loss: ``per_example_loss(logits, targets) -> [B]`` for local training and ``test_loss``.
      metrics: name -> `Metric`; reported as ``test_<name>``. ``"accuracy"`` is the headline
        (``test_accuracy`` in metrics.jsonl and summary.json).
    """

    loss: Callable[[jax.Array, jax.Array], jax.Array]
    metrics: dict[str, Metric]


def sigmoid_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example multi-label loss: sigmoid cross-entropy averaged over the labels, ``[B]``."""
    loss = optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype))
    return loss.reshape(loss.shape[0], -1).mean(axis=1)


def masked_top1(excluded: tuple[int, ...]) -> Metric:
    """Top-1 accuracy over the positions whose target is not in `excluded` (special tokens).

    ``logits [B, T, V]``, ``targets [B, T]``; numerator = correct countable positions of each
    example, denominator = its countable positions.
    """
    excluded = tuple(int(t) for t in excluded)

    def metric(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        targets = targets.astype(jnp.int32)
        counted = jnp.ones(targets.shape, bool)
        for token in excluded:
            counted &= targets != token
        correct = (jnp.argmax(logits, axis=-1) == targets) & counted
        axes = tuple(range(1, targets.ndim))
        return (jnp.sum(correct, axis=axes).astype(jnp.float32),
                jnp.sum(counted, axis=axes).astype(jnp.float32))

    return metric


def top_k_hits(logits: jax.Array, targets: jax.Array, k: int) -> jax.Array:
    """``[B]``: how many of the ``k`` highest-scoring labels are true labels (multi-hot)."""
    _, top = jax.lax.top_k(logits, k)
    return jnp.sum(jnp.take_along_axis(targets.astype(jnp.float32), top, axis=-1), axis=-1)


def precision_at(k: int) -> Metric:
    """Precision at ``k``: true labels among the top ``k`` scores, over ``k`` per example."""

    def metric(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        hits = top_k_hits(logits, targets, k)
        return hits, jnp.full(hits.shape, float(k), jnp.float32)

    return metric


def recall_at(k: int) -> Metric:
    """Recall at ``k``: true labels among the top ``k`` scores, over the true labels.

    An example without a true label (all its tags out of the vocabulary) adds 0 / 0: nothing.
    """

    def metric(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        return top_k_hits(logits, targets, k), jnp.sum(targets.astype(jnp.float32), axis=-1)

    return metric


def next_word_task(special_tokens: tuple[int, ...]) -> Task:
    """Next-word prediction: softmax cross-entropy, accuracy without `special_tokens`."""
    return Task(softmax_cross_entropy, {"accuracy": masked_top1(special_tokens)})


def tag_prediction_task(k: int = 5) -> Task:
    """Multi-label tag prediction: sigmoid cross-entropy; accuracy (= precision at 1: the top
    tag is a true tag), precision and recall at ``k``."""
    return Task(sigmoid_cross_entropy, {"accuracy": precision_at(1),
                                        f"precision_at_{k}": precision_at(k),
                                        f"recall_at_{k}": recall_at(k)})


def training_loss(target_kind: str) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """The training loss of a ``Dataset.target_kind`` when it is not the algorithms' default
    (softmax cross-entropy, which also serves per-position ``"sequence"`` targets): sigmoid
    cross-entropy for ``"multi_hot"``, else None."""
    return sigmoid_cross_entropy if target_kind == "multi_hot" else None


def task_of(dataset) -> Task | None:
    """The `Task` of a non-class ``fedjax_lab.data.datasets.Dataset``, None for classes.

    ``"sequence"`` targets use the next-word token layout of ``stackoverflow_nwp``
    (``WordIds``: pad 0, then the words, then OOV, bos, eos as the last three ids), whose
    special tokens the accuracy leaves out; ``"multi_hot"`` targets are tag prediction.
    """
    if dataset.target_kind == "sequence":
        v = dataset.num_classes
        return next_word_task((0, v - 3, v - 2, v - 1))
    if dataset.target_kind == "multi_hot":
        return tag_prediction_task(5)
    return None
