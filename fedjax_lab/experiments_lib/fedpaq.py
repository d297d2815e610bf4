"""Reproduction of FedPAQ's Figure 1 (all eight panels): training loss vs simulated time.

Reisizadeh, Mokhtari, Hassani, Jadbabaie, Pedarsani (2020), "FedPAQ: A Communication-Efficient
Federated Learning Method with Periodic Averaging and Quantization", AISTATS, §5 / Figure 1.

Two settings, four panels each (:data:`PAPER_PANELS` is the paper's table of settings, with the
values the text does not state marked as inferred):

* ``lr`` (§5.1, top row): L2-regularised logistic regression on MNIST digits '0' and '8',
  ``n = 50`` nodes x 200 samples, ``C_comm/C_comp = 100``;
* ``nn`` (§5.2, bottom row): a network with four hidden layers (> 92K parameters) on 10K
  CIFAR-10 samples, ``n = 50`` nodes, ``C_comm/C_comp = 1000``.

Both: ``T = 100`` local iterations per node (``T / tau`` rounds), batch ``B = 10``, the
shifted-exponential computation time and the ``bits / BW`` communication time of
:class:`fedjax_lab.systems.TimeModel`, QSGD's bits for ``s`` levels (32 bits per float
unquantized). The real data are read from TFDS when ``--data-dir`` is given; otherwise an
offline stand-in of the same shape is used and named in the outputs (:func:`load_setting_data`).

Step size: "we ... finely tune the stepsize's coefficient" (§5). Every curve is trained for a
grid of constant step sizes in ONE compiled program (:func:`fedjax_lab.sweep.sweep`, with the
global training loss computed inside the program after every round), and the step with the
lowest final training loss is kept; the JSON records the grid, every final loss and the choice.

The paper's strongly convex theory (Theorem 1: ``O(1/T)`` with ``eta_k ~ 1/k``) is checked by
:mod:`fedjax_lab.experiments_lib.fedpaq_theory`, run from the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms.fedpaq import fedpaq
from fedjax_lab.compressors import qsgd
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.tree import tree_size
from fedjax_lab.core.types import Algorithm, Cohort
from fedjax_lab.data.datasets import Dataset, digits, federate, load_dataset
from fedjax_lab.experiment import MAX_SEED
from fedjax_lab.experiments_lib.common import validated_run
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.models import get_model, mlp
from fedjax_lab.sweep import parse_values, sweep
from fedjax_lab.systems import TimeModel
from fedjax_lab.systems.time_model import SimulatedClock

SETTINGS = ("lr", "nn")
# The paper's datasets, read from TFDS when --data-dir is given.
TFDS_NAMES = {"lr": "mnist", "nn": "cifar10"}
# The three methods of panel 4, by curve label.
METHODS = ("fedpaq", "fedavg", "qsgd")
# The paper's network size: n = 50 nodes; ``r`` values below are for n = 50 and scale with n.
PAPER_NODES = 50


@dataclass(frozen=True)
class Variant:
    """One curve: FedPAQ with period ``tau``, ``r`` nodes per round, ``s`` levels (None: none)."""

    label: str
    tau: int
    r: int
    s: int | None


@dataclass(frozen=True)
class PanelSpec:
    """One panel of Figure 1 as the paper states it (``r`` for ``n = 50`` nodes).

    Attributes:
      vary: the parameter the panel varies (``"s"``, ``"r"``, ``"tau"``) or ``"method"``.
      values: the varied values (``None``: no quantization), or the methods of panel 4.
      fixed: the other parameters (for panel 4: ``{method: (s, r, tau)}``).
      inferred: what the text does not state and this reproduction chose.
    """

    vary: str
    values: tuple
    fixed: dict
    inferred: str = ""


# §5.1 and §5.2, panel by panel. The text names the fixed pair of each panel except panel 3,
# and lists the varied values only for panel 1 of §5.1 (s ∈ {1, 5, 10} and no quantization).
PAPER_PANELS: dict[str, dict[str, PanelSpec]] = {
    "lr": {
        "1": PanelSpec("s", (1, 5, 10, None), {"tau": 5, "r": 25}),
        "2": PanelSpec("r", (5, 10, 25, 50), {"s": 1, "tau": 5},
                       inferred="the r values (the text fixes (s, tau) = (1, 5) only)"),
        "3": PanelSpec("tau", (1, 2, 5, 10, 50), {"s": 1, "r": 25},
                       inferred="(s, r) = (1, 25) and tau = 5 (the text names tau = 1, 2, 10, 50)"),
        "4": PanelSpec("method", METHODS, {"fedpaq": (1, 50, 2), "fedavg": (None, 50, 2),
                                           "qsgd": (1, 50, 1)}),
    },
    "nn": {
        "1": PanelSpec("s", (1, 5, 10, None), {"tau": 2, "r": 25},
                       inferred="the s values (taken from §5.1)"),
        "2": PanelSpec("r", (5, 10, 25, 50), {"s": 1, "tau": 2},
                       inferred="the r values (the text fixes (s, tau) = (1, 2) only)"),
        "3": PanelSpec("tau", (1, 2, 5, 10, 50), {"s": 1, "r": 25},
                       inferred="(s, r) = (1, 25) and the tau values (the text names tau = 10)"),
        "4": PanelSpec("method", METHODS, {"fedpaq": (1, 20, 10), "fedavg": (None, 20, 10),
                                           "qsgd": (1, 50, 1)}),
    },
}


def _label(vary: str, value: Any) -> str:
    if vary == "s":
        return f"s={value if value is not None else 'inf'}"
    return f"{vary}={value}"


def panels(setting: str, num_clients: int, total_iterations: int,
           quick: bool = False) -> dict[str, tuple[str, list[Variant]]]:
    """The four panels of ``setting`` as ``{key: (title, curves)}`` for ``num_clients`` nodes.

    ``r`` is the paper's value scaled by ``num_clients / 50`` (exact for multiples of 10).
    Panel 3 keeps the periods that divide ``total_iterations`` (all of them for T = 100).
    ``quick`` (a smoke run: few compilations) keeps, in panels 1-3, only the reference curve
    they share (``s = 1`` at panel 1's ``(tau, r)``); panel 4 whole.
    """
    if setting not in PAPER_PANELS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if num_clients % 10:
        raise ValueError(f"num_clients must be a multiple of 10 (the paper's r values are "
                         f"multiples of n/10), got {num_clients}")

    def nodes(r: int) -> int:
        return r * num_clients // PAPER_NODES

    first = PAPER_PANELS[setting]["1"].fixed
    reference = (first["tau"], nodes(first["r"]), 1)
    out = {}
    for key, spec in PAPER_PANELS[setting].items():
        if spec.vary == "method":
            curves = [Variant(m, spec.fixed[m][2], nodes(spec.fixed[m][1]), spec.fixed[m][0])
                      for m in spec.values]
            title = "FedPAQ vs FedAvg vs QSGD"
        else:
            fixed = dict(spec.fixed)
            if "r" in fixed:
                fixed["r"] = nodes(fixed["r"])
            values = [v for v in spec.values
                      if spec.vary != "tau" or total_iterations % v == 0]
            curves = []
            for v in values:
                p = {**fixed, spec.vary: nodes(v) if spec.vary == "r" else v}
                if quick and (p["tau"], p["r"], p["s"]) != reference:
                    continue
                curves.append(Variant(_label(spec.vary, p[spec.vary]), p["tau"], p["r"],
                                      p["s"]))
            title = f"vary {spec.vary} (" + ", ".join(
                f"{k}={fixed[k]}" for k in ("s", "tau", "r") if k in fixed) + ")"
        out[key] = (title, curves)
    return out


@dataclass
class FedPAQFigureConfig:
    """Configuration of the Figure 1 reproduction (CLI flags in :func:`main`)."""

    settings: tuple[str, ...] = SETTINGS
    data_dir: str | None = None
    num_clients: int = 50
    samples_per_node: int = 200
    total_iterations: int = 100
    batch_size: int = 10
    lr_l2: float = 1e-3
    lr_steps: str = "geom:0.001:0.1:7"
    nn_steps: str = "geom:0.003:0.3:5"
    nn_hidden: str = "30,30,30,30"
    lr_ratio: float = 100.0
    nn_ratio: float = 1000.0
    shift: float = 1.0
    scale: float = 1.0
    loss_fractions: str = "0.5,0.8,0.9,0.95,0.99"
    theory: bool = True
    theory_l2: float = 0.5
    theory_iterations: int | None = None
    theory_seeds: int = 4
    seed: int = 0
    quick: bool = False
    out: str = "runs/fedpaq"

    def hidden(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.nn_hidden.split(",") if w.strip())

    def steps(self, setting: str) -> list[float]:
        return parse_values(self.lr_steps if setting == "lr" else self.nn_steps)

    def fractions(self) -> list[float]:
        return [float(f) for f in self.loss_fractions.split(",") if f.strip()]

    def validate(self) -> None:
        """Raises ValueError naming the bad flag, before anything is built."""
        unknown = [s for s in self.settings if s not in SETTINGS]
        if not self.settings or unknown:
            raise ValueError(f"--settings must be a subset of {SETTINGS}, got {self.settings}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")
        for name in ("num_clients", "samples_per_node", "total_iterations", "batch_size",
                     "theory_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_clients % 10:
            raise ValueError(f"--num-clients must be a multiple of 10 (the paper's r values "
                             f"are multiples of n/10; it uses 50), got {self.num_clients}")
        if self.samples_per_node < self.batch_size:
            raise ValueError(f"--samples-per-node ({self.samples_per_node}) must be >= "
                             f"--batch-size ({self.batch_size})")
        if self.total_iterations % 10:
            raise ValueError(
                f"--total-iterations must be a multiple of 10 (periods 1, 2, 5, 10 must divide "
                f"it; the paper uses 100), got {self.total_iterations}"
            )
        if self.theory_iterations is not None and self.theory_iterations < 16:
            raise ValueError(f"--theory-iterations must be >= 16, got {self.theory_iterations}")
        for name in ("lr_ratio", "nn_ratio", "shift", "scale", "theory_l2"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite float > 0")
        if not 0 <= self.lr_l2 < math.inf:
            raise ValueError(f"--lr-l2 must be a finite float >= 0, got {self.lr_l2}")
        try:
            hidden = self.hidden()
        except ValueError:
            hidden = ()
        if not hidden or min(hidden) < 1:
            raise ValueError(f"--nn-hidden must be comma-separated positive widths, got "
                             f"{self.nn_hidden!r}")
        for setting in ("lr", "nn"):
            steps = self.steps(setting)  # parse_values raises naming the syntax
            if not steps or not all(0 < s < math.inf for s in steps):
                raise ValueError(f"--{setting}-steps must be finite step sizes > 0, got "
                                 f"{steps}")
        if self.data_dir:
            # TFDS keeps each dataset in <data_dir>/<name>/<version>: refuse a wrong folder
            # here (one line, before anything is built) rather than deep in the loader.
            for setting in self.settings:
                name = TFDS_NAMES[setting]
                if not os.path.isdir(os.path.join(self.data_dir, name)):
                    raise ValueError(
                        f"--data-dir {self.data_dir!r} holds no TFDS {name!r} (needed by the "
                        f"{setting!r} setting; prepare it with tfds build {name} "
                        "--file_format=array_record --data_dir=DIR); without --data-dir the "
                        "offline stand-in is used")
        try:
            fractions = self.fractions()
        except ValueError:
            fractions = []
        if not fractions or not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"--loss-fractions must be comma-separated numbers in (0, 1], "
                             f"got {self.loss_fractions!r}")


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


def load_setting_data(cfg: FedPAQFigureConfig, setting: str) -> tuple[Dataset, str]:
    """The ``n x m`` training examples of ``setting`` and a description of where they come from.

    With ``--data-dir``: TFDS MNIST digits '0'/'8' (``lr``) or CIFAR-10 (``nn``), ``n·m``
    train examples drawn without replacement. Without: the offline stand-in, scikit-learn's 8x8
    digits resized (bilinear) to the real data's shape -- '0'/'8' at 28x28 for ``lr``, all ten
    digits at 32x32 repeated over 3 channels for ``nn`` -- so that the models and ``p`` are the
    paper's; it has only 1,437 train images, so the ``n·m`` examples are drawn WITH replacement.
    """
    count = cfg.num_clients * cfg.samples_per_node
    if cfg.data_dir:
        full = load_dataset(TFDS_NAMES[setting], data_dir=cfg.data_dir)
        full = class_subset(full, (0, 8)) if setting == "lr" else full
        what = "TFDS MNIST digits '0' and '8'" if setting == "lr" else "TFDS CIFAR-10"
        replace = False
    else:
        if setting == "lr":
            full = digits(classes=(0, 8), resize=(28, 28))
            what = "stand-in: scikit-learn 8x8 digits '0'/'8' resized to 28x28 (MNIST's shape)"
        else:
            full = digits(resize=(32, 32))
            full = full._replace(
                train={"x": np.repeat(full.train["x"], 3, axis=-1), "y": full.train["y"]},
                test={"x": np.repeat(full.test["x"], 3, axis=-1), "y": full.test["y"]},
                input_shape=(32, 32, 3))
            what = ("stand-in: scikit-learn 8x8 digits (10 classes) resized to 32x32x3 "
                    "(CIFAR-10's shape)")
        replace = True
    x, y = np.asarray(full.train["x"]), np.asarray(full.train["y"])
    if not replace and len(y) < count:
        raise ValueError(f"--num-clients x --samples-per-node = {count} exceeds the "
                         f"{len(y)} train examples of {what}")
    rng = rng_lib.host_rng(cfg.seed, rng_lib.PARTITION_STREAM, 1)
    rows = rng.choice(len(y), size=count, replace=replace)
    what += (f", {count} examples drawn {'with' if replace else 'without'} replacement from "
             f"{len(y)}")
    return full._replace(train={"x": x[rows], "y": y[rows]}, train_client_ids=None), what


@dataclass
class Problem:
    """A setting's data, model, objective, client optimizer and time model."""

    name: str
    source: str
    data: Any
    model: Any
    params: Any
    loss_fn: Callable[[Any, dict[str, jax.Array]], jax.Array]
    train: dict[str, jax.Array]
    optimizer: Callable[[Any], optax.GradientTransformation]
    time_model: TimeModel
    ratio: float

    def objective(self, params: Any) -> float:
        """The global training loss of ``params`` (host call)."""
        return float(_jitted(self.loss_fn)(params, self.train))


@functools.cache
def _jitted(fn: Callable) -> Callable:
    # One compiled objective per setting, however many curves ask for it.
    return jax.jit(fn)


def global_objective(model: Any, l2: float = 0.0
                     ) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
    """``(x, data) -> mean_i loss(x; xi_i) + (l2/2)·||x||²`` over ``data`` (jnp, traceable).

    The paper plots the training loss of the server's model: the global objective (2) over
    all nodes' data, here with the L2 term of the regularised logistic regression. The data
    are an argument, not a closure, so that compiled programs do not embed them as constants.
    """
    def objective(params: Any, data: dict[str, jax.Array]) -> jax.Array:
        loss = jnp.mean(softmax_cross_entropy(model.apply(params, data["x"]), data["y"]))
        if l2:
            loss = loss + 0.5 * l2 * sum(jnp.sum(p * p) for p in jax.tree.leaves(params))
        return loss

    return objective


def l2_sgd(l2: float) -> Callable[[Any], optax.GradientTransformation]:
    """``step -> SGD on the L2-regularised loss`` (the gradient of ``(l2/2)||x||²`` is
    ``l2·x``); ``step`` may be a traced scalar (swept)."""
    if l2:
        return lambda step: optax.chain(optax.add_decayed_weights(l2), optax.sgd(step))
    return optax.sgd


def build_problem(cfg: FedPAQFigureConfig, setting: str) -> Problem:
    """Data (federated iid, ``m`` examples per node), model, objective and time model."""
    dataset, source = load_setting_data(cfg, setting)
    if setting == "lr":
        model = get_model("logreg", dataset.input_shape, dataset.num_classes)
        l2, ratio = cfg.lr_l2, cfg.lr_ratio
    else:
        model = mlp(dataset.input_shape, dataset.num_classes, hidden=cfg.hidden())
        l2, ratio = 0.0, cfg.nn_ratio
    data = federate(dataset, "iid", cfg.num_clients, seed=cfg.seed)
    params = model.init(jax.random.key(cfg.seed))
    time_model = TimeModel.from_ratio(ratio, tree_size(params), shift=cfg.shift,
                                      scale=cfg.scale)
    train = {k: jnp.asarray(v) for k, v in dataset.train.items()}
    return Problem(setting, source, data, model, params, global_objective(model, l2), train,
                   l2_sgd(l2), time_model, ratio)


def make_fedpaq(problem: Problem, variant: Variant, batch_size: int
                ) -> Callable[[dict[str, Any]], Algorithm]:
    """``{"step": eta} -> FedPAQ`` of ``variant`` (QSGD with ``s`` levels, or unquantized)."""
    compressor = qsgd(num_levels=variant.s) if variant.s is not None else None

    def make(h: dict[str, Any]) -> Algorithm:
        return fedpaq(problem.model, problem.optimizer(h["step"]), num_steps=variant.tau,
                      batch_size=batch_size, compressor=compressor)

    return make


def simulated_times(problem: Problem, variant: Variant, batch_size: int,
                    upload_bits: np.ndarray, seed: int) -> list[float]:
    """Cumulative ``sim_time`` after each round, as ``runner.run``'s SimulatedClock gives it.

    Every node of the round processes ``tau·B`` examples (each holds >= B of them).
    """
    clock = SimulatedClock(problem.time_model)
    mask = np.ones((variant.r, variant.tau * batch_size), bool)
    cohort = Cohort(arrays={}, index=None, mask=mask, weight=None, client_ids=None)
    return [clock.tick(cohort, float(b), seed=seed, round_idx=k)["sim_time"]
            for k, b in enumerate(upload_bits)]


def run_curve(problem: Problem, variant: Variant, cfg: FedPAQFigureConfig) -> dict[str, Any]:
    """Trains ``variant`` for every step size of the grid (one program); keeps the best.

    The best step is the one with the lowest final global training loss (non-finite losses
    never win); ``at_grid_edge`` says when it is the smallest or largest of the grid.
    """
    if cfg.total_iterations % variant.tau:
        raise ValueError(f"T={cfg.total_iterations} is not a multiple of tau={variant.tau}")
    steps = cfg.steps(problem.name)
    res = sweep(make_fedpaq(problem, variant, cfg.batch_size), {"step": steps}, problem.data,
                problem.params, seeds=[cfg.seed], rounds=cfg.total_iterations // variant.tau,
                clients_per_round=variant.r, keep_params=False,
                round_eval=lambda p, d, _: {"global_train_loss": problem.loss_fn(p, d)},
                round_eval_data=problem.train)
    losses = np.asarray(res.history["global_train_loss"][0], np.float64)  # [grid, rounds]
    final = losses[:, -1]
    ranked = np.where(np.isfinite(final), final, np.inf)
    best = int(np.argmin(ranked))
    bits = np.asarray(res.history["upload_bits"][0, best], np.float64)
    initial = problem.objective(problem.params)
    return {
        "tau": variant.tau, "r": variant.r, "s": variant.s,
        "rounds": cfg.total_iterations // variant.tau,
        "step_grid": steps,
        "final_loss_per_step": [float(v) if np.isfinite(v) else None for v in final],
        "step": steps[best],
        "at_grid_edge": len(steps) > 1 and best in (0, len(steps) - 1),
        "sim_time": [0.0, *simulated_times(problem, variant, cfg.batch_size, bits, cfg.seed)],
        "train_loss": [initial] + [float(v) for v in losses[best]],
        "uplink_bits": float(bits.sum()),
        "compile_seconds": res.compile_seconds,
        "run_seconds": res.run_seconds,
    }


def time_to_loss(sim_time: Sequence[float], losses: Sequence[float],
                 levels: Sequence[float]) -> list[float | None]:
    """For each level, the first simulated time at which the loss is <= level (None: never).

    A non-finite loss never reaches a level.
    """
    t = np.asarray(sim_time, np.float64)
    f = np.asarray(losses, np.float64)
    if t.shape != f.shape or t.ndim != 1:
        raise ValueError(f"sim_time and losses must be 1-D of one length, got {t.shape} and "
                         f"{f.shape}")
    out: list[float | None] = []
    for level in levels:
        hit = np.isfinite(f) & (f <= level)
        out.append(float(t[np.argmax(hit)]) if hit.any() else None)
    return out


def loss_levels(curves: dict[str, dict[str, Any]], fractions: Sequence[float]) -> list[float]:
    """Levels ``f0 - q·(f0 - f_best)``: ``q`` of the way from the initial loss to the best
    final loss of all ``curves`` (q = 1: only the best curve reaches it)."""
    f0 = max(c["train_loss"][0] for c in curves.values())
    finals = [c["train_loss"][-1] for c in curves.values() if math.isfinite(c["train_loss"][-1])]
    if not finals:
        return []
    best = min(finals)
    return [f0 - q * (f0 - best) for q in fractions]


def plot_figure(path: str, results: dict[str, Any]) -> None:
    """The figure: one row per setting, one column per panel, loss vs simulated time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results)
    fig, axes = plt.subplots(len(rows), 4, figsize=(18, 3.8 * len(rows)), squeeze=False)
    for i, setting in enumerate(rows):
        res = results[setting]
        for j, (key, panel) in enumerate(sorted(res["panels"].items())):
            ax = axes[i][j]
            for label, c in panel["curves"].items():
                # The t = 0 point (initial loss) cannot sit on the log time axis.
                ax.plot(c["sim_time"][1:], c["train_loss"][1:], label=label,
                        marker="." if c["rounds"] < 40 else None)
            ax.set_xscale("log")
            ax.set_xlabel("training time (simulated)")
            ax.set_ylabel("training loss")
            ax.set_title(f"{setting} {key}: {panel['title']}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("FedPAQ Figure 1: " + "; ".join(
        f"{s}: {results[s]['source']}, C_comm/C_comp={results[s]['ratio']:g}" for s in rows),
        fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_setting(cfg: FedPAQFigureConfig, setting: str) -> dict[str, Any]:
    """All four panels of one setting: tuned curves and time-to-loss per curve."""
    problem = build_problem(cfg, setting)
    cache: dict[tuple[int, int, int | None], dict[str, Any]] = {}
    result: dict[str, Any] = {
        "source": problem.source,
        "num_params": tree_size(problem.params),
        "ratio": problem.ratio,
        "bandwidth": problem.time_model.bandwidth,
        "num_train_examples": problem.data.num_examples,
        "client_sizes": [int(problem.data.sizes.min()), int(problem.data.sizes.max())],
        "panels": {},
    }
    for key, (title, variants) in panels(setting, cfg.num_clients, cfg.total_iterations,
                                         cfg.quick).items():
        curves = {}
        for v in variants:
            k = (v.tau, v.r, v.s)
            if k not in cache:
                cache[k] = run_curve(problem, v, cfg)
            curves[v.label] = cache[k]
        result["panels"][key] = {"title": title, "paper": dataclasses.asdict(
            PAPER_PANELS[setting][key]), "curves": curves}
    everything = {f"{k}/{label}": c for k, p in result["panels"].items()
                  for label, c in p["curves"].items()}
    levels = loss_levels(everything, cfg.fractions())
    result["loss_levels"] = levels
    result["loss_fractions"] = cfg.fractions()
    for panel in result["panels"].values():
        panel["time_to_loss"] = {
            label: time_to_loss(c["sim_time"], c["train_loss"], levels)
            for label, c in panel["curves"].items()
        }
    return result


def run_figure(cfg: FedPAQFigureConfig) -> dict[str, Any]:
    """Runs every configured setting (and the theory check); returns the JSON-able results."""
    from fedjax_lab.experiments_lib.fedpaq_theory import run_theory

    cfg.validate()
    start = time.perf_counter()
    # Locked for this run, and found writable before anything runs (results are replaced).
    with RunFolder(cfg.out, overwrite=True, results=()):
        settings = {s: run_setting(cfg, s) for s in cfg.settings}
        plot_figure(os.path.join(cfg.out, "figure1.png"), settings)
        theory = run_theory(cfg) if cfg.theory else None
    return {
        "config": dataclasses.asdict(cfg),
        "settings": settings,
        "theory": theory,
        "wall_seconds": time.perf_counter() - start,
        "jax_backend": jax.default_backend(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpaq.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="panels 1-3: only their shared reference curve (a smoke run)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated subset of lr,nn")
    p.add_argument("--no-theory", dest="theory", action="store_false",
                   help="skip the strongly convex O(1/T) check")
    defaults = FedPAQFigureConfig()
    kinds = {"data_dir": str, "theory_iterations": int}
    for f in dataclasses.fields(FedPAQFigureConfig):
        if f.name in ("settings", "quick", "theory"):
            continue
        value = getattr(defaults, f.name)
        kind = kinds.get(f.name, type(value))
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=value,
                       help=f"(default: {value})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (exit 2 with a message), run, write PNG/JSON, print a summary."""
    args = vars(_parser().parse_args(argv))
    json_out = args.pop("json_out")
    settings = args.pop("settings")
    cfg = FedPAQFigureConfig(settings=tuple(s for s in settings.split(",") if s), **args)
    results = validated_run(cfg, json_out, run_figure)
    if results is None:
        return 2
    for name, res in results["settings"].items():
        print(f"[{name}] {res['source']}; p={res['num_params']} "
              f"C_comm/C_comp={res['ratio']:g}")
        levels = ", ".join(f"{v:.4g}" for v in res["loss_levels"])
        print(f"  time to loss [{levels}]:")
        for key, panel in res["panels"].items():
            for label, times in panel["time_to_loss"].items():
                step = panel["curves"][label]["step"]
                shown = ", ".join(f"{t:.4g}" if t is not None else "never" for t in times)
                print(f"  panel {key} {label:>8} (step {step:.3g}): {shown}")
    theory = results["theory"]
    if theory is not None:
        slope = theory["slope"]
        print(f"[theory] strongly convex, eta_k = c/(k·tau + k0): log-log slope of "
              f"f(x_T) - f* vs T = {slope:.3f}" if slope is not None else
              "[theory] slope: not finite (see the JSON)")
    print(f"outputs: {cfg.out}/figure1.png" + (f", {json_out}" if json_out else "")
          + f" ({results['wall_seconds']:.1f} s)")
    return 0
