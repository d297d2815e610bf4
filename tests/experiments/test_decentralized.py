"""experiments/decentralized.py: a tiny run's outputs, and bad flags exit 2 before compiling."""

import json
import re

import pytest

from fedjax_lab.experiments_lib.decentralized import main

TINY = ["--nodes", "4", "--rounds", "2", "--local-steps", "1", "--eval-every", "1"]


def test_tiny_run_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*TINY, "--topology", "ring,fully_connected", "--out", str(out),
                 "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    assert json.loads((out / "results.json").read_text()) == res
    assert set(res["topologies"]) == {"ring(4)", "fully_connected(4)"}
    for entry in res["topologies"].values():
        assert len(entry["history"]) == 2
        assert 0.0 <= entry["final"]["test_accuracy"] <= 1.0
        assert entry["total_gossip_bits"] > 0
    assert res["topologies"]["fully_connected(4)"]["spectral_gap"] == pytest.approx(1.0)
    assert res["topologies"]["fully_connected(4)"]["final"]["consensus_distance"] < 1e-10
    assert "[dsgd ring(4)] spectral gap" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--topology", "star"], "--topology must be distinct comma-separated names"),
        (["--nodes", "1"], "--nodes must be >= 2"),
        (["--algorithm", "choco", "--compressor", "topk"], "did you mean top_k"),
        (["--algorithm", "choco", "--gamma", "1.5"], r"--gamma must be in \(0, 1\]"),
        (["--topology", "erdos_renyi", "--er-p", "0.01", "--nodes", "30"],
         r"erdos_renyi\(30, p=0.01, seed=0\) is not connected"),
        (["--dataset", "mnist"], "--dataset must be one of"),
        (["--dataset", "synthetic", "--partition", "iid"],
         "--partition applies to --dataset digits only"),
        (["--gamma", "0.5", "--sparsity", "0.1"],
         "--sparsity, --gamma only apply to --algorithm choco"),
        (["--algorithm", "choco", "--compressor", "sign", "--sparsity", "0.1"],
         "--sparsity is not a parameter of --compressor sign"),
        (["--er-p", "0.5"], "--er-p is read only by --topology erdos_renyi"),
    ],
    ids=["topology", "nodes", "compressor", "gamma", "disconnected", "dataset", "partition",
         "choco-only", "compressor-param", "er-p"],
)
def test_bad_input_exits_2_with_one_error_line(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not (out / "results.json").exists()


def test_unknown_flag_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["--rouns", "3"])
    assert e.value.code == 2
