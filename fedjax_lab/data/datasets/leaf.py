"""Reader of LEAF-format JSON federated datasets (FEMNIST, Shakespeare, Synthetic).

Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings" (arXiv:1812.01097). LEAF's
preprocessing writes ``<root>/train/*.json`` and ``<root>/test/*.json``, each
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lab.data.datasets._base import Dataset, check_dataset

LEAF_TASKS = ("femnist", "shakespeare", "synthetic")

# LEAF's character vocabulary for Shakespeare (``ALL_LETTERS`` in models/utils/language_utils.py):
# 80 characters; a token is the character's position in this string.
SHAKESPEARE_VOCAB = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
_FEMNIST_CLASSES = 62  # 10 digits + 26 upper + 26 lower case letters.

_CHAR_TABLE = np.full(max(map(ord, SHAKESPEARE_VOCAB)) + 1, -1, dtype=np.int32)
_CHAR_TABLE[[ord(c) for c in SHAKESPEARE_VOCAB]] = np.arange(len(SHAKESPEARE_VOCAB))


def _tokens(text: str, where: str) -> np.ndarray:
    """Token ids of `text`; raises on characters outside the LEAF vocabulary."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    tokens = np.full(codes.shape, -1, dtype=np.int32)
    known = codes < len(_CHAR_TABLE)
    tokens[known] = _CHAR_TABLE[codes[known]]
    if np.any(tokens < 0):
        bad = sorted({text[i] for i in np.flatnonzero(tokens < 0)})
        raise ValueError(
            f"{where}: characters {bad!r} are not in LEAF's 80-character Shakespeare vocabulary "
            "(SHAKESPEARE_VOCAB); re-run LEAF's preprocessing or clean the text"
        )
    return tokens


def _labels(y: list[Any], where: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{where}: y must be a list of integer labels, got dtype {arr.dtype}")
    # FedProx's synthetic generator writes labels as floats (3.0); accept integral values only.
    integral = np.isfinite(arr) & (arr == np.round(arr)) if arr.dtype.kind == "f" else True
    if not np.all(integral):
        raise ValueError(f"{where}: y holds non-integer labels")
    if np.any(arr < 0):
        raise ValueError(f"{where}: y holds negative labels")
    return arr.astype(np.int32)


def _features(task: str, x: list[Any], y: list[Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    if task == "shakespeare":
        if not all(isinstance(s, str) for s in x) or not all(
            isinstance(c, str) and len(c) == 1 for c in y
        ):
            raise ValueError(f"{where}: Shakespeare x must be strings and y single characters")
        lengths = {len(s) for s in x}
        if len(lengths) > 1 or 0 in lengths:
            raise ValueError(
                f"{where}: x strings must be non-empty and of one length, got {sorted(lengths)}"
            )
        xt = _tokens("".join(x), where).reshape(len(x), -1)
        return xt, _tokens("".join(y), where)
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: x must be a list of equal-length lists of finite numbers")
    if task == "femnist":
        if arr.shape[1] != 28 * 28:
            raise ValueError(f"{where}: FEMNIST x must have 784 values, got {arr.shape[1]}")
        arr = arr.reshape(-1, 28, 28, 1)
    return arr, _labels(y, where)


def _read_split(root: Path, split: str, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    directory = root / split
    if not directory.is_dir():
        raise FileNotFoundError(
            f"LEAF {task}: directory {str(directory)!r} not found; expected LEAF's output "
            f"layout <root_dir>/{split}/*.json"
        )
    files = sorted(directory.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"LEAF {task}: no *.json files in {str(directory)!r}")
    xs, ys, ids, seen = [], [], [], {}
    for path in files:
        with path.open() as f:
            blob = json.load(f)
        if not isinstance(blob, dict) or not {"users", "num_samples", "user_data"} <= set(blob):
            raise ValueError(f"{path}: expected keys users, num_samples, user_data")
        users, counts, data = blob["users"], blob["num_samples"], blob["user_data"]
        if len(users) != len(counts):
            raise ValueError(f"{path}: {len(users)} users but {len(counts)} num_samples entries")
        for user, count in zip(users, counts, strict=True):
            where = f"{path} user {user!r}"
            if user in seen:
                raise ValueError(f"{where}: user also appears in {seen[user]}")
            seen[user] = path.name
            if user not in data:
                raise ValueError(f"{where}: listed in users but missing from user_data")
            x, y = data[user].get("x"), data[user].get("y")
            if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y):
                raise ValueError(f"{where}: x and y must be lists of equal length")
            if len(x) != count:
                raise ValueError(f"{where}: num_samples says {count} but x has {len(x)} examples")
            if not x:
                continue
            fx, fy = _features(task, x, y, where)
            xs.append(fx)
            ys.append(fy)
            ids.append(np.full(len(fy), str(user)))
    if not xs:
        raise ValueError(f"LEAF {task}: {str(directory)!r} holds no examples")
    shapes = {a.shape[1:] for a in xs}
    if len(shapes) != 1:
        raise ValueError(f"LEAF {task}: {split} examples have different shapes {sorted(shapes)}")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)


def leaf(root_dir: str | Path, task: str) -> Dataset:
    """Reads a LEAF dataset from ``root_dir/train/*.json`` and ``root_dir/test/*.json``.

    Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings".

    * ``"femnist"``: x = 784 floats per example -> float32 ``[28, 28, 1]``; 62 classes.
    * ``"shakespeare"``: x = strings (80 characters in LEAF) -> int32 tokens with LEAF's
      80-character vocabulary (`SHAKESPEARE_VOCAB`); y = the next character's token;
      ``num_classes = 80``. Unknown characters raise a ValueError.
    * ``"synthetic"``: x = D floats per example; y integer labels (integral floats accepted);
      ``num_classes = 1 + max label`` over train and test.

    Users are read file by file (files sorted by name) in each file's ``users`` order. A user
    listed twice, a ``num_samples`` entry that disagrees with ``len(x)``, or x/y of different
    lengths raise a ValueError.

    Args:
      root_dir: directory holding ``train/`` and ``test/``.
      task: one of ``"femnist", "shakespeare", "synthetic"``.

    Returns:
      A `Dataset` named ``"leaf/<task>"`` whose ``train_client_ids`` and ``test_client_ids``
      are the LEAF user names (a test user need not appear in train, nor the reverse).
    """
    if task not in LEAF_TASKS:
        raise ValueError(f"unknown LEAF `task` {task!r}; valid tasks: {', '.join(LEAF_TASKS)}")
    root = Path(root_dir)
    x_tr, y_tr, ids = _read_split(root, "train", task)
    x_te, y_te, test_ids = _read_split(root, "test", task)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(
            f"LEAF {task}: train examples have shape {x_tr.shape[1:]}, test {x_te.shape[1:]}"
        )
    if task == "femnist":
        num_classes = _FEMNIST_CLASSES
    elif task == "shakespeare":
        num_classes = len(SHAKESPEARE_VOCAB)
    else:
        num_classes = int(max(y_tr.max(), y_te.max())) + 1
    for split, y in (("train", y_tr), ("test", y_te)):
        if y.max() >= num_classes:
            raise ValueError(
                f"LEAF {task}: {split} label {int(y.max())} >= num_classes={num_classes}"
            )
    return check_dataset(
        Dataset(
            name=f"leaf/{task}",
            train={"x": x_tr, "y": y_tr},
            test={"x": x_te, "y": y_te},
            num_classes=num_classes,
            input_shape=tuple(x_tr.shape[1:]),
            train_client_ids=ids,
            test_client_ids=test_ids,
        )
    )
