"""Reproduction of FedPAQ's Figure 1: training loss vs simulated time under the §5 time model.

Reisizadeh, Mokhtari, Hassani, Jadbabaie, Pedarsani (2020), "FedPAQ: A Communication-Efficient
Federated Learning Method with Periodic Averaging and Quantization", AISTATS, §5 / Figure 1.

Each *setting* is a problem plus a communication/computation ratio: ``lr`` is logistic
regression on digits '0' vs '8' (the paper: MNIST 0/8; here scikit-learn's 8x8 digits unless
``--dataset mnist --data-dir`` points at TFDS data) with ``C_comm/C_comp = 100``; ``nn`` is a
one-hidden-layer network on all ten digits with ``C_comm/C_comp = 1000`` (the paper trains a
network on CIFAR-10, which is not available offline). ``n = 50`` nodes (iid split), batch
``B = 10``, and every run performs ``T = 100`` local iterations per node, i.e. ``T / tau``
rounds. Four panels, as in the paper:

1. quantization levels ``s ∈ {1, 5, 10, none}`` at ``(tau, r) = (5, 25)``;
2. participating nodes ``r ∈ {5, 10, 25, 50}`` at ``(s, tau) = (1, 5)``;
3. period ``tau ∈ {1, 2, 5, 10, 50}`` at ``(s, r) = (1, 25)``;
4. FedPAQ ``(s, tau, r) = (1, 2, 25)`` vs FedAvg (no quantization, ``tau = 2``, ``r = 25``) vs
   QSGD (``s = 1``, ``tau = 1``, all ``50`` nodes).

Curves are the global training loss (over all nodes' data) after each round against the
cumulative simulated time ``sim_time`` of :class:`fedjax_lab.systems.TimeModel`; the run's
``metrics.jsonl`` per variant keep every round record (bits, simulated and wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax

from fedjax_lab.algorithms.fedpaq import fedpaq
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.core.tree import tree_size
from fedjax_lab.data.datasets import Dataset, federate, load_dataset
from fedjax_lab.experiment import MAX_SEED
from fedjax_lab.experiments_lib.common import validated_run
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.io.writers import JsonlWriter, plot_curves
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import get_model, mlp
from fedjax_lab.runner import run
from fedjax_lab.systems import TimeModel

SETTINGS = ("lr", "nn")
# The three methods of panel 4, by the keys of ``time_to_target``.
METHODS = ("fedpaq", "fedavg", "qsgd")


@dataclass(frozen=True)
class Variant:
    """One curve: FedPAQ with period ``tau``, ``r`` nodes per round, ``s`` levels (None: none)."""

    label: str
    tau: int
    r: int
    s: int | None


@dataclass
class FedPAQFigureConfig:
    """Configuration of the Figure 1 reproduction (CLI flags in :func:`main`)."""

    settings: tuple[str, ...] = SETTINGS
    dataset: str = "digits"
    data_dir: str | None = None
    num_clients: int = 50
    total_iterations: int = 100
    batch_size: int = 10
    lr_step: float = 0.5
    nn_step: float = 0.2
    nn_hidden: int = 100
    lr_ratio: float = 100.0
    nn_ratio: float = 1000.0
    shift: float = 1.0
    scale: float = 1.0
    target_loss: float | None = None
    seed: int = 0
    quick: bool = False
    out: str = "runs/fedpaq"

    def validate(self) -> None:
        """Raises ValueError naming the bad flag, before anything is built."""
        unknown = [s for s in self.settings if s not in SETTINGS]
        if not self.settings or unknown:
            raise ValueError(f"--settings must be a subset of {SETTINGS}, got {self.settings}")
        if self.dataset not in ("digits", "mnist"):
            raise ValueError(f"--dataset must be 'digits' or 'mnist', got {self.dataset!r}")
        if self.data_dir and self.dataset == "digits":
            raise ValueError("--data-dir is read only by --dataset mnist (TFDS); --dataset digits "
                             "takes none: drop --data-dir")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")
        for name in ("num_clients", "total_iterations", "batch_size", "nn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("lr_step", "nn_step", "lr_ratio", "nn_ratio", "shift", "scale"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite float > 0")
        if self.total_iterations % 10:
            raise ValueError(
                f"--total-iterations must be a multiple of 10 (periods 1, 2, 5, 10 must divide "
                f"it; the paper uses 100), got {self.total_iterations}"
            )
        if self.target_loss is not None and not self.target_loss > 0:
            raise ValueError(f"--target-loss must be > 0, got {self.target_loss}")


def panels(
    num_clients: int, total_iterations: int, quick: bool
) -> dict[str, tuple[str, list[Variant]]]:
    """The four panels of Figure 1 (``quick`` keeps each panel's extremes and its reference).

    Panel 3 keeps the periods that divide ``total_iterations`` (all of them for T = 100).
    """
    n = num_clients
    half = max(1, n // 2)

    def paq(tau: int, r: int, s: int | None, label: str) -> Variant:
        return Variant(label, tau, min(r, n), s)

    levels = [1, 5, 10, None] if not quick else [1, None]
    nodes = sorted({max(1, n // 10), max(1, n // 5), half, n}) if not quick else [half, n]
    periods = [1, 2, 5, 10, 50] if not quick else [1, 5, 50]
    periods = [t for t in periods if total_iterations % t == 0]
    return {
        "1": (f"vary s (tau=5, r={half})",
              [paq(5, half, s, f"s={s if s else 'none'}") for s in levels]),
        "2": ("vary r (s=1, tau=5)", [paq(5, r, 1, f"r={r}") for r in nodes]),
        "3": (f"vary tau (s=1, r={half})", [paq(t, half, 1, f"tau={t}") for t in periods]),
        "4": ("FedPAQ vs FedAvg vs QSGD", [
            paq(2, half, 1, "fedpaq"),
            paq(2, half, None, "fedavg"),
            paq(1, n, 1, "qsgd"),
        ]),
    }


def class_subset(dataset: Dataset, classes: Sequence[int]) -> Dataset:
    """The examples of ``classes`` only, relabelled ``0..k-1`` in the given order."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not all(0 <= c < dataset.num_classes
                                                    for c in classes):
        raise ValueError(f"classes must be distinct labels of {dataset.name}, got {classes}")
    relabel = np.full(dataset.num_classes, -1, np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)

    def keep(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = np.isin(split["y"], classes)
        return {"x": split["x"][m], "y": relabel[split["y"][m]]}

    return dataset._replace(train=keep(dataset.train), test=keep(dataset.test),
                            num_classes=len(classes), train_client_ids=None)


@dataclass
class Problem:
    """A setting's data, model, step size and time model."""

    name: str
    data: Any
    model: Any
    params: Any
    step: float
    time_model: TimeModel
    ratio: float
    evaluate: Any


def build_problem(cfg: FedPAQFigureConfig, setting: str) -> Problem:
    """Dataset, federated iid split, model, global-train-loss evaluator and time model."""
    kwargs = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
    full = load_dataset(cfg.dataset, **kwargs)
    if setting == "lr":
        dataset = class_subset(full, (0, 8))
        model = get_model("logreg", dataset.input_shape, dataset.num_classes)
        step, ratio = cfg.lr_step, cfg.lr_ratio
    else:
        dataset = full
        model = mlp(dataset.input_shape, dataset.num_classes, hidden=(cfg.nn_hidden,))
        step, ratio = cfg.nn_step, cfg.nn_ratio
    data = federate(dataset, "iid", cfg.num_clients, seed=cfg.seed)
    params = model.init(jax.random.key(cfg.seed))
    time_model = TimeModel.from_ratio(ratio, tree_size(params), shift=cfg.shift,
                                      scale=cfg.scale)
    # The paper plots the training loss: the global objective over all nodes' data.
    evaluator = make_evaluator(model.apply, data.arrays)

    def evaluate(p: Any) -> dict[str, float]:
        return {"global_train_loss": evaluator(p)["test_loss"]}

    return Problem(setting, data, model, params, step, time_model, ratio, evaluate)


def run_variant(problem: Problem, variant: Variant, cfg: FedPAQFigureConfig,
                jsonl_path: str | None = None) -> dict[str, Any]:
    """Runs one curve for ``T`` local iterations (``T // tau`` rounds); returns the curve."""
    if cfg.total_iterations % variant.tau:
        raise ValueError(
            f"T={cfg.total_iterations} is not a multiple of tau={variant.tau}; choose T so "
            "that every period completes (the paper uses T=100)"
        )
    compressor = qsgd(num_levels=variant.s) if variant.s is not None else None
    alg = fedpaq(problem.model, optax.sgd(problem.step), num_steps=variant.tau,
                 batch_size=cfg.batch_size, compressor=compressor)
    writer = JsonlWriter(jsonl_path) if jsonl_path else None
    try:
        result = run(
            alg, VmapBackend("vmap"), problem.data, problem.params,
            rounds=cfg.total_iterations // variant.tau, clients_per_round=variant.r,
            seed=cfg.seed, evaluate=problem.evaluate, eval_every=1,
            time_model=problem.time_model,
            callbacks=[lambda r, rec: writer.write(rec)] if writer else (),
        )
    finally:
        if writer:
            writer.close()
    h = result.history
    return {
        "tau": variant.tau, "r": variant.r, "s": variant.s,
        "rounds": len(h),
        "sim_time": [0.0] + [rec["sim_time"] for rec in h],
        "train_loss": [problem.evaluate(problem.params)["global_train_loss"]]
        + [rec["global_train_loss"] for rec in h],
        "uplink_bits": h[-1]["cum_uplink_bits"] if h else 0.0,
        "sim_comm_time": h[-1]["sim_comm_time"] if h else 0.0,
        "sim_comp_time": h[-1]["sim_comp_time"] if h else 0.0,
        "wall_time": result.wall_seconds,
    }


def time_to_target(curve: dict[str, Any], target: float) -> float | None:
    """First simulated time at which the loss is <= ``target`` (None if never)."""
    for t, loss in zip(curve["sim_time"], curve["train_loss"], strict=True):
        if loss <= target:
            return t
    return None


def run_setting(cfg: FedPAQFigureConfig, setting: str) -> dict[str, Any]:
    """All panels of one setting: curves, PNGs, and panel 4's time to target."""
    problem = build_problem(cfg, setting)
    cache: dict[tuple[int, int, int | None], dict[str, Any]] = {}
    out_dir = os.path.join(cfg.out, setting)
    os.makedirs(out_dir, exist_ok=True)
    result: dict[str, Any] = {
        "num_params": tree_size(problem.params),
        "ratio": problem.ratio,
        "bandwidth": problem.time_model.bandwidth,
        "step_size": problem.step,
        "num_train_examples": problem.data.num_examples,
        "client_sizes": [int(problem.data.sizes.min()), int(problem.data.sizes.max())],
        "panels": {},
    }
    for key, (title, variants) in panels(cfg.num_clients, cfg.total_iterations,
                                         cfg.quick).items():
        curves = {}
        for v in variants:
            k = (v.tau, v.r, v.s)
            if k not in cache:
                name = f"tau{v.tau}_r{v.r}_s{v.s if v.s else 'none'}.jsonl"
                cache[k] = run_variant(problem, v, cfg, os.path.join(out_dir, name))
            curves[v.label] = cache[k]
        # Per panel, the time each curve needs to reach the loss that all of them reach.
        panel_target = max(c["train_loss"][-1] for c in curves.values())
        result["panels"][key] = {
            "title": title,
            "curves": curves,
            "target_loss": panel_target,
            "time_to_target": {
                label: time_to_target(c, panel_target) for label, c in curves.items()
            },
        }
        # Log time axis: the unquantized curves take 10-1000x longer than the quantized
        # ones. The t=0 point (initial loss) is in the JSON but cannot sit on a log axis.
        plot_curves(
            os.path.join(out_dir, f"panel{key}.png"),
            {label: (c["sim_time"][1:], c["train_loss"][1:]) for label, c in curves.items()},
            xlabel="simulated time", ylabel="training loss", logx=True,
            title=f"{setting}: {title} (C_comm/C_comp={problem.ratio:g})",
        )
    final = {m: result["panels"]["4"]["curves"][m]["train_loss"][-1] for m in METHODS}
    # Default target: the loss that all three methods reach within T (the worst final loss).
    target = cfg.target_loss if cfg.target_loss is not None else max(final.values())
    result["target_loss"] = target
    result["final_loss"] = final
    result["time_to_target"] = {
        m: time_to_target(result["panels"]["4"]["curves"][m], target) for m in METHODS
    }
    return result


def run_figure(cfg: FedPAQFigureConfig) -> dict[str, Any]:
    """Runs every configured setting; returns the JSON-able results."""
    cfg.validate()
    start = time.perf_counter()
    # Locked for this run, and found writable before anything runs (results are replaced).
    with RunFolder(cfg.out, overwrite=True, results=()):
        settings = {s: run_setting(cfg, s) for s in cfg.settings}
    first = settings[cfg.settings[0]]
    return {
        "config": dataclasses.asdict(cfg),
        "settings": settings,
        "time_to_target": first["time_to_target"],
        "target_loss": first["target_loss"],
        "wall_seconds": time.perf_counter() - start,
        "jax_backend": jax.default_backend(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpaq.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="logistic-regression setting only, fewer curves per panel (< 1 min)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--settings", default=None, help="comma-separated subset of lr,nn")
    defaults = FedPAQFigureConfig()
    for f in dataclasses.fields(FedPAQFigureConfig):
        if f.name in ("settings", "quick"):
            continue
        value = getattr(defaults, f.name)
        kind = type(value) if value is not None else (float if f.name == "target_loss" else str)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=value,
                       help=f"(default: {value})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (exit 2 with a message), run, write PNGs/JSON, print a summary."""
    args = vars(_parser().parse_args(argv))
    json_out = args.pop("json_out")
    settings = args.pop("settings")
    quick = args.pop("quick")
    if settings is None:
        settings = "lr" if quick else ",".join(SETTINGS)
    cfg = FedPAQFigureConfig(settings=tuple(s for s in settings.split(",") if s), quick=quick,
                             **args)
    results = validated_run(cfg, json_out, run_figure)
    if results is None:
        return 2
    for name, res in results["settings"].items():
        ttt = ", ".join(
            f"{m}={t:.4g}" if t is not None else f"{m}=never"
            for m, t in res["time_to_target"].items()
        )
        print(f"[{name}] C_comm/C_comp={res['ratio']:g} p={res['num_params']} "
              f"target loss {res['target_loss']:.4f}: time to target {ttt}")
    print(f"outputs: {cfg.out}/<setting>/panel{{1..4}}.png"
          + (f", {json_out}" if json_out else "")
          + f" ({results['wall_seconds']:.1f} s)")
    return 0
