"""experiments/train.py --attack: flags validated before compiling, and the CLI run equals the
Python composition of the public attack functions."""

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import median, with_aggregator
from fedjax_lab.attacks import (
    attack_success_evaluator,
    backdoor,
    mark_malicious,
    scale,
    select_malicious,
    with_model_poisoning,
)
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from fedjax_lab.train import TrainConfig

SEED, NUM_CLIENTS, PER_ROUND, LR, BATCH = 3, 10, 5, 0.1, 20
TINY = ["--rounds", "2", "--num-clients", str(NUM_CLIENTS), "--clients-per-round",
        str(PER_ROUND), "--eval-every", "2", "--model", "logreg", "--no-progress",
        "--packing", "off", "--local-epochs", "1", "--client-lr", str(LR), "--batch-size",
        str(BATCH), "--seed", str(SEED)]


@pytest.mark.parametrize("flags,message", [
    (["--attack", "scale", "--malicious-fraction", "0.2", "--attack-boost", "5",
      "--backend", "sharded"], "--backend sharded splits the round's clients"),
    (["--attack", "alie", "--malicious-fraction", "0.2", "--chunk-size", "2"],
     "--chunk-size splits the round's clients"),
    (["--attack", "ipm", "--malicious-fraction", "0.2", "--compressor", "qsgd"],
     "--compressor qsgd compresses them"),
    (["--attack", "noise", "--malicious-fraction", "1.0"], "--malicious-fraction must be in "
     "[0, 1), got 1.0"),
    (["--attack", "noise", "--malicious-fraction", "-0.1"], "must be in [0, 1)"),
    (["--attack", "sign_flip"], "--attack sign_flip needs --malicious-fraction > 0"),
    (["--malicious-fraction", "0.2"], "--malicious-fraction needs --attack"),
    (["--attack", "scale", "--malicious-fraction", "0.2"], "--attack scale needs --attack-boost"),
    (["--attack", "noise", "--malicious-fraction", "0.2", "--attack-sigma", "0"],
     "--attack noise: noise: sigma must be a finite number > 0"),
    (["--attack", "label_flip", "--malicious-fraction", "0.2", "--ipm-epsilon", "1"],
     "--ipm-epsilon needs --attack ipm (got --attack label_flip)"),
    (["--attack", "backdoor", "--malicious-fraction", "0.2", "--dataset", "synthetic_iid"],
     "--attack backdoor (--dataset synthetic_iid): the pixel-pattern backdoor needs image "
     "inputs"),
    (["--attack", "backdoor", "--malicious-fraction", "0.2", "--backdoor-target", "10"],
     "backdoor target must be a class in [0, 10)"),
    (["--attack", "poison"], "invalid choice: 'poison'"),
    (["--attack", "label_flip", "--malicious-fraction", "0.01"], "--malicious-fraction 0.01 "
     "of 10 clients rounds to no malicious client"),
], ids=["scale-sharded", "alie-chunk", "ipm-qsgd", "fraction-1", "fraction-negative",
        "no-fraction", "fraction-no-attack", "scale-no-boost", "noise-sigma", "param-unselected",
        "backdoor-not-image", "backdoor-target", "unknown", "zero-malicious"])
def test_bad_attack_flags_exit_2_before_compiling(flags, message, capsys, tmp_path):
    try:
        code = main(TrainConfig, run_fedavg_experiment, [*TINY, "--out", str(tmp_path), *flags])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_model_replacement_backdoor_from_flags_equals_python(tmp_path):
    """--attack backdoor --attack-boost: backdoored data + scaled uploads, under a median."""
    flags = ["--attack", "backdoor", "--malicious-fraction", "0.3", "--attack-boost", "4",
             "--backdoor-target", "2", "--trigger-size", "2", "--aggregator", "median"]
    out = tmp_path / "run"
    assert main(TrainConfig, run_fedavg_experiment, [*TINY, "--out", str(out), *flags]) == 0
    cli = read_jsonl(str(out / "metrics.jsonl"))

    dataset = load_dataset("digits")
    train = federate(dataset, "dirichlet_per_class", NUM_CLIENTS, seed=SEED, alpha=0.5)
    model = get_model("logreg", dataset.input_shape, dataset.num_classes)
    malicious = select_malicious(NUM_CLIENTS, 0.3, SEED)
    train = mark_malicious(backdoor(train, malicious, target=2, size=2), malicious)
    clean = make_evaluator(model.apply, dataset.test, num_classes=model.num_classes)
    success = attack_success_evaluator(model.apply, dataset.test, target=2, size=2,
                                       num_classes=model.num_classes)
    algo = with_model_poisoning(
        with_aggregator(fedavg(model, optax.sgd(LR), batch_size=BATCH), median()), scale(4.0))
    result = run(algo, VmapBackend(packing=PackingPolicy("off")), train,
                 model.init(jax.random.key(SEED)), rounds=2, clients_per_round=PER_ROUND,
                 seed=SEED, evaluate=lambda p: {**clean(p), **success(p)}, eval_every=2,
                 num_classes=model.num_classes)
    assert len(cli) == len(result.history) == 2
    for got, want in zip(cli, result.history, strict=True):
        keys = sorted(set(want) - {"round_seconds", "wall_time"})
        assert sorted(set(got) - {"round_seconds", "wall_time"}) == keys
        np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys],
                                   rtol=1e-5, atol=1e-7)
    assert "attack_success_rate" in cli[-1] and cli[-1]["malicious_clients"] >= 0
