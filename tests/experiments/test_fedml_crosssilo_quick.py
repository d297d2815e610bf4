"""``--quick`` on FedML's cross-silo presets (experiments/configs/fedml_crosssilo_*.yaml).

``--quick`` writes a stand-in of CIFAR-10/100 (a TFDS data directory) or CINIC-10 (a PNG tree)
with fedjax_lab.data.datasets.image_standin and reads it through the real loaders. A whole
quick run of ResNet-56 or MobileNet takes minutes on 2 CPU cores (compiling the model's init,
round and evaluation programs, and its convolutions on CPU), so here every preset is checked
without compiling: its quick config keeps FedML's settings, its stand-in is written once and
read back by the real loader, the preset's partition splits it into clients of one local step,
and the model is built for its images and classes. One quick run per model (a TFDS and a
CINIC-10 preset) is marked ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.data.datasets.image_standin import (
    IMAGE_STANDIN_DATASETS,
    TEST_IMAGES,
    TRAIN_PER_CLASS,
    write_image_standin,
)
from fedjax_lab.experiment import dataset_kwargs, main, run_fedavg_experiment
from fedjax_lab.experiments_lib.quick import QUICK_PARTITION_CLIENTS, standin_dir
from fedjax_lab.models import get_model
from fedjax_lab.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS = [(d, m) for m in ("resnet56", "mobilenet") for d in ("cifar10", "cifar100", "cinic10")]
CLASSES = {"cifar10": 10, "cifar100": 100, "cinic10": 10}


def _preset(data, model):
    return os.path.join(ROOT, "experiments", "configs", f"fedml_crosssilo_{data}_{model}.yaml")


@pytest.fixture(scope="module")
def quick_configs():
    """Each row's ``--quick`` config; parsing writes (or reuses) the three stand-ins."""
    return {row: TrainConfig.parse(["--config", _preset(*row), "--quick"]) for row in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[f"{d}_{m}" for d, m in ROWS])
def test_quick_keeps_fedml_settings(quick_configs, row):
    data, model = row
    cfg = quick_configs[row]
    # What makes the row is kept: FedML's partition, batch, optimizer and learning rate.
    assert (cfg.dataset, cfg.model, cfg.algorithm) == (data, model, "fedavg")
    assert (cfg.partition, cfg.alpha) == ("dirichlet_per_class", 0.5)
    assert (cfg.batch_size, cfg.client_lr) == (64, 0.001)
    assert (cfg.client_optimizer, cfg.client_weight_decay) == ("amsgrad", 0.001)
    # The smoke run's data, population and length; one local epoch for the deep models.
    assert cfg.data_dir == standin_dir(data, 0)
    assert (cfg.num_clients, cfg.clients_per_round) == (QUICK_PARTITION_CLIENTS, 2)
    assert (cfg.rounds, cfg.eval_every, cfg.local_epochs) == (2, 1, 1)
    assert cfg.out == f"runs/fedml_crosssilo_{data}_{model}-quick"


@pytest.mark.parametrize("data", IMAGE_STANDIN_DATASETS)
def test_standin_reads_through_the_real_loader(quick_configs, data):
    cfg = quick_configs[(data, "resnet56")]
    ds = load_dataset(data, **dataset_kwargs(cfg))
    assert (ds.name, ds.num_classes, ds.input_shape) == (data, CLASSES[data], (32, 32, 3))
    labels = np.asarray(ds.train["y"])
    np.testing.assert_array_equal(np.bincount(labels, minlength=CLASSES[data]),
                                  np.full(CLASSES[data], TRAIN_PER_CLASS[data]))
    assert ds.test["x"].shape == (TEST_IMAGES, 32, 32, 3)
    assert np.all(np.isfinite(ds.test["x"]))
    # The preset's partition (FedML "hetero", >= 10 examples per client) splits the stand-in
    # into clients smaller than the batch: one local step each, as the quick run's docs say.
    fed = federate(ds, cfg.partition, cfg.num_clients, seed=cfg.seed, alpha=cfg.alpha)
    sizes = [len(fed.client(i)["y"]) for i in range(fed.num_clients)]
    assert fed.num_clients == QUICK_PARTITION_CLIENTS and sum(sizes) == len(labels)
    assert min(sizes) >= 10 and max(sizes) <= cfg.batch_size
    # The rows' models are built for the stand-in's images and classes (their forward pass at
    # this size, 10 and 100 classes, is traced in tests/models/test_crosssilo_models.py).
    for name in ("resnet56", "mobilenet"):
        model = get_model(name, ds.input_shape, ds.num_classes)
        assert (model.input_shape, model.num_classes) == ((32, 32, 3), CLASSES[data]), name


def test_standin_is_written_once_and_reused(quick_configs):
    folder = standin_dir("cinic10", 0)

    def stamps():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                for d, _, files in os.walk(folder) for f in files}

    before = stamps()
    TrainConfig.parse(["--config", _preset("cinic10", "mobilenet"), "--quick"])
    after = stamps()
    assert before == after and len(before) == 10 * TRAIN_PER_CLASS["cinic10"] + TEST_IMAGES


def test_write_image_standin_refuses_other_datasets(tmp_path):
    with pytest.raises(ValueError, match=r"no stand-in for 'mnist'; datasets with one: "
                                         r"cifar10, cifar100, cinic10"):
        write_image_standin("mnist", tmp_path)


@pytest.mark.parametrize(("argv", "message"), [
    (["--data-dir", "/tmp"], "--quick runs on generated stand-in data: drop --data-dir"),
    (["--download"], "--quick runs on generated stand-in data: drop --download"),
    (["--client-weight-decay", "-1"], "--client-weight-decay must be a finite number >= 0"),
])
@pytest.mark.parametrize("data", ["cifar10", "cinic10"])
def test_bad_input_exits_2_before_compiling(data, argv, message, capsys):
    code = main(TrainConfig, run_fedavg_experiment,
                ["--config", _preset(data, "resnet56"), "--quick", *argv, "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


# One quick run per model, one TFDS and one CINIC-10 stand-in: minutes each on 2 CPU cores.
@pytest.mark.slow
@pytest.mark.parametrize("row", [("cinic10", "mobilenet"), ("cifar10", "resnet56")],
                         ids=["cinic10_mobilenet", "cifar10_resnet56"])
def test_quick_run(row, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(TrainConfig, run_fedavg_experiment,
                ["--config", _preset(*row), "--quick", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run-quick" / "summary.json").read_text())
    config = summary["config"]
    for name, value in (("dataset", row[0]), ("model", row[1]), ("client_optimizer", "amsgrad"),
                        ("client_weight_decay", 0.001), ("batch_size", 64),
                        ("partition", "dirichlet_per_class"), ("rounds", 2),
                        ("local_epochs", 1)):
        assert config[name] == value, name
    records = [json.loads(line) for line in
               (tmp_path / "run-quick" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["local_steps"] == 1 for r in records)  # clients smaller than the batch
    assert np.isfinite(records[-1]["test_loss"]) and np.isfinite(records[-1]["train_loss"])
