"""Hierarchical FL from flags: ``experiments/hierarchical.py`` (HierFAVG, Liu et al. 2020).

Liu, Zhang, Song, Letaief (2020), "Client-Edge-Cloud Hierarchical Federated Learning"
(Algorithm 1). Clients are grouped under ``--groups`` edge servers (``--grouping random``: a
seeded balanced assignment; ``--grouping given --grouping-file F.json``: a JSON list of one group
id per client, or of member lists). Each edge round, every edge runs one round of
``--algorithm`` (any registered name, with its hyperparameter flags, as ``experiments/train.py``)
on ``--clients-per-edge-round`` of its clients (none: all), with ``--compressor`` on the
client -> edge uploads; ``--local-epochs``/``--local-steps`` is kappa_1, ``--edge-rounds`` is
kappa_2, and every cloud round the cloud averages the edge models weighted by the examples they
aggregated (:mod:`fedjax_lab.topologies.hierarchical`). Per cloud round: train loss, test
accuracy of the cloud model, client -> edge upload bits and edge -> cloud bytes.

Bad input exits with status 2 and one ``error:`` line before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from fedjax_lab.experiment import MAX_SEED, optional_type
from fedjax_lab.experiments_lib.common import validated_run

DATASETS = ("digits", "synthetic", "synthetic_iid")
GROUPINGS = ("random", "given")
HELP = {
    "dataset": "dataset held in memory: digits (embedded), synthetic (FedProx Synthetic(a,b): "
               "--num-clients natural devices, use --partition natural), synthetic_iid",
    "synthetic_alpha": "--dataset synthetic: model heterogeneity (none: 1)",
    "synthetic_beta": "--dataset synthetic: feature heterogeneity (none: 1)",
    "partition": "how the train set is split into clients: iid, dirichlet_label_mix, "
                 "dirichlet_per_class, shards, natural",
    "alpha": "Dirichlet concentration of the dirichlet_* partitions",
    "num_clients": "clients in the population",
    "groups": "edge servers (none: 4 for --grouping random; the file's count for given)",
    "grouping": "random (seeded, balanced) or given (--grouping-file)",
    "grouping_file": "--grouping given: JSON list of one group id per client, or of member "
                     "lists (client indices per group)",
    "local_epochs": "kappa_1 as local passes over each client's data per edge round",
    "local_steps": "kappa_1 as a fixed number of local steps instead of --local-epochs",
    "batch_size": "local minibatch size",
    "client_lr": "local (client) learning rate",
    "client_momentum": "local heavy-ball momentum in [0, 1) (0: plain SGD)",
    "edge_rounds": "kappa_2: edge aggregations per cloud aggregation",
    "clients_per_edge_round": "clients each edge samples per edge round (none: all of its "
                              "clients, the paper's setting); at most the smallest group",
    "cloud_rounds": "cloud aggregations",
    "model": "model: logreg, mlp (cnn/resnet18 run too, slowly on CPU)",
    "devices": "shard each group's client slots over this many devices (psum; additive "
               "aggregates only; none: one device)",
    "eval_every": "evaluate the cloud model every N cloud rounds and after the last (0: never)",
    "seed": "run seed: partition, grouping, sampling, init, local shuffles, client keys",
    "error_feedback": "add error feedback to the compressor (Seide et al. 2014; Stich et al. "
                      "2018): clients keep what compression lost",
}


@dataclass
class HierarchicalConfig:
    """Hierarchical FL (HierFAVG) settings; every field is a ``--flag-name`` CLI flag."""

    dataset: str = "digits"
    synthetic_alpha: float | None = None
    synthetic_beta: float | None = None
    partition: str = "dirichlet_per_class"
    alpha: float = 0.5
    num_clients: int = 32
    groups: int | None = None
    grouping: str = "random"
    grouping_file: str | None = None
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 20
    client_lr: float = 0.1
    client_momentum: float = 0.0
    edge_rounds: int = 2
    clients_per_edge_round: int | None = None
    cloud_rounds: int = 10
    model: str = "logreg"
    devices: int | None = None
    eval_every: int = 1
    seed: int = 0
    algorithm: str = "fedavg"
    compressor: str = "identity"
    error_feedback: bool = False
    hparams: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raises ValueError naming the bad flag; nothing is built or compiled here."""
        from fedjax_lab.data.partition import PARTITIONERS

        for name in ("num_clients", "local_epochs", "batch_size", "edge_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("cloud_rounds", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("groups", "local_steps", "clients_per_edge_round", "devices"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1 (or none), got {value}")
        for name in ("client_lr", "alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{_flag(name)} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.client_momentum) and 0 <= self.client_momentum < 1):
            raise ValueError(f"--client-momentum must be in [0, 1), got {self.client_momentum}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)} (held in memory), "
                             f"got {self.dataset!r}")
        for name in ("synthetic_alpha", "synthetic_beta"):
            value = getattr(self, name)
            if value is not None and self.dataset != "synthetic":
                raise ValueError(f"--{_flag(name)} needs --dataset synthetic (got --dataset "
                                 f"{self.dataset}): drop it")
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{_flag(name)} must be a finite number >= 0, got {value}")
        if self.partition not in PARTITIONERS:
            raise ValueError(f"--partition must be one of {', '.join(PARTITIONERS)}, got "
                             f"{self.partition!r}")
        sizes = np.bincount(self.group_ids())
        if self.clients_per_edge_round is not None and self.clients_per_edge_round > sizes.min():
            raise ValueError(
                f"--clients-per-edge-round {self.clients_per_edge_round} > {sizes.min()} clients "
                "of the smallest group; lower it or pass none (every client of each group)")
        if self.devices is not None:
            import jax

            if self.devices > jax.device_count():
                raise ValueError(f"--devices {self.devices} > the {jax.device_count()} devices "
                                 "JAX sees; lower it (or none)")
        algorithm, _ = self._selected()
        known = {p.name for c in self._selected() for p in c.params}
        extra = sorted(set(self.hparams) - known)
        if extra:
            raise ValueError(f"hparams {extra} belong to no selected component "
                             f"(--algorithm {self.algorithm}, --compressor {self.compressor})")
        for name, value in self._params(algorithm).items():
            if name.endswith("_lr") and not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{_flag(name)} must be a finite number > 0, got {value}")
        if "fixed_local_steps" in algorithm.tags and self.local_steps is None:
            raise ValueError(f"--algorithm {self.algorithm} runs a fixed number of local steps "
                             "(the paper's tau): pass --local-steps")
        if "noisy_aggregate" in algorithm.tags:
            raise ValueError(
                f"--algorithm {self.algorithm} draws its server noise from the round number "
                "alone, so every edge would add the SAME noise and the cloud would see "
                "noise-free differences of edge models: it is not supported under edges")
        if "plain_sgd" in algorithm.tags and self.client_momentum:
            raise ValueError(f"--algorithm {self.algorithm} runs plain local SGD: "
                             f"--client-momentum must be 0, got {self.client_momentum}")
        self.build_compressor()

    def group_ids(self) -> np.ndarray:
        """The edge of every client (ValueError naming --grouping/--grouping-file/--groups)."""
        from fedjax_lab.core.rng import PARTITION_STREAM, host_rng
        from fedjax_lab.topologies import check_grouping, random_grouping
        from fedjax_lab.topologies.hierarchical import GROUPING_SUBSTREAM

        if self.grouping not in GROUPINGS:
            raise ValueError(f"--grouping must be one of {', '.join(GROUPINGS)}, got "
                             f"{self.grouping!r}")
        if self.grouping == "random":
            if self.grouping_file is not None:
                raise ValueError("--grouping-file is read by --grouping given: drop it, or "
                                 "pass --grouping given")
            groups = 4 if self.groups is None else self.groups
            if groups > self.num_clients:
                raise ValueError(f"--groups {groups} > --num-clients {self.num_clients}: some "
                                 "edge would have no client")
            return random_grouping(self.num_clients, groups,
                                   host_rng(self.seed, PARTITION_STREAM, GROUPING_SUBSTREAM))
        if self.grouping_file is None:
            raise ValueError("--grouping given reads the edge of each client from "
                             "--grouping-file F.json: pass it")
        try:
            with open(self.grouping_file, encoding="utf-8") as f:
                given = json.load(f)
        except OSError as e:
            raise ValueError(f"--grouping-file {self.grouping_file}: cannot read it "
                             f"({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"--grouping-file {self.grouping_file} is not valid JSON ({e})"
                             ) from None
        try:
            ids = check_grouping(given, self.num_clients)
        except ValueError as e:
            raise ValueError(f"--grouping-file {self.grouping_file}: {e}") from None
        if self.groups is not None and self.groups != ids.max() + 1:
            raise ValueError(f"--groups {self.groups} but --grouping-file has {ids.max() + 1} "
                             "groups: drop --groups or fix the file")
        return ids

    # ------------------------------------------------------------------------- components
    def _selected(self) -> tuple[Any, Any]:
        algorithms, compressors = _registries()
        return algorithms.get(self.algorithm), compressors.get(self.compressor)

    def _params(self, component: Any) -> dict[str, Any]:
        return {p.name: self.hparams.get(p.name, p.default) for p in component.params}

    def build_compressor(self) -> Any:
        """The client -> edge ``Compressor`` (with error feedback when asked)."""
        from fedjax_lab.compressors import with_error_feedback

        _, component = self._selected()
        try:
            compressor = component.build(**self._params(component))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--compressor {self.compressor}: {e}") from None
        return with_error_feedback(compressor) if self.error_feedback else compressor

    def make_algorithm(self, model: Any, clients_per_round: int) -> Any:
        """The edge algorithm: the registered constructor with the compressor."""
        from fedjax_lab.registry import AlgorithmContext

        component, _ = self._selected()
        context = AlgorithmContext(
            model=model, client_lr=self.client_lr, client_momentum=self.client_momentum,
            batch_size=self.batch_size, local_epochs=self.local_epochs,
            local_steps=self.local_steps, num_clients=self.num_clients,
            clients_per_round=clients_per_round, seed=self.seed)
        try:
            return component.build(context, compressor=self.build_compressor(),
                                   **self._params(component))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--algorithm {self.algorithm}: {e}") from None

    def as_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "hparams"}
        for component in self._selected():
            values.update(self._params(component))
        return values


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _registries() -> tuple[Any, Any]:
    # Importing the packages fills the registries (their __init__ registers the constructors).
    import fedjax_lab.algorithms
    import fedjax_lab.compressors  # noqa: F401
    from fedjax_lab.registry import ALGORITHMS, COMPRESSORS

    return ALGORITHMS, COMPRESSORS


# ------------------------------------------------------------------------------------ run
def run_experiment(cfg: HierarchicalConfig) -> dict[str, Any]:
    """Builds the problem and runs HierFAVG; returns the results (history per cloud round)."""
    import jax

    from fedjax_lab.experiment import build_problem
    from fedjax_lab.topologies import run_hierarchical

    start = time.perf_counter()
    groups = cfg.group_ids()
    sizes = np.bincount(groups)
    problem = SimpleNamespace(
        dataset=cfg.dataset, data_dir=None, download=False, synthetic_alpha=cfg.synthetic_alpha,
        synthetic_beta=cfg.synthetic_beta, partition=cfg.partition, alpha=cfg.alpha,
        num_clients=cfg.num_clients, seed=cfg.seed, model=cfg.model,
        batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
        # The memory bound of build_problem: every client in one round (the hierarchical run
        # checks its own [edge rounds x groups x slots] cohort again before compiling).
        clients_per_round=cfg.num_clients)
    _, train, model, evaluate, params = build_problem(problem)
    algorithm = cfg.make_algorithm(model, cfg.clients_per_edge_round or int(sizes.max()))
    devices = None if cfg.devices is None else jax.devices()[: cfg.devices]

    def progress(c: int, record: dict[str, float]) -> None:
        acc = record.get("test_accuracy")
        print(f"cloud round {c + 1}: train loss {record['train_loss']:.4f}"
              + (f", test accuracy {acc:.4f}" if acc is not None else ""), file=sys.stderr)

    result = run_hierarchical(
        algorithm, train, params, groups, cloud_rounds=cfg.cloud_rounds,
        edge_rounds=cfg.edge_rounds, clients_per_edge_round=cfg.clients_per_edge_round,
        seed=cfg.seed, evaluate=evaluate, eval_every=cfg.eval_every, devices=devices,
        callbacks=(progress,))
    evals = [h for h in result.history if "test_accuracy" in h]
    last = result.history[-1] if result.history else {}
    return {
        "config": cfg.as_dict(),
        "algorithm": algorithm.name,
        "group_sizes": sizes.tolist(),
        "history": result.history,
        "final_test_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "final_train_loss": last.get("train_loss"),
        "upload_bits": last.get("cum_upload_bits", 0.0),
        "edge_cloud_bytes": last.get("cum_edge_cloud_bytes", 0.0),
        "compiled_programs": result.compiles,
        "wall_seconds": time.perf_counter() - start,
        "jax_backend": jax.default_backend(),
    }


# ------------------------------------------------------------------------------------ CLI
def parse(argv: Sequence[str] | None = None) -> tuple[HierarchicalConfig, str | None]:
    """``(config, --json path)`` of a command line. Unparsable flags exit 2 (argparse); a
    hyperparameter of an unselected component raises ValueError."""
    from fedjax_lab.cli import StrictParser
    from fedjax_lab.train import add_component_flags, pop_component_hparams

    parser = StrictParser(prog="hierarchical.py", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(HierarchicalConfig)
    components = ("algorithm", "compressor", "error_feedback", "hparams")
    for f in dataclasses.fields(HierarchicalConfig):
        if f.name in components:
            continue
        tp, optional = optional_type(hints[f.name])
        parser.add_flag(f.name, tp, f.default, HELP[f.name], optional=optional,
                        choices=GROUPINGS if f.name == "grouping" else None)

    def extras(parser: Any, kind: str, group: Any) -> None:
        if kind == "compressor":
            parser.add_flag("error_feedback", bool, False, HELP["error_feedback"], group=group)

    registries = _registries()
    add_component_flags(parser, registries, {"algorithm": "fedavg", "compressor": "identity"},
                        extra_flags=extras)
    parser.add_flag("json", str, None, "write the results (history per cloud round) here",
                    optional=True)
    values = vars(parser.parse_args(argv))
    values.pop("config")
    json_out = values.pop("json")
    hparams = pop_component_hparams(values, registries)
    return HierarchicalConfig(**values, hparams=hparams), json_out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (exit 2 with one ``error:`` line), run, print, write ``--json``."""
    try:
        cfg, json_out = parse(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = validated_run(cfg, json_out, run_experiment)
    if results is None:
        return 2
    acc = results["final_test_accuracy"]
    print(f"{results['algorithm']} under {len(results['group_sizes'])} edges "
          f"(kappa_2 = {cfg.edge_rounds}), {cfg.cloud_rounds} cloud rounds: test accuracy "
          f"{'n/a' if acc is None else f'{acc:.4f}'}, train loss "
          f"{results['final_train_loss']}, client->edge {results['upload_bits']:.0f} bits, "
          f"edge->cloud {results['edge_cloud_bytes']:.0f} bytes "
          f"({results['wall_seconds']:.1f} s)")
    return 0
