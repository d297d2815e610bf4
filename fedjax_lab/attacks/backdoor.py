"""Pixel-pattern backdoor (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning", §4,
the pixel-pattern backdoor of Gu et al. 2017 "BadNets").

A trigger (a ``size x size`` patch of value ``value`` in the bottom-right corner of the image,
every channel) is stamped on EVERY training example of the malicious clients and their labels
are set to ``target``; the clients then train honestly on that data. Bagdasaryan et al. mix
clean and backdoored examples in each batch; here a malicious client's data is all backdoored
(simpler, and the strongest data-only variant). Combine with :func:`fedjax_lab.attacks.scale`
for their model replacement.

The attack's success is measured on a triggered copy of the test set restricted to the
examples whose true label is not ``target`` (:func:`triggered_test`): the attack success rate
is the fraction classified as ``target`` (:func:`attack_success_evaluator`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedjax_lab.attacks.malicious import malicious_rows, replace_arrays
from fedjax_lab.data.federated import FederatedData

#: Round-record key of the attack success rate.
ATTACK_SUCCESS = "attack_success_rate"


def check_trigger(input_shape: Sequence[int], size: int, target: int, num_classes: int) -> None:
    """ValueError unless the inputs are images at least ``size`` pixels high and wide and
    ``target`` is a class."""
    if len(input_shape) < 2:
        raise ValueError(f"the pixel-pattern backdoor needs image inputs [H, W(, C)], got "
                         f"input shape {tuple(input_shape)}: use an image dataset")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"backdoor trigger size must be an int >= 1, got {size!r}")
    if size > min(input_shape[0], input_shape[1]):
        raise ValueError(f"backdoor trigger size {size} exceeds the image "
                         f"{input_shape[0]}x{input_shape[1]}")
    if isinstance(target, bool) or not isinstance(target, int | np.integer) or not (
            0 <= target < num_classes):
        raise ValueError(f"backdoor target must be a class in [0, {num_classes}), got {target!r}")


def add_trigger(x: np.ndarray, size: int, value: float = 1.0) -> np.ndarray:
    """A copy of images ``x`` ``[N, H, W(, C)]`` with the bottom-right ``size x size`` patch set
    to ``value`` (all channels)."""
    out = np.array(x, copy=True)
    out[:, -size:, -size:, ...] = value
    return out


def backdoor(data: FederatedData, malicious: Sequence[int] | np.ndarray, *, target: int,
             size: int = 3, value: float = 1.0) -> FederatedData:
    """``data`` with every example of the malicious clients triggered and labelled ``target``."""
    x = np.asarray(data.arrays["x"])
    check_trigger(x.shape[1:], size, target, data.num_classes or target + 1)
    rows = malicious_rows(data, malicious)
    x, y = x.copy(), np.asarray(data.arrays[data.label_key]).copy()
    x[rows] = add_trigger(x[rows], size, value)
    y[rows] = target
    return replace_arrays(data, {**data.arrays, "x": x, data.label_key: y})


def triggered_test(test: dict[str, np.ndarray], *, target: int, size: int = 3,
                   value: float = 1.0, num_classes: int | None = None
                   ) -> dict[str, np.ndarray]:
    """The test examples whose label is not ``target``, triggered, labelled ``target``."""
    check_trigger(np.shape(test["x"])[1:], size, target,
                  num_classes if num_classes is not None else target + 1)
    keep = np.asarray(test["y"]) != target
    if not keep.any():
        raise ValueError(f"every test example has the backdoor target label {target}; there is "
                         "nothing to measure the attack on")
    x = add_trigger(np.asarray(test["x"])[keep], size, value)
    return {"x": x, "y": np.full(len(x), target, np.asarray(test["y"]).dtype)}


def attack_success_evaluator(apply_fn: Callable[..., Any], test: dict[str, np.ndarray], *,
                             target: int, size: int = 3, value: float = 1.0,
                             num_classes: int | None = None
                             ) -> Callable[[Any], dict[str, float]]:
    """``evaluate(params) -> {"attack_success_rate": ...}`` on :func:`triggered_test`."""
    from fedjax_lab.metrics.evaluation import make_evaluator

    triggered = triggered_test(test, target=target, size=size, value=value,
                               num_classes=num_classes)
    evaluate = make_evaluator(apply_fn, triggered, num_classes=num_classes)

    def success(params: Any) -> dict[str, float]:
        return {ATTACK_SUCCESS: evaluate(params)["test_accuracy"]}

    return success
