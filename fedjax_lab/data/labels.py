"""Host-side validation of class labels (DESIGN.md "Errors").

Labels reach the compiled round as gather indices (cross entropy, accuracy), and JAX clamps
out-of-range indices instead of failing: a label ``-1`` silently trains class ``C - 1``, a label
``C`` gives a NaN loss with finite parameters, a float label is truncated, a ``[n, 1]`` label
array broadcasts. So every path that brings labels in (``FederatedData`` constructors, lazy
reads, ``federate``, evaluation sets) checks them here, on the host, before anything compiles.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np

# How many offending positions an error message lists.
_SHOWN = 5


def check_num_classes(num_classes: Any, where: str) -> int:
    """``num_classes`` as a positive int, or a ValueError naming ``where``."""
    if isinstance(num_classes, bool):
        raise ValueError(f"{where}: num_classes must be a positive integer, got {num_classes!r}")
    try:
        value = operator.index(num_classes)
    except TypeError:
        raise ValueError(
            f"{where}: num_classes must be a positive integer, got {num_classes!r}"
        ) from None
    if value < 1:
        raise ValueError(f"{where}: num_classes must be a positive integer, got {value}")
    return value


def check_label_spec(shape: tuple[int, ...], dtype: Any, name: str) -> None:
    """Checks the per-example shape and dtype of a label array (e.g. a ``RowSource``'s spec).

    Args:
      shape: per-example shape (must be ``()``: one label per example).
      dtype: the label dtype (must be an integer dtype).
      name: the array, as the message should name it.
    """
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(
            f"{name}: class labels must have an integer dtype, got {dtype} (float labels would "
            "be truncated, e.g. 2.7 -> 2); convert them with np.rint/astype(np.int32) only if "
            "they are whole numbers"
        )
    if tuple(shape) != ():
        raise ValueError(
            f"{name}: class labels must be one integer per example (shape [n]), got per-example "
            f"shape {tuple(shape)}; flatten them, e.g. y.reshape(-1) for [n, 1]"
        )


def check_labels(
    labels: Any,
    num_classes: int | None,
    name: str,
    locate: Callable[[int], str] | None = None,
) -> np.ndarray:
    """Validates class labels on the host; returns them as a numpy array.

    Labels must be an integer array of shape ``[n]`` with values in ``[0, num_classes)``;
    without ``num_classes`` only the lower bound is checked (negative labels are never valid).

    Args:
      labels: the label array.
      num_classes: the number of classes (the model's output size), or None when unknown.
      name: the array, as the message should name it (e.g. ``"federate(digits): train 'y'"``).
      locate: ``position -> text`` naming where position ``i`` of ``labels`` comes from (e.g.
        the client and its example); default ``"[i]"``.

    Raises:
      ValueError: naming ``name``, the offending positions and values, and the fix.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(
            f"{name}: class labels must have shape [n] (one integer per example), got shape "
            f"{y.shape}; flatten them, e.g. y.reshape(-1) for [n, 1]"
        )
    check_label_spec((), y.dtype, name)
    if num_classes is not None:
        num_classes = check_num_classes(num_classes, name)
    if not len(y):
        return y
    bad = y < 0 if num_classes is None else (y < 0) | (y >= num_classes)
    if np.any(bad):
        where = np.flatnonzero(bad)
        place = locate or (lambda i: f"[{i}]")
        shown = ", ".join(f"{place(int(i))}={y[i]}" for i in where[:_SHOWN])
        more = f" and {len(where) - _SHOWN} more" if len(where) > _SHOWN else ""
        valid = f"[0, {num_classes})" if num_classes is not None else "[0, num_classes)"
        raise ValueError(
            f"{name}: {len(where)} class label(s) outside {valid}: {shown}{more}. JAX would "
            "silently clamp them to another class; fix or drop these examples"
            + ("" if num_classes is None else ", or pass the right num_classes")
        )
    return y
