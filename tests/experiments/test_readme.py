"""The README is tested: its commands and its Python block run, shortened by appended flags.

Commands of ``experiments/fedavg.py``, ``experiments/train.py`` and ``experiments/sweep.py``
run (2 rounds, a small population, logistic regression, a 2-point sweep: flags appended after
the README's, so they win); the figure/table scripts, whose every curve compiles its own
program, are checked for flags their ``--help`` does not list; ``make`` targets,
``mpirun`` jobs and the edge backend are not run here (``make`` would recurse into this suite;
the MPI and edge backends have their own tests), and the test fails on any other command so a
new README command cannot go unchecked.
"""

import functools
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
SHORT = ["--rounds", "2", "--num-clients", "8", "--clients-per-round", "4", "--model", "logreg",
         "--local-epochs", "1", "--eval-every", "1", "--no-progress"]
# The sweep's shortening: 2 rounds, 2 learning rates x 1 seed (about 10 s instead of ~40 s).
SWEEP_SHORT = ["--rounds", "2", "--client-lrs", "0.1,0.2", "--seeds", "1", "--num-clients", "8",
               "--clients-per-round", "4", "--model", "logreg", "--local-epochs", "1"]
# FedBuff: 3 server steps of 2 buffered updates, 4 clients in flight, no synchronous baseline
# (tests/experiments/test_fedbuff_cli.py runs both on tiny settings and checks the JSON).
FEDBUFF_SHORT = ["--population", "8", "--concurrency", "4", "--buffer-size", "2",
                 "--server-steps", "3", "--eval-every", "3", "--no-compare-sync"]
# Hierarchical FL: 8 clients under 2 edges, one cloud round of one edge round.
HIERARCHICAL_SHORT = ["--num-clients", "8", "--groups", "2", "--cloud-rounds", "1",
                      "--edge-rounds", "1", "--batch-size", "50"]
# Decentralized: 4 nodes, 2 rounds of 1 local step (the README's topologies, one program).
DECENTRALIZED_SHORT = ["--nodes", "4", "--rounds", "2", "--local-steps", "1", "--eval-every", "1"]
# Robustness grid: one cell beside its clean baseline (digits, sign_flip, mean, 2 rounds);
# tests/experiments/test_robustness.py runs a 2 x 2 x 2 grid and checks its table.
ROBUSTNESS_SHORT = ["--datasets", "digits", "--attacks", "sign_flip", "--defenses", "mean",
                    "--fractions", "0.2", "--rounds", "2", "--num-clients", "10",
                    "--clients-per-round", "5", "--tolerated", "1"]
SHORTENED = {
    "experiments/fedavg.py": SHORT,
    "experiments/train.py": SHORT,
    "experiments/sweep.py": SWEEP_SHORT,
    "experiments/fedbuff.py": FEDBUFF_SHORT,
    "experiments/hierarchical.py": HIERARCHICAL_SHORT,
    "experiments/decentralized.py": DECENTRALIZED_SHORT,
    "experiments/robustness.py": ROBUSTNESS_SHORT,
}
# Each curve/table entry of these compiles its own program: no flag makes them take seconds
# (fedpaq.py --quick: ~70 s, sstc_compression.py with 2 rounds: minutes on 2 shared cores), so
# the README's flags are checked against --help; tests/experiments/test_fedpaq_figure.py,
# test_sstc_compression.py and test_fedprox_synthetic.py (fedprox_synthetic.py --quick: ~30 s)
# run their code on tiny settings. split_learning.py and vertical_fl.py compile a program per
# method / party count: test_split_learning.py and test_vertical_fl.py run one tiny setting
# each and check its exact byte counts.
FLAGS_ONLY = ("experiments/fedpaq.py", "experiments/sstc_compression.py",
              "experiments/fedprox_synthetic.py", "experiments/split_learning.py",
              "experiments/vertical_fl.py")
# The output each run script writes into --out.
OUTPUT = {
    "experiments/fedavg.py": "summary.json",
    "experiments/train.py": "summary.json",
    "experiments/sweep.py": "results.json",
    "experiments/fedbuff.py": "results.json",
    "experiments/decentralized.py": "results.json",
    "experiments/robustness.py": "robustness.csv",
}
# Scripts that write one --json file instead of an --out folder: that file's name.
JSON_OUTPUT = {"experiments/hierarchical.py": "results.json"}


def _blocks(language):
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _commands():
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()  # trailing comments
            if line:
                commands.append(line)
    return commands


def _kind(command):
    words = shlex.split(command)
    if words[0] == "make" or "mpirun" in command or "--backend edge" in command:
        return "not run"
    script = next((w for w in words if w.startswith("experiments/")), None)
    if script in SHORTENED:
        return "run"
    if script in FLAGS_ONLY:
        return "flags"
    raise AssertionError(f"README command not covered by this test: {command}")


COMMANDS = _commands()


def test_every_readme_command_is_covered():
    kinds = [_kind(c) for c in COMMANDS]
    assert kinds.count("run") >= 8  # the train.py section and the fedavg.py examples
    assert {c.split()[0] for c, k in zip(COMMANDS, kinds, strict=True) if k == "not run"} <= {
        "make", "OMPI_ALLOW_RUN_AS_ROOT=1", ".venv/bin/python"}


@pytest.mark.parametrize("command", [c for c in COMMANDS if _kind(c) == "run"])
def test_readme_command_runs(command, tmp_path, monkeypatch, capsys):
    words = shlex.split(command)
    script = next(w for w in words if w.startswith("experiments/"))
    argv = words[words.index(script) + 1:]
    if "--help" not in argv:
        # A later flag wins: shorter, and outputs into tmp_path instead of the repository.
        out = (["--json", str(tmp_path / "out" / JSON_OUTPUT[script])] if script in JSON_OUTPUT
               else ["--out", str(tmp_path / "out")])
        argv += [*SHORTENED[script], *out]
    monkeypatch.chdir(ROOT)  # the README runs from the repository root (preset paths)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    assert e.value.code == 0, capsys.readouterr().err
    if "--help" not in argv:
        assert (tmp_path / "out" / (JSON_OUTPUT.get(script) or OUTPUT[script])).exists()


@functools.cache
def _help(script):
    """``script --help`` (once per script: each start imports jax, ~5 s here)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("command", [c for c in COMMANDS if _kind(c) == "flags"])
def test_readme_flags_of_slow_scripts_exist(command):
    words = shlex.split(command)
    script = next(w for w in words if w.startswith("experiments/"))
    usage = _help(script)
    for flag in (w.split("=")[0] for w in words if w.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", usage), f"{script} has no {flag}"


def test_readme_python_block_runs():
    (block,) = _blocks("python")
    # The one shortening: fewer rounds (asserted, so a README edit cannot silently skip it).
    assert block.count("rounds=100") == 1
    namespace: dict = {}
    exec(compile(block.replace("rounds=100", "rounds=2"), README, "exec"), namespace)
    assert len(namespace["result"].history) == 2
