"""experiments/vertical_fl.py: bad input exits 2 before compiling; a tiny run's outputs."""

import json

import pytest

from fedjax_lab.experiments_lib.vertical_fl import main

TINY = ["--epochs", "1", "--batch-size", "256", "--top-hidden", "", "--embed-dim", "2"]


@pytest.mark.parametrize("flags, message", [
    (["--parties", "1,65"], "--parties must be distinct counts in [1, 64]"),
    (["--parties", "2,2"], "--parties must be distinct counts"),
    (["--dataset", "mnist"], "--dataset must be one of"),
    (["--split", "diagonal"], "--split must be one of"),
    (["--bottom-hidden", "0"], "--bottom-hidden must be comma-separated positive ints"),
], ids=["too-many-parties", "repeated", "dataset", "split", "hidden"])
def test_bad_input_exits_2_with_one_error_line(flags, message, tmp_path, capsys):
    assert main([*flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_tiny_run_writes_results_with_exact_bytes(tmp_path):
    out = tmp_path / "out"
    assert main([*TINY, "--parties", "3", "--split", "random", "--out", str(out),
                 "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["parties"].keys() == {"3"}
    n = results["train_examples"]
    three = results["parties"]["3"]
    assert sorted(three["columns"]) == [21, 21, 22]
    # Two passive parties, n embeddings of 2 floats each, up and down.
    assert three["bytes_per_epoch"] == {"embedding_bytes": 2 * n * 2 * 4,
                                        "gradient_bytes": 2 * n * 2 * 4,
                                        "total_bytes": 4 * n * 2 * 4}
    assert 0.0 <= three["final_test_accuracy"] <= 1.0
