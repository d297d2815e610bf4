"""experiments/fedpaq.py (FedPAQ Figure 1): panels, outputs, time to target, flag errors."""

import json

import numpy as np
import pytest

from fedjax_lab.data.datasets import digits
from fedjax_lab.experiments_lib.fedpaq import (
    METHODS,
    class_subset,
    main,
    panels,
    time_to_target,
)
from fedjax_lab.io.writers import read_jsonl

TINY = ["--quick", "--num-clients", "6", "--total-iterations", "10"]


def test_panels_follow_the_paper():
    p = panels(50, 100, quick=False)
    assert [v.s for v in p["1"][1]] == [1, 5, 10, None]
    assert {(v.tau, v.r) for v in p["1"][1]} == {(5, 25)}
    assert [v.r for v in p["2"][1]] == [5, 10, 25, 50]
    assert [v.tau for v in p["3"][1]] == [1, 2, 5, 10, 50]
    assert {(v.label, v.tau, v.r, v.s) for v in p["4"][1]} == {
        ("fedpaq", 2, 25, 1), ("fedavg", 2, 25, None), ("qsgd", 1, 50, 1)}
    assert [v.tau for v in panels(50, 20, quick=False)["3"][1]] == [1, 2, 5, 10]


def test_time_to_target_is_the_first_crossing():
    curve = {"sim_time": [0.0, 1.0, 2.5, 4.0], "train_loss": [1.0, 0.6, 0.4, 0.5]}
    assert time_to_target(curve, 0.6) == 1.0
    assert time_to_target(curve, 0.45) == 2.5
    assert time_to_target(curve, 0.1) is None


def test_class_subset_relabels_in_order():
    ds = digits()
    sub = class_subset(ds, (8, 0))
    ref = digits(classes=(8, 0))
    np.testing.assert_array_equal(sub.train["y"], ref.train["y"])
    np.testing.assert_array_equal(sub.test["x"], ref.test["x"])
    with pytest.raises(ValueError, match="classes must be distinct labels"):
        class_subset(ds, (0, 0))


def test_cli_writes_panels_json_and_metrics(tmp_path, capsys):
    out = tmp_path / "fig"
    code = main([*TINY, "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["time_to_target"]) == set(METHODS)
    lr = res["settings"]["lr"]
    assert set(lr["panels"]) == {"1", "2", "3", "4"}
    for key in "1234":
        assert (out / "lr" / f"panel{key}.png").stat().st_size > 1000
        for curve in lr["panels"][key]["curves"].values():
            assert len(curve["sim_time"]) == len(curve["train_loss"]) == curve["rounds"] + 1
            assert np.all(np.diff(curve["sim_time"]) > 0)
    curves = lr["panels"]["4"]["curves"]
    # Every method reaches the default target (the worst final loss of the three).
    assert all(t is not None for t in res["time_to_target"].values())
    # At C_comm/C_comp = 100 an unquantized upload costs ~40x a 1-level QSGD one, so FedPAQ's
    # whole run ends before FedAvg's first round does.
    assert res["time_to_target"]["fedpaq"] < curves["fedavg"]["sim_time"][1]
    records = read_jsonl(str(out / "lr" / "tau2_r3_snone.jsonl"))
    assert len(records) == 5
    for field in ("sim_time", "sim_comm_time", "sim_comp_time", "cum_uplink_bits",
                  "wall_time", "global_train_loss"):
        assert field in records[-1]
    assert "[lr] C_comm/C_comp=100" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--total-iterations", "15"], "--total-iterations must be a multiple of 10"),
        (["--settings", "cnn"], "--settings must be a subset"),
        (["--dataset", "imagenet"], "--dataset must be 'digits' or 'mnist'"),
        (["--lr-ratio", "0"], "--lr-ratio must be a finite float > 0"),
        (["--target-loss", "-1"], "--target-loss must be > 0"),
    ],
    ids=["T", "settings", "dataset", "ratio", "target"],
)
def test_bad_flags_exit_2(argv, message, capsys, tmp_path):
    assert main([*TINY, "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
