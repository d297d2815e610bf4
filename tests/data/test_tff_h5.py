"""TFF's h5 federated datasets: tiny files in TFF's layout, read through the real loaders."""

import h5py
import numpy as np
import pytest

from fedjax_lab.backends import VmapBackend
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.data import datasets as D
from fedjax_lab.data.datasets import tff_h5
from fedjax_lab.experiment import build_problem, main, run_fedavg_experiment
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from fedjax_lab.train import TrainConfig

EMNIST_SIZES = {"f0001_01": 3, "f0002_07": 5, "f0100_33": 2}  # writer -> train examples


def write_tff_h5(path, clients):
    """An h5 file in TFF's layout: ``examples/<client>/<feature>`` arrays."""
    with h5py.File(path, "w") as f:
        for cid, features in clients.items():
            for key, value in features.items():
                if isinstance(value, list):  # strings, as TFF stores them (variable length)
                    f.create_dataset(f"examples/{cid}/{key}", data=value,
                                     dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(f"examples/{cid}/{key}", data=value)


def emnist_clients(sizes, seed):
    rng = np.random.default_rng(seed)
    return {c: {"pixels": rng.random((n, 28, 28), dtype=np.float32),
                "label": rng.integers(0, 62, n).astype(np.int32)} for c, n in sizes.items()}


@pytest.fixture(scope="module")
def emnist_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed_emnist")
    train = emnist_clients(EMNIST_SIZES, 0)
    test = emnist_clients({c: 2 for c in EMNIST_SIZES}, 1)
    write_tff_h5(d / "fed_emnist_train.h5", train)
    write_tff_h5(d / "fed_emnist_test.h5", test)
    return d, train, test


def test_fed_emnist_layout_labels_and_natural_clients(emnist_dir):
    d, train, test = emnist_dir
    ds = D.load_dataset("fed_emnist", data_dir=str(d))
    assert ds.num_classes == 62 and ds.input_shape == (28, 28, 1)
    src = ds.train
    assert isinstance(src, D.H5ClientSource) and src.rows_read == 0  # nothing read at open
    assert src.client_names == tuple(sorted(EMNIST_SIZES))
    names = sorted(EMNIST_SIZES)
    np.testing.assert_array_equal(ds.train["y"],
                                  np.concatenate([train[c]["label"] for c in names]))
    np.testing.assert_array_equal(ds.train_client_ids,
                                  np.repeat([0, 1, 2], [EMNIST_SIZES[c] for c in names]))
    # The test split is read whole, 1 - pixels, with its natural (train) clients.
    assert ds.test["x"].dtype == np.float32 and ds.test["x"].shape == (6, 28, 28, 1)
    np.testing.assert_allclose(ds.test["x"][:2, ..., 0], 1.0 - test[names[0]]["pixels"])
    np.testing.assert_array_equal(ds.test_client_ids, [0, 0, 1, 1, 2, 2])

    pop = D.federate(ds, "natural", None, seed=0)
    assert pop.is_lazy and pop.client_ids == ("0", "1", "2")
    np.testing.assert_array_equal(pop.sizes, [EMNIST_SIZES[c] for c in names])
    client = pop.client(1)  # writer names[1] only: one group read, its 5 rows
    assert (src.clients_read, src.rows_read) == (1, EMNIST_SIZES[names[1]])
    np.testing.assert_allclose(client["x"][..., 0], 1.0 - train[names[1]]["pixels"])
    np.testing.assert_array_equal(client["y"], train[names[1]]["label"])
    # A few rows of two clients: only those rows are read (h5 fancy indexing).
    got = src.take(np.array([1, 2, 9]))
    assert (src.clients_read, src.rows_read) == (3, EMNIST_SIZES[names[1]] + 3)
    np.testing.assert_allclose(got["x"][:, ..., 0], 1.0 - np.concatenate(
        [train[names[0]]["pixels"][1:3], train[names[2]]["pixels"][1:2]]))


def test_fed_cifar100_normalised_images_fine_labels(tmp_path):
    rng = np.random.default_rng(2)

    def clients(sizes):
        return {c: {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    "label": rng.integers(0, 100, n).astype(np.int64),
                    "coarse_label": rng.integers(0, 20, n).astype(np.int64)}
                for c, n in sizes.items()}

    train, test = clients({"0": 4, "1": 2, "10": 3}), clients({"0": 2, "1": 1})
    write_tff_h5(tmp_path / "fed_cifar100_train.h5", train)
    write_tff_h5(tmp_path / "fed_cifar100_test.h5", test)
    ds = D.fed_cifar100(tmp_path)
    assert ds.num_classes == 100 and ds.input_shape == (32, 32, 3)
    assert ds.test_client_ids is None  # test clients are other data holders
    assert ds.train.client_names == ("0", "1", "10")
    want = (train["10"]["image"].astype(np.float64) / 255 - [0.5071, 0.4865, 0.4409]) / [
        0.2673, 0.2564, 0.2762]
    got = ds.train.take(np.arange(6, 9))
    assert got["x"].dtype == np.float32
    np.testing.assert_allclose(got["x"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["y"], train["10"]["label"])  # fine labels
    np.testing.assert_array_equal(ds.test["y"], np.concatenate([test["0"]["label"],
                                                                test["1"]["label"]]))


def test_shakespeare_token_ids_by_hand():
    chars = tff_h5.TFF_SHAKESPEARE_CHARS
    assert len(chars) == 86 and len(set(chars)) == 86 and tff_h5.SHAKESPEARE_VOCAB_SIZE == 90
    # 'd' is TFF's first character (id 1), 'h' the second; '~' is out of vocabulary.
    np.testing.assert_array_equal(D.shakespeare_tokens("dh~d"), [87, 1, 2, 89, 1, 88])
    x, y = D.shakespeare_examples("dh~d", seq_len=4)
    np.testing.assert_array_equal(y, [1, 2, 89, 1, 88])  # every character, then eos
    np.testing.assert_array_equal(x, [[0, 0, 0, 87], [0, 0, 87, 1], [0, 87, 1, 2],
                                      [87, 1, 2, 89], [1, 2, 89, 1]])
    x, y = D.shakespeare_examples("", seq_len=3)  # an empty snippet: predict eos after bos
    np.testing.assert_array_equal(x, [[0, 0, 87]])
    np.testing.assert_array_equal(y, [88])


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shakespeare")
    train = {"ROMEO": {"snippets": ["dh", "Thou art"]}, "JULIET": {"snippets": ["O Romeo!"]},
             "NURSE": {"snippets": ["Ay."]}}
    test = {"ROMEO": {"snippets": ["x"]}, "CHORUS": {"snippets": ["ab"]}}
    write_tff_h5(d / "shakespeare_train.h5", train)
    write_tff_h5(d / "shakespeare_test.h5", test)
    return d


def test_fed_shakespeare_examples_per_role(shakespeare_dir):
    ds = D.load_dataset("fed_shakespeare", data_dir=shakespeare_dir)
    src = ds.train
    assert src.client_names == ("JULIET", "NURSE", "ROMEO")
    assert ds.input_shape == (80,) and ds.num_classes == 90
    # One example per character plus one eos per snippet.
    np.testing.assert_array_equal(np.diff(src.offsets), [9, 4, 3 + 9])
    x, y = D.shakespeare_examples("Thou art")
    got = src.take(np.arange(16, 25))  # ROMEO's second snippet
    assert got["x"].dtype == np.int32 and got["x"].shape == (9, 80)
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_array_equal(got["y"], y)
    assert src.clients_read == 1
    # Test roles: ROMEO keeps his train index; CHORUS (test only) gets a new one.
    np.testing.assert_array_equal(ds.test_client_ids, [3, 3, 3, 2, 2])
    model = get_model("char_lstm", ds.input_shape, ds.num_classes)  # TFF's vocabulary fits
    assert model.num_classes == 90


def test_missing_and_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fed_emnist_train.h5, fed_emnist_test.h5 not "
                       r"found.*tff-datasets-public/fed_emnist.tar.bz2"):
        D.fed_emnist(tmp_path)
    with pytest.raises(ValueError, match="pass data_dir"):
        D.fed_cifar100()
    (tmp_path / "fed_emnist_train.h5").write_text("not hdf5")
    (tmp_path / "fed_emnist_test.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        D.fed_emnist(tmp_path)
    write_tff_h5(tmp_path / "fed_emnist_test.h5", emnist_clients({"a": 1}, 3))
    # An h5 file of another layout: the missing group/array is named.
    with h5py.File(tmp_path / "fed_emnist_train.h5", "w") as f:
        f.create_dataset("pixels", data=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="no 'examples' group"):
        D.fed_emnist(tmp_path)
    write_tff_h5(tmp_path / "fed_emnist_train.h5", {"a": {"image": np.zeros((2, 28, 28))}})
    with pytest.raises(ValueError, match=r"client 'a': no 'label' array"):
        D.fed_emnist(tmp_path)
    write_tff_h5(tmp_path / "fed_emnist_train.h5",
                 {"a": {"pixels": np.zeros((2, 28, 28), np.float32),
                        "label": np.array([3, 62], np.int32)}})
    with pytest.raises(ValueError, match=r"outside \[0, 62\)"):
        D.fed_emnist(tmp_path)


def test_cli_missing_files_exit_2(tmp_path, capsys):
    argv = ["--dataset", "fed_emnist", "--model", "logreg", "--out", str(tmp_path / "run"),
            "--partition", "natural", "--num-clients", "3", "--clients-per-round", "2"]
    assert main(TrainConfig, run_fedavg_experiment, argv) == 2
    assert "--data-dir DIR, the folder holding fed_emnist_train.h5, fed_emnist_test.h5" in (
        capsys.readouterr().err)
    assert main(TrainConfig, run_fedavg_experiment, [*argv, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fed_emnist_train.h5, fed_emnist_test.h5 not found" in err
    assert "https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2" in err


def test_two_round_run_on_tiny_fed_emnist(emnist_dir):
    # The train.py problem (flags -> dataset, natural population, evaluators), run by the
    # runner without the run folder's plots (the CLI path is covered above and by
    # test_stackoverflow's CLI run).
    d, _, _ = emnist_dir
    cfg = TrainConfig.parse([
        "--dataset", "fed_emnist", "--data-dir", str(d), "--partition", "natural",
        "--num-clients", "3", "--clients-per-round", "2", "--rounds", "2", "--model", "logreg",
        "--batch-size", "2", "--local-epochs", "1", "--client-eval", "natural"])
    dataset, train, model, evaluate, params = build_problem(cfg)
    assert train.is_lazy and dataset.train.rows_read == 0
    result = run(cfg.make_algorithm(model), VmapBackend(packing=PackingPolicy("off")), train,
                 params, rounds=2, clients_per_round=2, seed=0, num_classes=model.num_classes,
                 evaluate=evaluate, eval_every=1)
    records = result.history
    assert [r["round"] for r in records] == [1, 2]
    assert all(np.isfinite(r["test_loss"]) and 0 <= r["test_accuracy"] <= 1 for r in records)
    assert records[-1]["clients_evaluated"] == 3
    assert 0 < dataset.train.clients_read <= 4  # 2 rounds x 2 clients, read on demand


def test_natural_test_registry_matches_the_loaders():
    # --client-eval natural accepts exactly the loaders whose test examples keep their clients.
    assert {"fed_emnist", "fed_shakespeare"} <= set(D.NATURAL_TEST_DATASETS)
    assert "fed_cifar100" not in D.NATURAL_TEST_DATASETS
    assert set(D.H5_DATASETS) <= set(D.DATASET_NAMES)
