"""The mechanics of SSTC's Table I: conv-layer compression of STC vs SSTC on the FEMNIST CNN.

Mora, Foschini, Bellavista (2022), "Structured Sparse Ternary Compression for Convolutional
Layers in Federated Learning", IEEE VTC2022-Spring, Table I; STC: Sattler, Wiedemann, Müller,
Samek (2019), "Robust and Communication-Efficient Federated Learning from Non-IID Data".

Three runs of FedAvg (McMahan et al., 2017) with the FEMNIST CNN, the same clients, batches and
keys: 32-bit FedAvg, FedAvg + STC (``p``) and FedAvg + SSTC (``p``, kernel fraction ``k``), both
with client-side error feedback (residual accumulation, as in both papers). Data: scikit-learn's
8x8 digits upsampled to 28x28 (offline default), or EMNIST (TFDS, ``--data-dir``) / LEAF FEMNIST
(``--data-dir`` = the LEAF root, natural writer partition).

Per round the runs report, from EXACT bit accounting of every sent payload
(:mod:`fedjax_lab.compressors.accounting`):

* ``stc_conv_density``: STC non-zeros falling in conv kernels / conv parameters (the density
  STC's global top-p actually gives the conv layers: the paper's "p" of the conv part);
* ``*_conv_factor``: ``32 * conv parameters`` / conv-part bits, summed over the round's
  clients (STC: conv-restricted ternary vector re-encoded with STC's own code; SSTC: kernel
  counts, indices and 2-bit maps; neither counts ``μ``);
* ``*_total_factor``: ``32 * all parameters`` / the compressor's exact ``bits()``;
* test accuracy of the three methods.

The conv accounting is attached by :func:`with_payload_metrics`, which wraps the algorithm (not
the compressor): it reads the payload each client returns and adds additive client metrics, so
the trained models are exactly those of plain ``fedavg(..., compressor=...)``.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import sstc, stc, with_error_feedback
from fedjax_lab.compressors.accounting import (
    conv_leaves,
    sstc_conv_bits,
    sstc_conv_nonzeros,
    stc_conv_bits,
    stc_conv_nonzeros,
)
from fedjax_lab.core.local import is_local_update
from fedjax_lab.core.tree import tree_size
from fedjax_lab.core.types import Aggregate, Algorithm
from fedjax_lab.data.budget import check_cohort_memory
from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.experiment import MAX_SEED
from fedjax_lab.experiments_lib.common import validated_run
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.io.writers import plot_curves
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import femnist_cnn
from fedjax_lab.runner import run

METHODS = ("fedavg", "stc", "sstc")
DATASETS = ("digits", "emnist", "femnist")
PARTITIONS = ("iid", "dirichlet_label_mix", "shards")
# Paper values (Mora et al. 2022, Table I, FEMNIST CNN, p = 1 %, k = 12.5 %).
PAPER = {"stc_conv_factor": 41.0, "sstc_conv_factor": 104.0}


@dataclass
class SSTCConfig:
    """Configuration of the Table I reproduction (CLI flags in :func:`main`)."""

    dataset: str = "digits"
    data_dir: str | None = None
    partition: str = "iid"
    num_clients: int = 20
    clients_per_round: int = 5
    rounds: int = 30
    batch_size: int = 20
    local_epochs: int = 1
    lr: float = 0.1
    sparsity: float = 0.01
    kernel_fraction: float = 0.125
    seed: int = 0
    out: str = "runs/sstc"

    def validate(self) -> None:
        """Raises ValueError naming the bad flag, before anything is built."""
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset != "digits" and not self.data_dir:
            raise ValueError(
                f"--dataset {self.dataset} needs --data-dir (TFDS data dir for emnist, the "
                "LEAF femnist root for femnist); the offline default is --dataset digits"
            )
        if self.dataset == "digits" and self.data_dir:
            raise ValueError("--data-dir is read only by --dataset emnist and femnist; "
                             "--dataset digits takes none: drop --data-dir")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
            0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"--partition must be one of {PARTITIONS}, got {self.partition!r}")
        for name in ("num_clients", "clients_per_round", "rounds", "batch_size", "local_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1")
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"--clients-per-round ({self.clients_per_round}) must be <= --num-clients "
                f"({self.num_clients})"
            )
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--lr must be a finite float > 0, got {self.lr}")
        for name in ("sparsity", "kernel_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1]")


# ---- accounting wrapper ----------------------------------------------------------------------

PayloadMetrics = Callable[[Any], dict[str, jax.Array]]


def with_payload_metrics(algorithm: Algorithm, payload_metrics: PayloadMetrics) -> Algorithm:
    """Adds per-client metrics computed from each client's uplink payload.

    ``payload_metrics(payload) -> {name: scalar}`` runs inside the client update on the payload
    the client sends (``ClientOutput.update``); clients that send nothing (padded or rejected,
    ``upload_bits == 0``) contribute 0. Every name also gets ``"sent"`` (1 per sending client).
    The round's sums appear in the server metrics under the same names. Training is unchanged.

    Args:
      algorithm: an algorithm of the FedAvg family with a compressor (the payload is a
        compressor payload and the client metrics have ``upload_bits``).
      payload_metrics: jit-able function of ONE payload.

    Returns:
      The wrapped :class:`Algorithm`.
    """

    if not is_local_update(algorithm.client_update):
        raise TypeError(
            f"with_payload_metrics needs a client update built as a LocalUpdate (FedAvg family), "
            f"got {type(algorithm.client_update).__name__} from {algorithm.name}"
        )

    def add_metrics(finish):
        def finish_with_metrics(server_state, client_state, carry, weight, *, key):
            out, new_state = finish(server_state, client_state, carry, weight, key=key)
            sent = out.metrics["upload_bits"] > 0
            extra = {"sent": jnp.float32(1.0), **payload_metrics(out.update)}
            extra = {k: jnp.where(sent, jnp.asarray(v, jnp.float32), 0.0)
                     for k, v in extra.items()}
            clash = set(extra) & set(out.metrics)
            if clash:
                raise ValueError(
                    f"with_payload_metrics: metric names {sorted(clash)} already exist"
                )
            return out._replace(metrics={**out.metrics, **extra}), new_state

        return finish_with_metrics

    def server_update(state, agg: Aggregate):
        new_state, metrics = algorithm.server_update(state, agg)
        added = {k: v for k, v in agg.metric_sums.items() if k not in metrics}
        return new_state, {**metrics, **added}

    return algorithm._replace(
        client_update=algorithm.client_update.with_finish(add_metrics), server_update=server_update
    )


def stc_metrics(conv: tuple[bool, ...]) -> PayloadMetrics:
    """Conv bits / conv non-zeros / all non-zeros of one STC payload."""

    def metrics(payload):
        return {
            "conv_bits": stc_conv_bits(payload, conv),
            "conv_nonzeros": stc_conv_nonzeros(payload, conv),
            "nonzeros": jnp.sum(payload.signs != 0),
        }

    return metrics


def sstc_metrics(payload) -> dict[str, jax.Array]:
    """Conv bits / non-zero trits in kept kernels / all non-zeros of one SSTC payload."""
    conv_nz = sstc_conv_nonzeros(payload)
    return {
        "conv_bits": sstc_conv_bits(payload),
        "conv_nonzeros": conv_nz,
        "nonzeros": conv_nz + jnp.sum(payload.nc_signs != 0),
    }


# ---- the experiment --------------------------------------------------------------------------


@dataclass
class Problem:
    """Dataset split, model, initial params and the test evaluator shared by the methods."""

    data: Any
    model: Any
    params: Any
    evaluate: Callable[[Any], dict[str, float]]
    num_params: int
    conv_params: int
    conv: tuple[bool, ...]


def build_problem(cfg: SSTCConfig) -> Problem:
    """Loads the data (28x28x1), federates it, builds the FEMNIST CNN."""
    if cfg.dataset == "digits":
        dataset = load_dataset("digits", resize=(28, 28))
    elif cfg.dataset == "emnist":
        dataset = load_dataset("emnist", data_dir=cfg.data_dir)
    else:
        dataset = load_dataset("leaf", root_dir=cfg.data_dir, task="femnist")
    if cfg.dataset == "femnist":
        data = federate(dataset, "natural", None, seed=cfg.seed)
    else:
        data = federate(dataset, cfg.partition, cfg.num_clients, seed=cfg.seed)
    # Before the model is initialised (compiled): a round that cannot fit is refused here.
    check_cohort_memory(data, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
                        num_steps=None, cohort_size=cfg.clients_per_round, with_examples=False)
    model = femnist_cnn(dataset.input_shape, dataset.num_classes)
    params = model.init(jax.random.key(cfg.seed))
    conv = conv_leaves(params)
    sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
    conv_params = sum(n for n, c in zip(sizes, conv, strict=True) if c)
    return Problem(
        data, model, params, make_evaluator(model.apply, dataset.test), tree_size(params),
        conv_params, conv,
    )


def make_algorithm(method: str, problem: Problem, cfg: SSTCConfig) -> Algorithm:
    """FedAvg with the method's uplink (error-feedback STC/SSTC, or none)."""
    if method == "fedavg":
        compressor, metrics = None, None
    elif method == "stc":
        compressor, metrics = with_error_feedback(stc(cfg.sparsity)), stc_metrics(problem.conv)
    elif method == "sstc":
        compressor = with_error_feedback(sstc(cfg.sparsity, cfg.kernel_fraction))
        metrics = sstc_metrics
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    alg = fedavg(problem.model, optax.sgd(cfg.lr), batch_size=cfg.batch_size,
                 local_epochs=cfg.local_epochs, compressor=compressor)
    return alg if metrics is None else with_payload_metrics(alg, metrics)


def summarize_rounds(history: list[dict[str, float]], problem: Problem,
                     compressed: bool) -> dict[str, list[float]]:
    """Per-round lists: accuracy, cumulative bits and (compressed runs) the factors."""
    out: dict[str, list[float]] = {
        "test_accuracy": [rec["test_accuracy"] for rec in history],
        "cum_uplink_bits": [rec["cum_uplink_bits"] for rec in history],
        "upload_bits": [rec["upload_bits"] for rec in history],
    }
    if not compressed:
        return out
    d, dc = problem.num_params, problem.conv_params
    out["total_factor"] = [32.0 * d * r["sent"] / r["upload_bits"] for r in history]
    out["conv_factor"] = [32.0 * dc * r["sent"] / r["conv_bits"] for r in history]
    out["conv_bits_per_client"] = [r["conv_bits"] / r["sent"] for r in history]
    out["conv_density"] = [r["conv_nonzeros"] / (dc * r["sent"]) for r in history]
    out["conv_share_of_nonzeros"] = [r["conv_nonzeros"] / r["nonzeros"] for r in history]
    return out


def run_experiment(cfg: SSTCConfig) -> dict[str, Any]:
    """Runs the three methods; returns the JSON-able results and writes the PNG."""
    cfg.validate()
    start = time.perf_counter()
    # Locked for this run, and found writable before anything runs (results are replaced).
    with RunFolder(cfg.out, overwrite=True, results=()):
        return _run_experiment(cfg, start)


def _run_experiment(cfg: SSTCConfig, start: float) -> dict[str, Any]:
    problem = build_problem(cfg)
    initial = problem.evaluate(problem.params)["test_accuracy"]
    runs: dict[str, dict[str, list[float]]] = {}
    for method in METHODS:
        result = run(
            make_algorithm(method, problem, cfg), VmapBackend(), problem.data, problem.params,
            rounds=cfg.rounds, clients_per_round=cfg.clients_per_round, seed=cfg.seed,
            evaluate=problem.evaluate, eval_every=1,
        )
        if any(rec["rejected"] for rec in result.history):
            raise ValueError(f"{method}: a client update was non-finite; lower --lr")
        runs[method] = summarize_rounds(result.history, problem, method != "fedavg")
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "num_params": problem.num_params,
        "conv_params": problem.conv_params,
        "initial_test_accuracy": initial,
        "paper": PAPER,
        "runs": runs,
    }
    for method in METHODS:
        results[f"{method}_test_accuracy"] = runs[method]["test_accuracy"][-1]
    for method in ("stc", "sstc"):
        for name in ("conv_factor", "total_factor", "conv_density"):
            results[f"{method}_{name}"] = float(np.mean(runs[method][name]))
            results[f"{method}_{name}_per_round"] = runs[method][name]
    results["stc_conv_share_of_nonzeros"] = float(
        np.mean(runs["stc"]["conv_share_of_nonzeros"])
    )
    os.makedirs(cfg.out, exist_ok=True)
    png = os.path.join(cfg.out, "accuracy_vs_bits.png")
    plot_curves(
        png,
        {m: (runs[m]["cum_uplink_bits"], runs[m]["test_accuracy"]) for m in METHODS},
        xlabel="cumulative uploaded bits", ylabel="test accuracy", logx=True,
        title=f"FEMNIST CNN on {cfg.dataset}: FedAvg vs STC vs SSTC",
    )
    results["png"] = png
    results["wall_seconds"] = time.perf_counter() - start
    return results


# ---- CLI ---------------------------------------------------------------------------------------

QUICK = {"num_clients": 6, "clients_per_round": 2, "rounds": 2, "batch_size": 64}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sstc_compression.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"tiny run (< 1 min): {QUICK} unless given explicitly")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    defaults = SSTCConfig()
    for f in dataclasses.fields(SSTCConfig):
        value = getattr(defaults, f.name)
        kind = type(value) if value is not None else str
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                       help=f"(default: {value})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (exit 2 with a message), run, write PNG/JSON, print a summary."""
    args = vars(_parser().parse_args(argv))
    json_out = args.pop("json_out")
    quick = args.pop("quick")
    given = {k: v for k, v in args.items() if v is not None}
    cfg = SSTCConfig(**{**(QUICK if quick else {}), **given})
    results = validated_run(cfg, json_out, run_experiment)
    if results is None:
        return 2
    print(f"FEMNIST CNN: {results['num_params']} params, {results['conv_params']} in conv "
          f"kernels; {cfg.rounds} rounds, {cfg.clients_per_round}/{cfg.num_clients} clients")
    print(f"STC  p={cfg.sparsity:g}: conv density {results['stc_conv_density']:.4f}, conv "
          f"factor {results['stc_conv_factor']:.1f}x (paper ~{PAPER['stc_conv_factor']:g}x), "
          f"total {results['stc_total_factor']:.1f}x, acc {results['stc_test_accuracy']:.3f}")
    print(f"SSTC k={cfg.kernel_fraction:g}: conv factor {results['sstc_conv_factor']:.1f}x "
          f"(paper ~{PAPER['sstc_conv_factor']:g}x), total {results['sstc_total_factor']:.1f}x, "
          f"acc {results['sstc_test_accuracy']:.3f}")
    print(f"FedAvg 32-bit: acc {results['fedavg_test_accuracy']:.3f}")
    print(f"outputs: {results['png']}" + (f", {json_out}" if json_out else "")
          + f" ({results['wall_seconds']:.1f} s)")
    return 0
