"""Tests of the dataset loaders (digits, FedProx synthetic, LEAF JSON) and `federate`."""

import json
import re

import chex
import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedjax_lab.data import datasets as D
from fedjax_lab.data.federated import FederatedData


@pytest.fixture(scope="module")
def full_digits() -> D.Dataset:
    return D.digits()


def _rows(x: np.ndarray) -> np.ndarray:
    """Rows of `x` (flattened examples) in a canonical order, to compare multisets of examples."""
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


# ---------------------------------------------------------------------------------------- digits
def test_digits_shapes_ranges_and_split(full_digits):
    ds = full_digits
    bunch = load_digits()
    chex.assert_shape(ds.train["x"], (None, 8, 8, 1))
    assert ds.train["x"].dtype == np.float32 and ds.train["y"].dtype == np.int32
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10 and ds.train_client_ids is None
    for split in (ds.train, ds.test):
        assert split["x"].min() == 0.0 and split["x"].max() == 1.0
        assert set(np.unique(split["y"])) == set(range(10))
    # Stratified 80/20: per class round(0.2 * n_c) test examples.
    per_class = np.bincount(bunch.target, minlength=10)
    test_counts = np.bincount(ds.test["y"], minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(0.2 * per_class))
    np.testing.assert_array_equal(
        np.bincount(ds.train["y"], minlength=10) + np.bincount(ds.test["y"], minlength=10),
        per_class,
    )
    # Train + test is exactly the original dataset (each example once), scaled by 1/16.
    both = np.concatenate([ds.train["x"], ds.test["x"]])
    np.testing.assert_array_equal(_rows(both * 16), _rows(bunch.images.astype(np.float32)))


def test_digits_split_is_fixed(full_digits):
    again = D.digits()
    np.testing.assert_array_equal(again.test["x"], full_digits.test["x"])
    np.testing.assert_array_equal(again.train["y"], full_digits.train["y"])


def test_digits_class_subset(full_digits):
    ds = D.digits(classes=(8, 0))
    assert ds.num_classes == 2
    for split, full in ((ds.train, full_digits.train), (ds.test, full_digits.test)):
        # Relabelled in the given order: 8 -> 0, 0 -> 1; same split as the full dataset.
        np.testing.assert_array_equal(split["x"][split["y"] == 0], full["x"][full["y"] == 8])
        np.testing.assert_array_equal(split["x"][split["y"] == 1], full["x"][full["y"] == 0])
        assert len(split["y"]) == np.isin(full["y"], (0, 8)).sum()


@pytest.mark.parametrize("size", [(28, 28), (5, 12)], ids=["up28", "mixed"])
def test_digits_resize_matches_jax_image_resize(full_digits, size):
    ds = D.digits(resize=size)
    assert ds.input_shape == (*size, 1)
    chex.assert_shape(ds.train["x"], (len(full_digits.train["y"]), *size, 1))
    assert ds.train["x"].min() >= 0.0 and ds.train["x"].max() <= 1.0
    src = full_digits.test["x"]
    ref = jax.image.resize(src, (len(src), *size, 1), method="linear", antialias=True)
    np.testing.assert_allclose(ds.test["x"], np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": (0, 0)}, "classes"),
        ({"classes": (0, 10)}, "classes"),
        ({"classes": (3,)}, "classes"),
        ({"resize": (0, 28)}, "resize"),
        ({"resize": (28,)}, "resize"),
    ],
    ids=["dup", "range", "single", "zero", "rank"],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.digits(**kwargs)


# ------------------------------------------------------------------------------------- synthetic
def _homogeneity_chi2(ds: D.Dataset) -> tuple[float, int]:
    """Pearson chi-square test of "all clients share one label distribution" on train data."""
    ids, y = ds.train_client_ids, ds.train["y"]
    table = np.zeros((ids.max() + 1, ds.num_classes))
    np.add.at(table, (ids, y), 1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return stat, (table.shape[0] - 1) * (table.shape[1] - 1)


def test_synthetic_layout_and_determinism():
    ds = D.synthetic(1.0, 1.0, seed=3)
    assert ds.input_shape == (60,) and ds.num_classes == 10
    chex.assert_shape(ds.train["x"], (None, 60))
    assert ds.train["x"].dtype == np.float32 and ds.train["y"].dtype == np.int32
    assert ds.train["y"].min() >= 0 and ds.train["y"].max() < 10
    np.testing.assert_array_equal(np.unique(ds.train_client_ids), np.arange(30))
    again = D.synthetic(1.0, 1.0, seed=3)
    np.testing.assert_array_equal(again.train["x"], ds.train["x"])
    np.testing.assert_array_equal(again.test["y"], ds.test["y"])
    other = D.synthetic(1.0, 1.0, seed=4)
    assert other.train["x"].shape != ds.train["x"].shape or not np.array_equal(
        other.train["x"], ds.train["x"]
    )


@pytest.mark.parametrize("iid", [False, True], ids=["synthetic", "synthetic_iid"])
def test_synthetic_test_client_ids_are_each_devices_own_test_part(iid):
    ds = (D.synthetic_iid(num_clients=6, seed=1) if iid
          else D.synthetic(0.0, 1.0, num_clients=6, seed=1))
    assert ds.test_client_ids.shape == ds.test["y"].shape
    n_train = np.bincount(ds.train_client_ids, minlength=6)
    n_test = np.bincount(ds.test_client_ids, minlength=6)
    # Every device is split floor(0.8 n) / rest, so each has its own test examples.
    np.testing.assert_array_equal(n_train, (0.8 * (n_train + n_test)).astype(int))
    assert n_test.min() >= 1
    # Each device's features centre on its own v_k (v_k = 0 for all in the IID variant): the
    # nearest device mean of the train part names a test example's device.
    if not iid:
        means = np.stack([ds.train["x"][ds.train_client_ids == k].mean(0) for k in range(6)])
        nearest = np.argmin(((ds.test["x"][:, None] - means[None]) ** 2).sum(-1), axis=1)
        np.testing.assert_array_equal(nearest, ds.test_client_ids)


def test_synthetic_client_sizes_lognormal():
    # n_k = floor(lognormal(4, 2)) + 50, split floor(0.8 n) / rest.  Recover n_k (to within 1.25)
    # from the train counts, pool 5 seeds (150 clients) and check median / IQR of log(n - 50)
    # against N(4, 2): SE(median) = 1.2533 * 2 / sqrt(150) = 0.20, SE(IQR / 1.349) ~ 0.27.
    logs = []
    for seed in range(5):
        ds = D.synthetic(0.5, 0.5, seed=seed)
        n_train = np.bincount(ds.train_client_ids)
        assert n_train.min() >= 40  # floor(0.8 * 50)
        assert len(ds.train["y"]) + len(ds.test["y"]) >= 50 * 30
        logs.append(np.log(np.maximum(n_train / 0.8 - 50, 0.5)))
    z = np.concatenate(logs)
    q25, q50, q75 = np.percentile(z, [25, 50, 75])
    assert abs(q50 - 4.0) < 5 * 0.20
    assert abs((q75 - q25) / 1.349 - 2.0) < 5 * 0.27


def test_synthetic_heterogeneity_vs_iid():
    # Under "iid" the chi-square statistic is ~ chi2(dof): mean dof, sd sqrt(2 dof).
    for seed in range(3):
        stat, dof = _homogeneity_chi2(D.synthetic_iid(seed=seed))
        assert stat < dof + 5 * np.sqrt(2 * dof), (seed, stat, dof)
        het, dof_h = _homogeneity_chi2(D.synthetic(1.0, 1.0, seed=seed))
        assert het > 10 * (dof_h + 5 * np.sqrt(2 * dof_h)), (seed, het, dof_h)


def test_synthetic_train_fraction():
    ds = D.synthetic_iid(num_clients=5, seed=0, train_fraction=0.5)
    n_train = np.bincount(ds.train_client_ids)
    assert abs(len(ds.test["y"]) - n_train.sum()) <= 5


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: D.synthetic(-1.0, 1.0), "alpha"),
        (lambda: D.synthetic(1.0, float("nan")), "beta"),
        (lambda: D.synthetic(1.0, 1.0, num_clients=0), "num_clients"),
        (lambda: D.synthetic(1.0, 1.0, seed=-1), "seed"),
        (lambda: D.synthetic_iid(train_fraction=1.0), "train_fraction"),
        (lambda: D.synthetic_iid(train_fraction=0.001), "train_fraction"),
    ],
    ids=["alpha", "beta", "clients", "seed", "frac1", "frac_tiny"],
)
def test_synthetic_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -------------------------------------------------------------------------------------- federate
def _check_population(fd: FederatedData, ds: D.Dataset, num_clients: int) -> None:
    assert fd.num_clients == num_clients
    assert fd.num_examples == len(ds.train["y"])
    assert np.all(fd.sizes > 0)

    # Every train example exactly once: the multisets of (x, y) rows agree.
    def table(arrays):
        return np.concatenate([arrays["x"].reshape(len(arrays["y"]), -1), arrays["y"][:, None]], 1)

    np.testing.assert_array_equal(_rows(table(fd.arrays)), _rows(table(ds.train)))


@pytest.mark.parametrize(
    ("partition", "kwargs"),
    [
        ("iid", {}),
        ("dirichlet_label_mix", {"alpha": 0.3}),
        ("dirichlet_per_class", {"alpha": 0.5, "min_size": 5}),
        ("shards", {"shards_per_client": 2}),
    ],
    ids=["iid", "label_mix", "per_class", "shards"],
)
def test_federate_digits(full_digits, partition, kwargs):
    fd = D.federate(full_digits, partition, 20, seed=1, **kwargs)
    _check_population(fd, full_digits, 20)
    assert fd.client_ids == tuple(str(i) for i in range(20))
    again = D.federate(full_digits, partition, 20, seed=1, **kwargs)
    np.testing.assert_array_equal(again.arrays["y"], fd.arrays["y"])
    np.testing.assert_array_equal(again.offsets, fd.offsets)
    other = D.federate(full_digits, partition, 20, seed=2, **kwargs)
    assert not np.array_equal(other.arrays["x"], fd.arrays["x"])


def test_federate_shards_few_labels(full_digits):
    fd = D.federate(full_digits, "shards", 50, seed=0, shards_per_client=2)
    assert max(len(np.unique(fd.client(i)["y"])) for i in range(50)) <= 4


def test_federate_natural(full_digits):
    ds = D.synthetic(1.0, 1.0, seed=0)
    fd = D.federate(ds, "natural", None, seed=0)
    _check_population(fd, ds, 30)
    assert fd.client_ids == tuple(str(i) for i in range(30))
    for i in (0, 7, 29):
        np.testing.assert_array_equal(fd.client(i)["x"], ds.train["x"][ds.train_client_ids == i])
    with pytest.raises(ValueError, match="num_clients"):
        D.federate(ds, "natural", 10, seed=0)
    with pytest.raises(ValueError, match="no natural client ids"):
        D.federate(full_digits, "natural", None, seed=0)


def test_federate_unknown_partition(full_digits):
    with pytest.raises(ValueError, match="valid names"):
        D.federate(full_digits, "by_writer", 10, seed=0)


# ---------------------------------------------------------------------------------- load_dataset
def test_load_dataset_registry(full_digits):
    ds = D.load_dataset("digits", classes=(0, 8))
    np.testing.assert_array_equal(ds.train["y"], D.digits(classes=(0, 8)).train["y"])
    syn = D.load_dataset("synthetic", alpha=0.5, beta=0.5, num_clients=4, seed=2)
    np.testing.assert_array_equal(syn.train["x"], D.synthetic(0.5, 0.5, 4, seed=2).train["x"])
    assert set(D.DATASET_NAMES) >= {"digits", "synthetic", "synthetic_iid", "mnist", "leaf"}
    # NATURAL_TEST_DATASETS (what --client-eval natural accepts) is what the loaders return;
    # leaf's test ids are checked with its files below, the TFDS loaders pass none.
    for name, kwargs in (("digits", {}), ("synthetic_iid", {"num_clients": 2})):
        has_ids = D.load_dataset(name, **kwargs).test_client_ids is not None
        assert has_ids == (name in D.NATURAL_TEST_DATASETS)
    assert syn.test_client_ids is not None and "synthetic" in D.NATURAL_TEST_DATASETS
    assert "leaf" in D.NATURAL_TEST_DATASETS
    assert not set(D.LAZY_DATASETS) & set(D.NATURAL_TEST_DATASETS)
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*digits"):
        D.load_dataset("imagenet")


def test_tensorflow_datasets_not_imported_by_package():
    import subprocess
    import sys

    code = (
        "import sys, fedjax_lab.data.datasets as d, fedjax_lab.data.partition;"
        "d.digits(); d.synthetic_iid(num_clients=2);"
        "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------- LEAF
def _write_leaf(root, split, files):
    (root / split).mkdir(parents=True, exist_ok=True)
    for fname, users in files.items():
        blob = {
            "users": list(users),
            "num_samples": [len(d["y"]) for d in users.values()],
            "user_data": users,
        }
        (root / split / fname).write_text(json.dumps(blob))


def _leaf_femnist(root, rng):
    def user(n):
        return {"x": rng.random((n, 784)).round(4).tolist(), "y": rng.integers(0, 62, n).tolist()}

    train = {"a.json": {"w1": user(3), "w2": user(2)}, "b.json": {"w3": user(4)}}
    test = {"a.json": {"w1": user(1), "w2": user(1), "w3": user(2)}}
    _write_leaf(root, "train", train)
    _write_leaf(root, "test", test)
    return train, test


def test_leaf_femnist_round_trip(tmp_path):
    train, test = _leaf_femnist(tmp_path, np.random.default_rng(0))
    test_users = test["a.json"]
    ds = D.leaf(tmp_path, "femnist")
    assert ds.name == "leaf/femnist" and ds.num_classes == 62 and ds.input_shape == (28, 28, 1)
    users = {**train["a.json"], **train["b.json"]}
    np.testing.assert_array_equal(ds.train_client_ids, np.repeat(["w1", "w2", "w3"], [3, 2, 4]))
    want_x = np.concatenate([np.asarray(u["x"], np.float32) for u in users.values()])
    np.testing.assert_array_equal(ds.train["x"].reshape(9, 784), want_x)
    np.testing.assert_array_equal(ds.train["y"], np.concatenate([u["y"] for u in users.values()]))
    assert ds.test["x"].shape == (4, 28, 28, 1) and ds.test["y"].dtype == np.int32
    # The test files' users, in file order: each test example keeps its writer.
    np.testing.assert_array_equal(ds.test_client_ids, ["w1", "w2", "w3", "w3"])
    np.testing.assert_array_equal(ds.test["y"][ds.test_client_ids == "w3"], test_users["w3"]["y"])
    fd = D.federate(ds, "natural", None, seed=0)
    assert fd.client_ids == ("w1", "w2", "w3")
    np.testing.assert_array_equal(fd.client(2)["y"], users["w3"]["y"])


def test_leaf_shakespeare_round_trip(tmp_path):
    vocab = D.SHAKESPEARE_VOCAB
    assert len(vocab) == 80 and len(set(vocab)) == 80
    rng = np.random.default_rng(1)

    def user(n):
        xs = ["".join(rng.choice(list(vocab), 80)) for _ in range(n)]
        return {"x": xs, "y": [str(rng.choice(list(vocab))) for _ in range(n)]}

    train = {"all.json": {"HAMLET": user(3), "OPHELIA": user(2)}}
    _write_leaf(tmp_path, "train", train)
    _write_leaf(tmp_path, "test", {"all.json": {"HAMLET": user(1)}})
    ds = D.leaf(tmp_path, "shakespeare")
    assert ds.num_classes == 80 and ds.input_shape == (80,)
    assert ds.train["x"].dtype == np.int32 and ds.train["y"].dtype == np.int32
    strings = [s for u in train["all.json"].values() for s in u["x"]]
    decoded = ["".join(vocab[t] for t in row) for row in ds.train["x"]]
    assert decoded == strings
    assert "".join(vocab[t] for t in ds.train["y"]) == "".join(
        c for u in train["all.json"].values() for c in u["y"]
    )
    np.testing.assert_array_equal(ds.train_client_ids, ["HAMLET"] * 3 + ["OPHELIA"] * 2)
    np.testing.assert_array_equal(ds.test_client_ids, ["HAMLET"])


def test_leaf_shakespeare_unknown_character(tmp_path):
    _write_leaf(tmp_path, "train", {"a.json": {"u": {"x": ["ab@d"], "y": ["e"]}}})
    _write_leaf(tmp_path, "test", {"a.json": {"u": {"x": ["abcd"], "y": ["e"]}}})
    with pytest.raises(ValueError, match=r"\['@'\].*vocabulary"):
        D.leaf(tmp_path, "shakespeare")


def test_leaf_synthetic_round_trip(tmp_path):
    rng = np.random.default_rng(2)

    def user(n, top):  # FedProx's generator writes float labels such as 3.0.
        return {"x": rng.normal(size=(n, 60)).tolist(), "y": [float(top)] + [0.0] * (n - 1)}

    _write_leaf(tmp_path, "train", {"t.json": {"f_00000": user(3, 4), "f_00001": user(2, 1)}})
    _write_leaf(tmp_path, "test", {"t.json": {"f_00000": user(1, 6)}})
    ds = D.leaf(tmp_path, "synthetic")
    assert ds.input_shape == (60,) and ds.num_classes == 7
    np.testing.assert_array_equal(ds.train["y"], [4, 0, 0, 1, 0])


@pytest.mark.parametrize(
    ("train_users", "match"),
    [
        ({"u": {"x": [[0.0] * 784] * 2, "y": [1]}}, "equal length"),
        ({"u": {"x": [[0.0] * 783], "y": [1]}}, "784"),
        ({"u": {"x": [[float("nan")] * 784], "y": [1]}}, "finite"),
        ({"u": {"x": [[0.0] * 784], "y": [62]}}, "num_classes"),
        ({"u": {"x": [[0.0] * 784], "y": [1.5]}}, "non-integer"),
    ],
    ids=["xy_len", "pixels", "nan", "label_range", "float_label"],
)
def test_leaf_validation(tmp_path, train_users, match):
    _write_leaf(tmp_path, "train", {"a.json": train_users})
    _write_leaf(tmp_path, "test", {"a.json": {"u": {"x": [[0.0] * 784], "y": [1]}}})
    with pytest.raises(ValueError, match=match):
        D.leaf(tmp_path, "femnist")


def test_leaf_num_samples_and_duplicates(tmp_path):
    good = {"u": {"x": [[0.0] * 60], "y": [1]}}
    _write_leaf(tmp_path, "test", {"a.json": good})
    (tmp_path / "train").mkdir()
    blob = {"users": ["u"], "num_samples": [2], "user_data": good}
    (tmp_path / "train" / "a.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="num_samples says 2"):
        D.leaf(tmp_path, "synthetic")
    blob["num_samples"] = [1]
    (tmp_path / "train" / "a.json").write_text(json.dumps(blob))
    (tmp_path / "train" / "b.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match=r"also appears in a\.json"):
        D.leaf(tmp_path, "synthetic")


def test_leaf_missing_directory_and_task(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train"))):
        D.leaf(tmp_path, "femnist")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.json"):
        D.leaf(tmp_path, "femnist")
    with pytest.raises(ValueError, match=r"unknown LEAF `task` 'sent140'.*femnist"):
        D.leaf(tmp_path, "sent140")
