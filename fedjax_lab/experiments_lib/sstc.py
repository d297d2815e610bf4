"""SSTC's Table I: conv-layer compression and max accuracy of STC vs SSTC on the FEMNIST CNN.

Mora, Foschini, Bellavista (2022), "Structured Sparse Ternary Compression for Convolutional
Layers in Federated Learning", IEEE VTC2022-Spring, Table I; STC: Sattler, Wiedemann, Müller,
Samek (2019), "Robust and Communication-Efficient Federated Learning from Non-IID Data".

Three runs of FedAvg (McMahan et al., 2017) with the FEMNIST CNN, the same clients, batches and
keys: 32-bit FedAvg, FedAvg + STC (``p``) and FedAvg + SSTC (``p``, kernel fraction ``k``), both
with client-side error feedback (residual accumulation, as in both papers). Data: TFF's
federated EMNIST h5 files (``--dataset fed_emnist --data-dir``: the paper's data, "the LEAF
version of FEMNIST available in TFF", 3,400 writers), LEAF FEMNIST JSON (``femnist``) or TFDS
EMNIST (``emnist``, split by ``--partition``); offline, scikit-learn's 8x8 digits upsampled
to 28x28 (``digits``, the default: a stand-in, not the paper's data).

Defaults are the paper's settings (§V-A): 1000 rounds, 50 clients per round, 5 local epochs,
batch 16, SGD lr 0.1, sparsity p = 1 %, kernel fraction k = 12.5 %. Inferred (the paper does
not say): error feedback on (both STC and SSTC papers accumulate residuals), plain SGD without
momentum or weight decay, uniform sampling of the round's clients without replacement,
example-weighted averaging (FedAvg's), 'SAME' convolutions (1,690,046 parameters with 62
classes), test accuracy of the global model after every round ("max acc." = its maximum over
rounds), the stand-in's population of 100 IID clients (``--num-clients``; the h5/LEAF data
use their 3,400 natural writers).

Table I's "compression" is the paper's own accounting (Eq. 1, no Golomb coding of indices):
STC's conv part costs ``b_p`` bits per conv non-zero (``b_p = 1 + floor(log2(W_conv))`` = 16
for 52,000 conv weights), SSTC's ``b_k k + 2 K^2 k`` (``k`` kept kernels of ``K x K``, ``b_k =
1 + floor(log2(#kernels))``: 12 for 2,080 kernels; the paper's text says 11, which gives
104.9x instead of 103.2x); compression = ``32 W_conv`` / that.

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
DATASETS = ("digits", "emnist", "femnist", "fed_emnist")
NATURAL = ("femnist", "fed_emnist")  # the files' own writers are the clients
PARTITIONS = ("iid", "dirichlet_label_mix", "shards")
# Mora, Foschini, Bellavista (2022), Table I (FEMNIST CNN, sparsity 1 %, k = 12.5 %):
# "compression (≈)" w.r.t. 32-bit FedAvg of the conv-layer updates, and "max acc." (top-1 test
# accuracy of the global model). The paper gives no FedAvg row.
PAPER_TABLE_I = {
    "stc": {"label": "FedAvg + STC", "compression": 41.0, "max_accuracy": 0.8433},
    "sstc": {"label": "FedAvg + SSTC (ours)", "compression": 104.0, "max_accuracy": 0.8394},
}
PAPER = {"stc_conv_factor": 41.0, "sstc_conv_factor": 104.0}
LABELS = {"fedavg": "FedAvg (32-bit)", "stc": "FedAvg + STC", "sstc": "FedAvg + SSTC"}


@dataclass
class SSTCConfig:
    """Configuration of the Table I reproduction (CLI flags in :func:`main`)."""

    dataset: str = "digits"
    data_dir: str | None = None
    partition: str = "iid"
    num_clients: int = 100  # stand-in population (inferred); natural datasets: their writers
    clients_per_round: int = 50
    rounds: int = 1000
    batch_size: int = 16
    local_epochs: int = 5
    lr: float = 0.1
    image_size: int = 28  # digits stand-in only: upsampled to this (28: FEMNIST's size)
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
                f"--dataset {self.dataset} needs --data-dir (the folder of fed_emnist_train.h5 / "
                "fed_emnist_test.h5 for fed_emnist, TFDS data dir for emnist, the LEAF femnist "
                "root for femnist); the offline default is --dataset digits"
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
        for name in ("num_clients", "clients_per_round", "rounds", "batch_size", "local_epochs",
                     "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1")
        if self.image_size < 4:
            raise ValueError("--image-size must be >= 4 (the CNN's two 2x2 max-pools)")
        if self.image_size != 28 and self.dataset != "digits":
            raise ValueError("--image-size resizes only the digits stand-in; drop it")
        if self.dataset not in NATURAL and self.clients_per_round > self.num_clients:
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
    num_kernels: int  # conv kernels (C x F summed over conv layers)
    kernel_size: int  # K x K


def build_problem(cfg: SSTCConfig) -> Problem:
    """Loads the data (28x28x1), federates it, builds the FEMNIST CNN."""
    if cfg.dataset == "digits":
        dataset = load_dataset("digits", resize=(cfg.image_size, cfg.image_size))
    elif cfg.dataset == "emnist":
        dataset = load_dataset("emnist", data_dir=cfg.data_dir)
    elif cfg.dataset == "fed_emnist":
        dataset = load_dataset("fed_emnist", data_dir=cfg.data_dir)
    else:
        dataset = load_dataset("leaf", root_dir=cfg.data_dir, task="femnist")
    if cfg.dataset in NATURAL:
        data = federate(dataset, "natural", None, seed=cfg.seed)
        if cfg.clients_per_round > data.num_clients:
            raise ValueError(f"--clients-per-round ({cfg.clients_per_round}) must be <= the "
                             f"{data.num_clients} writers of --dataset {cfg.dataset}")
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
    shapes = [np.shape(x) for x, c in zip(jax.tree.leaves(params), conv, strict=True) if c]
    num_kernels = sum(s[2] * s[3] for s in shapes)  # HWIO
    return Problem(
        data, model, params, make_evaluator(model.apply, dataset.test), tree_size(params),
        conv_params, conv, num_kernels, shapes[0][0] * shapes[0][1],
    )


def paper_bits(problem: Problem, kernel_fraction: float) -> dict[str, float]:
    """The bit widths of the paper's Eq. 1 for this CNN (Mora et al. 2022, §IV-A, §V-B).

    ``b_p = 1 + floor(log2(W_conv))`` bits per STC conv index (16 for 52,000 weights: "to
    represent the maximum index (i.e., 51,999) 16 bits are needed"); ``b_k = 1 +
    floor(log2(N))`` bits per SSTC kernel index over all ``N`` conv kernels, ``k`` = the kept
    kernels (``max(1, round(kernel_fraction N))``, as ``compressors.sstc``), and the SSTC conv
    cost ``b_k k + 2 K^2 k`` (the denominator of Eq. 1).
    """
    b_p = 1 + math.floor(math.log2(problem.conv_params))
    b_k = 1 + math.floor(math.log2(problem.num_kernels))
    k = max(1, round(kernel_fraction * problem.num_kernels))
    return {"b_p": b_p, "b_k": b_k, "kept_kernels": k,
            "sstc_conv_bits": b_k * k + 2 * problem.kernel_size * k}


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
                     method: str, eq1: dict[str, float]) -> dict[str, list[float]]:
    """Per-round lists: accuracy, cumulative bits and (compressed runs) the factors.

    ``paper_conv_factor`` is Table I's compression (Eq. 1 accounting, see :func:`paper_bits`):
    STC ``32 W_conv / (b_p p)`` with ``p`` the round's mean conv non-zeros per client, SSTC
    ``32 W_conv / (b_k k + 2 K^2 k)``.
    """
    compressed = method != "fedavg"
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
    if method == "stc":
        # A round whose clients put no non-zero in the conv layers has an infinite factor.
        out["paper_conv_factor"] = [
            32.0 * dc * r["sent"] / (eq1["b_p"] * r["conv_nonzeros"]) if r["conv_nonzeros"]
            else math.inf for r in history]
    else:
        out["paper_conv_factor"] = [32.0 * dc / eq1["sstc_conv_bits"]] * len(history)
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
    eq1 = paper_bits(problem, cfg.kernel_fraction)
    for method in METHODS:
        result = run(
            make_algorithm(method, problem, cfg), VmapBackend(), problem.data, problem.params,
            rounds=cfg.rounds, clients_per_round=cfg.clients_per_round, seed=cfg.seed,
            evaluate=problem.evaluate, eval_every=1,
        )
        if any(rec["rejected"] for rec in result.history):
            raise ValueError(f"{method}: a client update was non-finite; lower --lr")
        runs[method] = summarize_rounds(result.history, problem, method, eq1)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "num_params": problem.num_params,
        "conv_params": problem.conv_params,
        "initial_test_accuracy": initial,
        "paper": PAPER,
        "paper_table_i": PAPER_TABLE_I,
        "eq1_bits": eq1,
        "data": (f"offline stand-in (scikit-learn digits at {cfg.image_size}x{cfg.image_size}), "
                 "not FEMNIST" if cfg.dataset == "digits" else cfg.dataset),
        "runs": runs,
    }
    for method in METHODS:
        results[f"{method}_test_accuracy"] = runs[method]["test_accuracy"][-1]
        results[f"{method}_max_accuracy"] = max(runs[method]["test_accuracy"])
    for method in ("stc", "sstc"):
        for name in ("conv_factor", "total_factor", "conv_density", "paper_conv_factor"):
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
    results["table"] = table_rows(results)
    results["table_files"] = write_table(results["table"], cfg.out)
    results["wall_seconds"] = time.perf_counter() - start
    return results


# ---- Table I -----------------------------------------------------------------------------------

TABLE_COLUMNS = ("method", "compression", "paper_compression", "exact_compression",
                 "max_accuracy", "paper_max_accuracy", "final_accuracy")


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Table I's rows (plus the FedAvg baseline) with the paper's values beside the measured.

    ``compression``: Eq. 1 accounting, mean over rounds (the paper's "averaged within 1000
    rounds"); ``exact_compression``: this library's exact wire bits of the conv part (STC's
    Golomb-coded gaps + signs, SSTC's per-layer counts, kernel indices and maps); both relative
    to 32-bit FedAvg. ``paper_*`` is None where Table I has no entry (the FedAvg row).
    """
    rows = []
    for method in METHODS:
        paper = PAPER_TABLE_I.get(method, {})
        compressed = method != "fedavg"
        rows.append({
            "method": LABELS[method],
            "compression": results[f"{method}_paper_conv_factor"] if compressed else 1.0,
            "paper_compression": paper.get("compression"),
            "exact_compression": results[f"{method}_conv_factor"] if compressed else 1.0,
            "max_accuracy": results[f"{method}_max_accuracy"],
            "paper_max_accuracy": paper.get("max_accuracy"),
            "final_accuracy": results[f"{method}_test_accuracy"],
        })
    return rows


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return str(value)  # inf/nan stay visible, never a number
    return f"{100 * value:.2f} %" if kind == "acc" else f"{value:.1f}x"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """Table I as Markdown: measured next to the paper's value in each column."""
    head = ("| | compression (Eq. 1) | paper | compression (exact bits) | max acc. | paper | "
            "final acc. |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["method"], _cell(r["compression"], "x"), _cell(r["paper_compression"], "x"),
                 _cell(r["exact_compression"], "x"), _cell(r["max_accuracy"], "acc"),
                 _cell(r["paper_max_accuracy"], "acc"), _cell(r["final_accuracy"], "acc")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict[str, Any]], out: str) -> dict[str, str]:
    """Writes ``table_i.json``, ``table_i.csv`` and ``table_i.md`` into `out`."""
    import csv
    import json

    paths = {ext: os.path.join(out, f"table_i.{ext}") for ext in ("json", "csv", "md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        # Non-finite factors are written as the strings "inf"/"nan" (JSON has no such numbers).
        json.dump([{k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in r.items()} for r in rows], f, indent=1)
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(table_markdown(rows))
    return paths


# ---- CLI ---------------------------------------------------------------------------------------

# Smoke settings (seconds, not a reproduction): 8x8 stand-in images keep the conv layers
# (52,000 weights) but shrink the dense layer, so compiling and top-k stay cheap.
QUICK = {"num_clients": 6, "clients_per_round": 2, "rounds": 2, "batch_size": 64,
         "local_epochs": 1, "image_size": 8}


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
    eq1 = results["eq1_bits"]
    print(f"FEMNIST CNN: {results['num_params']} params, {results['conv_params']} in conv "
          f"kernels; {cfg.rounds} rounds, {cfg.clients_per_round} clients/round, data: "
          f"{results['data']}")
    print(f"Table I (Mora et al. 2022), sparsity {cfg.sparsity:g}, k {cfg.kernel_fraction:g}; "
          f"Eq. 1 with b_p={eq1['b_p']}, b_k={eq1['b_k']}, {eq1['kept_kernels']} kernels; "
          f"STC conv density {results['stc_conv_density']:.4f}, total factors STC "
          f"{results['stc_total_factor']:.1f}x, SSTC {results['sstc_total_factor']:.1f}x")
    print(table_markdown(results["table"]), end="")
    files = [results["png"], *results["table_files"].values(), *([json_out] if json_out else [])]
    print(f"outputs: {', '.join(files)} ({results['wall_seconds']:.1f} s)")
    return 0
