"""FedML benchmark presets (experiments/configs/fedml_*.yaml): every one runs with --quick.

The presets read TFF's h5 files or TFDS MNIST; ``--quick`` swaps in a generated stand-in of
the same layout (fedjax_lab.data.datasets.standin, read by the real loaders), 2 rounds and at
most 2 clients per round, keeping the preset's algorithm, model, batch size, learning rate,
local epochs and partition, so a preset whose dataset, model and hyperparameters do not fit
together fails here, offline.
"""

import glob
import json
import os

import jax
import numpy as np
import pytest
import yaml

from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.data.datasets.standin import STANDIN_CLIENTS, STANDIN_DATASETS, write_standin
from fedjax_lab.experiment import build_problem, main, run_fedavg_experiment
from fedjax_lab.experiments_lib.quick import quick_values, standin_dir
from fedjax_lab.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The cross-silo rows (fedml_crosssilo_*: ResNet-56/MobileNet on CIFAR/CINIC-10) take minutes
# per quick run on CPU: tests/experiments/test_fedml_crosssilo_quick.py checks them without
# compiling (and runs one per model under the slow marker).
PRESETS = sorted(os.path.basename(p) for p in glob.glob(
    os.path.join(ROOT, "experiments", "configs", "fedml_*.yaml"))
    if not os.path.basename(p).startswith("fedml_crosssilo_"))


def _preset(name):
    return os.path.join(ROOT, "experiments", "configs", name)


def test_every_fedml_row_has_a_preset():
    for row in ("mnist_lr", "femnist_lr", "femnist_cnn", "fed_cifar100_resnet18",
                "fed_shakespeare_rnn", "stackoverflow_nwp", "stackoverflow_lr"):
        assert f"fedml_{row}.yaml" in PRESETS, row


# ResNet-18's training round takes minutes to compile on 2 shared cores (over this file's
# budget): its --quick config is built (stand-in through the real loader, model initialised,
# population and cohort checked) but not trained here; `train.py --config
# experiments/configs/fedml_fed_cifar100_resnet18.yaml --quick` trains it (2 rounds).
BUILD_ONLY = ("fedml_fed_cifar100_resnet18.yaml",)


# fed_shakespeare's quick run (char LSTM over 80 steps, batch 4) takes minutes, the StackOverflow
# LSTM's and the FEMNIST CNN's 12-15 s (their loaders, models and metrics have faster tests; the
# logistic-regression rows keep the quick path in `make test`): `make test-slow`.
SLOW = ("fedml_fed_shakespeare_rnn.yaml", "fedml_stackoverflow_nwp.yaml", "fedml_femnist_cnn.yaml")


@pytest.mark.parametrize("preset", [
    pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p
    for p in PRESETS if p not in BUILD_ONLY])
def test_preset_quick_run(preset, tmp_path, capsys):
    with open(_preset(preset), encoding="utf-8") as f:
        full = yaml.safe_load(f)
    out = tmp_path / "run"
    code = main(TrainConfig, run_fedavg_experiment,
                ["--config", _preset(preset), "--quick", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run-quick" / "summary.json").read_text())
    config = summary["config"]
    # What makes the preset is kept; only data, population and length are the smoke run's.
    for name in ("algorithm", "model", "batch_size", "client_lr", "local_epochs", "partition"):
        assert config[name] == full[name.replace("_", "-")], name
    assert config["rounds"] == 2 and config["clients_per_round"] == 2
    records = [json.loads(line) for line in
               (tmp_path / "run-quick" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert np.isfinite(records[-1]["test_loss"])


@pytest.mark.parametrize("preset", BUILD_ONLY)
def test_heavy_preset_quick_config_builds(preset):
    cfg = TrainConfig.parse(["--config", _preset(preset), "--quick"])
    assert (cfg.rounds, cfg.clients_per_round, cfg.num_clients) == (2, 2, STANDIN_CLIENTS)
    dataset, train, model, _, params = build_problem(cfg)
    assert train.num_clients == STANDIN_CLIENTS
    assert model.num_classes == dataset.num_classes == 100
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_quick_values_replace_only_data_population_and_length():
    values = TrainConfig.parse(["--config", _preset("fedml_femnist_lr.yaml"), "--quick"]).as_dict()
    values.update(data_dir=None, num_clients=200, max_clients=200, clients_per_round=10,
                  rounds=200, eval_every=10, out="runs/fedml_femnist_lr")
    quick = quick_values(values, None)
    changed = {k for k in values if quick[k] != values[k]}
    assert changed == {"data_dir", "num_clients", "max_clients", "clients_per_round", "rounds",
                       "eval_every", "out"}
    assert quick["data_dir"] == standin_dir("fed_emnist", 0)
    assert quick["max_clients"] == quick["num_clients"] == STANDIN_CLIENTS - 1
    assert quick["out"] == "runs/fedml_femnist_lr-quick"
    mnist = quick_values({**values, "dataset": "mnist", "max_clients": None,
                          "partition": "dirichlet_per_class", "data_dir": None}, None)
    assert mnist["dataset"] == "digits" and mnist["data_dir"] is None


def test_max_clients_keeps_the_first_natural_clients(tmp_path):
    write_standin("fed_emnist", tmp_path, seed=3)
    cfg = TrainConfig.parse(["--dataset", "fed_emnist", "--data-dir", str(tmp_path),
                             "--partition", "natural", "--max-clients", "2", "--num-clients", "2",
                             "--clients-per-round", "1", "--model", "logreg"])
    _, train, _, _, _ = build_problem(cfg)
    full = federate(load_dataset("fed_emnist", data_dir=str(tmp_path)), "natural", None, seed=0)
    assert full.num_clients == STANDIN_CLIENTS
    assert train.num_clients == 2
    for i in range(2):  # the files' first two writers, example for example
        np.testing.assert_array_equal(train.client(i)["x"], full.client(i)["x"])
        np.testing.assert_array_equal(train.client(i)["y"], full.client(i)["y"])


@pytest.mark.parametrize("name", STANDIN_DATASETS)
def test_standins_load_through_the_real_loaders(name, tmp_path):
    assert write_standin(name, tmp_path) == STANDIN_CLIENTS
    ds = load_dataset(name, data_dir=str(tmp_path))
    assert len(ds.train.client_names) == STANDIN_CLIENTS


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "fedml_femnist_cnn.yaml", "--quick", "--data-dir", "/tmp"],
         "--quick runs on generated stand-in data: drop --data-dir"),
        (["--config", "fedml_mnist_lr.yaml", "--quick", "--download"],
         "drop --download"),
        (["--config", "fedml_femnist_cnn.yaml", "--quick", "--dataset", "fashion_mnist",
          "--partition", "iid"], "--quick has no stand-in for --dataset fashion_mnist"),
        (["--config", "fedml_femnist_lr.yaml", "--num-clients", "300"],
         "--num-clients (300) must equal --max-clients (200)"),
        (["--config", "fedml_femnist_lr.yaml", "--partition", "iid"],
         "--max-clients keeps the first N natural clients: it needs --partition natural"),
        (["--config", "fedml_femnist_lr.yaml", "--max-clients", "0"],
         "--max-clients must be >= 1"),
    ],
    ids=["data_dir", "download", "no_standin", "num_clients", "partition", "zero"],
)
def test_bad_combinations_exit_2(argv, message, capsys):
    argv = [_preset(a) if a.endswith(".yaml") else a for a in argv]
    assert main(TrainConfig, run_fedavg_experiment, argv) == 2
    assert message in capsys.readouterr().err
