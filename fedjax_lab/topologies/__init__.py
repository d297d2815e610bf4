"""Training topologies beyond the star of FedAvg: split learning / SplitFed and vertical FL."""

from fedjax_lab.topologies.split import (
    Layer,
    SplitModel,
    SplitState,
    SplitTrainer,
    builtin_layers,
    init_state,
    split_grads,
    split_model,
    splitfed,
    vanilla_split_learning,
)
from fedjax_lab.topologies.vertical import (
    VerticalModel,
    check_feature_groups,
    epoch_batches,
    feature_split,
    split_features,
    vertical_grads,
    vertical_model,
    vertical_trainer,
)

__all__ = [
    "Layer",
    "SplitModel",
    "SplitState",
    "SplitTrainer",
    "VerticalModel",
    "builtin_layers",
    "check_feature_groups",
    "epoch_batches",
    "feature_split",
    "init_state",
    "split_features",
    "split_grads",
    "split_model",
    "splitfed",
    "vanilla_split_learning",
    "vertical_grads",
    "vertical_model",
    "vertical_trainer",
]
