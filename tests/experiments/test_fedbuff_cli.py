"""experiments/fedbuff.py: bad flags exit 2 before anything runs; a tiny run writes its JSON."""

import json

import pytest

from fedjax_lab.experiments_lib.fedbuff import main


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--buffer-size", "5", "--concurrency", "4"], "K=5 > --concurrency=4"),
        (["--buffer-size", "0"], "--buffer-size"),
        (["--population", "10", "--concurrency", "8", "--buffer-size", "4"], "needs >= "),
        (["--server-steps", "0"], "give --time-budget"),
        (["--time-budget", "nan"], "--time-budget"),
        (["--dataset", "mnist"], "--dataset"),
        (["--staleness", "hinge"], "--staleness"),
        (["--slowdown-sigma", "-1"], "--slowdown-sigma"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_flags_exit_2_before_running(tmp_path, capsys, flags, match):
    out = tmp_path / "out"
    assert main([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0]
    assert not out.exists()  # refused before the run folder (or anything else) was touched


def test_tiny_run_writes_both_curves(tmp_path):
    out = tmp_path / "out"
    code = main(["--population", "12", "--concurrency", "4", "--buffer-size", "2",
                 "--server-steps", "4", "--eval-every", "2", "--out", str(out),
                 "--json", str(tmp_path / "r.json")])
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res == json.loads((out / "results.json").read_text())
    assert (out / "accuracy_vs_time.png").exists()
    fb, sync = res["fedbuff"], res["sync"]
    assert [r["step"] for r in fb["history"]] == [1, 2, 3, 4]
    assert sum(fb["staleness_histogram"].values()) == 4 * 2
    assert sync["rounds"] >= 4 and sync["sim_time"] >= fb["sim_time"]
    times = [r["sim_time"] for r in sync["history"]]
    assert times == sorted(times) and times[0] > 0
    assert set(res["time_to_target"]) == {"fedbuff", "sync"}
    assert all("test_accuracy" in fb["history"][i] for i in (1, 3))
