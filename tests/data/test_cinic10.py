"""CINIC-10 from its image-folder tree: tiny trees of PNGs written here."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fedjax_lab.data.datasets import (
    CINIC10_CLASSES,
    CINIC10_MEAN,
    CINIC10_STD,
    ImageFolderSplit,
    cinic10,
    federate,
    load_dataset,
)


def write_cinic_tree(root, per_class=(2, 1), seed=0, gray=True):
    """Writes train/ and test/ with `per_class` PNGs per class; returns the pixels written.

    The first train image of 'bird' is greyscale (CINIC-10 has a few), read back as RGB.
    """
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, count in zip(("train", "test"), per_class, strict=True):
        pixels[split] = []
        for label, name in enumerate(CINIC10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                if gray and split == "train" and name == "bird" and i == 0:
                    g = rng.integers(0, 256, (32, 32), np.uint8)
                    Image.fromarray(g).save(folder / f"img{i}.png")
                    rgb = np.repeat(g[:, :, None], 3, axis=2)
                else:
                    rgb = rng.integers(0, 256, (32, 32, 3), np.uint8)
                    Image.fromarray(rgb).save(folder / f"img{i}.png")
                pixels[split].append((label, rgb))
    (root / "valid").mkdir()  # present in the archive, never read
    return pixels


def _normalised(rgb):
    return ((rgb.astype(np.float64) / 255.0 - np.asarray(CINIC10_MEAN))
            / np.asarray(CINIC10_STD))


def test_reads_labels_and_normalised_images(tmp_path):
    pixels = write_cinic_tree(tmp_path)
    ds = load_dataset("cinic10", data_dir=str(tmp_path))
    assert ds.num_classes == 10 and ds.input_shape == (32, 32, 3)
    assert isinstance(ds.train, ImageFolderSplit) and ds.train.rows_read == 0
    want_y = np.asarray([label for label, _ in pixels["train"]], np.int32)
    np.testing.assert_array_equal(ds.train["y"], want_y)
    rows = np.asarray([1, 4, 19])
    got = ds.train.take(rows)
    assert got["x"].dtype == np.float32 and ds.train.rows_read == 3
    for k, r in enumerate(rows):
        np.testing.assert_allclose(got["x"][k], _normalised(pixels["train"][r][1]), atol=1e-5)
    np.testing.assert_array_equal(got["y"], want_y[rows])
    ds.train.take(np.asarray([4, 5]))  # row 4 is kept decoded: only row 5 is read
    assert ds.train.rows_read == 4
    test_y = np.asarray([label for label, _ in pixels["test"]], np.int32)
    np.testing.assert_array_equal(ds.test["y"], test_y)
    np.testing.assert_allclose(ds.test["x"][3], _normalised(pixels["test"][3][1]), atol=1e-5)
    eager = cinic10(tmp_path, lazy=False)
    np.testing.assert_allclose(eager.train["x"], ds.train.take(np.arange(20))["x"])
    # A population reads its clients' rows on demand.
    fed = federate(ds, "iid", 2, seed=0)
    assert sum(len(fed.client(i)["y"]) for i in range(2)) == 20


def test_missing_tree_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<class>/\*\.png"):
        cinic10(tmp_path / "nowhere")
    write_cinic_tree(tmp_path)
    (tmp_path / "test" / "truck").rename(tmp_path / "test" / "lorry")
    with pytest.raises(FileNotFoundError, match=r"lacks the class folder\(s\) \['truck'\]"):
        cinic10(tmp_path)


def test_wrong_image_size_is_refused(tmp_path):
    write_cinic_tree(tmp_path, gray=False)
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(tmp_path / "test" / "cat" / "x.png")
    with pytest.raises(ValueError, match=r"x\.png' is 32x16, expected a 32x32 image"):
        cinic10(tmp_path)
