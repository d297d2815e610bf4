"""Tiny offline stand-ins of CIFAR-10, CIFAR-100 (TFDS) and CINIC-10 in their on-disk formats.

FedML's cross-silo benchmark rows (He et al. 2020, "FedML: A Research Library and Benchmark for
Federated Machine Learning": ResNet-56 and MobileNet on CIFAR-10, CIFAR-100 and CINIC-10) read
TFDS's prepared CIFAR datasets and CINIC-10's image folders, neither of which a smoke run can
download. `write_image_standin` writes a few random 32x32 images per class in exactly the
format the real loaders open:

* ``cifar10`` / ``cifar100``: a TFDS data directory prepared by a subclass of TFDS's own
  builder (same name, version and features, so the same files ``cifar10/3.0.2/...`` and
  ``dataset_info.json``) whose only change is that it generates the examples instead of
  downloading them; :func:`fedjax_lab.data.datasets.cifar10` then reads it with
  ``tfds.data_source`` as it reads real data (array_record). Needs ``tensorflow`` (TFDS
  writes with it), as ``tfds build`` does.
* ``cinic10``: CINIC-10's tree ``train/<class>/*.png`` and ``test/<class>/*.png`` (and an
  empty ``valid/``), read by :func:`fedjax_lab.data.datasets.cinic10`.

The pixels and labels are random: only that the pipeline (loader, normalisation, partition,
model, optimizer, metrics) runs is meaningful, never the accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_STANDIN_DATASETS = ("cifar10", "cifar100", "cinic10")
# Train images per class: every class is present (the loaders and dirichlet_per_class see all
# labels), and 4 clients of FedML's "hetero" partition (>= 10 examples each) fit in 80 / 100
# images. CIFAR-100 has 100 classes, so one each.
TRAIN_PER_CLASS = {"cifar10": 8, "cifar100": 1, "cinic10": 8}
TEST_IMAGES = 20  # labels 0, 1, ... cycling over the classes
_CLASSES = {"cifar10": 10, "cifar100": 100, "cinic10": 10}
_SHAPE = (32, 32, 3)


def _labels(name: str) -> tuple[np.ndarray, np.ndarray]:
    classes = _CLASSES[name]
    train = np.repeat(np.arange(classes), TRAIN_PER_CLASS[name])
    return train, np.arange(TEST_IMAGES) % classes


def _write_tfds(name: str, folder: Path, rng: np.random.Generator) -> None:
    try:  # optional dependency (the `tfds` extra), imported when used
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(f"write_image_standin({name!r}) prepares a TFDS data directory: "
                          "install the tfds extra (`pip install -e .[tfds]`: "
                          "tensorflow-datasets, tensorflow-cpu)") from err

    base = tfds.builder_cls(name)
    train_labels, test_labels = _labels(name)

    def examples(features: Any, labels: np.ndarray, images: np.ndarray
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, (label, image) in enumerate(zip(labels, images, strict=True)):
            example: dict[str, Any] = {"image": image, "label": int(label)}
            if "coarse_label" in features:  # CIFAR-100's superclass: any valid value
                example["coarse_label"] = int(label) % features["coarse_label"].num_classes
            if "id" in features:
                example["id"] = f"standin_{i}"
            yield i, example

    splits = {split: (labels, rng.integers(0, 256, (len(labels), *_SHAPE), dtype=np.uint8))
              for split, labels in (("train", train_labels), ("test", test_labels))}

    class StandIn(base, skip_registration=True):  # type: ignore[misc, valid-type]
        name = base.name
        code_path = None  # nothing is downloaded, so no checksums file is looked up

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            del dl_manager
            return {split: examples(self.info.features, *arrays)
                    for split, arrays in splits.items()}

    StandIn(data_dir=str(folder), file_format="array_record").download_and_prepare()


def _write_cinic10(folder: Path, rng: np.random.Generator) -> None:
    from PIL import Image  # Pillow, as the CINIC-10 loader

    from fedjax_lab.data.datasets.cinic10 import CINIC10_CLASSES

    for split, labels in zip(("train", "test"), _labels("cinic10"), strict=True):
        for class_name in CINIC10_CLASSES:  # every class folder, as the loader checks
            (folder / split / class_name).mkdir(parents=True, exist_ok=True)
        for i, label in enumerate(labels):
            image = rng.integers(0, 256, _SHAPE, dtype=np.uint8)
            Image.fromarray(image).save(folder / split / CINIC10_CLASSES[label] / f"{i:05d}.png")
    (folder / "valid").mkdir(exist_ok=True)  # in the real archive; never read


def write_image_standin(name: str, folder: str | Path, *, seed: int = 0) -> int:
    """Writes a tiny stand-in of the image dataset `name` into `folder`; returns its train size.

    `TRAIN_PER_CLASS` random train images of every class and `TEST_IMAGES` test images, in
    the format the loader of `name` reads with ``data_dir=folder`` (see the module docstring).

    Args:
      name: one of `IMAGE_STANDIN_DATASETS`.
      folder: where to write (created if missing); for TFDS, a data directory.
      seed: seed of the random pixels.

    Returns:
      The number of train images.

    Raises:
      ValueError: `name` has no image stand-in.
    """
    if name not in IMAGE_STANDIN_DATASETS:
        raise ValueError(f"write_image_standin: no stand-in for {name!r}; datasets with one: "
                         f"{', '.join(IMAGE_STANDIN_DATASETS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if name == "cinic10":
        _write_cinic10(folder, rng)
    else:
        _write_tfds(name, folder, rng)
    return len(_labels(name)[0])
