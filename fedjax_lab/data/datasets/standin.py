"""Tiny offline stand-ins of TFF's federated h5 datasets, written in TFF's own file layout.

Smoke runs of the benchmark presets (``experiments/train.py --config ... --quick``, FedML's
table: He et al. 2020, "FedML: A Research Library and Benchmark for Federated Machine
Learning") need data of the right shape without the real downloads. `write_standin` writes a
few clients of random examples in exactly the layout the loaders of
:mod:`fedjax_lab.data.datasets.tff_h5` and :mod:`fedjax_lab.data.datasets.stackoverflow` read
(``examples/<client>/<feature>``; StackOverflow also its word and tag count files), so a smoke
run goes through the real loader, preprocessing, model and metrics. The numbers it produces
are meaningless (random pixels and labels); only that the pipeline runs is checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# The datasets `write_standin` can imitate -> (train file, test file).
STANDIN_FILES = {
    "fed_emnist": ("fed_emnist_train.h5", "fed_emnist_test.h5"),
    "fed_cifar100": ("fed_cifar100_train.h5", "fed_cifar100_test.h5"),
    "fed_shakespeare": ("shakespeare_train.h5", "shakespeare_test.h5"),
    "stackoverflow_nwp": ("stackoverflow_train.h5", "stackoverflow_test.h5"),
    "stackoverflow_lr": ("stackoverflow_train.h5", "stackoverflow_test.h5"),
}
STANDIN_DATASETS = tuple(STANDIN_FILES)
STANDIN_CLIENTS = 4  # train clients of every stand-in
_WORDS = 10_000  # the StackOverflow loaders' default vocabulary (TFF's / Reddi et al.'s)
_TAGS = 500


def _write_h5(path: Path, clients: dict[str, dict[str, Any]]) -> None:
    from fedjax_lab.data.datasets.tff_h5 import _import_h5py

    h5py = _import_h5py()
    with h5py.File(path, "w") as f:
        for cid, features in clients.items():
            for key, value in features.items():
                if isinstance(value, list):  # strings, variable length as TFF stores them
                    f.create_dataset(f"examples/{cid}/{key}", data=value,
                                     dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(f"examples/{cid}/{key}", data=value)


def _clients(name: str, sizes: list[int], rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, n in enumerate(sizes):
        if name == "fed_emnist":
            out[f"f{i:04d}_00"] = {"pixels": rng.random((n, 28, 28), dtype=np.float32),
                                   "label": rng.integers(0, 62, n).astype(np.int32)}
        elif name == "fed_cifar100":
            out[str(i)] = {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                           "label": rng.integers(0, 100, n).astype(np.int64),
                           "coarse_label": rng.integers(0, 20, n).astype(np.int64)}
        elif name == "fed_shakespeare":
            letters = np.array(list("abcdefgh ,.ROMEO"))
            out[f"ROLE_{i}"] = {"snippets": [
                "".join(rng.choice(letters, int(rng.integers(20, 120)))) for _ in range(n)]}
        else:  # StackOverflow: sentences of vocabulary words, a title and tags
            def sentence() -> str:
                return " ".join(f"w{j}" for j in rng.integers(0, 50, int(rng.integers(3, 25))))

            out[f"{i:05d}"] = {
                "tokens": [sentence() for _ in range(n)], "title": [sentence() for _ in range(n)],
                "tags": ["|".join(f"t{j}" for j in rng.integers(0, 8, 2)) for _ in range(n)],
                "score": np.zeros(n, np.int64)}
    return out


def write_standin(name: str, folder: str | Path, *, seed: int = 0) -> int:
    """Writes a tiny stand-in of TFF's dataset `name` into `folder`; returns its client count.

    `STANDIN_CLIENTS` train clients of 3 to 14 random examples each (client sizes differ, as
    natural clients do) and a test file with a few examples per client, in the file names and
    layout the loaders read; for StackOverflow also ``stackoverflow.word_count`` (10,000
    words) and ``stackoverflow.tag_count`` (500 tags), the loaders' default vocabularies.

    Args:
      name: one of `STANDIN_DATASETS`.
      folder: where to write (created if missing; the files are replaced).
      seed: seed of the random contents.

    Raises:
      ValueError: `name` has no stand-in.
    """
    if name not in STANDIN_FILES:
        raise ValueError(f"write_standin: no stand-in for {name!r}; datasets with one: "
                         f"{', '.join(STANDIN_DATASETS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(3, 15, STANDIN_CLIENTS)]
    train_name, test_name = STANDIN_FILES[name]
    _write_h5(folder / train_name, _clients(name, sizes, rng))
    _write_h5(folder / test_name, _clients(name, [2] * STANDIN_CLIENTS, rng))
    if name.startswith("stackoverflow"):
        (folder / "stackoverflow.word_count").write_text(
            "".join(f"w{i} {2 * _WORDS - i}\n" for i in range(_WORDS)), encoding="utf-8")
        (folder / "stackoverflow.tag_count").write_text(
            json.dumps({f"t{i}": _TAGS - i for i in range(_TAGS)}), encoding="utf-8")
    return STANDIN_CLIENTS
