"""Federated data: host-side populations, fixed-shape cohorts, partitioners, datasets."""

from fedjax_lab.data import datasets
from fedjax_lab.data.cohort import CohortBuilder, padded_cohort_size
from fedjax_lab.data.datasets import Dataset, federate, load_dataset
from fedjax_lab.data.federated import FederatedData, ReorderedSource, RowSource, sample_clients
from fedjax_lab.data.partition import (
    PARTITIONERS,
    dirichlet_label_mix,
    dirichlet_per_class,
    iid,
    natural,
    shards,
)
from fedjax_lab.data.partition import partition as partition_by_name

__all__ = [
    "PARTITIONERS",
    "CohortBuilder",
    "Dataset",
    "FederatedData",
    "ReorderedSource",
    "RowSource",
    "datasets",
    "dirichlet_label_mix",
    "dirichlet_per_class",
    "federate",
    "iid",
    "load_dataset",
    "natural",
    "padded_cohort_size",
    "partition_by_name",
    "sample_clients",
    "shards",
]
