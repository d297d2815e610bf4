"""Model lookup by name, for configs and command lines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedjax_lab.models._base import Model, check_positive_int, check_shape
from fedjax_lab.models.char_lstm import char_lstm
from fedjax_lab.models.cnn import cnn_dropout, femnist_cnn
from fedjax_lab.models.logistic_regression import logistic_regression
from fedjax_lab.models.mlp import mlp
from fedjax_lab.models.mobilenet import mobilenet
from fedjax_lab.models.nwp_lstm import nwp_lstm
from fedjax_lab.models.resnet import resnet18_gn
from fedjax_lab.models.resnet56 import resnet56


def _char_lstm(input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> Model:
    # For token models input_shape is (seq_len,) and the classes are the vocabulary.
    for arg in ("seq_len", "vocab_size"):
        if arg in kwargs:
            raise TypeError(
                f"get_model('char_lstm') takes {arg} from input_shape=(seq_len,) and "
                f"num_classes=vocab_size; do not pass {arg} as well."
            )
    (seq_len,) = check_shape(input_shape, rank=1)
    return char_lstm(vocab_size=num_classes, seq_len=seq_len, **kwargs)


def _nwp_lstm(input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> Model:
    # Like char_lstm: input_shape is (seq_len,), the classes are the extended vocabulary.
    if "seq_len" in kwargs:
        raise TypeError("get_model('nwp_lstm') takes seq_len from input_shape=(seq_len,)")
    (seq_len,) = check_shape(input_shape, rank=1)
    return nwp_lstm(num_classes=num_classes, seq_len=seq_len, **kwargs)


_FACTORIES: dict[str, Callable[..., Model]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "cnn": femnist_cnn,
    "cnn_dropout": cnn_dropout,
    "resnet18": resnet18_gn,
    "resnet56": resnet56,
    "mobilenet": mobilenet,
    "char_lstm": _char_lstm,
    "nwp_lstm": _nwp_lstm,
}


def get_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> Model:
    """Builds a model by name.

    Args:
      name: One of ``'logreg'``, ``'mlp'``, ``'cnn'`` (`femnist_cnn`), ``'cnn_dropout'``
        (`cnn_dropout`, FedML's CNN_DropOut), ``'resnet18'``
        (`resnet18_gn`), ``'resnet56'`` (`resnet56`, FedML's), ``'mobilenet'`` (`mobilenet`,
        FedML's MobileNet v1), ``'char_lstm'``, ``'nwp_lstm'`` (`nwp_lstm`, StackOverflow next-word
        prediction: per-position logits).
      input_shape: Per-example input shape; ``(seq_len,)`` for ``'char_lstm'`` and
        ``'nwp_lstm'``.
      num_classes: Number of classes; the vocabulary size for ``'char_lstm'``.
      **kwargs: Extra keyword arguments of the factory (e.g. ``hidden`` for ``'mlp'``,
        ``groups`` for ``'resnet18'``).

    Returns:
      The `Model`.

    Raises:
      ValueError: On an unknown `name` (the message lists the valid names) or a bad
        `input_shape`/`num_classes`.
      TypeError: On keyword arguments the factory does not take.
    """
    if name not in _FACTORIES:
        raise ValueError(f"Unknown model name {name!r}; valid names are {sorted(_FACTORIES)}.")
    shape = check_shape(input_shape)
    classes = check_positive_int(num_classes, "num_classes")
    return _FACTORIES[name](shape, classes, **kwargs)
