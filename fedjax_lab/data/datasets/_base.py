"""The common `Dataset` type of all loaders, and `federate` (dataset -> client population)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from fedjax_lab.core.rng import PARTITION_STREAM, host_rng
from fedjax_lab.data.federated import FederatedData, RowSource
from fedjax_lab.data.labels import check_labels
from fedjax_lab.data.partition import natural_client_ids
from fedjax_lab.data.partition import partition as partition_by_name


class Dataset(NamedTuple):
    """A centralized dataset as host numpy arrays.

    Attributes:
      name: dataset name (e.g. ``"digits"``, ``"leaf/femnist"``).
      train: ``{"x": float32 [N, *input_shape] (or int32 tokens), "y": int32 [N]}``, or a
        split read on demand (a ``RowSource`` whose ``["y"]`` is the label array, e.g. a TFDS
        loader's ``lazy=True``); `federate` then gives a population that reads its clients'
        examples per round.
      test: same layout as `train`, the held-out examples.
      num_classes: number of classes (the vocabulary size for next-token tasks).
      input_shape: per-example shape of ``x``.
      train_client_ids: natural client id (writer, user, device) of each train example, or
        None when the dataset has no natural clients.
      test_client_ids: natural client id of each test example (the same ids as
        `train_client_ids`: a client's own held-out examples, e.g. a LEAF user's test file
        entries), or None when the data do not say whose the test examples are.
      target_kind: ``"class"`` (``y`` int32 ``[N]`` class labels, the default), or, for tasks
        scored by ``fedjax_lab.metrics.tasks``, ``"sequence"`` (``y`` int32 ``[N, T]``: a
        class, e.g. the next token, per position) or ``"multi_hot"`` (``y`` float32 ``[N, K]``
        in {0, 1}). A non-class dataset's train split is a user-grouped ``RowSource`` with
        ``client_names`` and ``offsets`` (StackOverflow), federated with ``"natural"`` only.
    """

    name: str
    train: dict[str, np.ndarray] | RowSource
    test: dict[str, np.ndarray]
    num_classes: int
    input_shape: tuple[int, ...]
    train_client_ids: np.ndarray | None
    # Defaulted: loaders without natural test clients (and older callers) need not pass it.
    test_client_ids: np.ndarray | None = None
    target_kind: str = "class"


TARGET_KINDS = ("class", "sequence", "multi_hot")


def _check_targets(ds: Dataset) -> Dataset:
    """`check_dataset` of a non-class dataset (targets checked as arrays, not class labels)."""
    source = ds.train
    if not (hasattr(source, "offsets") and hasattr(source, "client_names")
            and isinstance(source, RowSource)):
        raise ValueError(f"{ds.name}: target_kind={ds.target_kind!r} needs a train split read "
                         "per user (a RowSource with client_names and offsets)")
    spec = source.feature_spec()
    x, y = ds.test["x"], ds.test["y"]
    want_y = (np.int32,) if ds.target_kind == "sequence" else (np.float32,)
    if (set(spec) != {"x", "y"} or tuple(spec["x"][0]) != tuple(ds.input_shape)
            or set(ds.test) != {"x", "y"} or x.shape[1:] != tuple(ds.input_shape)
            or y.ndim != 2 or len(y) != len(x) or y.dtype not in want_y
            or tuple(spec["y"][0]) != y.shape[1:]):
        raise ValueError(f"{ds.name}: {ds.target_kind} targets: train {spec}, test x{x.shape} "
                         f"y{y.shape} {y.dtype} do not match input_shape={ds.input_shape}")
    if ds.target_kind == "sequence":
        check_labels(y.reshape(-1), ds.num_classes, f"{ds.name}: `test` per-position targets")
    elif not np.all((y == 0) | (y == 1)) or y.shape[1] != ds.num_classes:
        raise ValueError(f"{ds.name}: multi-hot targets must be 0/1 [n, {ds.num_classes}]")
    if ds.train_client_ids is not None or ds.test_client_ids is not None:
        raise ValueError(f"{ds.name}: a user-grouped split carries its clients in its offsets")
    return ds


def check_dataset(ds: Dataset) -> Dataset:
    """Validates the layout of a `Dataset`; returns it unchanged."""
    if ds.target_kind not in TARGET_KINDS:
        raise ValueError(f"{ds.name}: target_kind must be one of {TARGET_KINDS}, got "
                         f"{ds.target_kind!r}")
    if ds.target_kind != "class":
        return _check_targets(ds)
    if isinstance(ds.train, RowSource) and not isinstance(ds.train, dict):
        spec = ds.train.feature_spec()
        y = np.asarray(ds.train["y"])
        if set(spec) != {"x", "y"} or tuple(spec["x"][0]) != tuple(ds.input_shape):
            raise ValueError(f"{ds.name}: lazy `train` features {spec} do not match "
                             f"input_shape={ds.input_shape}")
        if y.shape != (len(ds.train),) or y.dtype != np.int32:
            raise ValueError(f"{ds.name}: lazy `train` labels must be int32 [{len(ds.train)}]")
        check_labels(y, ds.num_classes, f"{ds.name}: `train` labels")
    for split in ("train", "test"):
        arrays = getattr(ds, split)
        if split == "train" and not isinstance(arrays, dict):
            continue  # checked above
        if set(arrays) != {"x", "y"}:
            raise ValueError(f"{ds.name}: `{split}` must have keys x and y, got {sorted(arrays)}")
        x, y = arrays["x"], arrays["y"]
        if x.shape[1:] != tuple(ds.input_shape) or y.shape != (len(x),):
            raise ValueError(
                f"{ds.name}: `{split}` shapes x{x.shape} y{y.shape} do not match "
                f"input_shape={ds.input_shape}"
            )
        if y.dtype != np.int32 or x.dtype not in (np.float32, np.int32):
            raise ValueError(f"{ds.name}: `{split}` dtypes x {x.dtype} y {y.dtype}")
        check_labels(y, ds.num_classes, f"{ds.name}: `{split}` labels")
    if ds.train_client_ids is not None and ds.train_client_ids.shape != ds.train["y"].shape:
        raise ValueError(f"{ds.name}: `train_client_ids` must have one id per train example")
    if ds.test_client_ids is not None:
        if ds.train_client_ids is None:
            raise ValueError(f"{ds.name}: `test_client_ids` needs `train_client_ids` (the "
                             "test examples' clients are the train set's natural clients)")
        if ds.test_client_ids.shape != ds.test["y"].shape:
            raise ValueError(f"{ds.name}: `test_client_ids` must have one id per test example")
    return ds


def federate(
    dataset: Dataset,
    partition: str,
    num_clients: int | None,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 10,
) -> FederatedData:
    """Splits the train set of `dataset` into a client population.

    The partition is drawn with ``host_rng(seed, PARTITION_STREAM)``, so it depends only on the
    run seed and the arguments.

    Args:
      dataset: the centralized dataset.
      partition: ``"iid"``, ``"dirichlet_label_mix"`` (uses `alpha`), ``"dirichlet_per_class"``
        (uses `alpha`, `min_size`), ``"shards"`` (uses `shards_per_client`) or ``"natural"``
        (uses ``dataset.train_client_ids``).
      num_clients: number of clients; for ``"natural"`` None (all natural clients) or their
        exact count.
      seed: run seed (>= 0).
      alpha: Dirichlet concentration of the two Dirichlet schemes.
      shards_per_client: shards per client of ``"shards"``.
      min_size: minimum client size of ``"dirichlet_per_class"``.

    Returns:
      `FederatedData` over ``dataset.train`` with ``num_classes = dataset.num_classes`` (its
      labels are checked against it: here, and on every read of a lazy split); client ids are
      the natural ids for ``"natural"``, else ``"0" ... "num_clients - 1"``.

    A non-class dataset (``target_kind`` ``"sequence"``/``"multi_hot"``: StackOverflow) is
    user-grouped: only ``"natural"`` applies, and the population is its train source's own
    ``client_names``/``offsets`` (``label_key=None``: no class labels to check).

    Raises:
      ValueError: a train label is not an integer in ``[0, dataset.num_classes)``; another
        partition than ``"natural"`` (or another client count) for a non-class dataset.
    """
    if dataset.target_kind != "class":
        # StackOverflow: 135.8M sentences; the natural population is the source's own user
        # grouping (no per-row ids, order or labels, which would take > 1.6 GB).
        source = dataset.train
        if partition != "natural":
            raise ValueError(f"federate({dataset.name!r}): a {dataset.target_kind} dataset read "
                             f"per user is federated with partition='natural' (its users), got "
                             f"{partition!r}")
        names = tuple(source.client_names)
        if num_clients is not None and num_clients != len(names):
            raise ValueError(f"federate({dataset.name!r}, 'natural'): the data have "
                             f"{len(names)} users; pass num_clients={len(names)} or None")
        # label_key=None: the targets are not one class per example (the loader builds them).
        return FederatedData(names, source, source.offsets, label_key=None)
    # The partitioners index by label too: check them (and the class count) before use. A lazy
    # split's examples are checked again on every read.
    labels = check_labels(dataset.train["y"], dataset.num_classes,
                          f"federate({dataset.name!r}): train labels 'y'")
    kwargs: dict[str, Any] = {}
    client_ids = None
    if partition == "natural":
        if dataset.train_client_ids is None:
            raise ValueError(
                f"federate(partition='natural'): dataset {dataset.name!r} has no natural client "
                "ids (train_client_ids is None); use iid, dirichlet_label_mix, "
                "dirichlet_per_class or shards."
            )
        kwargs["client_of_example"] = dataset.train_client_ids
        client_ids = natural_client_ids(dataset.train_client_ids)
    elif partition in ("dirichlet_label_mix", "dirichlet_per_class"):
        kwargs["alpha"] = alpha
        if partition == "dirichlet_per_class":
            kwargs["min_size"] = min_size
    elif partition == "shards":
        kwargs["shards_per_client"] = shards_per_client
    parts = partition_by_name(
        partition, labels, num_clients, host_rng(seed, PARTITION_STREAM), **kwargs
    )
    return FederatedData.from_partition(dataset.train, parts, client_ids,
                                        num_classes=dataset.num_classes)
