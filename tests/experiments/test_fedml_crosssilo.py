"""FedML's cross-silo presets (experiments/configs/fedml_crosssilo_*.yaml) and their flags.

Every preset parses and carries FedML's settings; the CINIC-10 ResNet-56 preset runs one round
through train.py's entry on a tiny CINIC-10 tree of PNGs (the real loader) with FedML's
client optimizer, the model swapped for logistic regression (compiling ResNet-56's training
round takes minutes on CPU; its forward/backward is tested in
tests/models/test_crosssilo_models.py).
"""

from __future__ import annotations

import json
import os

import pytest

from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.train import TrainConfig
from tests.data.test_cinic10 import write_cinic_tree

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS = [(d, m) for m in ("resnet56", "mobilenet") for d in ("cifar10", "cifar100", "cinic10")]


def _preset(data, model):
    return os.path.join(ROOT, "experiments", "configs", f"fedml_crosssilo_{data}_{model}.yaml")


@pytest.fixture(scope="module")
def cinic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cinic10")
    write_cinic_tree(root, per_class=(4, 1))
    return root


@pytest.mark.parametrize(("data", "model"), ROWS)
def test_presets_carry_fedml_settings(data, model, cinic_dir):
    extra = ["--data-dir", str(cinic_dir)] if data == "cinic10" else []
    cfg = TrainConfig.parse(["--config", _preset(data, model), *extra])
    assert (cfg.dataset, cfg.model, cfg.algorithm) == (data, model, "fedavg")
    assert (cfg.partition, cfg.alpha) == ("dirichlet_per_class", 0.5)  # FedML "hetero"
    assert (cfg.num_clients, cfg.clients_per_round, cfg.rounds) == (10, 10, 100)
    assert (cfg.local_epochs, cfg.batch_size, cfg.client_lr) == (20, 64, 0.001)
    # FedML's commands ran torch.optim.Adam(amsgrad=True, weight_decay=0.001), not SGD.
    assert (cfg.client_optimizer, cfg.client_weight_decay) == ("amsgrad", 0.001)
    assert cfg.as_dict()["client_optimizer"] == "amsgrad"
    # The IID row and the table's SGD are overrides.
    iid = TrainConfig.parse(["--config", _preset(data, model), *extra, "--partition", "iid",
                             "--client-optimizer", "sgd"])
    assert (iid.partition, iid.client_optimizer, iid.client_weight_decay) == ("iid", "sgd",
                                                                             0.001)


def test_default_client_optimizer_leaves_config_hashes_alone():
    cfg = TrainConfig.parse(["--out", "x"])
    assert "client_optimizer" not in cfg.as_dict()
    assert "client_weight_decay" not in cfg.as_dict()


@pytest.mark.parametrize(("argv", "message"), [
    ([], "--dataset cinic10 reads CINIC-10's image folders: pass --data-dir DIR with "
         "DIR/train/<class>/*.png"),
    (["--data-dir", "/nonexistent/cinic"], "lacks the class folder(s)"),
    (["--data-dir", "{cinic}", "--algorithm", "scaffold"],
     "--algorithm scaffold runs its own local SGD"),
    (["--data-dir", "{cinic}", "--client-optimizer", "adam", "--client-momentum", "0.9"],
     "--client-momentum is SGD's heavy ball"),
    (["--data-dir", "{cinic}", "--client-weight-decay", "-0.1"],
     "--client-weight-decay must be a finite number >= 0"),
])
def test_bad_input_exits_2_before_building(argv, message, cinic_dir, capsys):
    argv = [a.replace("{cinic}", str(cinic_dir)) for a in argv]
    code = main(TrainConfig, run_fedavg_experiment,
                ["--config", _preset("cinic10", "resnet56"), *argv, "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cinic_preset_runs_one_round_on_a_tiny_png_tree(cinic_dir, tmp_path):
    out = tmp_path / "run"
    code = main(TrainConfig, run_fedavg_experiment,
                ["--config", _preset("cinic10", "resnet56"), "--data-dir", str(cinic_dir),
                 "--model", "logreg", "--num-clients", "2", "--clients-per-round", "2",
                 "--rounds", "1", "--local-epochs", "1", "--eval-every", "1", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    for name, value in (("dataset", "cinic10"), ("partition", "dirichlet_per_class"),
                        ("client_optimizer", "amsgrad"), ("client_weight_decay", 0.001),
                        ("batch_size", 64), ("client_lr", 0.001)):
        assert config[name] == value, name
    text = json.dumps(summary)
    assert "test_accuracy" in text
