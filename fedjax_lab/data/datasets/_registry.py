"""`load_dataset`: dataset loaders by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fedjax_lab.data.datasets import tfds_images
from fedjax_lab.data.datasets._base import Dataset
from fedjax_lab.data.datasets.cinic10 import cinic10
from fedjax_lab.data.datasets.digits import digits
from fedjax_lab.data.datasets.leaf import leaf
from fedjax_lab.data.datasets.stackoverflow import stackoverflow_lr, stackoverflow_nwp
from fedjax_lab.data.datasets.synthetic import synthetic, synthetic_iid
from fedjax_lab.data.datasets.tff_h5 import fed_cifar100, fed_emnist, fed_shakespeare

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "synthetic": synthetic,
    "synthetic_iid": synthetic_iid,
    "mnist": tfds_images.mnist,
    "fashion_mnist": tfds_images.fashion_mnist,
    "emnist": tfds_images.emnist,
    "cifar10": tfds_images.cifar10,
    "cifar100": tfds_images.cifar100,
    "cinic10": cinic10,
    "leaf": leaf,
    "fed_emnist": fed_emnist,
    "fed_shakespeare": fed_shakespeare,
    "fed_cifar100": fed_cifar100,
    "stackoverflow_nwp": stackoverflow_nwp,
    "stackoverflow_lr": stackoverflow_lr,
}

DATASET_NAMES = tuple(_LOADERS)
# Loaders with ``lazy=True``: the train split stays on disk and is read per round, per client.
LAZY_DATASETS = ("mnist", "fashion_mnist", "emnist", "cifar10", "cifar100")
# TFF's federated datasets, read from TFF's h5 files in ``data_dir`` (always lazily: the train
# split is read per client on demand).
H5_DATASETS = ("fed_emnist", "fed_shakespeare", "fed_cifar100", "stackoverflow_nwp",
               "stackoverflow_lr")
# Datasets whose targets are not one class per example (``Dataset.target_kind``): they train
# and evaluate with ``fedjax_lab.metrics.tasks`` and federate with partition="natural" only.
TARGET_KIND_OF = {"stackoverflow_nwp": "sequence", "stackoverflow_lr": "multi_hot"}
# Loaders whose test examples carry their natural client (``Dataset.test_client_ids``): FedProx's
# per-device train/test split, LEAF's per-user test files and TFF's per-writer/role test files.
NATURAL_TEST_DATASETS = ("synthetic", "synthetic_iid", "leaf", "fed_emnist", "fed_shakespeare")


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Loads a dataset by name, forwarding `kwargs` to its loader.

    Args:
      name: one of `DATASET_NAMES`: ``digits``, ``synthetic`` (``alpha=, beta=``),
        ``synthetic_iid``, ``mnist``, ``fashion_mnist``, ``emnist``, ``cifar10``, ``cifar100``
        (``data_dir=, download=, lazy=``; see `LAZY_DATASETS`), ``leaf`` (``root_dir=, task=``),
        ``cinic10`` (``data_dir=``: CINIC-10's image folders, ``lazy=``),
        ``fed_emnist``, ``fed_shakespeare``, ``fed_cifar100`` (``data_dir=``: TFF's h5 files),
        ``stackoverflow_nwp``, ``stackoverflow_lr`` (``data_dir=``, ``vocab_size=``, ...).
      **kwargs: the loader's arguments.

    Returns:
      The loaded `Dataset`.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    loader = _LOADERS[name]
    signature = inspect.signature(loader)
    try:  # a wrong argument is bad input (ValueError), not a TypeError from inside the loader
        signature.bind(**kwargs)
    except TypeError as e:
        raise ValueError(
            f"load_dataset({name!r}): {e}; the loader's arguments are {name}{signature}"
        ) from None
    return loader(**kwargs)
