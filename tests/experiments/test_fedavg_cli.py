"""experiments/fedavg.py: flags, validation messages, outputs."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.models import get_model
from fedjax_lab.train import FedAvgConfig, TrainConfig
from tests.helpers import assert_refused

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--rounds", "3", "--num-clients", "8", "--clients-per-round", "3", "--eval-every", "2",
        "--model", "logreg", "--progress", "false", "--local-epochs", "1"]


def test_cli_run_writes_metrics_summary_and_plot(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "fedavg.py"), *TINY, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "final test accuracy" in proc.stdout
    lines = read_jsonl(str(out / "metrics.jsonl"))
    assert [rec["round"] for rec in lines] == [1, 2, 3]
    assert "test_accuracy" in lines[1] and "test_accuracy" in lines[2]  # every 2 + final
    assert "test_accuracy" not in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_test_accuracy", "final_test_loss", "rounds", "wall_seconds",
                "examples_per_second", "config"):
        assert key in summary
    assert summary["rounds"] == 3 and summary["config"]["num_clients"] == 8
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert (out / "accuracy.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "-1"], "--rounds must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--clients-per-round", "60", "--num-clients", "50"], "--clients-per-round=60 > "),
        (["--backend", "tpu-pod"], "--backend must be one of"),
        (["--plan", "fastest"], "--plan must be one of"),
        (["--dataset", "imagenet-21k"], "unknown dataset"),
        (["--model", "transformer-xl"], "transformer-xl"),
        (["--partition", "by-moon-phase"], "by-moon-phase"),
    ],
    ids=["rounds", "batch", "cpr", "backend", "plan", "dataset", "model", "partition"],
)
def test_bad_values_exit_2_with_message(argv, message, capsys, tmp_path):
    code = main(FedAvgConfig, run_fedavg_experiment,
                [*TINY, "--out", str(tmp_path), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_flag_and_unparsable_value_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        FedAvgConfig.parse(["--rounds", "3", "--learning-rate", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        FedAvgConfig.parse(["--rounds", "three"])
    assert e.value.code == 2
    assert "invalid int value: 'three'" in capsys.readouterr().err


def test_same_seed_reproduces_metrics(tmp_path):
    runs = []
    for i, seed in enumerate([5, 5, 6]):
        out = tmp_path / f"r{i}"
        assert main(FedAvgConfig, run_fedavg_experiment,
                    [*TINY, "--seed", str(seed), "--out", str(out)]) == 0
        recs = read_jsonl(str(out / "metrics.jsonl"))
        runs.append([{k: v for k, v in r.items() if k != "round_seconds"} for r in recs])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize(
    ("flags", "name"),
    [([], "fedavg"), (["--server-lr", "0.5"], "fedavg"),
     (["--server-optimizer", "adam", "--server-lr", "0.01"], "fedadam"),
     (["--server-optimizer", "momentum"], "fedmomentum")],
    ids=["default", "server-lr", "adam", "momentum"],
)
def test_fedavg_py_is_a_preset_of_train_py(flags, name):
    """fedavg.py = train.py --algorithm fedopt --out runs/fedavg (same settings, so the same
    run); the algorithm keeps the names fedavg.py always logged."""
    preset = FedAvgConfig.parse(flags)
    general = TrainConfig.parse(["--algorithm", "fedopt", "--out", "runs/fedavg", *flags])
    assert preset.as_dict() == general.as_dict()
    assert preset.out == "runs/fedavg" and not preset.auto_out
    model = get_model("logreg", (4,), 3)
    assert preset.make_algorithm(model).name == name
    assert general.make_algorithm(model).name == "fedopt"
    assert FedAvgConfig.parse(["--algorithm", "fedprox"]).make_algorithm(model).name == "fedprox"


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--server-lr", "-1"], "--server-lr must be a finite number > 0, got -1.0"),
     (["--server-optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
     (["--algorithm", "fedprox", "--server-lr", "0.5"], "--server-lr needs --algorithm fedopt")],
    ids=["negative-lr", "unknown-optimizer", "lr-without-server-optimizer"],
)
def test_bad_server_flags_exit_2(flags, message, capsys, tmp_path):
    assert_refused(main, (FedAvgConfig, run_fedavg_experiment,
                          [*TINY, "--out", str(tmp_path), *flags]), message, capsys, tmp_path)
