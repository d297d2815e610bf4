"""FedML benchmark presets (experiments/configs/fedml_*.yaml) run end to end on stand-ins.

The presets read TFF's h5 files; here each runs one round through train.py on tiny files the
test writes in TFF's layout (with --num-clients/--clients-per-round shrunk to fit them), so a
preset whose dataset, model and hyperparameters do not fit together fails here, offline.
"""

import json
import os

import pytest

from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.train import TrainConfig
from tests.data.test_tff_h5 import EMNIST_SIZES, emnist_clients, write_tff_h5

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _emnist(d):
    write_tff_h5(d / "fed_emnist_train.h5", emnist_clients(EMNIST_SIZES, 0))
    write_tff_h5(d / "fed_emnist_test.h5", emnist_clients({c: 2 for c in EMNIST_SIZES}, 1))
    return len(EMNIST_SIZES)


def _shakespeare(d):
    write_tff_h5(d / "shakespeare_train.h5", {"ROMEO": {"snippets": ["Thou art"]},
                                         "JULIET": {"snippets": ["O Romeo!", "Ay me"]},
                                         "NURSE": {"snippets": ["Ay."]}})
    write_tff_h5(d / "shakespeare_test.h5", {"ROMEO": {"snippets": ["x"]}})
    return 3


@pytest.mark.parametrize(("preset", "write"), [("fedml_femnist_cnn.yaml", _emnist),
                                               ("fedml_fed_shakespeare_rnn.yaml", _shakespeare)])
def test_preset_runs_one_round_on_tiny_tff_files(preset, write, tmp_path):
    path = os.path.join(ROOT, "experiments", "configs", preset)
    clients = write(tmp_path)
    out = tmp_path / "run"
    code = main(TrainConfig, run_fedavg_experiment,
                ["--config", path, "--data-dir", str(tmp_path), "--num-clients", str(clients),
                 "--clients-per-round", "2", "--rounds", "1", "--eval-every", "1",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    preset_cfg = TrainConfig.parse(["--config", path, "--data-dir", str(tmp_path)])
    config = json.loads((out / "summary.json").read_text())["config"]
    for name in ("dataset", "model", "batch_size", "client_lr", "local_epochs", "partition"):
        assert config[name] == getattr(preset_cfg, name), name
