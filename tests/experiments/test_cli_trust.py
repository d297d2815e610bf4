"""experiments/fedavg.py at its trust boundaries: bad input exits 2 with one line before any
compilation, run folders are locked and never silently overwritten, and a diverging run is
reported as such (NaN metrics, exit status 3) instead of looking like a finished one."""

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from fedjax_lab.experiment import EXIT_DIVERGED, main, run_fedavg_experiment
from fedjax_lab.experiments_lib.fedpaq import main as fedpaq_main
from fedjax_lab.experiments_lib.sstc import main as sstc_main
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.sweep import main as sweep_main
from fedjax_lab.train import FedAvgConfig

TINY = ["--rounds", "2", "--num-clients", "8", "--clients-per-round", "3", "--eval-every", "2",
        "--model", "logreg", "--progress", "false", "--local-epochs", "1"]

# Every XLA compilation of this process (a refused run must not reach one).
COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, duration, **kw: COMPILES.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None
)


def _refused(argv, capsys):
    """Runs the CLI in-process; returns (exit status, stderr lines, compilations)."""
    before = len(COMPILES)
    code = main(FedAvgConfig, run_fedavg_experiment, argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err, len(COMPILES) - before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--client-lr", "nan"], "argument --client-lr: expected a finite number, got 'nan'"),
        (["--server-lr", "inf"], "argument --server-lr: expected a finite number, got 'inf'"),
        (["--client-momentum", "nan"], "expected a finite number, got 'nan'"),
        (["--client-momentum", "-5"], "--client-momentum must be in [0, 1)"),
        (["--seed", str(10**23)], "--seed must be an integer in [0, 2**32 - 1]"),
        (["--data-dir", "/tmp"], "--dataset digits takes none: drop --data-dir"),
        (["--synthetic-alpha", "1"], "--synthetic-alpha needs --dataset synthetic"),
        (["--dataset", "leaf"], "--dataset leaf reads LEAF's preprocessed JSON: pass --leaf-root"),
        (["--local-epochs", "100000000"], "one round's cohort needs about"),
        (["--chunk-size", "1000000000"], "(1000000000 client slots x"),
        (["--resume", "true", "--overwrite", "true"], "pass one of them"),
        (["--on-divergence", "ignore"], "--on-divergence must be one of"),
        (["--mpi-round-timeout", "0"], "--mpi-round-timeout must be a finite number"),
    ],
    ids=["lr-nan", "server-lr-inf", "momentum-nan", "momentum-neg", "seed", "data-dir",
         "dataset-flag", "leaf-needs-root", "epochs", "chunk", "resume-overwrite", "policy",
         "mpi-timeout"],
)
def test_bad_input_exits_2_with_one_line_before_compiling(flags, message, capsys, tmp_path):
    out = tmp_path / "out"
    try:
        code, err, compiles = _refused([*TINY, "--out", str(out), *flags], capsys)
    except SystemExit as e:  # argparse's own refusals (unparsable values)
        code, err, compiles = e.code, capsys.readouterr().err.splitlines(), 0
        err = [line for line in err if ": error: " in line]  # after argparse's usage lines
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert compiles == 0
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_unusable_out_folder_exits_2(where, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = {"file": blocker, "under-file": blocker / "run", "proc": pathlib.Path("/proc/run")}
    code, err, compiles = _refused([*TINY, "--out", str(out[where])], capsys)
    assert code == 2 and compiles == 0
    assert len(err) == 1 and err[0].startswith(f"error: --out '{out[where]}'"), err
    assert blocker.read_text() == "not a folder"


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(folder).rglob("*")):
        digest.update(str(path).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_existing_results_are_kept_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*TINY, "--out", str(out), "--checkpoint-every", "1"]
    assert main(FedAvgConfig, run_fedavg_experiment, flags) == 0
    before = _digest(out)
    code, err, compiles = _refused([*flags, "--seed", "1"], capsys)
    assert code == 2 and compiles == 0
    assert len(err) == 1 and "already holds the results of a run" in err[0], err
    assert "--resume" in err[0] and "--overwrite" in err[0]
    assert _digest(out) == before  # its checkpoints and metrics are untouched
    assert main(FedAvgConfig, run_fedavg_experiment, [*flags, "--seed", "1",
                                                      "--overwrite", "true"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]


def test_a_folder_in_use_is_refused_and_freed_when_its_owner_dies(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # Another run holding the folder: the lock is the OS's, so it goes when the process dies.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'%d' % os.getpid())\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n",
         str(out / ".fedjax_lab.lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err, _ = _refused([*TINY, "--out", str(out)], capsys)
        assert code == 2
        assert len(err) == 1 and f"is in use by another run (pid {holder.pid})" in err[0], err
        assert sorted(os.listdir(out)) == [".fedjax_lab.lock"]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert main(FedAvgConfig, run_fedavg_experiment, [*TINY, "--out", str(out)]) == 0


DIVERGING = [*TINY, "--model", "mlp", "--client-lr", "1e6"]  # every client's update overflows


def test_diverging_run_stops_with_exit_3_and_says_why(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(FedAvgConfig, run_fedavg_experiment,  # default: stop after 3 such rounds
                [*DIVERGING, "--rounds", "5", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == EXIT_DIVERGED
    history = read_jsonl(str(out / "metrics.jsonl"))
    assert [h["round"] for h in history] == [1, 2, 3]
    for h in history:  # JSON has no NaN: metrics.jsonl writes the string "nan"
        assert h["rejected"] == h["clients"] == 3.0
        assert h["train_loss"] == "nan" and h["update_norm"] == "nan"
        assert math.isnan(float(h["train_loss"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["rounds"] == 3
    assert summary["stop_reason"].startswith("diverged: every client was rejected")
    assert summary["rounds_all_rejected"] == 3 and summary["final_train_loss"] == "nan"
    assert captured.err.count("warning: round 1: all 3 clients were rejected") == 1
    assert "STOPPED EARLY" in captured.out and "final train loss    : nan" in captured.out


def test_warn_policy_finishes_and_counts_the_rounds(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(FedAvgConfig, run_fedavg_experiment,
                [*DIVERGING, "--rounds", "4", "--on-divergence", "warn",
                 "--divergence-patience", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("clients were rejected") == 1  # warned once, not every round
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_all_rejected"] == 4
    assert [h["train_loss"] for h in read_jsonl(str(out / "metrics.jsonl"))] == ["nan"] * 4


OTHER_CLIS = {
    "sweep": (sweep_main, ["--rounds", "1", "--seeds", "1"]),
    "fedpaq": (fedpaq_main, ["--quick"]),
    "sstc": (sstc_main, ["--quick"]),
}


# The flags each CLI has (sweep writes no --json; fedpaq runs a fixed number of local steps).
OTHER_CASES = [(cli, case) for cli in OTHER_CLIS
               for case in ("out-file", "seed", "data-dir", "epochs", "json")
               if (cli, case) not in (("sweep", "json"), ("fedpaq", "epochs"))]


@pytest.mark.parametrize(("cli", "case"), OTHER_CASES, ids=[f"{a}-{b}" for a, b in OTHER_CASES])
def test_other_clis_refuse_bad_input_before_compiling(cli, case, tmp_path, capsys):
    cli_main, base = OTHER_CLIS[cli]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    flags = {
        "out-file": (["--out", str(blocker)], "is a file, not a folder"),
        "seed": (["--seed", str(2**40)], "--seed must be"),
        # fedpaq reads TFDS MNIST/CIFAR-10 from --data-dir: an empty folder holds neither.
        "data-dir": (["--data-dir", str(tmp_path)],
                     "holds no TFDS" if cli == "fedpaq" else "takes none: drop --data-dir"),
        "epochs": (["--local-epochs", "100000000"], "one round's cohort needs about"),
        "json": (["--json", str(blocker / "out.json")], "--json"),
    }
    argv, message = flags[case]
    before = len(COMPILES)
    code = cli_main([*base, "--out", str(tmp_path / "out"), *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert len(COMPILES) == before
