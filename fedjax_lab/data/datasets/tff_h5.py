"""TensorFlow Federated's federated datasets, read from the h5 files TFF publishes.

The benchmark rows of FedML (He et al. 2020, "FedML: A Research Library and Benchmark for
Federated Machine Learning") and of Reddi et al. 2021 ("Adaptive Federated Optimization")
use TFF's federated EMNIST, Shakespeare and CIFAR-100. TFF (and FedML's download scripts)
ship them as HDF5 files whose group ``examples`` holds one subgroup per natural client (a
writer, a speaking role, a data holder): ``examples/<client_id>/<feature>`` is an array with
one row per example of that client. ``h5py`` is imported lazily, inside the loaders.

The train split is a `H5ClientSource` (a ``fedjax_lab.data.RowSource``): opening it reads
only what partitioners need (every example's label and client), and ``take(rows)`` reads the
features of just the clients those rows belong to, so a round reads only its clients. The
test split is read whole (the central evaluation set). The natural partition
(``--partition natural``) is the files' clients.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lab.data.datasets._base import Dataset, check_dataset

# Where TFF's ``tff.simulation.datasets.<name>.load_data`` downloads each archive from.
TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"

# TFF's Shakespeare character vocabulary (the "Federated Learning for Text Generation"
# tutorial's, reused by TFF's and FedML's Shakespeare preprocessing): 86 characters.
TFF_SHAKESPEARE_CHARS = (
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)
# Token ids as TFF builds them: pad 0, the characters 1..86, then bos, eos, and one
# out-of-vocabulary bucket.
SHAKESPEARE_PAD = 0
SHAKESPEARE_BOS = len(TFF_SHAKESPEARE_CHARS) + 1
SHAKESPEARE_EOS = len(TFF_SHAKESPEARE_CHARS) + 2
SHAKESPEARE_OOV = len(TFF_SHAKESPEARE_CHARS) + 3
SHAKESPEARE_VOCAB_SIZE = len(TFF_SHAKESPEARE_CHARS) + 4
SHAKESPEARE_SEQ_LEN = 80  # McMahan et al. 2017's (and TFF's) sequence length

# CIFAR-100 per-channel train mean and standard deviation (of pixels in [0, 1]), the constants
# FedML's fed_cifar100 transform normalises with.
CIFAR100_MEAN = np.array([0.5071, 0.4865, 0.4409], np.float32)
CIFAR100_STD = np.array([0.2673, 0.2564, 0.2762], np.float32)

# Code point -> token id lookup (vectorised tokenisation); code points past it are OOV too.
_CHAR_TABLE = np.full(max(map(ord, TFF_SHAKESPEARE_CHARS)) + 1, SHAKESPEARE_OOV, np.int32)
_CHAR_TABLE[[ord(c) for c in TFF_SHAKESPEARE_CHARS]] = np.arange(1, len(TFF_SHAKESPEARE_CHARS) + 1)


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as err:
        raise ImportError(
            "TFF's h5 datasets are read with h5py: `pip install h5py` (it comes with the tfds "
            "extra, `pip install fedjax_lab[tfds]`)"
        ) from err
    return h5py


def shakespeare_tokens(snippet: str) -> np.ndarray:
    """TFF's token ids of one snippet: ``[bos, ids of its characters..., eos]`` (int32).

    A character outside `TFF_SHAKESPEARE_CHARS` becomes the out-of-vocabulary id, as in TFF
    (``num_oov_buckets=1``).
    """
    codes = np.frombuffer(snippet.encode("utf-32-le"), np.uint32)
    ids = np.full(len(codes), SHAKESPEARE_OOV, np.int32)
    known = codes < len(_CHAR_TABLE)
    ids[known] = _CHAR_TABLE[codes[known]]
    return np.concatenate([[SHAKESPEARE_BOS], ids, [SHAKESPEARE_EOS]]).astype(np.int32)


def shakespeare_examples(snippet: str,
                         seq_len: int = SHAKESPEARE_SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Next-character examples of one snippet: ``x`` int32 ``[n, seq_len]``, ``y`` int32 ``[n]``.

    Every character of the snippet and its final eos is one target (``n = len(snippet) + 1``);
    its input is the ``seq_len`` tokens before it in ``[bos, characters..., eos]``, left-padded
    with the pad id. This is LEAF's one-target-per-example formulation (Caldas et al. 2018: the
    80 characters before each character), which the ``char_lstm`` model (last-step prediction)
    trains on, with TFF's vocabulary and special tokens: TFF's own pipeline cuts the same token
    sequence into chunks of 81 and predicts every position of a chunk, so its targets are the
    same characters (and eos), each with a shorter context at chunk starts, plus pad targets.
    """
    tokens = shakespeare_tokens(snippet)
    padded = np.concatenate([np.full(seq_len - 1, SHAKESPEARE_PAD, np.int32), tokens])
    n = len(tokens) - 1
    # Window i covers padded[i : i + seq_len], i.e. the seq_len tokens before tokens[i + 1].
    x = np.lib.stride_tricks.sliding_window_view(padded, seq_len)[:n]
    return np.ascontiguousarray(x), tokens[1:].copy()


class _Task:
    """How one TFF dataset's client group becomes labels and features."""

    def __init__(self, name: str, input_shape: tuple[int, ...], dtype: Any, num_classes: int,
                 labels: Callable[[Any, str], np.ndarray],
                 features: Callable[[Any, np.ndarray, str], np.ndarray]) -> None:
        self.name, self.input_shape, self.dtype = name, input_shape, np.dtype(dtype)
        self.num_classes, self.labels, self.features = num_classes, labels, features


def _dataset(group: Any, key: str, where: str) -> Any:
    if key not in group:
        raise ValueError(f"{where}: no {key!r} array (found {sorted(group)}); is this the right "
                         "TFF h5 file?")
    return group[key]


def _int_labels(group: Any, where: str, key: str = "label") -> np.ndarray:
    y = np.asarray(_dataset(group, key, where)[()])
    if y.ndim == 2 and y.shape[1] == 1:  # some exports store labels as [n, 1]
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: {key!r} must be one integer per example, got {y.dtype} "
                         f"{y.shape}")
    return y.astype(np.int32)


def _emnist_features(group: Any, rows: np.ndarray, where: str) -> np.ndarray:
    pixels = np.asarray(_dataset(group, "pixels", where)[rows], np.float32)
    if pixels.shape[1:] != (28, 28):
        raise ValueError(f"{where}: 'pixels' must be [n, 28, 28], got {pixels.shape}")
    # TFF stores white background as 1.0 and ink as 0.0; 1 - pixels makes ink 1 on a 0
    # background like MNIST (FedJAX's EMNIST preprocessing does the same).
    return (1.0 - pixels)[..., None]


def _cifar_features(group: Any, rows: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(_dataset(group, "image", where)[rows])
    if image.dtype != np.uint8 or image.shape[1:] != (32, 32, 3):
        raise ValueError(f"{where}: 'image' must be uint8 [n, 32, 32, 3], got {image.dtype} "
                         f"{image.shape}")
    return (image.astype(np.float32) / np.float32(255.0) - CIFAR100_MEAN) / CIFAR100_STD


def _snippets(group: Any, where: str) -> list[str]:
    raw = _dataset(group, "snippets", where)
    if raw.dtype.kind not in ("O", "S", "U"):
        raise ValueError(f"{where}: 'snippets' must hold strings, got {raw.dtype}")
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in raw[()]]


def _shakespeare_labels(group: Any, where: str) -> np.ndarray:
    parts = [shakespeare_tokens(s)[1:] for s in _snippets(group, where)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _shakespeare_features(group: Any, rows: np.ndarray, where: str) -> np.ndarray:
    # A client's examples are derived from all its snippets: build them, keep the rows asked.
    xs = [shakespeare_examples(s)[0] for s in _snippets(group, where)]
    x = np.concatenate(xs) if xs else np.zeros((0, SHAKESPEARE_SEQ_LEN), np.int32)
    return x[rows]


_TASKS = {
    "fed_emnist": _Task("fed_emnist", (28, 28, 1), np.float32, 62, _int_labels,
                        _emnist_features),
    "fed_cifar100": _Task("fed_cifar100", (32, 32, 3), np.float32, 100, _int_labels,
                          _cifar_features),
    "fed_shakespeare": _Task("fed_shakespeare", (SHAKESPEARE_SEQ_LEN,), np.int32,
                             SHAKESPEARE_VOCAB_SIZE, _shakespeare_labels, _shakespeare_features),
}

# Expected file names of each dataset's (train, test) split and TFF's archive holding them.
H5_FILES = {
    "fed_emnist": (("fed_emnist_train.h5", "fed_emnist_test.h5"), "fed_emnist.tar.bz2"),
    "fed_cifar100": (("fed_cifar100_train.h5", "fed_cifar100_test.h5"), "fed_cifar100.tar.bz2"),
    "fed_shakespeare": (("shakespeare_train.h5", "shakespeare_test.h5"), "shakespeare.tar.bz2"),
}


class H5ClientSource:
    """One split of a TFF h5 file, read client by client on demand (a ``RowSource``).

    Rows are the examples of the file's clients in the file's (sorted) client order. Opening
    reads each client's labels only (for Shakespeare, whose labels are characters of the
    text, its snippets); ``take(rows)`` reads the features of the clients owning those rows.

    Attributes:
      path: the h5 file.
      client_names: the file's client ids, in row order.
      offsets: ``[num_clients + 1]``; client ``i`` owns rows ``offsets[i]:offsets[i + 1]``.
      labels: int32 ``[N]`` label of every row (``source["y"]``).
      rows_read: examples returned by ``take`` so far; clients_read: client groups read by
        ``take`` so far (tests check that a round reads only its clients).
    """

    def __init__(self, path: str | Path, task: _Task) -> None:
        h5py = _import_h5py()
        self.path = Path(path)
        self.task = task
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise ValueError(f"{task.name}: {str(self.path)!r} is not a readable HDF5 file "
                             f"({err}); re-download TFF's {H5_FILES[task.name][1]}") from None
        if "examples" not in self._file:
            raise ValueError(f"{task.name}: {str(self.path)!r} has no 'examples' group (found "
                             f"{sorted(self._file)}); it is not one of TFF's h5 files")
        self._examples = self._file["examples"]
        self.client_names = tuple(self._examples)
        if not self.client_names:
            raise ValueError(f"{task.name}: {str(self.path)!r} holds no clients")
        labels = [task.labels(self._examples[c], self._where(c)) for c in self.client_names]
        sizes = [len(y) for y in labels]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.labels = np.concatenate(labels).astype(np.int32)
        self.rows_read = 0
        self.clients_read = 0

    def _where(self, client: str) -> str:
        return f"{self.task.name}: {str(self.path)!r} client {client!r}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: str) -> np.ndarray:
        if key == "y":
            return self.labels
        raise KeyError(f"{self.task.name}: the train split is read on demand and holds only "
                       "its labels ('y'); read examples with take(rows)")

    @property
    def client_of_row(self) -> np.ndarray:
        """int32 ``[N]``: the client index (position in `client_names`) of every row."""
        return np.repeat(np.arange(len(self.client_names), dtype=np.int32),
                         np.diff(self.offsets))

    def feature_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"x": (self.task.input_shape, self.task.dtype), "y": ((), np.dtype(np.int32))}

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= len(self)):
            raise ValueError(f"take: rows must be sorted, unique and in [0, {len(self)})")
        client = np.searchsorted(self.offsets, rows, side="right") - 1
        xs = [np.zeros((0, *self.task.input_shape), self.task.dtype)]
        # Rows are sorted, so each client's rows are one contiguous run of `rows`.
        starts = np.flatnonzero(np.diff(client, prepend=-1))
        for c, lo, hi in zip(client[starts], starts, [*starts[1:], len(rows)], strict=True):
            local = rows[lo:hi] - self.offsets[c]
            name = self.client_names[c]
            x = self.task.features(self._examples[name], local, self._where(name))
            xs.append(np.asarray(x, self.task.dtype))
            self.clients_read += 1
        self.rows_read += len(rows)
        return {"x": np.concatenate(xs), "y": self.labels[rows]}

    def read_all(self) -> dict[str, np.ndarray]:
        """Every row (the central test set)."""
        return self.take(np.arange(len(self)))

    def close(self) -> None:
        self._file.close()


def _paths(name: str, data_dir: str | Path | None) -> tuple[Path, Path]:
    (train_name, test_name), archive = H5_FILES[name]
    where = (f"TFF publishes them in {TFF_URL}{archive} (the archive "
             f"`tff.simulation.datasets` downloads; FedML's download scripts fetch the same files)")
    if data_dir is None:
        raise ValueError(f"{name}: pass data_dir, the folder holding {train_name} and "
                         f"{test_name}; {where}")
    folder = Path(data_dir)
    paths = (folder / train_name, folder / test_name)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {', '.join(missing)} not found in {str(folder)!r}; "
                                f"expected {train_name} and {test_name} there; {where}")
    return paths


def _load(name: str, data_dir: str | Path | None, natural_test: bool) -> Dataset:
    task = _TASKS[name]
    train_path, test_path = _paths(name, data_dir)
    train = H5ClientSource(train_path, task)
    try:
        test_source = H5ClientSource(test_path, task)
    except Exception:
        train.close()
        raise
    test = test_source.read_all()
    test_source.close()
    test_ids = None
    if natural_test:
        # Test clients are the train clients (the same writer/role in both files): code them
        # by their position among the train clients; a test-only client gets a new code.
        code = {c: i for i, c in enumerate(train.client_names)}
        extra = [c for c in test_source.client_names if c not in code]
        code.update({c: len(train.client_names) + i for i, c in enumerate(extra)})
        test_ids = np.repeat(np.array([code[c] for c in test_source.client_names], np.int32),
                             np.diff(test_source.offsets))
    return check_dataset(Dataset(
        name=name, train=train, test=test, num_classes=task.num_classes,
        input_shape=task.input_shape, train_client_ids=train.client_of_row,
        test_client_ids=test_ids,
    ))


def fed_emnist(data_dir: str | Path | None = None) -> Dataset:
    """TFF's federated EMNIST (Caldas et al. 2018's FEMNIST writers): 3,400 writers, 62 classes.

    Files ``fed_emnist_train.h5`` / ``fed_emnist_test.h5``; ``examples/<writer>/pixels``
    float32 ``[n, 28, 28]`` and ``label`` int32 ``[n]``. ``x = 1 - pixels`` (TFF stores a white
    background as 1.0; this gives ink 1 on 0, like MNIST and FedJAX's EMNIST), float32
    ``[28, 28, 1]``. Every writer has train and test examples, so the test set keeps its
    natural clients (``test_client_ids``).

    Args:
      data_dir: the folder holding the two h5 files.

    Returns:
      A `Dataset` whose train split is a lazily read `H5ClientSource`; ``train_client_ids``
      are int32 client indices (``source.client_names[i]`` is the writer of index ``i``).

    Raises:
      FileNotFoundError: a file is missing (the message names both and where TFF publishes
        them). ValueError: a file is not TFF's layout.
    """
    return _load("fed_emnist", data_dir, natural_test=True)


def fed_cifar100(data_dir: str | Path | None = None) -> Dataset:
    """TFF's federated CIFAR-100 (Reddi et al. 2021): 500 train clients, 100 fine classes.

    Files ``fed_cifar100_train.h5`` / ``fed_cifar100_test.h5``; ``examples/<id>/image`` uint8
    ``[n, 32, 32, 3]``, ``label`` (fine, used) and ``coarse_label`` (not used). ``x`` is the
    image in [0, 1] normalised per channel with CIFAR-100's mean and standard deviation
    (`CIFAR100_MEAN`, `CIFAR100_STD`, FedML's constants), float32 ``[32, 32, 3]``. FedML's and
    TFF's random crops (24x24) and flips are training augmentations and are not applied: the
    examples are deterministic. The 100 test clients are other data holders than the train
    clients (their ids restart at 0), so the test set has no natural clients.

    Args:
      data_dir: the folder holding the two h5 files.
    """
    return _load("fed_cifar100", data_dir, natural_test=False)


def fed_shakespeare(data_dir: str | Path | None = None) -> Dataset:
    """TFF's federated Shakespeare: 715 speaking roles, next-character prediction.

    Files ``shakespeare_train.h5`` / ``shakespeare_test.h5``; ``examples/<role>/snippets``
    strings (one per spoken line group). Characters become TFF's ids (`shakespeare_tokens`:
    pad 0, TFF's 86 characters 1..86, bos 87, eos 88, out-of-vocabulary 89;
    ``num_classes = 90``), and every character and each snippet's eos is one example whose
    input is the 80 tokens before it (`shakespeare_examples`), int32 ``[80]``, for the
    ``char_lstm`` model (``--model char_lstm``). A role has train and test snippets, so the test
    set keeps its natural clients.

    Args:
      data_dir: the folder holding the two h5 files.
    """
    return _load("fed_shakespeare", data_dir, natural_test=True)
