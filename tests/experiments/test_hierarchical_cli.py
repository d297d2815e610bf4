"""experiments/hierarchical.py: a tiny run end to end, and bad input exits 2 before compiling."""

import json

import pytest

from fedjax_lab.experiments_lib import hierarchical as lib

TINY = ["--num-clients", "8", "--groups", "2", "--cloud-rounds", "2", "--edge-rounds", "2",
        "--batch-size", "50"]


def test_tiny_run_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert lib.main([*TINY, "--algorithm", "fedprox", "--mu", "0.01",
                     "--clients-per-edge-round", "3", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert sorted(results["group_sizes"]) == [4, 4]
    assert [h["round"] for h in results["history"]] == [1, 2]
    for h in results["history"]:
        assert 0.0 <= h["test_accuracy"] <= 1.0
        assert h["clients"] == 2 * 2 * 3  # edge rounds x groups x clients per edge round
        assert h["upload_bits"] > 0
    # 2 edges x (64 x 10 + 10) float32 parameters of the digits logistic regression.
    assert results["history"][0]["edge_cloud_bytes"] == 2 * 650 * 4
    assert results["config"]["mu"] == 0.01 and results["algorithm"] == "fedprox"
    assert "test accuracy" in capsys.readouterr().out


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if anything reached the hierarchical run (and so compiled)."""
    import fedjax_lab.topologies

    def refuse(*args, **kwargs):
        raise AssertionError("run_hierarchical was called")

    monkeypatch.setattr(fedjax_lab.topologies, "run_hierarchical", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--edge-rounds", "0"], "--edge-rounds must be >= 1"),
        (["--groups", "9"], "--groups 9 > --num-clients 8"),
        (["--clients-per-edge-round", "5"], "smallest group"),
        (["--grouping", "given"], "pass it"),
        (["--grouping-file", "g.json"], "--grouping-file is read by --grouping given"),
        (["--mu", "0.1"], "--mu needs --algorithm fedprox"),
        (["--dataset", "mnist"], "--dataset must be one of"),
        (["--synthetic-alpha", "1"], "needs --dataset synthetic"),
        (["--client-lr", "-1"], "--client-lr must be a finite number > 0"),
        (["--devices", "99"], "--devices 99"),
        (["--algorithm", "dp_fedavg"], "SAME noise"),
    ],
    ids=["kappa2", "groups", "per-edge", "no-file", "file-unread", "hparam", "dataset",
         "synthetic", "lr", "devices", "dp"],
)
def test_bad_flags_exit_2(argv, message, capsys, no_compile):
    assert lib.main([*TINY, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[0, 1, 0]", "one group id per client"),
        ("[[0, 1, 2, 3], [3, 4, 5, 6, 7]]", "more than one group"),
        ("[0, 0, 0, 0, 2, 2, 2, 2]", "have no client"),
        ("{not json", "not valid JSON"),
    ],
    ids=["short", "twice", "gap", "json"],
)
def test_bad_grouping_file_exit_2(content, message, tmp_path, capsys, no_compile):
    path = tmp_path / "groups.json"
    path.write_text(content)
    argv = [*TINY[:2], "--grouping", "given", "--grouping-file", str(path)]
    assert lib.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "--grouping-file" in err


def test_given_grouping_file_is_used(tmp_path):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps([[0, 1, 2], [3, 4, 5, 6, 7]]))
    cfg, _ = lib.parse([*TINY[:2], "--grouping", "given", "--grouping-file", str(path)])
    cfg.validate()
    assert cfg.group_ids().tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="--groups 3 but --grouping-file has 2"):
        lib.parse([*TINY[:2], "--groups", "3", "--grouping", "given", "--grouping-file",
                   str(path)])[0].validate()
