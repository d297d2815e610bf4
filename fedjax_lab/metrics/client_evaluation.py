"""Federated evaluation: the global model on each client's own held-out examples.

A central test set says how the model does on average over examples; federated evaluation
says how it does for each client (Li et al. 2020, "Fair Resource Allocation in Federated
Learning"; the LEAF benchmark): the distribution over clients of their accuracy, reported as
mean, 10th percentile and minimum.

:func:`split_client_examples` holds out a seeded fraction of every client's examples (any
partition); :func:`natural_client_examples` gives every natural client the dataset's own test
examples of that client (LEAF's per-user test files, FedProx synthetic's per-device split) and
takes nothing out of training; :func:`make_client_evaluator` evaluates the model on every
client's held-out examples at once, vmapped over clients like training (clients padded to the
largest, padding masked).
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


def natural_client_examples(
    data: FederatedData, test: dict[str, np.ndarray], test_client_ids: np.ndarray | None
) -> HeldOut:
    """Every client's own test examples: the test rows whose natural client id is the client's.

    ``data`` must be the natural partition of the dataset whose ``test`` split and
    ``test_client_ids`` (``Dataset.test_client_ids``) are given: its client ids are the
    natural ids as strings, and a test example belongs to the client with the same id. A
    client without a test example gets none (it is left out of the client metrics, which count
    the clients evaluated); test examples of an id that is no client of ``data`` (a LEAF user
    with test data only) are in no client's part (they stay in the central test set).

    Raises:
      ValueError: ``test_client_ids`` is None or not one id per test example, or no client of
        ``data`` has a test example.
    """
    if test_client_ids is None:
        raise ValueError("--client-eval natural needs the dataset's per-client test examples, "
                         "and this dataset does not say whose its test examples are "
                         "(test_client_ids is None): use --client-eval split "
                         "--client-eval-fraction F")
    test_client_ids = np.asarray(test_client_ids)
    if test_client_ids.shape != np.shape(test["y"]):
        raise ValueError(f"test_client_ids has shape {test_client_ids.shape}; it must hold one "
                         f"id per test example ({len(test['y'])})")
    position = {cid: i for i, cid in enumerate(data.client_ids)}
    # Ids are compared as strings, as the natural partition names its clients.
    ids, inverse = np.unique(test_client_ids, return_inverse=True)
    client_of_id = np.array([position.get(str(i), -1) for i in ids], dtype=np.int64)
    client_of_row = client_of_id[inverse.reshape(-1)]
    owned = np.flatnonzero(client_of_row >= 0)
    if not len(owned):
        raise ValueError("--client-eval natural: no client of the population has a test "
                         "example (the test ids match no train client id); use --client-eval "
                         "split --client-eval-fraction F")
    # Stable: each client's test examples keep their order in the test set.
    rows = owned[np.argsort(client_of_row[owned], kind="stable")]
    sizes = np.bincount(client_of_row[owned], minlength=data.num_clients)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return HeldOut(data.client_ids, {k: np.asarray(v)[rows] for k, v in test.items()}, offsets)


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
    (clients with at least one held-out example: only those enter the distribution, a client
    without one is not counted as accuracy 0). Every client is evaluated in one jitted
    call vmapped over clients (``[K, M, ...]``, padded to the largest client and masked).
    """
    check_labels(clients.arrays["y"], num_classes, "held-out client examples: labels 'y'")
    sizes = np.diff(clients.offsets)
    keep = np.flatnonzero(sizes > 0)
    if not len(keep):
        raise ValueError("no client has a held-out example: raise --client-eval-fraction "
                         "(--client-eval split)")
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
