"""CINIC-10 (Darlow et al. 2018) read from its distributed image-folder tree of PNGs.

The archive ``CINIC-10.tar.gz`` unpacks to ``train/``, ``valid/`` and ``test/``, each with one
folder per class (``airplane`` ... ``truck``, CIFAR-10's classes) of 32x32 PNGs (90,000 images
per split; a few are greyscale and are converted to RGB, as torchvision's loader does). As in
FedML's cross-silo benchmark (``fedml_api/data_preprocessing/cinic10``), clients train on
``train/`` and the model is tested on ``test/``; ``valid/`` is not read.

Images are normalised with CINIC-10's published per-channel mean and standard deviation
(Darlow et al. 2018, the CINIC-10 repository's README; the values FedML uses). The train split
is a ``RowSource`` that decodes a client's PNGs when they are first taken and keeps them as
uint8 (276 MB for the 90,000 train images), so later rounds do not decode again and an MPI
rank decodes only its clients' images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedjax_lab.data.datasets._base import Dataset, check_dataset

CINIC10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
# Darlow et al. 2018, "CINIC-10 is not ImageNet or CIFAR-10", github.com/BayesWatch/cinic-10
# README ("cinic_mean = [0.47889522, 0.47227842, 0.43047404]", "cinic_std = [...]").
CINIC10_MEAN = (0.47889522, 0.47227842, 0.43047404)
CINIC10_STD = (0.24205776, 0.23828046, 0.25874835)
IMAGE_SHAPE = (32, 32, 3)
SPLITS = ("train", "test")
LAYOUT = ("DIR/train/<class>/*.png and DIR/test/<class>/*.png for the 10 classes "
          f"{', '.join(CINIC10_CLASSES)} (the tree CINIC-10.tar.gz unpacks to; valid/ is not "
          "read)")


def check_cinic10_dir(data_dir: str | Path | None) -> None:
    """Raises FileNotFoundError naming the expected layout unless `data_dir` has it.

    Checks folders only (no image is opened), so a command line can be refused at once.
    """
    if not data_dir:
        raise FileNotFoundError(f"cinic10 reads the CINIC-10 image folders: pass --data-dir "
                                f"DIR with {LAYOUT}")
    root = Path(data_dir)
    for split in SPLITS:
        missing = [c for c in CINIC10_CLASSES if not (root / split / c).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"cinic10: {str(root / split)!r} lacks the class folder(s) {missing}; "
                f"expected {LAYOUT.replace('DIR', str(root))}")


def _files(root: Path, split: str) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for label, name in enumerate(CINIC10_CLASSES):
        folder = root / split / name
        found = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
        paths += [str(folder / f) for f in found]
        labels += [label] * len(found)
    if not paths:
        raise ValueError(f"cinic10: {str(root / split)!r} holds no .png image in its class "
                         "folders")
    return paths, np.asarray(labels, np.int32)


def _decode(path: str) -> np.ndarray:
    from PIL import Image  # Pillow, imported when images are read

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), np.uint8)
    if array.shape != IMAGE_SHAPE:
        raise ValueError(f"cinic10: {path!r} is {array.shape[1]}x{array.shape[0]}, expected a "
                         "32x32 image")
    return array


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 32, 32, 3]`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean = np.asarray(CINIC10_MEAN, np.float32)[None, None, None, :]
    std = np.asarray(CINIC10_STD, np.float32)[None, None, None, :]
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


class ImageFolderSplit:
    """A split of PNG files read on demand (a ``fedjax_lab.data.RowSource``).

    ``split["y"]`` is the label array (from the folder names, no image opened);
    ``take(rows)`` decodes the rows not decoded before, keeps them as uint8 and returns them
    normalised; ``rows_read`` counts the images decoded.
    """

    def __init__(self, paths: list[str], labels: np.ndarray) -> None:
        self.paths = paths
        self.labels = labels
        self._images = np.zeros((len(paths), *IMAGE_SHAPE), np.uint8)
        self._decoded = np.zeros(len(paths), bool)
        self.rows_read = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: str) -> np.ndarray:
        if key == "y":
            return self.labels
        raise KeyError("cinic10: the train split holds only its labels ('y'); read images "
                       "with take(rows)")

    def feature_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"x": (IMAGE_SHAPE, np.dtype(np.float32)), "y": ((), np.dtype(np.int32))}

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        for r in rows[~self._decoded[rows]]:
            self._images[r] = _decode(self.paths[r])
            self._decoded[r] = True
            self.rows_read += 1
        return {"x": normalize(self._images[rows]), "y": self.labels[rows]}


def cinic10(data_dir: str | Path, lazy: bool = True) -> Dataset:
    """CINIC-10 (Darlow et al., "CINIC-10 is not ImageNet or CIFAR-10", 2018).

    270,000 32x32 RGB images of CIFAR-10's 10 classes (CIFAR-10 images plus downsampled
    ImageNet images), split equally into train/valid/test. Labels follow
    `CINIC10_CLASSES` (alphabetical, as torchvision's ImageFolder and CIFAR-10). Images are
    float32, normalised with `CINIC10_MEAN`/`CINIC10_STD`.

    Args:
      data_dir: the folder with ``train/`` and ``test/`` (see the module docstring).
      lazy: read the train images when clients first take them (``ImageFolderSplit``); False
        decodes the whole train split now.

    Returns:
      The `Dataset` (no natural clients: federate with a partition).

    Raises:
      FileNotFoundError: the folder tree is missing (the message gives the layout).
      ValueError: a split without images, or an image that is not 32x32.
    """
    check_cinic10_dir(data_dir)
    root = Path(data_dir)
    train_paths, train_labels = _files(root, "train")
    test_paths, test_labels = _files(root, "test")
    test = {"x": normalize(np.stack([_decode(p) for p in test_paths])), "y": test_labels}
    train = ImageFolderSplit(train_paths, train_labels)
    if not lazy:
        train = train.take(np.arange(len(train)))
    return check_dataset(Dataset(name="cinic10", train=train, test=test, num_classes=10,
                                 input_shape=IMAGE_SHAPE, train_client_ids=None))
