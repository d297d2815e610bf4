"""Split learning vs SplitFed vs FedAvg on digits: test accuracy and bytes per round.

Vanilla split learning (Gupta & Raskar 2018, relay of the client part), SplitFed (Thapa et al.
2022, SFLV1 with one synchronous server step per local step: see
:func:`fedjax_lab.topologies.splitfed`) and FedAvg (McMahan et al. 2017) train the same model
(``mlp`` or ``cnn``, same initial params, cut at ``--cut`` for the two split methods) on the
same client population (scikit-learn's 8x8 digits, ``--partition`` over ``--num-clients``,
every client in every round), with the same local SGD (``--local-epochs`` passes of batches of
``--batch-size``, step ``--lr``). Each round records the test accuracy of the whole model and
the bytes exchanged: cut-layer activations and their gradients (split methods), client-part
weights (relay, or SplitFed's FedAvg of the client parts) and full model up/downloads
(FedAvg: ``2 x clients x params x 4``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import optax

from fedjax_lab.algorithms import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.cli import StrictParser
from fedjax_lab.data.datasets import digits, federate
from fedjax_lab.experiment import MAX_SEED
from fedjax_lab.experiments_lib.common import config_parser, parse_config, validated_run
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.io.writers import write_json
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from fedjax_lab.topologies import (
    builtin_layers,
    init_state,
    split_model,
    splitfed,
    vanilla_split_learning,
)
from fedjax_lab.topologies.split import tree_bytes

METHODS = ("splitfed", "vanilla", "fedavg")
MODELS = ("mlp", "cnn")
PARTITIONS = ("iid", "dirichlet_label_mix")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated positive ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag} must be comma-separated positive ints, got {text!r}")
    return values


@dataclass
class SplitLearningConfig:
    """Flags of ``experiments/split_learning.py`` (the defaults are the README's run)."""

    methods: str = "splitfed,vanilla,fedavg"
    model: str = "mlp"
    hidden: str = "64,32"
    cut: str = "dense_0"
    num_clients: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    seed: int = 0
    out: str = "runs/split_learning"

    def method_list(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods.split(",") if m)

    def layers(self) -> Any:
        kwargs = {"hidden": _ints(self.hidden, "--hidden")} if self.model == "mlp" else {}
        return builtin_layers(self.model, (8, 8, 1), 10, **kwargs)

    def validate(self) -> None:
        """Raises ValueError naming the bad flag, before anything is built or compiled."""
        methods = self.method_list()
        if not methods or any(m not in METHODS for m in methods) or \
                len(set(methods)) != len(methods):
            raise ValueError(f"--methods must be distinct names of {METHODS}, got "
                             f"{self.methods!r}")
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {MODELS} (sequential models that can be "
                             f"cut), got {self.model!r}")
        names = [layer.name for layer in self.layers()][:-1]
        if self.cut not in names:
            raise ValueError(f"--cut {self.cut!r} is not a cut layer of --model {self.model}; "
                             f"valid: {names}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"--partition must be one of {PARTITIONS}, got {self.partition!r}")
        for name in ("num_clients", "rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_clients > 100:
            raise ValueError("--num-clients must be <= 100 (digits has 1,437 training examples)")
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"--lr must be a finite float > 0, got {self.lr}")
        if not 0.0 < self.alpha < math.inf:
            raise ValueError(f"--alpha must be a finite float > 0, got {self.alpha}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")


def run_experiment(cfg: SplitLearningConfig) -> dict[str, Any]:
    """Trains every method of ``cfg``; writes ``results.json`` into ``cfg.out``; returns it."""
    cfg.validate()
    start = time.perf_counter()
    with RunFolder(cfg.out, overwrite=True, results=()):
        dataset = digits()
        data = federate(dataset, cfg.partition, cfg.num_clients, seed=cfg.seed, alpha=cfg.alpha)
        split = split_model(cfg.layers(), dataset.input_shape, cut=cfg.cut)
        kwargs = {"hidden": _ints(cfg.hidden, "--hidden")} if cfg.model == "mlp" else {}
        model = get_model(cfg.model, dataset.input_shape, dataset.num_classes, **kwargs)
        params = model.init(jax.random.key(cfg.seed))
        evaluate = make_evaluator(model.apply, dataset.test, num_classes=dataset.num_classes)
        opt = optax.sgd(cfg.lr)
        results: dict[str, Any] = {
            "config": dataclasses.asdict(cfg), "num_params": tree_bytes(params) // 4,
            "client_params": tree_bytes(split.split_params(params)[0]) // 4,
            "cut_size": split.cut_size, "train_examples": data.num_examples,
            "initial_test_accuracy": evaluate(params)["test_accuracy"], "methods": {},
        }
        for method in cfg.method_list():
            t0 = time.perf_counter()
            if method == "fedavg":
                alg = fedavg(model, opt, batch_size=cfg.batch_size,
                             local_epochs=cfg.local_epochs)
                result = run(alg, VmapBackend("vmap"), data, params, rounds=cfg.rounds,
                             clients_per_round=cfg.num_clients, seed=cfg.seed,
                             evaluate=evaluate, eval_every=1)
                accuracy = [rec["test_accuracy"] for rec in result.history]
                loss = [rec["train_loss"] for rec in result.history]
                model_bytes = 2 * cfg.num_clients * tree_bytes(params)
                per_round = {"activation_bytes": 0, "gradient_bytes": 0,
                             "model_bytes": model_bytes, "total_bytes": model_bytes}
            else:
                make = splitfed if method == "splitfed" else vanilla_split_learning
                trainer = make(split, opt, data, batch_size=cfg.batch_size,
                               local_epochs=cfg.local_epochs, seed=cfg.seed)
                state = init_state(split, params, opt)
                accuracy, loss = [], []
                for r in range(cfg.rounds):
                    state, metrics = trainer.run_round(state, r)
                    whole = split.merge_params(state.client_params, state.server_params)
                    accuracy.append(evaluate(whole)["test_accuracy"])
                    loss.append(metrics["train_loss"])
                per_round = {k: v for k, v in metrics.items() if k.endswith("_bytes")}
            results["methods"][method] = {
                "test_accuracy": accuracy, "train_loss": loss,
                "final_test_accuracy": accuracy[-1], "bytes_per_round": per_round,
                "wall_seconds": time.perf_counter() - t0,
            }
        results["wall_seconds"] = time.perf_counter() - start
        results["jax_backend"] = jax.default_backend()
        write_json(f"{cfg.out}/results.json", results)
    return results


HELP = {
    "methods": f"comma-separated subset of {','.join(METHODS)}",
    "model": f"one of {MODELS} (sequential models that can be cut)",
    "hidden": "mlp hidden widths, comma-separated",
    "cut": "name of the last client layer (mlp: dense_0, dense_1, ...; cnn: conv_0, conv_1, "
           "dense_0)",
    "num_clients": "clients of the population (all train every round)",
    "partition": f"one of {PARTITIONS}",
    "alpha": "Dirichlet concentration of dirichlet_label_mix",
    "rounds": "training rounds",
    "local_epochs": "passes over each client's data per round",
    "batch_size": "minibatch size",
    "lr": "SGD step size (clients and server part)",
    "seed": "seed of the partition, shuffles and init",
    "out": "folder for results.json",
}


def _parser() -> StrictParser:
    return config_parser("split_learning.py", __doc__, SplitLearningConfig, HELP)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (one ``error:`` line, exit 2), train, print a summary."""
    cfg, json_out = parse_config(_parser(), SplitLearningConfig, argv)
    results = validated_run(cfg, json_out, run_experiment)
    if results is None:
        return 2
    print(f"digits, {cfg.model} ({results['num_params']} params, {results['client_params']} on "
          f"the client), cut {cfg.cut} ({results['cut_size']} floats/example), "
          f"{cfg.num_clients} clients, {cfg.rounds} rounds")
    for method, res in results["methods"].items():
        b = res["bytes_per_round"]
        print(f"{method:9s} test acc {res['final_test_accuracy']:.3f}  bytes/round "
              f"{b['total_bytes']:,} (activations {b['activation_bytes']:,} + gradients "
              f"{b['gradient_bytes']:,} + weights {b['model_bytes']:,})")
    print(f"outputs: {cfg.out}/results.json" + (f", {json_out}" if json_out else "")
          + f" ({results['wall_seconds']:.1f} s)")
    return 0
