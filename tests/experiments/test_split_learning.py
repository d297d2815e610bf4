"""experiments/split_learning.py: bad input exits 2 before compiling; a tiny run's outputs."""

import json

import pytest

from fedjax_lab.experiments_lib.split_learning import main

TINY = ["--rounds", "1", "--num-clients", "2", "--hidden", "4", "--batch-size", "64"]


@pytest.mark.parametrize("flags, message", [
    (["--cut", "head"], "--cut 'head' is not a cut layer"),
    (["--model", "resnet18"], "--model must be one of"),
    (["--methods", "splitfed,gossip"], "--methods must be distinct names"),
    (["--hidden", "4,-1"], "--hidden must be comma-separated positive ints"),
    (["--lr", "0"], "--lr must be a finite float > 0"),
], ids=["cut", "model", "methods", "hidden", "lr"])
def test_bad_input_exits_2_with_one_error_line(flags, message, tmp_path, capsys):
    assert main([*flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # rejected before anything was created


def test_tiny_run_writes_results_with_exact_bytes(tmp_path):
    out = tmp_path / "out"
    # SplitFed shares this code path with vanilla SL (both are unit-tested for their bytes).
    assert main([*TINY, "--methods", "vanilla,fedavg", "--out", str(out),
                 "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["methods"].keys() == {
        "vanilla", "fedavg"}
    n, params = results["train_examples"], results["num_params"]
    # mlp 64-4-10 cut after dense_0: 4 floats per example each way; client part 64*4+4.
    assert results["cut_size"] == 4 and results["client_params"] == 64 * 4 + 4
    assert params == 64 * 4 + 4 + 4 * 10 + 10
    # Relay: each of the 2 clients hands the client part (SGD: no optimizer state) on once.
    assert results["methods"]["vanilla"]["bytes_per_round"] == {
        "activation_bytes": n * 4 * 4, "gradient_bytes": n * 4 * 4,
        "model_bytes": 2 * (64 * 4 + 4) * 4, "total_bytes": 2 * n * 4 * 4 + 8 * 260}
    assert results["methods"]["fedavg"]["bytes_per_round"]["total_bytes"] == 2 * 2 * params * 4
    for method in results["methods"].values():
        assert 0.0 <= method["final_test_accuracy"] <= 1.0
