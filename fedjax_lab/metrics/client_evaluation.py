"""Federated evaluation: the global model on each client's own held-out examples.

A central test set says how the model does on average over examples; federated evaluation
says how it does for each client (Li et al. 2020, "Fair Resource Allocation in Federated
Learning"; the LEAF benchmark): the distribution over clients of their accuracy, reported as
mean, 10th percentile and minimum.

:func:`split_client_examples` holds out a seeded fraction of every client's examples;
:func:`make_client_evaluator` evaluates the model on every client's held-out examples at once,
vmapped over clients like training (clients padded to the largest, padding masked).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.losses import correct_predictions, softmax_cross_entropy
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.data.labels import check_labels


class HeldOut(NamedTuple):
    """Every client's held-out examples: client ``i`` owns rows ``offsets[i]:offsets[i+1]``
    of ``arrays`` (possibly none: a client too small to hold one out)."""

    client_ids: tuple[str, ...]
    arrays: dict[str, np.ndarray]
    offsets: np.ndarray


# Sub-stream of PARTITION_STREAM: the held-out split never shares draws with the partition.
CLIENT_TEST_SUBSTREAM = 1


def split_client_examples(
    data: FederatedData, fraction: float, seed: int
) -> tuple[FederatedData, HeldOut]:
    """Splits every client's examples into ``(train, held-out test)`` populations.

    Client ``i`` keeps ``n_i - floor(fraction * n_i)`` examples for training and holds out the
    other ``floor(fraction * n_i)``, chosen with ``host_rng(seed, PARTITION_STREAM, 1)``; a
    client too small to hold one out has no test examples (and is left out of the client
    metrics, which count the clients evaluated).

    Raises:
      ValueError: a fraction outside ``(0, 1)``, lazily read data, or a client left with no
        training example.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--client-eval-fraction must be in (0, 1), got {fraction}")
    if data.is_lazy:
        raise ValueError("--client-eval-fraction splits in-memory clients; this population is "
                         "read lazily from disk (TFDS with --backend mpi): drop it")
    rng = rng_lib.host_rng(seed, rng_lib.PARTITION_STREAM, CLIENT_TEST_SUBSTREAM)
    train_rows, test_rows = [], []
    train_sizes, test_sizes = [], []
    for i in range(data.num_clients):
        start, stop = int(data.offsets[i]), int(data.offsets[i + 1])
        rows = start + rng.permutation(stop - start)
        held = int(fraction * len(rows))
        if held == len(rows):
            raise ValueError(f"--client-eval-fraction {fraction} leaves client "
                             f"{data.client_ids[i]} no training example; lower it")
        test_rows.append(np.sort(rows[:held]))
        train_rows.append(np.sort(rows[held:]))
        train_sizes.append(len(rows) - held)
        test_sizes.append(held)

    def subset(rows: list[np.ndarray], sizes: list[int]) -> tuple[dict, np.ndarray]:
        index = np.concatenate(rows).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return {k: np.asarray(v)[index] for k, v in data.arrays.items()}, offsets

    train_arrays, train_offsets = subset(train_rows, train_sizes)
    train = FederatedData(data.client_ids, train_arrays, train_offsets, data.num_classes,
                          data.label_key)
    return train, HeldOut(data.client_ids, *subset(test_rows, test_sizes))


def make_client_evaluator(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    clients: HeldOut,
    *,
    num_classes: int | None = None,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Callable[[Any], dict[str, float]]:
    """Returns ``evaluate(params)`` with the distribution of per-client test accuracy.

    Keys: ``client_accuracy_mean``, ``client_accuracy_p10`` (10th percentile, numpy's linear
    interpolation), ``client_accuracy_min``, ``client_loss_mean`` and ``clients_evaluated``
    (clients with at least one held-out example). Every client is evaluated in one jitted
    call vmapped over clients (``[K, M, ...]``, padded to the largest client and masked).
    """
    check_labels(clients.arrays["y"], num_classes, "held-out client examples: labels 'y'")
    sizes = np.diff(clients.offsets)
    keep = np.flatnonzero(sizes > 0)
    if not len(keep):
        raise ValueError("no client has a held-out example; raise --client-eval-fraction")
    m = int(sizes.max())
    k = len(keep)
    stacked: dict[str, np.ndarray] = {}
    for name, values in clients.arrays.items():
        values = np.asarray(values)
        out = np.zeros((k, m, *values.shape[1:]), values.dtype)
        for j, i in enumerate(keep):
            start, stop = clients.offsets[i], clients.offsets[i + 1]
            out[j, : stop - start] = values[start:stop]
        stacked[name] = out
    mask = (np.arange(m)[None, :] < sizes[keep][:, None]).astype(np.float32)
    device = {name: jnp.asarray(v) for name, v in stacked.items()}
    device_mask = jnp.asarray(mask)
    counts = jnp.asarray(sizes[keep].astype(np.float32))

    @jax.jit
    def per_client(params, x, y, mask):
        def one(x, y, mask):
            logits = apply_fn(params, x)
            return (jnp.sum(correct_predictions(logits, y) * mask),
                    jnp.sum(per_example_loss(logits, y) * mask))

        correct, loss = jax.vmap(one)(x, y, mask)
        return correct / counts, loss / counts

    def evaluate(params: Any) -> dict[str, float]:
        accuracy, loss = jax.device_get(
            per_client(params, device["x"], device["y"], device_mask))
        return {
            "client_accuracy_mean": float(np.mean(accuracy)),
            "client_accuracy_p10": float(np.percentile(accuracy, 10)),
            "client_accuracy_min": float(np.min(accuracy)),
            "client_loss_mean": float(np.mean(loss)),
            "clients_evaluated": float(k),
        }

    return evaluate
