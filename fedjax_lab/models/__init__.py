"""Flax models exposed as pure ``Model(init, apply)`` pairs; see `Model` for the contract."""

from fedjax_lab.models._base import Model, Params
from fedjax_lab.models._registry import get_model
from fedjax_lab.models.bn_mlp import BatchNormMLP
from fedjax_lab.models.char_lstm import char_lstm
from fedjax_lab.models.cnn import cnn_dropout, femnist_cnn
from fedjax_lab.models.logistic_regression import logistic_regression
from fedjax_lab.models.mlp import mlp
from fedjax_lab.models.mobilenet import mobilenet
from fedjax_lab.models.nwp_lstm import nwp_lstm
from fedjax_lab.models.resnet import resnet18_gn
from fedjax_lab.models.resnet56 import resnet56

__all__ = [
    "BatchNormMLP",
    "Model",
    "Params",
    "char_lstm",
    "cnn_dropout",
    "femnist_cnn",
    "get_model",
    "logistic_regression",
    "mlp",
    "mobilenet",
    "nwp_lstm",
    "resnet18_gn",
    "resnet56",
]
