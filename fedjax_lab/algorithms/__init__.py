"""Federated algorithms as pure functions (DESIGN.md ``Algorithm``)."""

# Registers the constructors by name for the experiment CLI (fedjax_lab.registry).
from fedjax_lab.algorithms import _registered  # noqa: F401
from fedjax_lab.algorithms.dp_adaptive_clip import dp_fedavg_adaptive
from fedjax_lab.algorithms.dp_fedavg import dp_fedavg
from fedjax_lab.algorithms.dp_ftrl import dp_ftrl
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fedbn import fedbn
from fedjax_lab.algorithms.fednova import fednova
from fedjax_lab.algorithms.fedopt import (
    fedadagrad,
    fedadam,
    fedavgm,
    fedopt,
    fedyogi,
    reddi_adaptive,
)
from fedjax_lab.algorithms.fedpaq import fedpaq, qsgd_baseline
from fedjax_lab.algorithms.fedprox import fedprox
from fedjax_lab.algorithms.ldp_fedavg import ldp_fedavg
from fedjax_lab.algorithms.robust import (
    Aggregator,
    Transform,
    bulyan,
    centered_clipping,
    clip_norm,
    geometric_median,
    krum,
    mean,
    median,
    multi_krum,
    trimmed_mean,
    with_aggregator,
    with_foolsgold,
    with_weak_dp,
)
from fedjax_lab.algorithms.scaffold import ScaffoldClientState, scaffold
from fedjax_lab.algorithms.torch_adam import TorchAdamState, torch_adam

__all__ = [
    "Aggregator",
    "ScaffoldClientState",
    "TorchAdamState",
    "Transform",
    "bulyan",
    "centered_clipping",
    "clip_norm",
    "dp_fedavg",
    "dp_fedavg_adaptive",
    "dp_ftrl",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedbn",
    "fednova",
    "fedopt",
    "fedpaq",
    "fedprox",
    "fedyogi",
    "geometric_median",
    "krum",
    "ldp_fedavg",
    "mean",
    "median",
    "multi_krum",
    "qsgd_baseline",
    "reddi_adaptive",
    "scaffold",
    "torch_adam",
    "trimmed_mean",
    "with_aggregator",
    "with_foolsgold",
    "with_weak_dp",
]
