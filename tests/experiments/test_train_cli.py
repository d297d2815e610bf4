"""experiments/train.py: every registered component from flags equals the Python composition.

The Python side below is written against the public constructors with the values the flags
name, independently of the registry, so a registration that drops or renames a hyperparameter,
ignores a flag or builds another component fails here.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from fedjax_lab import algorithms as A
from fedjax_lab import compressors as Z
from fedjax_lab.backends import VmapBackend
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.experiment import build_problem, main, run_fedavg_experiment
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import get_model
from fedjax_lab.registry import AGGREGATORS, ALGORITHMS, COMPRESSORS
from fedjax_lab.runner import run
from fedjax_lab.systems import Availability
from fedjax_lab.train import TrainConfig
from tests.helpers import assert_refused, persistent_compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED, NUM_CLIENTS, PER_ROUND, LR, BATCH = 3, 10, 5, 0.1, 20
# Padded rounds (--packing off, and the same in Python): one compiled round program per run.
TINY = ["--rounds", "2", "--num-clients", str(NUM_CLIENTS), "--clients-per-round",
        str(PER_ROUND), "--eval-every", "2", "--model", "logreg", "--no-progress",
        "--packing", "off",
        "--local-epochs", "1", "--client-lr", str(LR), "--batch-size", str(BATCH),
        "--seed", str(SEED)]
# Timing fields differ run to run; everything else must match.
NONDETERMINISTIC = ("round_seconds", "wall_time")

# The algorithm flags of each case (non-default values, so that a dropped flag shows) and the
# same algorithm built in Python from the public constructors.
ALGORITHM_CASES = {
    "fedavg": ([], lambda m, c: A.fedavg(m, optax.sgd(LR), batch_size=BATCH, compressor=c)),
    "fedprox": (["--mu", "0.3"], lambda m, c: A.fedprox(
        m, optax.sgd(LR), mu=0.3, batch_size=BATCH, compressor=c)),
    "fedopt": (["--server-optimizer", "momentum", "--server-lr", "0.5"], lambda m, c: A.fedopt(
        m, optax.sgd(LR), optax.sgd(0.5, momentum=0.9), batch_size=BATCH, compressor=c)),
    "fedadam": (["--server-lr", "0.03", "--b1", "0.8", "--tau", "0.01"], lambda m, c: A.fedadam(
        m, optax.sgd(LR), server_lr=0.03, b1=0.8, tau=0.01, batch_size=BATCH, compressor=c)),
    "fedyogi": (["--server-lr", "0.03", "--b2", "0.9"], lambda m, c: A.fedyogi(
        m, optax.sgd(LR), server_lr=0.03, b2=0.9, batch_size=BATCH, compressor=c)),
    "fedadagrad": (["--server-lr", "0.03"], lambda m, c: A.fedadagrad(
        m, optax.sgd(LR), server_lr=0.03, batch_size=BATCH, compressor=c)),
    "fedavgm": (["--server-momentum", "0.5"], lambda m, c: A.fedavgm(
        m, optax.sgd(LR), momentum=0.5, batch_size=BATCH, compressor=c)),
    "scaffold": (["--server-lr", "0.7"], lambda m, c: A.scaffold(
        m, LR, num_clients=NUM_CLIENTS, server_lr=0.7, batch_size=BATCH, compressor=c)),
    "fednova": ([], lambda m, c: A.fednova(m, LR, batch_size=BATCH, compressor=c)),
    "fedpaq": (["--local-steps", "3"], lambda m, c: A.fedpaq(
        m, optax.sgd(LR), num_steps=3, batch_size=BATCH, compressor=c)),
    "dp_fedavg": (["--dp-clip-norm", "0.5", "--noise-multiplier", "0.3"], lambda m, c: A.dp_fedavg(
        m, optax.sgd(LR), clip_norm=0.5, noise_multiplier=0.3, clients_per_round=PER_ROUND,
        key=jax.random.key(SEED), batch_size=BATCH, compressor=c)),
}
# identity, one biased and one unbiased compressor.
COMPRESSOR_CASES = {
    "identity": ([], Z.identity),
    "top_k": (["--sparsity", "0.2"], lambda: Z.top_k(0.2)),
    "qsgd": (["--num-levels", "2"], lambda: Z.qsgd(2)),
}
AGGREGATOR_CASES = {
    "mean": ([], None),
    "median": ([], lambda: (A.median(), ())),
    "trimmed_mean": (["--trim-fraction", "0.2"], lambda: (A.trimmed_mean(0.2), ())),
    "krum": (["--byzantine-clients", "1"], lambda: (A.krum(1), ())),
    "multi_krum": (["--byzantine-clients", "1", "--krum-keep", "3"],
                   lambda: (A.multi_krum(1, 3), ())),
    # Bulyan needs 4f + 3 slots; the cases run 5 per round, so f = 0 (every update selected).
    "bulyan": (["--byzantine-clients", "0"], lambda: (A.bulyan(0), ())),
    "geometric_median": (["--geomed-iterations", "2", "--geomed-nu", "1e-5"],
                         lambda: (A.geometric_median(2, 1e-5), ())),
    "centered_clipping": (["--cclip-tau", "0.05", "--cclip-iterations", "2"],
                          lambda: (A.centered_clipping(0.05, 2), ())),
}


# Registered algorithms whose CLI-equals-Python cases live in their own file
# (tests/experiments/test_train_dp_cli.py: the DP algorithms of issue 16).
CASES_ELSEWHERE = {"dp_fedavg_adaptive", "ldp_fedavg", "dp_ftrl"}


def test_cases_cover_every_registered_component():
    assert set(ALGORITHM_CASES) | CASES_ELSEWHERE == set(ALGORITHMS.names())
    assert set(AGGREGATOR_CASES) == set(AGGREGATORS.names())
    assert {"biased", "unbiased"} <= {t for c in COMPRESSOR_CASES for t in COMPRESSORS.get(c).tags}
    # The covering pairs: every algorithm with a compressor that changes the numbers, every
    # compressor at least once (see COVERING_PAIRS).
    assert {a for a, c in COVERING_PAIRS if c != "identity"} == set(ALGORITHM_CASES)
    assert {c for _, c in COVERING_PAIRS} == set(COMPRESSOR_CASES)
    assert all(("fedavg", c) in COVERING_PAIRS for c in COMPRESSOR_CASES)


# Public constructors returning an Algorithm that are not --algorithm choices, and how the CLI
# reaches them instead.
REACHED_OTHERWISE = {
    "with_aggregator": "--aggregator/--clip-norm",
    "with_weak_dp": "--weak-dp-std",
    "with_foolsgold": "experiments/robustness.py (a wrapper keeping client histories, not an "
                      "--aggregator)",
    "qsgd_baseline": "--algorithm fedpaq --local-steps 1 --compressor qsgd",
}


def test_every_public_algorithm_is_registered_or_refused_with_a_reason():
    # An algorithm added to the library later must be a CLI choice or say why it is not.
    import inspect

    from fedjax_lab.core.types import Algorithm

    public = {name for name in A.__all__ if callable(getattr(A, name))
              and inspect.signature(getattr(A, name)).return_annotation in (Algorithm,
                                                                            "Algorithm")}
    assert public - set(REACHED_OTHERWISE) == set(ALGORITHMS.names()) | set(ALGORITHMS.refused())
    assert "fedbn" in ALGORITHMS.refused()


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the Python run of a case loads the CLI run's
    executables when their programs are identical, instead of compiling them again (speed only;
    the numbers are compared below either way). Restored afterwards."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


@pytest.fixture(scope="module")
def problem():
    dataset = load_dataset("digits")
    train = federate(dataset, "dirichlet_per_class", NUM_CLIENTS, seed=SEED, alpha=0.5)
    model = get_model("logreg", dataset.input_shape, dataset.num_classes)
    evaluate = make_evaluator(model.apply, dataset.test, num_classes=model.num_classes)
    return train, model, evaluate, model.init(jax.random.key(SEED))


def _python_history(problem, algorithm):
    train, model, evaluate, params = problem
    result = run(algorithm, VmapBackend(packing=PackingPolicy("off")), train, params, rounds=2,
                 clients_per_round=PER_ROUND, seed=SEED, evaluate=evaluate, eval_every=2,
                 num_classes=model.num_classes)
    return result.history


def _cli_history(tmp_path, flags):
    out = tmp_path / "run"
    assert main(TrainConfig, run_fedavg_experiment, [*TINY, "--out", str(out), *flags]) == 0
    return read_jsonl(str(out / "metrics.jsonl"))


def _assert_same(cli, python):
    assert len(cli) == len(python) == 2
    for got, want in zip(cli, python, strict=True):
        got = {k: v for k, v in got.items() if k not in NONDETERMINISTIC}
        want = {k: v for k, v in want.items() if k not in NONDETERMINISTIC}
        assert sorted(got) == sorted(want)
        np.testing.assert_allclose([float(got[k]) for k in sorted(got)],
                                   [float(want[k]) for k in sorted(want)], rtol=1e-5, atol=1e-7)


# A covering design, not the full algorithm x compressor product: train.py builds the compressor
# from its own flags alone (TrainConfig.build_compressor) and hands the object to the algorithm's
# builder, which only forwards it (algorithms/_registered.py); the Python side composes the same
# public constructors, so an interaction inside the library would show identically on both sides.
# The wiring bugs this test can catch are per component: an algorithm builder that drops or
# replaces ``compressor`` (shows when that algorithm runs with a compressor that changes the
# numbers, so every algorithm is paired with top_k or qsgd) and a compressor whose flags are
# ignored (shows with any algorithm: fedavg runs every compressor, the plain reference). Each
# non-identity compressor also reaches both stateless and stateful algorithms: top_k with
# SCAFFOLD (client control variates) and FedAdam/FedAvgM (server optimizer state), qsgd with
# DP-FedAvg (server noise key), FedPAQ (its paper's pairing) and FedYogi/FedOpt.
# test_cases_cover_every_registered_component checks the design stays covering.
COVERING_PAIRS = [
    ("fedavg", "identity"), ("fedavg", "top_k"), ("fedavg", "qsgd"),
    ("fedprox", "qsgd"), ("fedopt", "qsgd"), ("fedadam", "top_k"), ("fedyogi", "qsgd"),
    ("fedadagrad", "top_k"), ("fedavgm", "top_k"), ("scaffold", "top_k"),
    ("fednova", "top_k"), ("fedpaq", "qsgd"), ("dp_fedavg", "qsgd"),
]


@pytest.mark.parametrize(("algorithm", "compressor"), COVERING_PAIRS,
                         ids=[f"{a}-{c}" for a, c in COVERING_PAIRS])
def test_every_algorithm_and_compressor_equals_python(algorithm, compressor, problem, tmp_path):
    algo_flags, build = ALGORITHM_CASES[algorithm]
    comp_flags, make_compressor = COMPRESSOR_CASES[compressor]
    cli = _cli_history(tmp_path, ["--algorithm", algorithm, *algo_flags,
                                  "--compressor", compressor, *comp_flags])
    _assert_same(cli, _python_history(problem, build(problem[1], make_compressor())))


@pytest.mark.parametrize("aggregator", list(AGGREGATOR_CASES))
def test_every_aggregator_equals_python(aggregator, problem, tmp_path):
    flags, make = AGGREGATOR_CASES[aggregator]
    cli = _cli_history(tmp_path, ["--aggregator", aggregator, *flags, "--clip-norm", "0.5"])
    base = A.fedavg(problem[1], optax.sgd(LR), batch_size=BATCH, compressor=Z.identity())
    rule = A.mean() if make is None else make()[0]
    python = A.with_aggregator(base, rule, transforms=(A.clip_norm(0.5),))
    _assert_same(cli, _python_history(problem, python))


def test_norm_clipping_with_weak_dp_equals_python(problem, tmp_path):
    # Sun et al. 2019's defense: --clip-norm M then --weak-dp-std sigma, noise keyed by --seed.
    cli = _cli_history(tmp_path, ["--clip-norm", "0.5", "--weak-dp-std", "0.01"])
    base = A.fedavg(problem[1], optax.sgd(LR), batch_size=BATCH, compressor=Z.identity())
    clipped = A.with_aggregator(base, A.mean(), transforms=(A.clip_norm(0.5),))
    python = A.with_weak_dp(clipped, 0.01, jax.random.key(SEED))
    _assert_same(cli, _python_history(problem, python))
    assert cli[-1]["weak_dp_std"] == pytest.approx(0.01)


def test_error_feedback_wraps_the_compressor(problem, tmp_path):
    cli = _cli_history(tmp_path, ["--compressor", "top_k", "--sparsity", "0.2",
                                  "--error-feedback"])
    python = A.fedavg(problem[1], optax.sgd(LR), batch_size=BATCH,
                      compressor=Z.with_error_feedback(Z.top_k(0.2)))
    _assert_same(cli, _python_history(problem, python))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--algorithm", "fedprx"], "invalid choice: 'fedprx' (choose from 'fedavg', 'fedprox'"),
        (["--algorithm", "fedbn"], "--algorithm fedbn cannot run from the CLI: FedBN needs a "
         "model with BatchNorm state"),
        (["--compressor", "zip"], "invalid choice: 'zip' (choose from 'identity', 'qsgd'"),
        (["--aggregator", "mode"], "invalid choice: 'mode' (choose from 'mean', 'median'"),
        (["--sparsity", "0.1"], "--sparsity needs --compressor rand_k|top_k|stc|sstc"),
        (["--mu", "0.1", "--algorithm", "fedavg"], "--mu needs --algorithm fedprox"),
        (["--trim-fraction", "0.1"], "--trim-fraction needs --aggregator trimmed_mean"),
        (["--aggregator", "median", "--backend", "mpi"],
         "--aggregator median needs every client's update in one place; --backend mpi"),
        (["--aggregator", "krum", "--chunk-size", "2"], "--chunk-size adds partial sums"),
        (["--algorithm", "dp_fedavg", "--clip-norm", "1"], "--algorithm dp_fedavg clips"),
        (["--algorithm", "fedpaq"], "--algorithm fedpaq runs a fixed number of local steps"),
        (["--algorithm", "scaffold", "--client-momentum", "0.9"], "--client-momentum must be 0"),
        (["--compressor", "top_k", "--sparsity", "1.5"], "--compressor top_k: top_k"),
        (["--dropout", "0.2", "--backend", "edge"], "--backend edge splits them"),
        (["--comp-shift", "2"], "they need --comm-comp-ratio"),
        (["--client_lr", "0.1"], "unrecognized arguments: --client_lr (did you mean --client-lr?)"),
        (["--rou", "3"], "unrecognized arguments: --rou"),
        (["--no-progress", "false"], "--no-progress takes no value"),
        (["--client-eval", "natural"], "--client-eval natural needs a dataset whose test "
         "examples belong to natural clients (--dataset synthetic|synthetic_iid|leaf|"
         "fed_emnist|fed_shakespeare), got --dataset digits"),
        (["--client-eval", "natural", "--dataset", "synthetic_iid"],
         "it needs --partition natural (got --partition dirichlet_per_class)"),
        (["--client-eval", "natural", "--dataset", "synthetic_iid", "--partition", "natural",
          "--client-eval-fraction", "0.2"], "--client-eval-fraction needs --client-eval split "
         "(got --client-eval natural)"),
        (["--client-eval", "off", "--client-eval-fraction", "0.2"],
         "--client-eval-fraction needs --client-eval split (got --client-eval off)"),
        (["--client-eval", "split"], "--client-eval split holds out a fraction of every "
         "client's examples: pass --client-eval-fraction"),
        (["--client-eval", "all"], "--client-eval must be one of off, split, natural"),
        (["--straggler-sampling", "exact"], "--straggler-sampling exact shape(s) the "
         "stragglers: they need --straggler-fraction > 0"),
        (["--straggler-fraction", "0.5", "--straggler-work", "epochs", "--local-steps", "3"],
         "--straggler-work epochs counts whole local epochs; --local-steps fixes steps"),
        (["--straggler-work", "rounds"], "invalid choice: 'rounds' (choose from 'steps', "
         "'epochs')"),
        (["--aggregator", "bulyan"], "--aggregator bulyan (bulyan1) needs at least 7 client "
         "slots per round: raise --clients-per-round (got 5)"),
        (["--aggregator", "geometric_median", "--geomed-nu", "0"],
         "--aggregator geometric_median: geometric_median: nu must be a finite number > 0"),
        (["--aggregator", "geometric_median", "--geomed-iterations", "0"],
         "geometric_median: iterations must be an integer >= 1, got 0"),
        (["--weak-dp-std", "-1"], "--weak-dp-std must be a finite number > 0 (or none), got -1"),
        (["--aggregator", "centered_clipping", "--cclip-tau", "-1"],
         "--aggregator centered_clipping: centered_clipping: tau must be a finite number > 0"),
    ],
    ids=["algorithm", "fedbn-refused", "compressor", "aggregator", "sparsity-unselected",
         "mu-unselected",
         "trim-unselected", "median-mpi", "krum-chunk", "dp-clip", "fedpaq-steps",
         "scaffold-momentum", "bad-sparsity", "systems-edge", "time-model", "underscore",
         "abbreviation", "no-x-value", "natural-client-eval-digits",
         "natural-client-eval-partitioned", "natural-client-eval-fraction",
         "client-eval-off-fraction", "client-eval-split-no-fraction", "client-eval-unknown",
         "straggler-sampling-alone", "straggler-epochs-steps", "straggler-work-unknown",
         "bulyan-cohort", "geomed-nu", "geomed-iterations", "weak-dp-std", "cclip-tau"],
)
def test_bad_input_exits_2_naming_the_flags(flags, message, capsys, tmp_path):
    assert_refused(main, (TrainConfig, run_fedavg_experiment,
                          [*TINY, "--out", str(tmp_path), *flags]), message, capsys, tmp_path)


def test_straggler_flags_build_the_fedprox_code_availability():
    """--straggler-sampling exact --straggler-work epochs is the availability that
    experiments/fedprox_synthetic.py runs (the FedProx code's stragglers)."""
    cfg = TrainConfig.parse([*TINY, "--straggler-fraction", "0.5", "--straggler-sampling",
                             "exact", "--straggler-work", "epochs", "--local-epochs", "4"])
    cfg.validate()
    assert cfg.systems(10)["availability"] == Availability(
        0.0, 0.5, "partial", straggler_sampling="exact", straggler_epochs=4)
    default = TrainConfig.parse([*TINY, "--straggler-fraction", "0.5"])
    assert default.systems(10)["availability"] == Availability(0.0, 0.5, "partial")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_config_file_overrides_and_written_config_reproduces_the_run(tmp_path):
    config = _write(tmp_path / "c.yaml", "algorithm: fedprox\nmu: 0.2\nrounds: 5\n"
                    "client-lr: 0.05\nprogress: false\n")
    cfg = TrainConfig.parse(["--config", config, "--rounds", "2", "--mu", "0.4"])
    assert (cfg.algorithm, cfg.rounds, cfg.client_lr, cfg.progress) == ("fedprox", 2, 0.05, False)
    assert cfg.hparams == {"mu": 0.4}  # the command line overrides the file
    first = tmp_path / "first"
    argv = [*TINY, "--algorithm", "fedprox", "--mu", "0.4", "--compressor", "qsgd"]
    assert main(TrainConfig, run_fedavg_experiment, [*argv, "--out", str(first)]) == 0
    second = tmp_path / "second"
    code = main(TrainConfig, run_fedavg_experiment,
                ["--config", str(first / "config.yaml"), "--out", str(second)])
    assert code == 0
    strip = [{k: v for k, v in r.items() if k not in NONDETERMINISTIC}
             for r in read_jsonl(str(first / "metrics.jsonl"))]
    assert strip == [{k: v for k, v in r.items() if k not in NONDETERMINISTIC}
                     for r in read_jsonl(str(second / "metrics.jsonl"))]
    summary = json.loads((second / "summary.json").read_text())
    assert summary["config"]["mu"] == 0.4 and summary["config"]["num_levels"] == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds: [1, 2\n", "is not valid YAML"),
        ("roundz: 3\n", "unknown key 'roundz' (did you mean rounds?)"),
        ("client_lr: 0.1\n", "unknown key 'client_lr' (did you mean client-lr?)"),
        ("- rounds\n", "must be a mapping of flag names to values"),
        ("sparsity: 0.1\n", "--sparsity needs --compressor"),
    ],
    ids=["malformed", "unknown-key", "underscore-key", "not-a-mapping", "unselected"],
)
def test_bad_config_file_exits_2(text, message, tmp_path, capsys):
    config = _write(tmp_path / "c.yaml", text)
    assert_refused(main, (TrainConfig, run_fedavg_experiment,
                          ["--config", config, "--out", str(tmp_path / "o")]),
                   message, capsys, tmp_path / "o")


def test_help_groups_every_component_with_choices_and_defaults():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"),
                           "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for registry in (ALGORITHMS, COMPRESSORS, AGGREGATORS):
        assert f" {registry.kind}: {registry.description}" in text  # its own group
        for component in registry:
            assert f"{component.name}: {component.description}" in text
    assert "--sparsity SPARSITY" in text and "[--compressor rand_k|top_k|stc|sstc; default 0.01]" \
        in text
    assert "--error-feedback [true|false], --no-error-feedback" in text


# train.py's presets; robustness_grid.yaml is experiments/robustness.py's (tested there).
PRESETS = sorted(p for p in os.listdir(os.path.join(ROOT, "experiments", "configs"))
                 if p != "robustness_grid.yaml")
# Presets that read no downloaded data run here (2 rounds); the TFDS ones are parsed only.
OFFLINE = ("fedavg_digits.yaml", "fedpaq_digits.yaml", "fedprox_synthetic_1_1.yaml")


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_parse_and_the_offline_ones_run(preset, tmp_path):
    path = os.path.join(ROOT, "experiments", "configs", preset)
    # The h5 presets refuse to parse without --data-dir (tests/experiments/test_fedml_presets.py
    # runs them on tiny files).
    data_dir = ["--data-dir", str(tmp_path)] if preset.startswith("fedml_") else []
    cfg = TrainConfig.parse(["--config", path, *data_dir])
    assert cfg.rounds >= 100  # a real benchmark setting, not a smoke test
    if preset not in OFFLINE:
        return
    out = tmp_path / "run"
    code = main(TrainConfig, run_fedavg_experiment,
                ["--config", path, "--rounds", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["dataset"] == cfg.dataset and summary["rounds"] == 2


def test_synthetic_iid_with_any_client_count_and_natural_client_evaluation(tmp_path):
    """Any --num-clients; --client-eval natural evaluates each device on its own test examples
    (a numpy loop over the devices here) and trains on every train example."""
    out = tmp_path / "run"
    argv = [*TINY, "--dataset", "synthetic_iid", "--partition", "natural", "--num-clients", "7",
            "--client-eval", "natural", "--eval-every", "1", "--out", str(out)]
    assert main(TrainConfig, run_fedavg_experiment, argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_train_clients"] == 7 and summary["final_clients_evaluated"] == 7
    assert summary["config"]["client_eval"] == "natural"
    records = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["clients_evaluated"] for r in records] == [7, 7]
    assert summary["final_client_accuracy_mean"] == records[-1]["client_accuracy_mean"]
    dataset, train, model, evaluate, params = build_problem(TrainConfig.parse(argv))
    assert train.num_examples == len(dataset.train["y"])  # nothing held out of training
    accuracies = []
    for k in range(7):
        mine = dataset.test_client_ids == k
        logits = np.asarray(model.apply(params, dataset.test["x"][mine]))
        accuracies.append(np.mean(np.argmax(logits, 1) == dataset.test["y"][mine]))
    got = evaluate(params)
    np.testing.assert_allclose(got["client_accuracy_mean"], np.mean(accuracies), rtol=1e-6)
    np.testing.assert_allclose(got["client_accuracy_min"], np.min(accuracies), rtol=1e-6)
    assert summary["initial_evaluation"]["client_accuracy_mean"] == got["client_accuracy_mean"]


def test_csv_tensorboard_and_plots_hold_the_jsonl_numbers(tmp_path):
    import csv

    from fedjax_lab import plot
    from fedjax_lab.io.writers import read_tensorboard

    runs = []
    for name, flags in (("a", ["--compressor", "qsgd", "--comm-comp-ratio", "10"]),
                        ("b", ["--algorithm", "fedprox"])):
        out = tmp_path / name
        argv = [*TINY, "--eval-every", "1", "--out", str(out), *flags]
        assert main(TrainConfig, run_fedavg_experiment, argv) == 0
        runs.append(str(out))
    out = tmp_path / "a"
    jsonl = read_jsonl(str(out / "metrics.jsonl"))
    assert [h["round"] for h in jsonl] == [1, 2]  # the trained rounds (what checkpoints hold)
    # Round 0: the initial model (the seed's init), evaluated before any training.
    initial = json.loads((out / "summary.json").read_text())["initial_evaluation"]
    cfg = TrainConfig.parse([*TINY, "--eval-every", "1", "--out", str(tmp_path / "unused"),
                             "--compressor", "qsgd", "--comm-comp-ratio", "10"])
    _, _, _, evaluate, params = build_problem(cfg)
    assert initial == {"round": 0, **evaluate(params)}
    assert initial["test_accuracy"] != jsonl[-1]["test_accuracy"]  # training moved the model
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    scalars = read_tensorboard(str(out))
    assert scalars["test_accuracy"][0] == (0, pytest.approx(initial["test_accuracy"]))
    for row, record in zip(rows, [initial, *jsonl], strict=True):
        assert set(row) == {k for r in jsonl for k in r}  # one column per metric
        for key, value in record.items():
            assert float(row[key]) == float(value)  # repr() round-trips floats exactly
            if key != "round":
                step_values = dict(scalars[key])
                np.testing.assert_allclose(step_values[record["round"]], float(value),
                                           rtol=1e-6)  # TensorBoard stores float32
    assert {"sim_time", "test_accuracy", "train_loss", "cum_uplink_bits"} <= set(scalars)
    assert (out / "curves.png").stat().st_size > 10_000
    png = tmp_path / "both.png"
    assert plot.main([*runs, "--out", str(png)]) == 0 and png.stat().st_size > 10_000
    assert plot.load_run(str(out))[1] == [initial, *jsonl]  # the overlay plots round 0 too
    names, shared = plot.labels([plot.load_run(r)[0::2] for r in runs])
    assert names == ["fedavg, qsgd", "fedprox, identity"]
    assert shared == "digits, dirichlet_per_class, α=0.5"
    assert plot.main([str(tmp_path / "missing"), "--out", str(png)]) == 2


def test_default_run_folders_never_overwrite_and_latest_points_at_the_newest(tmp_path,
                                                                              monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    argv = [*TINY, "--algorithm", "fedprox"]
    assert main(TrainConfig, run_fedavg_experiment, argv) == 0
    assert main(TrainConfig, run_fedavg_experiment, argv) == 0  # same config: a new folder
    folders = sorted(p for p in (tmp_path / "runs" / "fedprox").iterdir() if p.name != "latest")
    assert len(folders) == 2
    digest = TrainConfig.parse(argv).config_hash()
    assert all(digest in p.name for p in folders)
    latest = (tmp_path / "runs" / "fedprox" / "latest").resolve()
    assert latest in [p.resolve() for p in folders] and (latest / "summary.json").exists()
    written = yaml.safe_load((latest / "config.yaml").read_text())
    assert written["out"] is None  # re-running the file names a new folder, same hash
    other = TrainConfig.parse([*argv, "--mu", "0.5"]).config_hash()
    assert other != digest
    with pytest.raises(ValueError, match="--backend mpi: pass --out"):
        TrainConfig.parse([*argv, "--backend", "mpi"])
    with pytest.raises(ValueError, match="--resume continues the run in --out"):
        TrainConfig.parse([*argv, "--resume"])
    resumed = TrainConfig.parse([*argv, "--resume", "--out", "runs/fedprox/latest"])
    assert resumed.out == "runs/fedprox/latest" and resumed.resume


def test_federated_evaluation_reports_the_client_distribution(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--client-eval-fraction", "0.25", "--eval-every", "1", "--out", str(out)]
    assert main(TrainConfig, run_fedavg_experiment, argv) == 0
    records = read_jsonl(str(out / "metrics.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    for record in records:  # every evaluated round
        assert record["client_accuracy_min"] <= record["client_accuracy_p10"] \
            <= record["client_accuracy_mean"] <= 1.0
        assert record["clients_evaluated"] == NUM_CLIENTS
    for key in ("mean", "p10", "min"):
        assert summary[f"final_client_accuracy_{key}"] == records[-1][f"client_accuracy_{key}"]


# Edge client processes with a round timeout: run alone.
@pytest.mark.serial
def test_edge_backend_carries_the_selected_compressor(problem, tmp_path):
    """The edge server and its client processes get the compressor the algorithm encodes
    with (its wire codec); the run equals the vmap one."""
    flags = ["--compressor", "qsgd", "--num-levels", "2", "--error-feedback"]
    edge = tmp_path / "edge"
    argv = [*TINY, *flags, "--backend", "edge", "--edge-clients", "2", "--out", str(edge)]
    assert main(TrainConfig, run_fedavg_experiment, argv) == 0
    python = A.fedavg(problem[1], optax.sgd(LR), batch_size=BATCH,
                      compressor=Z.with_error_feedback(Z.qsgd(2)))
    want = _python_history(problem, python)
    got = read_jsonl(str(edge / "metrics.jsonl"))
    for key in ("train_loss", "test_accuracy", "upload_bits"):
        np.testing.assert_allclose([float(r[key]) for r in got if key in r],
                                   [float(r[key]) for r in want if key in r], rtol=1e-5)
