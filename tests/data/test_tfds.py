"""Tests of the TFDS image loaders on real (tiny, fake-content) array_record datasets.

`tfds.testing.mock_data` is not used: with tensorflow-datasets 4.9.10 its mocked data source
answers ``source[i]`` but its ``__getitems__`` raises ``TypeError: _getitems() missing 1 required
positional argument: 'record_keys'``, and the loaders read in batches with ``__getitems__``
(about twice as fast as single reads). Instead, each test dataset is *prepared* offline in a
temporary ``data_dir`` by a subclass of the real TFDS builder (same name, version, config and
features) whose only change is that it generates a few random examples instead of downloading.
The loaders then open it exactly as they open real data, through the registered builders.
"""

import sys

import numpy as np
import pytest

from fedjax_lab.data import datasets as D
from fedjax_lab.data.datasets import tfds_images

NUM_TRAIN, NUM_TEST = 12, 5


def _fake_examples(builder, n, seed, store):
    rng = np.random.default_rng(seed)
    features = builder.info.features
    for i in range(n):
        image = rng.integers(0, 256, features["image"].shape, dtype=np.uint8)
        label = int(rng.integers(features["label"].num_classes))
        store[image.tobytes()] = (image, label)
        example = {"image": image, "label": label}
        if "coarse_label" in features:  # cifar100 has extra features; fill them too.
            example["coarse_label"] = 0
        if "id" in features:
            example["id"] = f"id_{i}"
        yield i, example


def _prepare(base, data_dir, config=None, file_format="array_record"):
    """Prepares `base`'s dataset in `data_dir` with random examples; returns them per split."""
    made = {"train": {}, "test": {}}

    class Fake(base, skip_registration=True):
        name = base.name
        # No download, so no checksums file to locate next to the builder's code.
        code_path = None

        def _split_generators(self, dl_manager):
            del dl_manager  # Nothing is downloaded.
            return {
                "train": _fake_examples(self, NUM_TRAIN, 0, made["train"]),
                "test": _fake_examples(self, NUM_TEST, 1, made["test"]),
            }

    kwargs = {"config": config} if config else {}
    Fake(data_dir=str(data_dir), file_format=file_format, **kwargs).download_and_prepare()
    return made


LOADERS = {
    # name: (loader, TFDS builder class path, config, num_classes, image shape, transposed)
    "mnist": (D.mnist, "mnist.MNIST", None, 10, (28, 28, 1), False),
    "fashion_mnist": (D.fashion_mnist, "mnist.FashionMNIST", None, 10, (28, 28, 1), False),
    "emnist": (D.emnist, "mnist.EMNIST", "byclass", 62, (28, 28, 1), True),
    "cifar10": (D.cifar10, "cifar.Cifar10", None, 10, (32, 32, 3), False),
    "cifar100": (D.cifar100, "cifar.Cifar100", None, 100, (32, 32, 3), False),
}


def _builder_class(path):
    from tensorflow_datasets import image_classification

    module, cls = path.split(".")
    return getattr(getattr(image_classification, module), cls)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    made = {
        name: _prepare(_builder_class(path), data_dir, config)
        for name, (_, path, config, *_) in LOADERS.items()
    }
    return data_dir, made


@pytest.mark.parametrize("name", list(LOADERS))
def test_loader_round_trip(prepared, name):
    data_dir, made = prepared
    loader, _, _, num_classes, shape, transposed = LOADERS[name]
    ds = loader(data_dir=data_dir)
    assert ds.name == name and ds.num_classes == num_classes and ds.input_shape == shape
    assert ds.train_client_ids is None
    for split, arrays, n in (("train", ds.train, NUM_TRAIN), ("test", ds.test, NUM_TEST)):
        assert arrays["x"].shape == (n, *shape) and arrays["x"].dtype == np.float32
        assert arrays["y"].shape == (n,) and arrays["y"].dtype == np.int32
        assert arrays["x"].min() >= 0.0 and arrays["x"].max() <= 1.0
        # Every stored example comes back once (TFDS shuffles the order on disk).
        seen = set()
        for x, y in zip(arrays["x"], arrays["y"], strict=True):
            pixels = np.round(x * 255).astype(np.uint8)
            np.testing.assert_allclose(x * 255, pixels, atol=1e-4)
            stored = pixels.transpose(1, 0, 2) if transposed else pixels
            _, label = made[name][split][stored.tobytes()]
            assert y == label
            seen.add(stored.tobytes())
        assert len(seen) == n


def test_emnist_is_transposed_upright(prepared):
    data_dir, made = prepared
    ds = D.emnist(data_dir=data_dir)
    stored = {np.round(x * 255).astype(np.uint8).tobytes() for x in ds.train["x"]}
    raw = {img.tobytes() for img, _ in made["emnist"]["train"].values()}
    transposed = {img.transpose(1, 0, 2).tobytes() for img, _ in made["emnist"]["train"].values()}
    assert stored == transposed and stored != raw


def test_load_dataset_and_federate(prepared):
    data_dir, _ = prepared
    ds = D.load_dataset("cifar10", data_dir=data_dir)
    fd = D.federate(ds, "iid", 3, seed=0)
    assert fd.num_examples == NUM_TRAIN and fd.feature_spec()["x"][0] == (32, 32, 3)


def test_download_flag_is_forwarded(prepared, monkeypatch):
    import tensorflow_datasets as tfds

    data_dir, _ = prepared
    calls = []
    real = tfds.data_source

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tfds, "data_source", spy)
    # download=True on prepared data is a no-op for TFDS (nothing is fetched).
    D.mnist(data_dir=data_dir, download=True)
    assert calls[0]["download"] is True
    assert calls[0]["builder_kwargs"] == {"file_format": "array_record"}


def test_not_prepared_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared.*download=True.*tfds build"):
        D.mnist(data_dir=tmp_path)


def test_tfrecord_only_raises(tmp_path):
    _prepare(_builder_class("mnist.MNIST"), tmp_path, file_format="tfrecord")
    with pytest.raises(FileNotFoundError, match=r"could not be opened as array_record"):
        D.mnist(data_dir=tmp_path)


def test_missing_tensorflow_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        tfds_images.cifar100(data_dir="/nonexistent")


@pytest.mark.parametrize("name", ["mnist", "emnist"])
def test_lazy_train_split_reads_only_the_rows_taken(prepared, name):
    data_dir, _ = prepared
    loader = LOADERS[name][0]
    eager, lazy = loader(data_dir=data_dir), loader(data_dir=data_dir, lazy=True)
    assert isinstance(lazy.train, D.LazyImageSplit) and lazy.input_shape == eager.input_shape
    np.testing.assert_array_equal(lazy.train["y"], eager.train["y"])  # labels read up front
    np.testing.assert_array_equal(lazy.test["x"], eager.test["x"])  # the test split is eager
    assert lazy.train.rows_read == 0  # no train example decoded yet
    with pytest.raises(KeyError, match="holds only its labels"):
        lazy.train["x"]
    fe = D.federate(eager, "iid", 3, seed=1)
    fl = D.federate(lazy, "iid", 3, seed=1)
    assert fl.is_lazy and not fe.is_lazy
    np.testing.assert_array_equal(fl.offsets, fe.offsets)
    first = fl.client(0)  # emnist: transposed upright like the eager loader
    for k, v in fe.client(0).items():
        np.testing.assert_array_equal(first[k], v)
    assert lazy.train.rows_read == fe.sizes[0]  # only client 0's examples were read


def test_the_mpi_experiment_loads_tfds_lazily(prepared):
    from fedjax_lab.experiment import build_problem
    from fedjax_lab.train import FedAvgConfig

    data_dir, _ = prepared
    argv = ["--dataset", "mnist", "--data-dir", str(data_dir), "--partition", "iid",
            "--num-clients", "3", "--clients-per-round", "2", "--model", "logreg"]
    _, train, *_ = build_problem(FedAvgConfig.parse([*argv, "--backend", "mpi"]))
    assert train.is_lazy
    _, train, *_ = build_problem(FedAvgConfig.parse(argv))
    assert not train.is_lazy
