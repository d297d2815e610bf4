"""Robustness grid: attack x defense x malicious fraction (``experiments/robustness.py``).

Every cell trains FedAvg (logistic regression by default) with ``--clients-per-round`` of
``--num-clients`` clients for ``--rounds`` rounds, a fixed seeded set of malicious clients
(:func:`fedjax_lab.attacks.select_malicious`, ``round(fraction x num_clients)`` of them) and
one aggregation rule, and reports

* ``clean_accuracy``: test accuracy of the final model;
* the attack's effect: for the backdoor (Bagdasaryan et al. 2020) the attack success rate
  (``attack_success``: triggered non-target test examples classified as the target); for the
  untargeted attacks the accuracy drop against the same defense without attack
  (``accuracy_drop = clean baseline - clean_accuracy``, the ``fraction 0`` row);
* for selecting rules (Krum, Bulyan) the mean over rounds of ``detection_precision`` and
  ``detection_recall`` of their exclusions against the malicious flags
  (:mod:`fedjax_lab.algorithms.robust.detection`; NaN rounds left out, NaN if all are);
* ``above_breakdown``: whether the population's malicious fraction exceeds the fraction the
  rule is configured to tolerate (mean 0; Krum/Bulyan ``f / clients_per_round``; trimmed mean
  its ``beta``; median and geometric median 1/2), so the grid shows rules breaking above it.

Attacks: ``label_flip`` (reverse map) and ``backdoor`` (pixel pattern, image datasets only: it
is left out on synthetic data, and said so) poison the data; ``sign_flip`` (``-s x`` the
honest update), ``alie`` (Baruch et al. 2019, omniscient) and ``ipm`` (Xie et al. 2020,
omniscient) poison uploads in the round. Defenses: ``mean``, ``median``, ``trimmed_mean``,
``krum``, ``multi_krum`` (m = C - f), ``bulyan``, ``geometric_median`` (RFA),
``centered_clipping`` and ``foolsgold`` (Fung et al. 2020, :func:`fedjax_lab.algorithms.
with_foolsgold`; it has no stated breakdown fraction, so its cells are never marked above one;
the omniscient ALIE and IPM replace uploads after FoolsGold forms its histories and are left
out against it, and said so).

Execution is sequential, cell after cell: :mod:`fedjax_lab.sweep` vmaps float
hyperparameters and seeds of ONE algorithm over ONE example table, while here the defense and
the attack change the program and the malicious fraction changes the table (poisoned labels,
the malicious column). Compiled programs are shared instead: every cell of a (dataset,
defense) with a data attack, and of a (dataset, defense, model attack) across fractions, runs
the same algorithm object on the same shapes (one step shape per run, no packing), so the grid
compiles once per (dataset, defense) plus once per (dataset, defense, model attack).

Outputs in ``--out``: ``robustness.csv`` (a row per cell), ``heatmap_<dataset>.png`` (clean
accuracy and attack effect, defense x fraction, one column per attack) and, with ``--json``,
everything as JSON.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from fedjax_lab.experiment import MAX_SEED, optional_type
from fedjax_lab.experiments_lib.common import validated_run

DATASETS = ("digits", "synthetic", "synthetic_iid")
DATA_ATTACKS = ("label_flip", "backdoor")
MODEL_ATTACKS = ("sign_flip", "alie", "ipm")
ATTACKS = (*DATA_ATTACKS, *MODEL_ATTACKS)
DEFENSES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
            "geometric_median", "centered_clipping", "foolsgold")
# Rules whose exclusions are scored (FoolsGold: clients given weight 0).
SELECTING = ("krum", "multi_krum", "bulyan", "foolsgold")
OMNISCIENT = ("alie", "ipm")
CSV_FIELDS = ("dataset", "attack", "defense", "fraction", "num_malicious", "above_breakdown",
              "clean_accuracy", "baseline_accuracy", "accuracy_drop", "attack_success",
              "detection_precision", "detection_recall", "seconds")
HELP = {
    "datasets": f"comma-separated datasets of {', '.join(DATASETS)} (held in memory)",
    "attacks": f"comma-separated attacks of {', '.join(ATTACKS)}",
    "defenses": f"comma-separated aggregation rules of {', '.join(DEFENSES)}",
    "fractions": "comma-separated malicious fractions of the population, each in (0, 1)",
    "num_clients": "clients in the population",
    "clients_per_round": "clients sampled per round (C)",
    "rounds": "rounds per cell",
    "local_epochs": "local epochs per round",
    "batch_size": "local minibatch size",
    "client_lr": "local SGD learning rate",
    "model": "model: logreg or mlp",
    "partition": "iid, dirichlet_label_mix, dirichlet_per_class, shards",
    "tolerated": "f, the Byzantine clients per round Krum/Multi-Krum/Bulyan are set to "
                 "tolerate (Krum needs C >= 2f + 3, Bulyan C >= 4f + 3)",
    "trim": "trimmed mean: fraction beta cut from each end per coordinate",
    "sign_flip_scale": "sign_flip uploads -scale x the honest update",
    "ipm_epsilon": "IPM's epsilon: upload -epsilon x the mean honest update",
    "backdoor_target": "backdoor target label",
    "trigger_size": "backdoor trigger patch side (pixels)",
    "seed": "run seed: data, partition, malicious set, sampling, init, client keys",
    "out": "folder for robustness.csv and the heatmaps",
}


def _names(text: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"--{flag} must be distinct comma-separated names of "
                         f"{', '.join(allowed)}, got {text!r}")
    return names


@dataclass
class RobustnessConfig:
    """The grid's settings; every field is a ``--flag-name`` (lists are comma-separated)."""

    datasets: str = "digits,synthetic_iid"
    attacks: str = "label_flip,backdoor,sign_flip,alie"
    defenses: str = "mean,median,trimmed_mean,krum,bulyan,geometric_median,foolsgold"
    fractions: str = "0.1,0.3,0.6"
    num_clients: int = 40
    clients_per_round: int = 20
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 10
    client_lr: float = 0.1
    model: str = "logreg"
    partition: str = "iid"
    tolerated: int = 4
    trim: float = 0.2
    sign_flip_scale: float = 4.0
    ipm_epsilon: float = 0.5
    backdoor_target: int = 0
    trigger_size: int = 2
    seed: int = 0
    out: str = "runs/robustness"

    def grid(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...],
                            tuple[float, ...]]:
        """``(datasets, attacks, defenses, fractions)``; ValueError naming the flag."""
        datasets = _names(self.datasets, DATASETS, "datasets")
        attacks = _names(self.attacks, ATTACKS, "attacks")
        defenses = _names(self.defenses, DEFENSES, "defenses")
        try:
            fractions = tuple(float(v) for v in self.fractions.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--fractions must be comma-separated numbers, got "
                             f"{self.fractions!r}") from None
        if not fractions or not all(0.0 < f < 1.0 for f in fractions) or (
                len(set(fractions)) != len(fractions)):
            raise ValueError(f"--fractions must be distinct numbers in (0, 1) (the clean "
                             f"baseline is always run), got {self.fractions!r}")
        return datasets, attacks, defenses, tuple(sorted(fractions))

    def validate(self) -> None:
        """Raises ValueError naming the bad flag; nothing is built or compiled here."""
        from fedjax_lab.data.partition import PARTITIONERS

        _, _, defenses, fractions = self.grid()
        for name in ("num_clients", "clients_per_round", "rounds", "local_epochs",
                     "batch_size", "trigger_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"--clients-per-round ({self.clients_per_round}) must be <= "
                             f"--num-clients ({self.num_clients})")
        for name in ("client_lr", "sign_flip_scale", "ipm_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{_flag(name)} must be a finite number > 0, got {value}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"--trim must be in [0, 0.5), got {self.trim}")
        if self.tolerated < 0:
            raise ValueError(f"--tolerated must be >= 0, got {self.tolerated}")
        if self.model not in ("logreg", "mlp"):
            raise ValueError(f"--model must be logreg or mlp, got {self.model!r}")
        if self.partition not in PARTITIONERS or self.partition == "natural":
            raise ValueError(f"--partition must be one of iid, dirichlet_label_mix, "
                             f"dirichlet_per_class, shards, got {self.partition!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")
        small = [f for f in fractions if round(f * self.num_clients) < 1]
        if small:
            raise ValueError(f"--fractions {small} of {self.num_clients} clients round to no "
                             "malicious client: raise them or --num-clients")
        for name in defenses:
            if name == "foolsgold":
                continue
            rule = self.defense(name)
            if self.clients_per_round < rule.min_slots:
                raise ValueError(f"--defenses {name} ({rule.name}) needs at least "
                                 f"{rule.min_slots} clients per round: raise "
                                 f"--clients-per-round or lower --tolerated")

    def defense(self, name: str) -> Any:
        """The ``Aggregator`` of a defense name with this config's settings."""
        from fedjax_lab.algorithms import robust

        f, c = self.tolerated, self.clients_per_round
        return {"mean": robust.mean, "median": robust.median,
                "trimmed_mean": lambda: robust.trimmed_mean(self.trim),
                "krum": lambda: robust.krum(f),
                "multi_krum": lambda: robust.multi_krum(f, max(c - f, 1)),
                "bulyan": lambda: robust.bulyan(f),
                "geometric_median": robust.geometric_median,
                "centered_clipping": lambda: robust.centered_clipping(1.0)}[name]()

    def breakdown(self, name: str) -> float:
        """The malicious fraction of a round the rule is set to tolerate (see module doc)."""
        if name == "mean":
            return 0.0
        if name == "trimmed_mean":
            return self.trim
        if name == "foolsgold":
            return math.inf  # no fraction bound: designed against sybils, not a count
        if name in SELECTING:
            return self.tolerated / self.clients_per_round
        return 0.5  # median, geometric median, centered clipping


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ------------------------------------------------------------------------------------ run
@dataclass
class _Problem:
    name: str
    dataset: Any
    train: Any
    model: Any
    evaluate: Any
    params: Any
    success: Any  # backdoor success evaluator, or None (no image inputs)
    programs: dict = dataclasses.field(default_factory=dict)


def _problem(cfg: RobustnessConfig, name: str) -> _Problem:
    from fedjax_lab import attacks
    from fedjax_lab.experiment import build_problem

    spec = SimpleNamespace(
        dataset=name, data_dir=None, download=False, synthetic_alpha=None,
        synthetic_beta=None, partition=cfg.partition, alpha=0.5, num_clients=cfg.num_clients,
        seed=cfg.seed, model=cfg.model, batch_size=cfg.batch_size,
        local_epochs=cfg.local_epochs, clients_per_round=cfg.clients_per_round)
    dataset, train, model, evaluate, params = build_problem(spec)
    try:
        success = attacks.attack_success_evaluator(
            model.apply, dataset.test, target=cfg.backdoor_target, size=cfg.trigger_size,
            num_classes=model.num_classes)
    except ValueError:  # no image inputs: the backdoor is left out on this dataset
        success = None
    return _Problem(name, dataset, train, model, evaluate, params, success)


def _algorithm(cfg: RobustnessConfig, problem: _Problem, defense: str, attack: str) -> Any:
    """The cell's algorithm, shared by every cell with the same (defense, program kind)."""
    import optax

    from fedjax_lab import attacks
    from fedjax_lab.algorithms import fedavg, with_aggregator, with_foolsgold

    kind = attack if attack in MODEL_ATTACKS else "data"
    key = (defense, kind)
    if key not in problem.programs:
        alg = fedavg(problem.model, optax.sgd(cfg.client_lr), batch_size=cfg.batch_size,
                     local_epochs=cfg.local_epochs)
        if defense not in ("mean", "foolsgold"):
            alg = with_aggregator(alg, cfg.defense(defense))
        if kind == "data":
            alg = attacks.with_malicious_flag(alg)
        else:
            attack_fn = {"sign_flip": lambda: attacks.sign_flip(cfg.sign_flip_scale),
                         "alie": attacks.alie,
                         "ipm": lambda: attacks.ipm(cfg.ipm_epsilon)}[attack]
            alg = attacks.with_model_poisoning(alg, attack_fn())
        if defense == "foolsgold":  # outermost: it forms histories from what clients send
            alg = with_foolsgold(alg)
        problem.programs[key] = alg
    return problem.programs[key]


def _poisoned(cfg: RobustnessConfig, problem: _Problem, attack: str, fraction: float) -> Any:
    from fedjax_lab import attacks

    train = problem.train
    malicious = attacks.select_malicious(train.num_clients, fraction, cfg.seed)
    if attack == "label_flip":
        train = attacks.label_flip(train, malicious, "reverse", cfg.seed)
    elif attack == "backdoor":
        train = attacks.backdoor(train, malicious, target=cfg.backdoor_target,
                                 size=cfg.trigger_size)
    return attacks.mark_malicious(train, malicious), len(malicious)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def run_cell(cfg: RobustnessConfig, problem: _Problem, backend: Any, defense: str,
             attack: str, fraction: float) -> dict[str, Any]:
    """One cell (``fraction = 0``: the defense without attack, through the same program)."""
    from fedjax_lab.runner import run

    start = time.perf_counter()
    train, count = _poisoned(cfg, problem, attack, fraction)
    evaluate = problem.evaluate
    if attack == "backdoor":
        def evaluate(params: Any) -> dict[str, float]:
            return {**problem.evaluate(params), **problem.success(params)}

    result = run(_algorithm(cfg, problem, defense, attack), backend, train, problem.params,
                 rounds=cfg.rounds, clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                 evaluate=evaluate, eval_every=cfg.rounds, step_ladder=None,
                 num_classes=problem.model.num_classes)
    last = result.history[-1]
    row: dict[str, Any] = {
        "dataset": problem.name, "attack": attack, "defense": defense, "fraction": fraction,
        "num_malicious": count, "above_breakdown": fraction > cfg.breakdown(defense),
        "clean_accuracy": last["test_accuracy"],
        "attack_success": last.get("attack_success_rate", math.nan),
        "detection_precision": math.nan, "detection_recall": math.nan,
    }
    if defense in SELECTING:
        for name in ("detection_precision", "detection_recall"):
            row[name] = _nanmean([h[name] for h in result.history])
    row["seconds"] = time.perf_counter() - start
    return row


def run_experiment(cfg: RobustnessConfig) -> dict[str, Any]:
    """Runs the grid; writes the CSV and heatmaps into ``cfg.out``; returns the results."""
    import jax

    from fedjax_lab.backends.vmap import VmapBackend
    from fedjax_lab.io.run_folder import RunFolder

    start = time.perf_counter()
    datasets, attack_names, defenses, fractions = cfg.grid()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    backend = VmapBackend("vmap", packing="off")
    with RunFolder(cfg.out, overwrite=True, results=()):
        for name in datasets:
            problem = _problem(cfg, name)
            for defense in defenses:
                # The clean baseline: no malicious client, the data-attack program.
                base = run_cell(cfg, problem, backend, defense, "none", 0.0)
                rows.append(base)
                _progress(base)
                for attack in attack_names:
                    if attack == "backdoor" and problem.success is None:
                        skipped.append(f"backdoor on {name}: the pixel-pattern trigger needs "
                                       "image inputs")
                        continue
                    if attack in OMNISCIENT and defense == "foolsgold":
                        skipped.append(f"{attack} against foolsgold: an omniscient attack "
                                       "replaces uploads after FoolsGold forms its histories")
                        continue
                    for fraction in fractions:
                        row = run_cell(cfg, problem, backend, defense, attack, fraction)
                        rows.append(row)
                        _progress(row)
            for row in rows:
                if row["dataset"] == name:
                    base = next(r for r in rows if r["dataset"] == name and r["attack"] == "none"
                                and r["defense"] == row["defense"])
                    row["baseline_accuracy"] = base["clean_accuracy"]
                    row["accuracy_drop"] = base["clean_accuracy"] - row["clean_accuracy"]
        write_csv(os.path.join(cfg.out, "robustness.csv"), rows)
        for name in datasets:
            plot_heatmap(os.path.join(cfg.out, f"heatmap_{name}.png"),
                         [r for r in rows if r["dataset"] == name], defenses, fractions, name)
    return {
        "config": dataclasses.asdict(cfg), "rows": rows, "skipped": sorted(set(skipped)),
        "breakdown": {d: cfg.breakdown(d) for d in defenses},
        "compiles": dict(backend.compiles), "wall_seconds": time.perf_counter() - start,
        "jax_backend": jax.default_backend(),
    }


def _progress(row: dict[str, Any]) -> None:
    effect = (f"ASR {row['attack_success']:.3f}" if row["attack"] == "backdoor" else "")
    print(f"  {row['dataset']} {row['attack']} {row['defense']} {row['fraction']:g}: "
          f"accuracy {row['clean_accuracy']:.4f} {effect} ({row['seconds']:.1f} s)",
          file=sys.stderr, flush=True)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    """One row per cell, :data:`CSV_FIELDS` in order (NaN written as ``nan``)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_FIELDS})


def effect(row: dict[str, Any]) -> float:
    """The attack's effect: backdoor success rate, else the accuracy drop."""
    return row["attack_success"] if row["attack"] == "backdoor" else row["accuracy_drop"]


def plot_heatmap(path: str, rows: list[dict[str, Any]], defenses: Sequence[str],
                 fractions: Sequence[float], title: str) -> None:
    """Per attack (columns): clean accuracy (top) and attack effect (bottom), defense x
    fraction; cells above the rule's breakdown point are marked with ``*``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks_run = [a for a in dict.fromkeys(r["attack"] for r in rows) if a != "none"]
    if not attacks_run:
        return
    cols = len(attacks_run)
    width, height = 2.4 + 2.2 * cols, 1.4 + 0.5 * len(defenses) * 2
    fig, axes = plt.subplots(2, cols, figsize=(width, height), squeeze=False)
    for j, attack in enumerate(attacks_run):
        for i, (label, fn) in enumerate((
                ("clean accuracy", lambda r: r["clean_accuracy"]),
                ("ASR" if attack == "backdoor" else "accuracy drop", effect))):
            grid = np.full((len(defenses), len(fractions)), np.nan)
            marks = np.zeros_like(grid, bool)
            for r in rows:
                if r["attack"] == attack:
                    a, b = defenses.index(r["defense"]), list(fractions).index(r["fraction"])
                    grid[a, b], marks[a, b] = fn(r), r["above_breakdown"]
            ax = axes[i][j]
            ax.imshow(grid, cmap="viridis" if i == 0 else "magma", vmin=0.0, vmax=1.0,
                      aspect="auto")
            for a in range(grid.shape[0]):
                for b in range(grid.shape[1]):
                    text = "nan" if np.isnan(grid[a, b]) else f"{grid[a, b]:.2f}"
                    ax.text(b, a, text + ("*" if marks[a, b] else ""), ha="center",
                            va="center", fontsize=7,
                            color="white" if np.isnan(grid[a, b]) or grid[a, b] < 0.5
                            else "black")
            ax.set_xticks(range(len(fractions)), [f"{f:g}" for f in fractions], fontsize=7)
            ax.set_yticks(range(len(defenses)), defenses if j == 0 else [""] * len(defenses),
                          fontsize=7)
            ax.set_title(f"{attack}: {label}", fontsize=8)
            if i == 1:
                ax.set_xlabel("malicious fraction", fontsize=7)
    fig.suptitle(f"{title} (* above the rule's breakdown point)", fontsize=9)
    fig.subplots_adjust(left=1.3 / width, right=0.98, bottom=0.5 / height, top=0.88,
                        hspace=0.35, wspace=0.15)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------ CLI
def parse(argv: Sequence[str] | None = None) -> tuple[RobustnessConfig, str | None]:
    """``(config, --json path)`` of a command line (``--config FILE.yaml`` presets work)."""
    from fedjax_lab.cli import StrictParser

    parser = StrictParser(prog="robustness.py", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(RobustnessConfig)
    for f in dataclasses.fields(RobustnessConfig):
        tp, optional = optional_type(hints[f.name])
        parser.add_flag(f.name, tp, f.default, HELP[f.name], optional=optional)
    parser.add_flag("json", str, None, "write the results (every cell) here", optional=True)
    values = vars(parser.parse_args(argv))
    values.pop("config")
    json_out = values.pop("json")
    return RobustnessConfig(**values), json_out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (exit 2 with one ``error:`` line), run, print, write ``--json``."""
    cfg, json_out = parse(argv)
    results = validated_run(cfg, json_out, run_experiment)
    if results is None:
        return 2
    for line in results["skipped"]:
        print(f"skipped: {line}")
    print(f"{len(results['rows'])} cells: {cfg.out}/robustness.csv, {cfg.out}/heatmap_*.png"
          + (f", {json_out}" if json_out else "") + f" ({results['wall_seconds']:.1f} s)")
    return 0
