"""experiments/sweep.py: outputs of a tiny sweep and flag validation."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_lab.sweep import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--rounds", "2", "--num-clients", "8", "--clients-per-round", "3", "--seeds", "2",
        "--client-lrs", "0.05,0.5", "--server-lrs", "1,0.5"]


def test_cli_writes_table_summary_json_and_heatmap(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), *TINY, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "8 runs (4 points x 2 seeds) in one program" in proc.stdout
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and "test_accuracy" in rows[0]
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 4
    data = json.loads((out / "results.json").read_text())
    assert data["runs"] == 8 and data["seeds"] == [0, 1]
    assert 0.0 <= data["best"]["test_accuracy_mean"] <= 1.0
    assert data["compile_seconds"] > 0 and data["run_seconds"] > 0
    assert (out / "heatmap.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--client-lrs", "0.1,-1"], "--client-lrs must be > 0"),
        (["--server-lrs", "geom:1:0.1:3"], "needs 0 < LO <= HI"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--clients-per-round", "80"], "--clients-per-round=80 > --num-clients=50"),
    ],
    ids=["neg_lr", "bad_geom", "seeds0", "cpr"],
)
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_packing_flag_packs_host_rounds_with_the_same_runs(tmp_path, capsys):
    # --packing on selects the host execution under --execution auto and packs every round;
    # the runs are the padded host execution's (same seeds, same cohorts), to float rounding.
    outs = {}
    for packing in ("on", "off"):
        out = tmp_path / packing
        assert main([*TINY, "--execution", "auto" if packing == "on" else "host",
                     "--packing", packing, "--out", str(out)]) == 0
        outs[packing] = json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().out
    assert "(host execution)" in printed and "rounds packed (" in printed
    on, off = outs["on"], outs["off"]
    assert on["execution"] == off["execution"] == "host"
    assert on["packed_layouts"] and not off["packed_layouts"]
    assert on["real_steps"] == off["real_steps"] > 0
    assert on["config"]["packing"] == "on"
    for a, b in zip(on["rows"], off["rows"], strict=True):
        assert (a["client_lr"], a["server_lr"], a["seed"]) == (b["client_lr"], b["server_lr"],
                                                               b["seed"])
        assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], abs=1e-5)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
