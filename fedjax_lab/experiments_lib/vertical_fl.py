"""Vertical FL: test accuracy and bytes per epoch as the feature columns spread over parties.

Split-NN vertical FL (Liu et al. 2022, "Vertical Federated Learning", §3; FedML's
``classical_vertical_fl``; the setting of Hardy et al. 2017 without homomorphic encryption,
see :mod:`fedjax_lab.topologies.vertical`): the columns of a tabular dataset are split among
``P`` parties (:func:`fedjax_lab.topologies.feature_split`, contiguous blocks or a seeded random
assignment), each with a bottom model, party 0 holding the labels and the top model. For every
``P`` of ``--parties`` the same training (``--epochs`` passes of SGD over shuffled batches of
``--batch-size`` aligned samples) is run; ``P = 1`` is centralized training of the same
bottom+top architecture. Datasets: ``digits`` (scikit-learn's 8x8 digits, 64 pixel columns in
row-major order: contiguous blocks are horizontal bands of the image) and ``synthetic``
(FedProx's Synthetic(1,1), Li et al. 2020: 60 features, all devices' samples pooled).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.cli import StrictParser
from fedjax_lab.core import host_rng
from fedjax_lab.data.datasets import digits, synthetic
from fedjax_lab.experiment import MAX_SEED
from fedjax_lab.experiments_lib.common import config_parser, parse_config, validated_run
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.io.writers import write_json
from fedjax_lab.topologies import epoch_batches, feature_split, vertical_model, vertical_trainer

DATASETS = ("digits", "synthetic")
SPLITS = ("contiguous", "random")
COMBINE = ("concat", "sum")
# Host randomness streams of this experiment (host_rng(seed, stream, ...)).
SPLIT_STREAM, SHUFFLE_STREAM = 101, 102


def _ints(text: str, flag: str, allow_empty: bool) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated positive ints, got {text!r}") from None
    if any(v < 1 for v in values) or (not values and not allow_empty):
        raise ValueError(f"{flag} must be comma-separated positive ints, got {text!r}")
    return values


@dataclass
class VerticalFLConfig:
    """Flags of ``experiments/vertical_fl.py`` (the defaults are the README's run)."""

    dataset: str = "digits"
    parties: str = "1,2,4"
    split: str = "contiguous"
    embed_dim: int = 8
    bottom_hidden: str = ""
    top_hidden: str = "32"
    combine: str = "concat"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.1
    seed: int = 0
    out: str = "runs/vertical_fl"

    def num_features(self) -> int:
        return 64 if self.dataset == "digits" else 60

    def validate(self) -> None:
        """Raises ValueError naming the bad flag, before anything is built or compiled."""
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        parties = _ints(self.parties, "--parties", allow_empty=False)
        if len(set(parties)) != len(parties) or max(parties) > self.num_features():
            raise ValueError(f"--parties must be distinct counts in [1, {self.num_features()}] "
                             f"(every party needs a column of {self.dataset}), got "
                             f"{self.parties!r}")
        _ints(self.bottom_hidden, "--bottom-hidden", allow_empty=True)
        _ints(self.top_hidden, "--top-hidden", allow_empty=True)
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {SPLITS}, got {self.split!r}")
        if self.combine not in COMBINE:
            raise ValueError(f"--combine must be one of {COMBINE}, got {self.combine!r}")
        for name in ("embed_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"--lr must be a finite float > 0, got {self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")


def load(cfg: VerticalFLConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Train and test arrays (``x`` flattened to ``[N, D]``) and the class count."""
    ds = digits() if cfg.dataset == "digits" else synthetic(1.0, 1.0, seed=cfg.seed)

    def flat(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"x": arrays["x"].reshape(len(arrays["x"]), -1), "y": arrays["y"]}

    return flat(ds.train), flat(ds.test), ds.num_classes


def run_parties(cfg: VerticalFLConfig, parties: int, train: dict[str, np.ndarray],
                test: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    """Trains one ``P``; returns its curves, final accuracy and bytes per epoch."""
    d = train["x"].shape[1]
    rng = host_rng(cfg.seed, SPLIT_STREAM, parties) if cfg.split == "random" else None
    groups = feature_split(d, parties, rng)
    vm = vertical_model(groups, d, num_classes, embed_dim=cfg.embed_dim,
                        bottom_hidden=_ints(cfg.bottom_hidden, "--bottom-hidden", True),
                        top_hidden=_ints(cfg.top_hidden, "--top-hidden", True),
                        combine=cfg.combine)
    # One program for all the parties' inits (each init alone is a compile).
    params = jax.jit(vm.init)(jax.random.key(cfg.seed))
    opt = optax.sgd(cfg.lr)
    opt_state = opt.init(params)
    train_epoch = vertical_trainer(vm, opt, batch_size=cfg.batch_size)
    accuracy_of = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(vm.apply(p, x), -1) == y))
    tx, ty = jnp.asarray(test["x"]), jnp.asarray(test["y"])
    accuracy, loss = [], []
    n = len(train["y"])
    for epoch in range(cfg.epochs):
        index, mask = epoch_batches(n, cfg.batch_size, host_rng(cfg.seed, SHUFFLE_STREAM, epoch))
        params, opt_state, metrics = train_epoch(params, opt_state, train["x"], train["y"],
                                                 index, mask)
        loss.append(metrics["train_loss"])
        accuracy.append(float(accuracy_of(params, tx, ty)))
    return {"columns": [len(g) for g in groups], "test_accuracy": accuracy, "train_loss": loss,
            "final_test_accuracy": accuracy[-1],
            "bytes_per_epoch": {k: v for k, v in metrics.items() if k.endswith("_bytes")}}


def run_experiment(cfg: VerticalFLConfig) -> dict[str, Any]:
    """Trains every party count; writes ``results.json`` into ``cfg.out``; returns it."""
    cfg.validate()
    start = time.perf_counter()
    with RunFolder(cfg.out, overwrite=True, results=()):
        train, test, num_classes = load(cfg)
        results: dict[str, Any] = {"config": dataclasses.asdict(cfg),
                                   "train_examples": len(train["y"]),
                                   "test_examples": len(test["y"]), "parties": {}}
        for p in _ints(cfg.parties, "--parties", allow_empty=False):
            results["parties"][str(p)] = run_parties(cfg, p, train, test, num_classes)
        results["wall_seconds"] = time.perf_counter() - start
        results["jax_backend"] = jax.default_backend()
        write_json(f"{cfg.out}/results.json", results)
    return results


HELP = {
    "dataset": f"one of {DATASETS}",
    "parties": "comma-separated party counts to compare (1 = centralized)",
    "split": f"one of {SPLITS}: contiguous column blocks or a seeded random assignment",
    "embed_dim": "width of each party's embedding (the message)",
    "bottom_hidden": "hidden ReLU widths of the bottom models, comma-separated ('' = linear)",
    "top_hidden": "hidden ReLU widths of the top model, comma-separated ('' = linear)",
    "combine": f"one of {COMBINE}: how the top model combines the embeddings",
    "epochs": "passes over the aligned training samples",
    "batch_size": "minibatch size",
    "lr": "SGD step size (every party and the top model)",
    "seed": "seed of the data (synthetic), split, shuffles and init",
    "out": "folder for results.json",
}


def _parser() -> StrictParser:
    return config_parser("vertical_fl.py", __doc__, VerticalFLConfig, HELP)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (one ``error:`` line, exit 2), train, print a summary."""
    cfg, json_out = parse_config(_parser(), VerticalFLConfig, argv)
    results = validated_run(cfg, json_out, run_experiment)
    if results is None:
        return 2
    print(f"{cfg.dataset}: {results['train_examples']} aligned training samples, "
          f"{cfg.epochs} epochs, {cfg.split} columns")
    for p, res in results["parties"].items():
        print(f"{p} part{'y' if p == '1' else 'ies'} (columns {res['columns']}): test acc "
              f"{res['final_test_accuracy']:.3f}, bytes/epoch "
              f"{res['bytes_per_epoch']['total_bytes']:,}")
    print(f"outputs: {cfg.out}/results.json" + (f", {json_out}" if json_out else "")
          + f" ({results['wall_seconds']:.1f} s)")
    return 0
