"""experiments/train.py with the DP algorithms of issue 16: the flags build exactly the Python
composition, and bad values or combinations exit 2 before anything is built."""

import jax
import numpy as np
import optax
import pytest

from fedjax_lab import algorithms as A
from fedjax_lab.backends import VmapBackend
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from fedjax_lab.train import TrainConfig
from tests.helpers import assert_refused, persistent_compilation_cache

SEED, NUM_CLIENTS, PER_ROUND, LR, BATCH = 3, 10, 5, 0.1, 20
TINY = ["--rounds", "2", "--num-clients", str(NUM_CLIENTS), "--clients-per-round",
        str(PER_ROUND), "--eval-every", "2", "--model", "logreg", "--no-progress",
        "--packing", "off", "--local-epochs", "1", "--client-lr", str(LR), "--batch-size",
        str(BATCH), "--seed", str(SEED)]
NONDETERMINISTIC = ("round_seconds", "wall_time")
CASES = {
    "dp_fedavg_adaptive": (
        ["--dp-clip-norm", "0.4", "--noise-multiplier", "0.5", "--target-quantile", "0.3",
         "--clip-lr", "0.4", "--clip-count-stddev", "1.5"],
        lambda m: A.dp_fedavg_adaptive(
            m, optax.sgd(LR), batch_size=BATCH, initial_clip_norm=0.4, noise_multiplier=0.5,
            clients_per_round=PER_ROUND, key=jax.random.key(SEED), target_quantile=0.3,
            clip_lr=0.4, clip_count_stddev=1.5)),
    "ldp_fedavg": (
        ["--dp-clip-norm", "0.4", "--noise-multiplier", "0.2", "--ldp-mechanism", "laplace"],
        lambda m: A.ldp_fedavg(m, optax.sgd(LR), batch_size=BATCH, clip_norm=0.4,
                               noise_multiplier=0.2, mechanism="laplace")),
    "dp_ftrl": (
        ["--dp-clip-norm", "0.4", "--noise-multiplier", "0.3", "--server-lr", "0.8",
         "--server-momentum", "0.5"],
        lambda m: A.dp_ftrl(m, optax.sgd(LR), batch_size=BATCH, clip_norm=0.4,
                            noise_multiplier=0.3, clients_per_round=PER_ROUND,
                            key=jax.random.key(SEED), server_lr=0.8, momentum=0.5)),
}


@pytest.fixture(scope="module")
def problem():
    dataset = load_dataset("digits")
    train = federate(dataset, "dirichlet_per_class", NUM_CLIENTS, seed=SEED, alpha=0.5)
    model = get_model("logreg", dataset.input_shape, dataset.num_classes)
    evaluate = make_evaluator(model.apply, dataset.test, num_classes=model.num_classes)
    return train, model, evaluate, model.init(jax.random.key(SEED))


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """The Python run loads the CLI run's executables when the programs are identical (speed
    only; the numbers are compared either way)."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


@pytest.mark.parametrize("algorithm", list(CASES))
def test_flags_call_the_constructor_with_their_values(algorithm, monkeypatch):
    # Each flag reaches its keyword (no compilation: the constructor is recorded, then run).
    from fedjax_lab.algorithms import _registered

    flags, build = CASES[algorithm]
    calls = []
    real = getattr(_registered, algorithm)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_registered, algorithm, spy)
    cfg = TrainConfig.parse([*TINY, "--out", "unused", "--algorithm", algorithm, *flags])
    model = get_model("logreg", (8, 8, 1), 10)
    cfg.make_algorithm(model)
    monkeypatch.setattr(_registered, algorithm, real)
    want = []
    monkeypatch.setattr(A, algorithm, lambda *a, **k: want.append(k))
    build(model)
    (got,) = calls
    (expected,) = want
    got = {k: v for k, v in got.items() if k != "per_example_loss"}
    key = got.pop("key", None)
    # --compressor identity (the default) arrives as the identity Compressor object.
    assert algorithm == "dp_fedavg_adaptive" or got.pop("compressor").bits is not None
    expected_key = expected.pop("key", None)
    assert got == {**expected, "local_epochs": 1}
    if key is not None:
        assert (jax.random.key_data(key) == jax.random.key_data(expected_key)).all()


def test_adaptive_flags_equal_python(problem, tmp_path):
    # End to end (server-state clip norm, the identity compressor standing for raw uploads).
    flags, build = CASES["dp_fedavg_adaptive"]
    out = tmp_path / "run"
    assert main(TrainConfig, run_fedavg_experiment,
                [*TINY, "--out", str(out), "--algorithm", "dp_fedavg_adaptive", *flags]) == 0
    cli = read_jsonl(str(out / "metrics.jsonl"))
    train, model, evaluate, params = problem
    python = run(build(model), VmapBackend(packing=PackingPolicy("off")), train, params,
                 rounds=2, clients_per_round=PER_ROUND, seed=SEED, evaluate=evaluate,
                 eval_every=2, num_classes=model.num_classes).history
    assert len(cli) == len(python) == 2
    for got, want in zip(cli, python, strict=True):
        got = {k: v for k, v in got.items() if k not in NONDETERMINISTIC}
        want = {k: v for k, v in want.items() if k not in NONDETERMINISTIC}
        assert sorted(got) == sorted(want)
        np.testing.assert_allclose([float(got[k]) for k in sorted(got)],
                                   [float(want[k]) for k in sorted(want)], rtol=1e-5, atol=1e-7)
    assert cli[0]["clip_norm"] == pytest.approx(0.4)
    assert cli[1]["clip_norm"] != pytest.approx(0.4)  # the bound moved


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--algorithm", "dp_fedavg_adaptive", "--clip-count-stddev", "2", "--compressor",
          "qsgd"], "--algorithm dp_fedavg_adaptive clips on the client"),
        (["--algorithm", "dp_fedavg_adaptive", "--clip-count-stddev", "2", "--error-feedback"],
         "drop --error-feedback"),
        (["--algorithm", "dp_fedavg_adaptive", "--noise-multiplier", "1.0"],
         "--clip-count-stddev (default --clients-per-round / 20 = 0.25) with --noise-multiplier"),
        (["--algorithm", "dp_fedavg_adaptive", "--target-quantile", "1.5",
          "--clip-count-stddev", "2"], "--target-quantile must be in [0, 1], got 1.5"),
        (["--algorithm", "dp_ftrl", "--server-momentum", "1.0"],
         "--server-momentum must be in [0, 1), got 1.0"),
        (["--algorithm", "dp_ftrl", "--aggregator", "median"],
         "--algorithm dp_ftrl clips and noises its own aggregate"),
        (["--algorithm", "ldp_fedavg", "--ldp-mechanism", "cauchy"], "invalid choice"),
        (["--algorithm", "ldp_fedavg", "--noise-multiplier", "-1"],
         "--noise-multiplier must be a finite number >= 0, got -1"),
        (["--algorithm", "dp_ftrl", "--dp-clip-norm", "0"],
         "--dp-clip-norm must be a finite number > 0, got 0"),
        (["--target-quantile", "0.3"], "--target-quantile needs --algorithm dp_fedavg_adaptive"),
    ],
    ids=["adaptive-compressor", "adaptive-ef", "adaptive-sigma-b", "quantile", "momentum",
         "ftrl-aggregator", "mechanism", "ldp-z", "clip", "quantile-unselected"],
)
def test_bad_input_exits_2(flags, message, capsys, tmp_path):
    assert_refused(main, (TrainConfig, run_fedavg_experiment,
                          [*TINY, "--out", str(tmp_path), *flags]), message, capsys, tmp_path)
