"""StackOverflow (TFF's federated h5 files): next-word and tag prediction, read per user.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), §5 and App. C, and FedML's
benchmark: 342,477 users, each a client of their own questions and answers (135.8M train
sentences). TFF's files: ``stackoverflow_train.h5`` / ``stackoverflow_test.h5`` (and
``stackoverflow_held_out.h5``, not used) with ``examples/<user>/tokens``, ``title``, ``tags``
(strings, one per sentence; plus ``score``, ``type``, ``creation_date``), and the vocabulary
files ``stackoverflow.word_count`` (``word count`` lines, most frequent first) and
``stackoverflow.tag_count`` (a JSON object tag -> count).

The population is too large for per-row arrays, so the train split is a `UserSource` whose
clients are the file's users: opening it reads each user's sentence count from the h5 metadata
(no sentence is read), and ``take(rows)`` reads and preprocesses only the rows asked. Such a
dataset is federated with ``partition="natural"`` only (``federate`` builds the population
straight from the user offsets). The test split is a seeded sample of ``test_examples``
sentences (Reddi et al. evaluate on 10,000 test sentences).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lab.data.datasets._base import Dataset, check_dataset
from fedjax_lab.data.datasets.tff_h5 import TFF_URL, _import_h5py
from fedjax_lab.data.datasets.tff_h5 import _dataset as _h5_array

TRAIN_FILE, TEST_FILE = "stackoverflow_train.h5", "stackoverflow_test.h5"
WORD_COUNT_FILE, TAG_COUNT_FILE = "stackoverflow.word_count", "stackoverflow.tag_count"
ARCHIVE = "stackoverflow.tar.bz2"
# The files each loader reads from its data_dir.
EXPECTED_FILES = {"stackoverflow_nwp": (TRAIN_FILE, TEST_FILE, WORD_COUNT_FILE),
                  "stackoverflow_lr": (TRAIN_FILE, TEST_FILE, WORD_COUNT_FILE, TAG_COUNT_FILE)}


def load_word_vocab(path: str | Path, vocab_size: int) -> list[str]:
    """The ``vocab_size`` most frequent words: the first words of ``stackoverflow.word_count``.

    Raises:
      ValueError: the file has fewer words (the vocabulary is never silently smaller).
    """
    words = []
    with open(path) as f:
        for line in f:
            if len(words) == vocab_size:
                break
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {len(words) + 1} is not 'word count': {line!r}")
            words.append(parts[0])
    if len(words) < vocab_size:
        raise ValueError(f"{path} lists {len(words)} words, fewer than vocab_size={vocab_size}")
    return words


def load_tag_vocab(path: str | Path, num_tags: int) -> list[str]:
    """The ``num_tags`` most frequent tags of ``stackoverflow.tag_count`` (a JSON object tag ->
    count), sorted by decreasing count as TFF's ``load_tag_counts`` does (ties keep file
    order)."""
    with open(path) as f:
        try:
            counts = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not TFF's JSON tag counts ({err})") from None
    if not isinstance(counts, dict):
        raise ValueError(f"{path}: expected a JSON object tag -> count")
    if not all(isinstance(c, (int, float)) for c in counts.values()):
        raise ValueError(f"{path}: tag counts must be numbers")
    tags = [t for t, _ in sorted(counts.items(), key=lambda item: item[1], reverse=True)]
    tags = tags[:num_tags]
    if len(tags) < num_tags:
        raise ValueError(f"{path} lists {len(tags)} tags, fewer than num_tags={num_tags}")
    return tags


class WordIds:
    """TFF's next-word token ids for a vocabulary of ``V`` words (Reddi et al. 2021).

    pad 0, the words 1..V in vocabulary order, one out-of-vocabulary id ``V + 1``, bos
    ``V + 2``, eos ``V + 3``: ``V + 4`` classes (TFF's ``get_special_tokens`` with one OOV
    bucket).
    """

    def __init__(self, vocab: list[str]) -> None:
        self.ids = {w: i + 1 for i, w in enumerate(vocab)}
        v = len(vocab)
        self.pad, self.oov, self.bos, self.eos = 0, v + 1, v + 2, v + 3
        self.num_classes = v + 4

    @property
    def special(self) -> tuple[int, int, int, int]:
        return self.pad, self.oov, self.bos, self.eos

    def example(self, sentence: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` int32 ``[seq_len]`` of one sentence, as TFF's ``to_ids`` + padded split.

        The sentence is split on single spaces and cut to ``seq_len`` words; eos follows when
        it is shorter, bos precedes; padded with pad to ``seq_len + 1`` tokens;
        ``x = tokens[:-1]``, ``y = tokens[1:]`` (the next word at every position).
        """
        words = sentence.split(" ")[:seq_len]
        tokens = [self.bos] + [self.ids.get(w, self.oov) for w in words]
        if len(words) < seq_len:
            tokens.append(self.eos)
        seq = np.full(seq_len + 1, self.pad, np.int32)
        seq[:len(tokens)] = tokens
        return seq[:-1], seq[1:]


def bag_of_words(text: str, word_index: dict[str, int], vocab_size: int) -> np.ndarray:
    """TFF's tag-prediction features: float32 ``[vocab_size]``, count of each word / all words.

    Words are split on whitespace; out-of-vocabulary words count in the denominator only (TFF
    averages one-hots over ``vocab_size + 1`` columns, then drops the OOV column). A text
    without words gives zeros.
    """
    words = text.split()
    x = np.zeros(vocab_size, np.float32)
    if not words:
        return x
    ids = [word_index[w] for w in words if w in word_index]
    np.add.at(x, np.asarray(ids, np.int64), 1.0)
    return x / np.float32(len(words))


def tag_targets(tags: str, tag_index: dict[str, int], num_tags: int) -> np.ndarray:
    """Multi-hot float32 ``[num_tags]`` of ``'|'``-separated tags (unknown tags dropped, as TFF)."""
    y = np.zeros(num_tags, np.float32)
    y[[tag_index[t] for t in tags.split("|") if t in tag_index]] = 1.0
    return y


def _strings(group: Any, key: str, rows: np.ndarray, where: str) -> list[str]:
    raw = _h5_array(group, key, where)[rows]
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in raw]


class UserSource:
    """One StackOverflow split read user by user on demand (a ``RowSource``).

    Rows are the sentences of the file's users in file (sorted-name) order. Opening reads the
    sentence count of every user (the length of its first field) from the h5 metadata only;
    ``take(rows)`` reads the string fields of just those rows and preprocesses them.

    Attributes:
      client_names: the users, in row order. offsets: ``[num_users + 1]`` row offsets.
      rows_read, clients_read: rows returned and user groups read by ``take`` so far.
    """

    def __init__(self, path: Path, name: str, fields: tuple[str, ...],
                 preprocess: Callable[[dict[str, list[str]]], dict[str, np.ndarray]],
                 spec: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        h5py = _import_h5py()
        self.path, self.name = path, name
        self.fields, self.preprocess, self.spec = fields, preprocess, spec
        try:
            self._file = h5py.File(path, "r")
        except OSError as err:
            raise ValueError(f"{name}: {str(path)!r} is not a readable HDF5 file ({err}); "
                             f"re-download TFF's {ARCHIVE}") from None
        if "examples" not in self._file:
            raise ValueError(f"{name}: {str(path)!r} has no 'examples' group; it is not one of "
                             "TFF's StackOverflow h5 files")
        self._examples = self._file["examples"]
        self.client_names = tuple(self._examples)
        # One metadata lookup per user (its first field's length): 342,477 users. The other
        # fields are checked against it when the user is read.
        sizes = [self._length(u, fields[0], h5py) for u in self.client_names]
        if not sizes:
            raise ValueError(f"{name}: {str(path)!r} holds no users")
        self.sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.rows_read = self.clients_read = 0

    def _where(self, user: str) -> str:
        return f"{self.name}: {str(self.path)!r} user {user!r}"

    def _length(self, user: str, key: str, h5py: Any) -> int:
        # The low-level open is 2.5x faster than examples[user][key] (measured, 20k users).
        try:
            return int(h5py.h5d.open(self._examples.id, f"{user}/{key}".encode()).shape[0])
        except (KeyError, ValueError):  # missing or not a dataset: name it
            return int(_h5_array(self._examples[user], key, self._where(user)).shape[0])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: str) -> np.ndarray:
        raise KeyError(f"{self.name}: the split is read user by user on demand; it holds no "
                       "label array (federate it with partition='natural')")

    def feature_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return dict(self.spec)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= len(self)):
            raise ValueError(f"take: rows must be sorted, unique and in [0, {len(self)})")
        user = np.searchsorted(self.offsets, rows, side="right") - 1
        texts: dict[str, list[str]] = {k: [] for k in self.fields}
        # Rows are sorted, so each user's rows are one contiguous run of `rows`.
        starts = np.flatnonzero(np.diff(user, prepend=-1))
        for u, lo, hi in zip(user[starts], starts, [*starts[1:], len(rows)], strict=True):
            local = rows[lo:hi] - self.offsets[u]
            name = self.client_names[u]
            group = self._examples[name]
            for key in self.fields:
                if _h5_array(group, key, self._where(name)).shape[0] != self.sizes[u]:
                    raise ValueError(f"{self._where(name)}: fields {self.fields} have "
                                     "different lengths")
                texts[key] += _strings(group, key, local, self._where(name))
            self.clients_read += 1
        self.rows_read += len(rows)
        if not len(rows):
            return {k: np.zeros((0, *shape), dtype) for k, (shape, dtype) in self.spec.items()}
        return self.preprocess(texts)

    def sample(self, count: int, seed: int) -> dict[str, np.ndarray]:
        """A seeded uniform sample of ``min(count, len(self))`` rows, read and preprocessed."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(self), size=min(count, len(self)), replace=False))
        return self.take(rows)

    def close(self) -> None:
        self._file.close()


def _paths(name: str, data_dir: str | Path | None) -> tuple[Path, ...]:
    expected = EXPECTED_FILES[name]
    where = (f"TFF publishes them in {TFF_URL}{ARCHIVE} (the h5 files) and "
             f"{TFF_URL}stackoverflow.word_count.tar.bz2 / stackoverflow.tag_count.tar.bz2 (the "
             "counts), as `tff.simulation.datasets.stackoverflow` downloads them")
    if data_dir is None:
        raise ValueError(f"{name}: pass data_dir, the folder holding {', '.join(expected)}; "
                         f"{where}")
    folder = Path(data_dir)
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {', '.join(missing)} not found in {str(folder)!r}; "
                                f"expected {', '.join(expected)} there; {where}")
    return tuple(folder / f for f in expected)


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _dataset(name: str, data_dir: Any, fields: tuple[str, ...],
             preprocess: Callable[[dict[str, list[str]]], dict[str, np.ndarray]],
             spec: dict[str, tuple[tuple[int, ...], np.dtype]], num_classes: int,
             target_kind: str, test_examples: int, seed: int) -> Dataset:
    train_path, test_path = _paths(name, data_dir)[:2]
    train = UserSource(train_path, name, fields, preprocess, spec)
    try:
        test_source = UserSource(test_path, name, fields, preprocess, spec)
    except Exception:
        train.close()
        raise
    test = test_source.sample(test_examples, seed)
    test_source.close()
    return check_dataset(Dataset(
        name=name, train=train, test=test, num_classes=num_classes,
        input_shape=spec["x"][0], train_client_ids=None, target_kind=target_kind,
    ))


def stackoverflow_nwp(data_dir: str | Path | None = None, vocab_size: int = 10_000,
                      seq_len: int = 20, test_examples: int = 10_000,
                      seed: int = 0) -> Dataset:
    """StackOverflow next-word prediction (Reddi et al. 2021): x, y int32 ``[seq_len]``.

    Each sentence (``tokens``) becomes TFF's token ids (`WordIds`: the ``vocab_size`` most
    frequent words of ``stackoverflow.word_count``, pad 0, OOV, bos, eos; ``num_classes =
    vocab_size + 4``), cut to ``seq_len`` words; ``y`` is the next token at every position
    (``target_kind="sequence"``: trained with softmax cross-entropy over the positions, scored
    by top-1 accuracy without pad/OOV/bos/eos targets, ``fedjax_lab.metrics.tasks``).

    Args:
      data_dir: the folder holding ``stackoverflow_train.h5``, ``stackoverflow_test.h5`` and
        ``stackoverflow.word_count``.
      vocab_size: words in the vocabulary (10,000 in Reddi et al.).
      seq_len: words per sentence (20).
      test_examples: size of the seeded sample of test sentences (10,000).
      seed: seed of that sample.
    """
    vocab_size = _check_count(vocab_size, "vocab_size")
    seq_len = _check_count(seq_len, "seq_len")
    _check_count(test_examples, "test_examples")
    paths = _paths("stackoverflow_nwp", data_dir)
    ids = WordIds(load_word_vocab(paths[2], vocab_size))

    def preprocess(texts: dict[str, list[str]]) -> dict[str, np.ndarray]:
        pairs = [ids.example(s, seq_len) for s in texts["tokens"]]
        return {"x": np.stack([p[0] for p in pairs]), "y": np.stack([p[1] for p in pairs])}

    spec = {"x": ((seq_len,), np.dtype(np.int32)), "y": ((seq_len,), np.dtype(np.int32))}
    return _dataset("stackoverflow_nwp", data_dir, ("tokens",), preprocess,
                    spec, ids.num_classes, "sequence", test_examples, seed)


def stackoverflow_nwp_special_tokens(vocab_size: int = 10_000) -> tuple[int, int, int, int]:
    """(pad, oov, bos, eos) ids of `stackoverflow_nwp` with ``vocab_size`` words."""
    return 0, vocab_size + 1, vocab_size + 2, vocab_size + 3


def stackoverflow_lr(data_dir: str | Path | None = None, vocab_size: int = 10_000,
                     num_tags: int = 500, test_examples: int = 10_000,
                     seed: int = 0) -> Dataset:
    """StackOverflow tag prediction (Reddi et al. 2021): bag of words -> multi-hot tags.

    ``x`` float32 ``[vocab_size]`` is `bag_of_words` of the sentence and its question title
    (``tokens + ' ' + title``, as TFF) over the ``vocab_size`` most frequent words; ``y``
    float32 ``[num_tags]`` is `tag_targets` of ``tags`` over the ``num_tags`` most frequent tags
    of ``stackoverflow.tag_count`` (``target_kind="multi_hot"``: trained with sigmoid
    cross-entropy, scored by precision and recall at 5, ``fedjax_lab.metrics.tasks``).

    Args:
      data_dir: the folder holding the two h5 files and both count files.
      vocab_size: words of the bag of words (10,000).
      num_tags: tags predicted (500).
      test_examples: size of the seeded sample of test sentences (10,000).
      seed: seed of that sample.
    """
    vocab_size = _check_count(vocab_size, "vocab_size")
    num_tags = _check_count(num_tags, "num_tags")
    _check_count(test_examples, "test_examples")
    word_path, tag_path = _paths("stackoverflow_lr", data_dir)[2:]
    word_index = {w: i for i, w in enumerate(load_word_vocab(word_path, vocab_size))}
    tag_index = {t: i for i, t in enumerate(load_tag_vocab(tag_path, num_tags))}

    def preprocess(texts: dict[str, list[str]]) -> dict[str, np.ndarray]:
        x = [bag_of_words(f"{s} {t}", word_index, vocab_size)
             for s, t in zip(texts["tokens"], texts["title"], strict=True)]
        y = [tag_targets(t, tag_index, num_tags) for t in texts["tags"]]
        return {"x": np.stack(x), "y": np.stack(y)}

    spec = {"x": ((vocab_size,), np.dtype(np.float32)), "y": ((num_tags,), np.dtype(np.float32))}
    return _dataset("stackoverflow_lr", data_dir, ("tokens", "title", "tags"),
                    preprocess, spec, num_tags, "multi_hot", test_examples, seed)
