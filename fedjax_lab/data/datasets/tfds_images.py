"""TFDS image-classification datasets read through ``tfds.data_source`` (array_record).

``tensorflow_datasets`` is imported lazily inside the loaders: importing it is slow, and the rest
of the package must work without it. The data must be prepared in ``data_dir`` in the
array_record format; pass ``download=True`` (or run
``tfds build <name> --file_format=array_record --data_dir=<data_dir>``) once to prepare them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lab.data.datasets._base import Dataset, check_dataset

# Examples are decoded in chunks so the list of Python dicts never holds a whole split.
_CHUNK = 4096


def _to_numpy(source: Sequence[dict[str, Any]], name: str,
              transpose: bool) -> dict[str, np.ndarray]:
    n = len(source)
    images, labels = [], []
    for start in range(0, n, _CHUNK):
        # Batched reads: about 2x faster than one record at a time (parallel reads).
        records = source.__getitems__(list(range(start, min(n, start + _CHUNK))))
        images.append(_decode_images(records, name, transpose))
        labels.append(np.asarray([r["label"] for r in records]))
    if not images:
        raise ValueError(f"{name}: a split of the prepared dataset holds no examples")
    return {"x": np.concatenate(images), "y": np.concatenate(labels).astype(np.int32)}


def _decode_images(records: Sequence[dict[str, Any]], name: str, transpose: bool) -> np.ndarray:
    image = np.stack([np.asarray(r["image"]) for r in records])
    if image.dtype != np.uint8 or image.ndim != 4:
        raise ValueError(
            f"{name}: expected uint8 images [N, H, W, C], got {image.dtype} {image.shape}"
        )
    x = image.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)) if transpose else x


class LazyImageSplit:
    """A TFDS image split read on demand (a ``fedjax_lab.data.RowSource``).

    The labels are read once (images skipped undecoded) so that partitioners can split the
    population; ``take(rows)`` reads and decodes just those examples, e.g. the clients one MPI
    rank trains in a round. ``split["y"]`` is the label array; ``rows_read`` counts examples
    read by ``take``.
    """

    def __init__(self, source: Sequence[dict[str, Any]], labels: np.ndarray,
                 input_shape: tuple[int, ...], name: str, transpose: bool) -> None:
        self.source = source
        self.labels = labels
        self.input_shape = input_shape
        self.name = name
        self.transpose = transpose
        self.rows_read = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: str) -> np.ndarray:
        if key == "y":
            return self.labels
        raise KeyError(
            f"{self.name}: a lazily read split holds only its labels ('y'); read examples with "
            "take(rows), or load it with lazy=False"
        )

    def feature_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"x": (self.input_shape, np.dtype(np.float32)), "y": ((), np.dtype(np.int32))}

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = [int(r) for r in np.asarray(rows)]
        if not rows:
            return {"x": np.zeros((0, *self.input_shape), np.float32),
                    "y": np.zeros(0, np.int32)}
        records = self.source.__getitems__(rows)
        self.rows_read += len(rows)
        return {"x": _decode_images(records, self.name, self.transpose),
                "y": np.asarray([r["label"] for r in records], np.int32)}


def _labels(source: Sequence[dict[str, Any]]) -> np.ndarray:
    n = len(source)
    parts = [
        np.asarray([r["label"] for r in source.__getitems__(list(range(a, min(n, a + _CHUNK))))])
        for a in range(0, n, _CHUNK)
    ]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def _load(
    name: str,
    tfds_name: str,
    num_classes: int,
    data_dir: str | Path | None,
    download: bool,
    transpose: bool = False,
    lazy: bool = False,
) -> Dataset:
    try:
        # Imported here: importing tensorflow_datasets is slow, and it is an optional dependency.
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"load {name!r}: tensorflow_datasets is not installed; `pip install "
            "tensorflow-datasets array_record` (plus tensorflow-cpu to build datasets)"
        ) from err
    how = (
        f"prepare it once with `{name}(data_dir=..., download=True)` (i.e. "
        f"`tfds.data_source({tfds_name!r}, data_dir=..., download=True, "
        "builder_kwargs={'file_format': 'array_record'})`) or `tfds build "
        f"{tfds_name} --file_format=array_record --data_dir=<data_dir>`"
    )
    # tfds.data_source only defaults to array_record when data_dir is None; ask for it always,
    # so that download=True prepares a random-access format.
    file_format = {"file_format": "array_record"}
    try:
        train_src, test_src = tfds.data_source(
            tfds_name,
            split=["train", "test"],
            data_dir=data_dir,
            download=download,
            builder_kwargs=file_format,
        )
    except Exception as err:  # tfds raises KeyError, RuntimeError, ... for missing data.
        # No file_format here: asking for array_record fails on data prepared as tfrecord.
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        if not download and not builder.is_prepared():
            raise FileNotFoundError(
                f"{name}: TFDS dataset {tfds_name!r} is not prepared in {str(builder.data_dir)!r}; "
                f"{how}"
            ) from err
        raise FileNotFoundError(
            f"{name}: TFDS dataset {tfds_name!r} in {str(builder.data_dir)!r} could not be opened "
            f"as array_record ({type(err).__name__}: {err}); {how}"
        ) from err
    test = _to_numpy(test_src, name, transpose)
    if lazy:
        # A second view of the split that leaves images undecoded: reading every label is
        # then cheap, and no image is decoded until a client's rows are taken.
        label_src = tfds.data_source(
            tfds_name, split="train", data_dir=data_dir, download=False,
            decoders={"image": tfds.decode.SkipDecoding()}, builder_kwargs=file_format,
        )
        train = LazyImageSplit(train_src, _labels(label_src), tuple(test["x"].shape[1:]), name,
                               transpose)
    else:
        train = _to_numpy(train_src, name, transpose)
    return check_dataset(
        Dataset(
            name=name,
            train=train,
            test=test,
            num_classes=num_classes,
            input_shape=tuple(test["x"].shape[1:]),
            train_client_ids=None,
        )
    )


def mnist(
    data_dir: str | Path | None = None, download: bool = False, lazy: bool = False
) -> Dataset:
    """MNIST (LeCun et al. 1998): 60k/10k 28x28x1 digits, float32 in [0, 1], 10 classes.

    Args:
      data_dir: TFDS data directory (default: TFDS's, ``~/tensorflow_datasets``).
      download: download and prepare the data if they are not in `data_dir`.
      lazy: keep the train images on disk and read them per round (``LazyImageSplit``).
    """
    return _load("mnist", "mnist", 10, data_dir, download, lazy=lazy)


def fashion_mnist(
    data_dir: str | Path | None = None, download: bool = False, lazy: bool = False
) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28x1 images, float32 in [0, 1], 10 classes.

    Args:
      data_dir: TFDS data directory.
      download: download and prepare the data if they are not in `data_dir`.
      lazy: keep the train images on disk and read them per round (``LazyImageSplit``).
    """
    return _load("fashion_mnist", "fashion_mnist", 10, data_dir, download, lazy=lazy)


def emnist(
    data_dir: str | Path | None = None, download: bool = False, lazy: bool = False
) -> Dataset:
    """EMNIST ByClass (Cohen et al. 2017): 28x28x1 digits and letters, 62 classes.

    TFDS ``emnist/byclass``, non-federated (use LEAF's FEMNIST via `leaf` for writers). The
    source files store every image transposed (mirrored and rotated 90 degrees, as TFDS's
    description notes); they are transposed back here, so characters are upright like MNIST and
    LEAF's FEMNIST.

    Args:
      data_dir: TFDS data directory.
      download: download and prepare the data if they are not in `data_dir`.
      lazy: keep the train images on disk and read them per round (``LazyImageSplit``).
    """
    return _load("emnist", "emnist/byclass", 62, data_dir, download, transpose=True, lazy=lazy)


def cifar10(
    data_dir: str | Path | None = None, download: bool = False, lazy: bool = False
) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32x32x3 images, float32 in [0, 1], 10 classes.

    Args:
      data_dir: TFDS data directory.
      download: download and prepare the data if they are not in `data_dir`.
      lazy: keep the train images on disk and read them per round (``LazyImageSplit``).
    """
    return _load("cifar10", "cifar10", 10, data_dir, download, lazy=lazy)


def cifar100(
    data_dir: str | Path | None = None, download: bool = False, lazy: bool = False
) -> Dataset:
    """CIFAR-100 (Krizhevsky 2009): 50k/10k 32x32x3 images, 100 fine classes (``label``).

    Args:
      data_dir: TFDS data directory.
      download: download and prepare the data if they are not in `data_dir`.
      lazy: keep the train images on disk and read them per round (``LazyImageSplit``).
    """
    return _load("cifar100", "cifar100", 100, data_dir, download, lazy=lazy)
