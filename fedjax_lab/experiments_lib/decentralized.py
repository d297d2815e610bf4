"""Decentralized (gossip) FL on a graph of nodes: D-SGD, PushSum/SGP or CHOCO-SGD.

One node per client of a population (digits or FedProx's synthetic data), every node trains
every round (``--local-steps`` SGD steps) and then gossips with its neighbours on
``--topology`` (comma-separated to compare several, each with the same data, seed and initial
model). Reported per topology: its spectral gap, and per round the node average's test
accuracy/loss, the consensus distance of the node models and the training loss.

Algorithms: ``dsgd`` (Lian et al. 2017; Koloskova et al. 2020), ``pushsum`` (Stochastic
Gradient Push, Assran et al. 2019), ``choco`` (CHOCO-SGD, Koloskova et al. 2019, with
``--compressor`` and the consensus step size ``--gamma``). Library:
:mod:`fedjax_lab.topologies`.
"""

from __future__ import annotations

import math
import os
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fedjax_lab.experiment import MAX_SEED, optional_type
from fedjax_lab.experiments_lib.common import validated_run
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.io.writers import write_json

DATASETS = ("digits", "synthetic", "synthetic_iid")
MODELS = ("logreg", "mlp")
ALGORITHMS = ("dsgd", "pushsum", "choco")
BACKENDS = ("vmap", "sharded")
PARTITIONS = ("iid", "dirichlet_label_mix", "dirichlet_per_class", "shards")
ER_P = 0.3
# CHOCO-SGD's settings when not given (the flags exist only for --algorithm choco).
CHOCO = {"compressor": "top_k", "gamma": 0.5}
HELP = {
    "dataset": f"one of {DATASETS}; synthetic is FedProx's Synthetic(1,1) with one device per "
               "node (natural partition)",
    "partition": f"how digits is split over the nodes: one of {PARTITIONS} (none: iid); "
                 "synthetic data comes with one device per node and takes none",
    "model": f"one of {MODELS}",
    "nodes": "number of nodes (= clients; every node trains every round)",
    "topology": "comma-separated graphs to compare: ring, torus, fully_connected, "
                "erdos_renyi, exponential, one_peer_exponential",
    "er_p": f"edge probability of erdos_renyi (seeded by --seed; none: {ER_P})",
    "algorithm": f"one of {ALGORITHMS}",
    "compressor": "choco: the compressor of the model differences (a --compressor of "
                  f"experiments/train.py, e.g. top_k, qsgd, sign; none: {CHOCO['compressor']})",
    "sparsity": "choco with top_k/rand_k/stc/sstc: fraction of coordinates kept (none: the "
                "compressor's default)",
    "num_levels": "choco with qsgd: quantization levels (none: the compressor's default)",
    "gamma": f"choco: the consensus step size, in (0, 1] (none: {CHOCO['gamma']})",
    "rounds": "communication rounds",
    "local_steps": "local SGD steps per node per round",
    "batch_size": "local minibatch size",
    "lr": "local SGD learning rate",
    "seed": "run seed (data split, batches, model init, erdos_renyi graph)",
    "eval_every": "evaluate the node average every this many rounds (and after the last)",
    "backend": "vmap (one device) or sharded (nodes split over the local devices)",
    "out": "folder for results.json",
}


@dataclass
class DecentralizedConfig:
    """Decentralized FL on a graph: D-SGD, PushSum/SGP or CHOCO-SGD (see the module doc)."""

    dataset: str = "digits"
    partition: str | None = None
    model: str = "logreg"
    nodes: int = 16
    topology: str = "ring"
    er_p: float | None = None
    algorithm: str = "dsgd"
    compressor: str | None = None
    sparsity: float | None = None
    num_levels: int | None = None
    gamma: float | None = None
    rounds: int = 50
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 0.1
    seed: int = 0
    eval_every: int = 10
    backend: str = "vmap"
    out: str = "runs/decentralized"

    @property
    def topologies(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.topology.split(",") if t.strip())

    def validate(self) -> None:
        """Raises ValueError naming the bad flag, before anything is built or compiled."""
        from fedjax_lab.registry import COMPRESSORS
        from fedjax_lab.topologies.graphs import TOPOLOGIES

        for name, choices in (("dataset", DATASETS), ("model", MODELS),
                              ("algorithm", ALGORITHMS), ("backend", BACKENDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {choices}, got "
                                 f"{getattr(self, name)!r}")
        if self.partition is not None and self.dataset != "digits":
            raise ValueError(f"--partition applies to --dataset digits only; {self.dataset} "
                             "has one natural device per node: drop --partition")
        if self.partition is not None and self.partition not in PARTITIONS:
            raise ValueError(f"--partition must be one of {PARTITIONS}, got {self.partition!r}")
        names = self.topologies
        bad = [t for t in names if t not in TOPOLOGIES]
        if not names or bad or len(set(names)) != len(names):
            raise ValueError(f"--topology must be distinct comma-separated names of "
                             f"{TOPOLOGIES}, got {self.topology!r}")
        for name in ("nodes", "rounds", "local_steps", "batch_size", "eval_every",
                     "num_levels"):
            value = getattr(self, name)
            if value is None and name == "num_levels":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got "
                                 f"{value!r}")
        if self.nodes < 2:
            raise ValueError(f"--nodes must be >= 2 (a graph needs two nodes), got {self.nodes}")
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"--lr must be a finite float > 0, got {self.lr}")
        if self.er_p is not None:
            if "erdos_renyi" not in names:
                raise ValueError("--er-p is read only by --topology erdos_renyi: drop it")
            if not 0.0 < self.er_p <= 1.0:
                raise ValueError(f"--er-p must be an edge probability in (0, 1], got "
                                 f"{self.er_p}")
        if self.gamma is not None and not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"--gamma must be in (0, 1], got {self.gamma}")
        if self.sparsity is not None and not 0.0 < self.sparsity <= 1.0:
            raise ValueError(f"--sparsity must be in (0, 1], got {self.sparsity}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")
        choco_flags = ("compressor", "sparsity", "num_levels", "gamma")
        if self.algorithm != "choco":
            given = [f"--{n.replace('_', '-')}" for n in choco_flags
                     if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to --algorithm choco (the "
                                 f"{self.algorithm} gossip is uncompressed): drop them")
        else:
            component = COMPRESSORS.get(self.compressor or CHOCO["compressor"])
            for n in ("sparsity", "num_levels"):
                if getattr(self, n) is not None and component.param(n) is None:
                    raise ValueError(f"--{n.replace('_', '-')} is not a parameter of "
                                     f"--compressor {component.name}: drop it")
        if self.backend == "sharded":
            import jax

            devices = jax.device_count()
            if self.nodes % devices:
                raise ValueError(f"--backend sharded splits --nodes over {devices} devices: "
                                 f"use a multiple of {devices} nodes, got {self.nodes}")


def build_compressor(cfg: DecentralizedConfig) -> Any:
    """The registered ``--compressor`` with ``--sparsity``/``--num-levels`` where it takes
    them (its other hyperparameters at their registered defaults)."""
    from fedjax_lab.registry import COMPRESSORS

    component = COMPRESSORS.get(cfg.compressor or CHOCO["compressor"])
    given = {k: v for k, v in (("sparsity", cfg.sparsity), ("num_levels", cfg.num_levels))
             if v is not None}
    return component.build(**{p.name: given.get(p.name, p.default) for p in component.params})


def build_problem(cfg: DecentralizedConfig) -> tuple[Any, Any, Any, Any]:
    """The population (one client per node), the model, its evaluator and initial params."""
    import jax

    from fedjax_lab.data.datasets import federate, load_dataset
    from fedjax_lab.metrics.evaluation import make_evaluator
    from fedjax_lab.models import get_model

    if cfg.dataset == "digits":
        dataset = load_dataset("digits")
        data = federate(dataset, cfg.partition or "iid", cfg.nodes, seed=cfg.seed)
    else:
        kwargs = {"alpha": 1.0, "beta": 1.0} if cfg.dataset == "synthetic" else {}
        dataset = load_dataset(cfg.dataset, num_clients=cfg.nodes, seed=cfg.seed, **kwargs)
        data = federate(dataset, "natural", cfg.nodes, seed=cfg.seed)
    model = get_model(cfg.model, dataset.input_shape, dataset.num_classes)
    evaluate = make_evaluator(model.apply, dataset.test, num_classes=dataset.num_classes)
    return data, model, evaluate, model.init(jax.random.key(cfg.seed))


def run_experiment(cfg: DecentralizedConfig) -> dict[str, Any]:
    """Runs every ``--topology``; returns the JSON-able results (also ``OUT/results.json``)."""
    import optax

    from fedjax_lab.algorithms.kit import model_objective
    from fedjax_lab.topologies import (
        choco_sgd,
        dsgd,
        pushsum,
        run_decentralized,
        topology_by_name,
    )
    from fedjax_lab.topologies.gossip_run import check_compatible

    # Graphs first: a disconnected Erdős–Rényi draw is refused before any data or compile.
    er_p = ER_P if cfg.er_p is None else cfg.er_p
    graphs = [topology_by_name(t, cfg.nodes, p=er_p, seed=cfg.seed) for t in cfg.topologies]
    compressor = build_compressor(cfg) if cfg.algorithm == "choco" else None
    with RunFolder(cfg.out, overwrite=True, results=("results.json",)) as folder:
        folder.start_fresh()
        data, model, evaluate, params = build_problem(cfg)
        objective = model_objective(model)
        optimizer = optax.sgd(cfg.lr)
        if cfg.algorithm == "dsgd":
            algorithm = dsgd(objective, optimizer)
        elif cfg.algorithm == "pushsum":
            algorithm = pushsum(objective, optimizer)
        else:
            gamma = CHOCO["gamma"] if cfg.gamma is None else cfg.gamma
            algorithm = choco_sgd(objective, optimizer, compressor, gamma=gamma)
        for topo in graphs:
            check_compatible(algorithm, topo, data)
        results: dict[str, Any] = {"config": asdict(cfg), "topologies": {}}
        start = time.perf_counter()
        for topo in graphs:
            t0 = time.perf_counter()
            run = run_decentralized(
                algorithm, topo, data, params, rounds=cfg.rounds, batch_size=cfg.batch_size,
                local_steps=cfg.local_steps, seed=cfg.seed, evaluate=evaluate,
                eval_every=cfg.eval_every, backend=cfg.backend)
            last = run.history[-1]
            results["topologies"][topo.name] = {
                **topo.summary(),
                "final": {k: last[k] for k in ("test_accuracy", "test_loss",
                                               "consensus_distance", "train_loss")},
                "total_gossip_bits": sum(h["gossip_bits"] for h in run.history),
                "history": run.history,
                "seconds": time.perf_counter() - t0,
            }
        results["wall_seconds"] = time.perf_counter() - start
        write_json(os.path.join(cfg.out, "results.json"), results)
    return results


def _parser() -> Any:
    from fedjax_lab.cli import StrictParser

    parser = StrictParser(prog="decentralized.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", dest="json_out", default=None,
                        help="also write the results to this file")
    defaults = DecentralizedConfig()
    hints = typing.get_type_hints(DecentralizedConfig)
    for name, value in asdict(defaults).items():
        tp, optional = optional_type(hints[name])  # none: the default the help names
        parser.add_flag(name, tp, value, HELP[name], optional=optional)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (one ``error:`` line, exit 2), run, write JSON, print a summary."""
    args = vars(_parser().parse_args(argv))
    json_out = args.pop("json_out")
    args.pop("config")
    cfg = DecentralizedConfig(**args)
    results = validated_run(cfg, json_out, run_experiment)
    if results is None:
        return 2
    for name, entry in results["topologies"].items():
        final = entry["final"]
        print(f"[{cfg.algorithm} {name}] spectral gap {entry['spectral_gap']:.4f}: "
              f"test accuracy {final['test_accuracy']:.4f}, consensus distance "
              f"{final['consensus_distance']:.3g}, train loss {final['train_loss']:.4f}")
    print(f"outputs: {os.path.join(cfg.out, 'results.json')}"
          + (f", {json_out}" if json_out else "")
          + f" ({results['wall_seconds']:.1f} s)", file=sys.stdout)
    return 0
