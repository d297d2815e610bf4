"""Reproduction of FedProx's synthetic experiments: FedAvg vs FedProx under stragglers.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith (2020), "Federated Optimization in Heterogeneous
Networks", MLSys, §5.2 / Figure 1 (training loss under 0 %, 50 %, 90 % stragglers), Figure 2
(the variance of local gradients) and the test accuracies of the appendix.

The grid: datasets Synthetic(0,0), Synthetic(0.5,0.5), Synthetic(1,1) and Synthetic-IID
(:func:`fedjax_lab.data.datasets.synthetic`, 30 devices, natural partition by device) x
straggler fractions {0, 0.5, 0.9}. In every cell, multinomial logistic regression (60 features,
10 classes) trains for 200 rounds with 10 devices per round, E = 20 local epochs of SGD with
B = 10 and step size 0.01, as three (and more) curves:

* ``fedavg``: FedAvg, which drops the stragglers (``straggler_policy="drop"``);
* ``fedprox_mu0``: FedProx with mu = 0, which keeps the stragglers' partial work;
* ``fedprox_mu{mu}`` for every mu of the grid {0.001, 0.01, 0.1, 1}; the cell's *best* mu is
  the one with the lowest final training loss (the paper's Figure 1 shows mu = 1 on the
  synthetic sets; it is in the JSON whichever mu wins).

The stragglers follow the released FedProx code (``straggler_model="paper"``): per round,
exactly ``K - round(K (1 - fraction))`` of the ``K`` sampled devices straggle, the same ones for
every method (the draws depend on the seed and round only), and each does a uniform number of
whole epochs in ``{1, ..., E - 1}``. ``straggler_model="library"`` uses the library's default
instead (an independent coin per device, a uniform number of steps). Each round also records
the paper's dissimilarity measure, the variance of the local gradients
``(1/N) sum_k ||grad F_k(w) - grad f(w)||^2`` over all ``N`` devices at the current global
model, with ``grad f = sum_k (n_k/n) grad F_k`` (the released code's "gradient difference").
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fedprox import fedprox
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.data.datasets import Dataset, federate, synthetic, synthetic_iid
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.experiment import MAX_SEED
from fedjax_lab.experiments_lib.common import validated_run
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from fedjax_lab.systems import Availability

# Dataset keys -> (alpha, beta), None for Synthetic-IID.
DATASETS: dict[str, tuple[float, float] | None] = {
    "0_0": (0.0, 0.0), "0.5_0.5": (0.5, 0.5), "1_1": (1.0, 1.0), "iid": None,
}
TITLES = {"0_0": "Synthetic(0,0)", "0.5_0.5": "Synthetic(0.5,0.5)", "1_1": "Synthetic(1,1)",
          "iid": "Synthetic-IID"}
STRAGGLER_MODELS = ("paper", "library")
# What --quick shrinks to (flags given explicitly still win).
QUICK = {"datasets": ("1_1",), "stragglers": (0.0, 0.9), "mus": (1.0,), "rounds": 10,
         "local_epochs": 2}
CURVE_METRICS = ("train_loss", "test_accuracy", "grad_variance")


@dataclass
class FedProxSyntheticConfig:
    """Configuration of the reproduction (CLI flags in :func:`main`); defaults are the paper's."""

    datasets: tuple[str, ...] = tuple(DATASETS)
    stragglers: tuple[float, ...] = (0.0, 0.5, 0.9)
    mus: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    rounds: int = 200
    num_clients: int = 30
    clients_per_round: int = 10
    local_epochs: int = 20
    batch_size: int = 10
    lr: float = 0.01
    train_fraction: float = 0.8
    straggler_model: str = "paper"
    seed: int = 0
    quick: bool = False
    out: str = "runs/fedprox_synthetic"

    def validate(self) -> None:
        """Raises ValueError naming the bad flag, before anything is built."""
        unknown = [d for d in self.datasets if d not in DATASETS]
        if not self.datasets or unknown or len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"--datasets must be distinct names of {tuple(DATASETS)}, got "
                             f"{self.datasets}")
        if not self.stragglers or not all(0.0 <= f < 1.0 for f in self.stragglers):
            raise ValueError(f"--stragglers must be fractions in [0, 1), got {self.stragglers}")
        if not self.mus or not all(0.0 < m < math.inf for m in self.mus):
            raise ValueError(f"--mus must be finite floats > 0 (mu = 0 is always run), got "
                             f"{self.mus}")
        for name in ("rounds", "num_clients", "clients_per_round", "local_epochs",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"--clients-per-round ({self.clients_per_round}) must be <= "
                             f"--num-clients ({self.num_clients})")
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"--lr must be a finite float > 0, got {self.lr}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"--train-fraction must lie in (0, 1), got {self.train_fraction}")
        if self.straggler_model not in STRAGGLER_MODELS:
            raise ValueError(f"--straggler-model must be one of {STRAGGLER_MODELS}, got "
                             f"{self.straggler_model!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")


def load_synthetic(key: str, cfg: FedProxSyntheticConfig) -> Dataset:
    """The dataset ``key`` of :data:`DATASETS`, generated from ``cfg.seed``."""
    ab = DATASETS[key]
    if ab is None:
        return synthetic_iid(cfg.num_clients, seed=cfg.seed, train_fraction=cfg.train_fraction)
    return synthetic(*ab, cfg.num_clients, seed=cfg.seed, train_fraction=cfg.train_fraction)


def dataset_stats(dataset: Dataset) -> dict[str, Any]:
    """Devices, sample totals and per-device training-sample counts.

    The test set is the union of the devices' test parts and keeps no device ids, so the
    per-device statistics are of the training parts (``floor(train_fraction * n_k)``).
    """
    train = np.bincount(dataset.train_client_ids)
    total = len(dataset.train["y"]) + len(dataset.test["y"])
    return {
        "devices": len(train),
        "samples": total,
        "train_samples": len(dataset.train["y"]),
        "test_samples": len(dataset.test["y"]),
        "train_per_device": {
            "min": int(train.min()), "median": float(np.median(train)),
            "mean": float(train.mean()), "std": float(train.std()), "max": int(train.max()),
        },
    }


def gradient_dissimilarity(grads: Any, sizes: Any) -> Any:
    """The paper's variance of local gradients, ``(1/N) sum_k ||g_k - sum_j p_j g_j||^2``.

    Li et al. 2020, §5.3 / Figure 2 (the released code's "gradient difference"): ``g_k`` is
    device ``k``'s full local gradient ``grad F_k(w)`` and ``p_j = n_j / n``, so the centre
    ``sum_j p_j g_j`` is the gradient of the global objective ``f``; the average over devices
    is uniform, as in the code. Works on numpy and jax arrays.

    Args:
      grads: ``[N, P]`` per-device gradients (flattened).
      sizes: ``[N]`` per-device example counts ``n_k``.
    """
    xp = jnp if isinstance(grads, jax.Array) else np
    p = sizes / sizes.sum()
    centre = p @ grads
    return xp.mean(xp.sum((grads - centre[None, :]) ** 2, axis=1))


def make_round_evaluator(
    apply_fn: Callable[[Any, jax.Array], jax.Array], data: FederatedData,
    test: dict[str, np.ndarray],
) -> Callable[[Any], dict[str, float]]:
    """``evaluate(params)``: global train loss, test accuracy and gradient variance, one jit.

    The training loss is the global objective ``f(w) = sum_k (n_k/n) F_k(w)`` (the code's
    sample-weighted average of the devices' losses, i.e. the mean over all training examples);
    the test accuracy is over the union of the devices' test parts. The per-device gradients
    are the Jacobian of the ``N`` per-device mean losses (reverse mode over ``N`` outputs).
    """
    sizes = np.asarray(data.sizes, np.float32)
    n = len(sizes)
    ids = jnp.asarray(np.repeat(np.arange(n), data.sizes))
    x, y = jnp.asarray(data.arrays["x"]), jnp.asarray(data.arrays["y"])
    tx, ty = jnp.asarray(test["x"]), jnp.asarray(test["y"])
    n_k = jnp.asarray(sizes)

    def device_losses(params: Any) -> jax.Array:
        per_example = softmax_cross_entropy(apply_fn(params, x), y)
        return jax.ops.segment_sum(per_example, ids, n) / n_k

    @jax.jit
    def stats(params: Any) -> dict[str, jax.Array]:
        jac = jax.jacrev(device_losses)(params)
        grads = jnp.concatenate([g.reshape(n, -1) for g in jax.tree_util.tree_leaves(jac)],
                                axis=1)
        logits = apply_fn(params, tx)
        return {
            "train_loss": jnp.sum(device_losses(params) * n_k) / n_k.sum(),
            "test_accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == ty),
            "test_loss": jnp.mean(softmax_cross_entropy(logits, ty)),
            "grad_variance": gradient_dissimilarity(grads, n_k),
        }

    def evaluate(params: Any) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(stats(params)).items()}

    return evaluate


def availability(cfg: FedProxSyntheticConfig, fraction: float, policy: str) -> Availability:
    """The round's stragglers.

    Also at 0 % (nobody straggles then): every cell then runs the same padded round program,
    which the grid compiles once per mu.
    """
    if cfg.straggler_model == "paper":
        return Availability(straggler_fraction=fraction, straggler_policy=policy,
                            straggler_sampling="exact", straggler_epochs=cfg.local_epochs)
    return Availability(straggler_fraction=fraction, straggler_policy=policy)


@dataclass
class Programs:
    """One backend and one algorithm object per mu, shared by every curve of the grid.

    The backend caches its compiled round per algorithm object, and every cell has the same
    shapes (the four datasets draw the same device sizes from the seed), so the grid compiles
    once per mu instead of once per curve.
    """

    model: Any
    cfg: FedProxSyntheticConfig
    backend: VmapBackend = dataclasses.field(default_factory=lambda: VmapBackend("vmap"))
    algorithms: dict[float, Any] = dataclasses.field(default_factory=dict)

    def algorithm(self, mu: float) -> Any:
        """FedProx with ``mu``; ``mu = 0`` is FedAvg itself (``fedprox`` returns FedAvg then)."""
        if mu not in self.algorithms:
            opt = optax.sgd(self.cfg.lr)
            kwargs = {"batch_size": self.cfg.batch_size, "local_epochs": self.cfg.local_epochs}
            self.algorithms[mu] = (fedavg(self.model, opt, **kwargs) if mu == 0.0
                                   else fedprox(self.model, opt, mu=mu, **kwargs))
        return self.algorithms[mu]


def run_curve(cfg: FedProxSyntheticConfig, data: FederatedData, programs: Programs,
              params: Any, evaluate: Callable[[Any], dict[str, float]], fraction: float,
              mu: float | None, title: str = "") -> dict[str, Any]:
    """One curve: FedAvg dropping stragglers (``mu=None``) or FedProx keeping their work.

    FedAvg and FedProx with mu = 0 run the same local update (the same compiled program);
    they differ only in what happens to the stragglers, which is the paper's comparison.
    """
    alg = programs.algorithm(0.0 if mu is None else mu)
    policy = "drop" if mu is None else "partial"
    result = run(alg, programs.backend, data, params, rounds=cfg.rounds,
                 clients_per_round=cfg.clients_per_round, seed=cfg.seed, evaluate=evaluate,
                 eval_every=1, availability=availability(cfg, fraction, policy))
    first = evaluate(params)
    h = result.history
    curve: dict[str, Any] = {"mu": mu, "policy": policy}
    for key in (*CURVE_METRICS, "test_loss"):
        curve[key] = [first[key]] + [rec[key] for rec in h]
    curve["stragglers"] = [rec.get("stragglers", 0.0) for rec in h]
    curve["dropped"] = [rec.get("dropped", 0.0) for rec in h]
    curve["final_train_loss"] = curve["train_loss"][-1]
    curve["final_test_accuracy"] = curve["test_accuracy"][-1]
    curve["wall_seconds"] = result.wall_seconds
    # Progress on stderr: the full grid is 72 runs of 200 rounds (tens of minutes on a CPU).
    print(f"  {title or f'{data.num_clients} devices'}, {cell_key(fraction)} stragglers, "
          f"{curve_label(mu)}: final loss {curve['final_train_loss']:.4f} "
          f"({result.wall_seconds:.1f} s)", file=sys.stderr, flush=True)
    return curve


def curve_label(mu: float | None) -> str:
    return "fedavg" if mu is None else f"fedprox_mu{mu:g}"


def best_mu(curves: dict[str, dict[str, Any]], mus: Sequence[float]) -> float:
    """The mu > 0 with the lowest final training loss (a diverged, NaN run never wins)."""
    def final(mu: float) -> float:
        loss = curves[curve_label(mu)]["final_train_loss"]
        return loss if math.isfinite(loss) else math.inf
    return min(mus, key=final)


def run_cell(cfg: FedProxSyntheticConfig, data: FederatedData, programs: Programs,
             params: Any, evaluate: Callable[[Any], dict[str, float]],
             fraction: float, title: str = "") -> dict[str, Any]:
    """All curves of one (dataset, straggler fraction) cell and its best mu."""
    curves = {curve_label(mu): run_curve(cfg, data, programs, params, evaluate, fraction, mu,
                                         title)
              for mu in (None, 0.0, *cfg.mus)}
    mu = best_mu(curves, cfg.mus)
    return {
        "curves": curves,
        "best_mu": mu,
        "final": {
            name: {"train_loss": c["final_train_loss"], "test_accuracy": c["final_test_accuracy"]}
            for name, c in curves.items()
        },
    }


def cell_key(fraction: float) -> str:
    return f"{round(100 * fraction)}%"


def plot_grid(path: str, results: dict[str, Any], cfg: FedProxSyntheticConfig, metric: str,
              ylabel: str, logy: bool = False) -> None:
    """Rows = straggler fractions, columns = datasets (the layout of the paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(cfg.stragglers), len(cfg.datasets)
    # The legend sits above the grid: one row of three entries, or a column on a narrow grid.
    ncol = 3 if cols >= 3 else 1
    legend_h = 0.4 if ncol == 3 else 0.8
    width, height = 3.6 * cols, 2.6 * rows + legend_h
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False,
                             sharex=True)
    styles = {"fedavg": ("FedAvg (drops stragglers)", "tab:green", "-"),
              "fedprox_mu0": ("FedProx, mu = 0 (keeps partial work)", "tab:blue", "--"),
              "best": ("FedProx, best mu (in each title)", "tab:red", "-")}
    for i, fraction in enumerate(cfg.stragglers):
        for j, name in enumerate(cfg.datasets):
            ax = axes[i][j]
            cell = results["datasets"][name]["cells"][cell_key(fraction)]
            for key, (legend, color, style) in styles.items():
                label = curve_label(cell["best_mu"]) if key == "best" else key
                ys = np.asarray(cell["curves"][label][metric], float)
                ax.plot(np.arange(len(ys)), ys, style, color=color, lw=1.2,
                        label=legend if i == j == 0 else None)
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"{TITLES[name]}, {cell_key(fraction)} stragglers, "
                         f"mu={cell['best_mu']:g}", fontsize=8)
            if i == rows - 1:
                ax.set_xlabel("# rounds")
            if j == 0:
                ax.set_ylabel(ylabel)
    # One legend for the figure and fixed margins: tight_layout measures every text box,
    # which took seconds per figure.
    fig.legend(loc="upper center", ncol=ncol, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.1 / width, bottom=0.5 / height,
                        top=1 - (legend_h + 0.25) / height, hspace=0.45, wspace=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_experiment(cfg: FedProxSyntheticConfig) -> dict[str, Any]:
    """Runs the whole grid; writes the PNGs into ``cfg.out``; returns the JSON-able results."""
    cfg.validate()
    start = time.perf_counter()
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "datasets": {}}
    programs: Programs | None = None
    with RunFolder(cfg.out, overwrite=True, results=()):
        for name in cfg.datasets:
            dataset = load_synthetic(name, cfg)
            data = federate(dataset, "natural", None, seed=cfg.seed)
            model = get_model("logreg", dataset.input_shape, dataset.num_classes)
            params = model.init(jax.random.key(cfg.seed))
            evaluate = make_round_evaluator(model.apply, data, dataset.test)
            programs = programs or Programs(model, cfg)
            results["datasets"][name] = {
                "title": TITLES[name],
                "stats": dataset_stats(dataset),
                "cells": {cell_key(f): run_cell(cfg, data, programs, params, evaluate, f,
                                                  TITLES[name])
                          for f in cfg.stragglers},
            }
        for metric, ylabel, logy in (("train_loss", "training loss", False),
                                     ("test_accuracy", "test accuracy", False),
                                     ("grad_variance", "variance of local grads", True)):
            plot_grid(os.path.join(cfg.out, f"{metric}.png"), results, cfg, metric, ylabel,
                      logy)
    results["wall_seconds"] = time.perf_counter() - start
    results["jax_backend"] = jax.default_backend()
    return results


def _floats(flag: str) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be comma-separated numbers, got {text!r}") from None
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedprox_synthetic.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a small offline smoke run: {QUICK} unless given (< 1 min)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated subset of {','.join(DATASETS)} (default: all)")
    p.add_argument("--stragglers", type=_floats("--stragglers"), default=None,
                   help="comma-separated straggler fractions (default: 0,0.5,0.9)")
    p.add_argument("--mus", type=_floats("--mus"), default=None,
                   help="comma-separated mu > 0 to choose the best from "
                        "(default: 0.001,0.01,0.1,1)")
    defaults = FedProxSyntheticConfig()
    for f in dataclasses.fields(FedProxSyntheticConfig):
        if f.name in ("datasets", "stragglers", "mus", "quick"):
            continue
        value = getattr(defaults, f.name)
        extra = {"choices": STRAGGLER_MODELS} if f.name == "straggler_model" else {}
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(value),
                       default=None, help=f"(default: {value})", **extra)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (exit 2 with a message), run, write PNGs/JSON, print a summary."""
    args = vars(_parser().parse_args(argv))
    json_out = args.pop("json_out")
    quick = args.pop("quick")
    if args["datasets"] is not None:
        args["datasets"] = tuple(d for d in args["datasets"].split(",") if d)
    given = {k: v for k, v in args.items() if v is not None}
    cfg = FedProxSyntheticConfig(quick=quick, **{**(QUICK if quick else {}), **given})
    results = validated_run(cfg, json_out, run_experiment)
    if results is None:
        return 2
    for ds in results["datasets"].values():
        for key, cell in ds["cells"].items():
            best = curve_label(cell["best_mu"])
            finals = ", ".join(
                f"{label} loss {cell['final'][label]['train_loss']:.4f} "
                f"acc {cell['final'][label]['test_accuracy']:.3f}"
                for label in ("fedavg", "fedprox_mu0", best))
            print(f"[{ds['title']} {key} stragglers] {finals}")
    print(f"outputs: {cfg.out}/{{train_loss,test_accuracy,grad_variance}}.png"
          + (f", {json_out}" if json_out else "")
          + f" ({results['wall_seconds']:.1f} s)")
    return 0
