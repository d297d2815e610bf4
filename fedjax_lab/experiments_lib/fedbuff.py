"""FedBuff vs synchronous FedAvg: accuracy against simulated time under heavy-tailed clients.

Nguyen et al. (2022), "Federated Learning with Buffered Asynchronous Aggregation", AISTATS.
Both methods train the same algorithm (FedAvg local SGD, ``--weighting``, server SGD with
``--server-lr``) under the same per-client time model
(:class:`fedjax_lab.topologies.ClientTimes`: FedPAQ's ``shift``/``scale``/``C_comm/C_comp``
per client, times a lognormal per-device slowdown of ``--slowdown-sigma``):

* ``fedbuff``: ``--concurrency`` clients in flight, a server step per ``--buffer-size`` (K)
  arrivals, staleness weight ``--staleness`` (:func:`fedjax_lab.topologies.run_fedbuff`);
* ``sync`` (unless ``--no-compare-sync``): the runner's FedAvg with K clients per round; a
  round lasts as long as its slowest client (its clients' durations are drawn exactly as
  FedBuff draws a cohort's), and it runs as many rounds as FedBuff took steps, and longer if
  needed to cover FedBuff's simulated time.

The JSON holds both curves (simulated time, training loss, test accuracy), FedBuff's staleness
distribution, and the simulated time each method needs to reach the accuracy both reach.
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

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.base import ProgramCache
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.tree import tree_size
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.datasets import federate, load_dataset
from fedjax_lab.data.federated import sample_clients
from fedjax_lab.experiment import MAX_SEED
from fedjax_lab.experiments_lib.common import validated_run
from fedjax_lab.io.run_folder import RunFolder
from fedjax_lab.io.writers import plot_curves, write_json
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.models import get_model
from fedjax_lab.runner import run
from fedjax_lab.systems import TimeModel
from fedjax_lab.topologies import STALENESS_WEIGHTS, ClientTimes, run_fedbuff, staleness_weight
from fedjax_lab.topologies.fedbuff import draw_durations

DATASETS = ("digits", "synthetic")
MODELS = ("logreg", "mlp")
WEIGHTINGS = ("uniform", "examples")


@dataclass
class FedBuffConfig:
    """Configuration of the comparison (CLI flags in :func:`main`)."""

    dataset: str = "digits"
    model: str = "logreg"
    population: int = 100
    concurrency: int = 20
    buffer_size: int = 10
    staleness: str = "polynomial"
    staleness_exponent: float = 0.5
    server_lr: float = 1.0
    client_lr: float = 0.1
    local_epochs: int = 1
    batch_size: int = 10
    weighting: str = "uniform"
    comm_ratio: float = 10.0
    shift: float = 1.0
    scale: float = 1.0
    slowdown_sigma: float = 1.5
    server_steps: int = 100
    time_budget: float | None = None
    eval_every: int = 5
    compare_sync: bool = True
    seed: int = 0
    out: str = "runs/fedbuff"

    def validate(self) -> None:
        """Raises ValueError naming the bad flag, before anything is loaded or compiled."""
        for name, allowed in (("dataset", DATASETS), ("model", MODELS),
                              ("staleness", STALENESS_WEIGHTS), ("weighting", WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("population", "concurrency", "local_epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.buffer_size < 1:
            raise ValueError(f"--buffer-size (K) must be >= 1, got {self.buffer_size}")
        if self.buffer_size > self.concurrency:
            raise ValueError(f"--buffer-size K={self.buffer_size} > --concurrency="
                             f"{self.concurrency}: the buffer could never fill")
        need = self.concurrency + self.buffer_size - 1
        if self.population < need:
            raise ValueError(f"--population {self.population} is too small for --concurrency "
                             f"{self.concurrency} and --buffer-size {self.buffer_size}: it "
                             f"needs >= concurrency + K - 1 = {need} clients")
        for name in ("server_lr", "client_lr", "comm_ratio", "shift", "scale"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite float > 0, got "
                                 f"{getattr(self, name)}")
        for name in ("staleness_exponent", "slowdown_sigma"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite float >= 0, got "
                                 f"{getattr(self, name)}")
        if self.server_steps is None or self.server_steps < 0:
            raise ValueError(f"--server-steps must be >= 0 (0: no limit, stop at "
                             f"--time-budget), got {self.server_steps}")
        if not self.server_steps and self.time_budget is None:
            raise ValueError("--server-steps 0 runs until --time-budget: give --time-budget")
        if self.time_budget is not None and not 0 < self.time_budget < math.inf:
            raise ValueError(f"--time-budget must be a finite float > 0, got {self.time_budget}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")


def build(cfg: FedBuffConfig) -> dict[str, Any]:
    """Population, model, algorithm, evaluator and per-client time model of a config."""
    if cfg.dataset == "digits":
        dataset = load_dataset("digits")
        data = federate(dataset, "iid", cfg.population, seed=cfg.seed)
    else:  # FedProx's Synthetic(1,1), one client per device
        dataset = load_dataset("synthetic", alpha=1.0, beta=1.0, num_clients=cfg.population,
                               seed=cfg.seed)
        data = federate(dataset, "natural", None, seed=cfg.seed)
    model = get_model(cfg.model, dataset.input_shape, dataset.num_classes)
    params = model.init(jax.random.key(cfg.seed))
    alg = fedavg(model, optax.sgd(cfg.client_lr), batch_size=cfg.batch_size,
                 local_epochs=cfg.local_epochs, server_optimizer=optax.sgd(cfg.server_lr),
                 weighting=cfg.weighting)
    p = tree_size(params)
    time_model = TimeModel.from_ratio(cfg.comm_ratio, p, shift=cfg.shift, scale=cfg.scale)
    times = ClientTimes(time_model, data.num_clients, upload_bits=32.0 * p,
                        slowdown_sigma=cfg.slowdown_sigma, seed=cfg.seed)
    evaluate = make_evaluator(model.apply, dataset.test, num_classes=dataset.num_classes)
    return {"data": data, "params": params, "algorithm": alg, "times": times,
            "evaluate": evaluate, "num_params": p, "time_model": time_model}


def sync_round_times(cfg: FedBuffConfig, problem: dict[str, Any], horizon: float,
                     min_rounds: int = 0, max_rounds: int = 100_000) -> list[float]:
    """Cumulative simulated time of the runner's synchronous rounds: at least ``min_rounds``
    rounds, and until ``horizon``.

    Round ``r`` trains the runner's clients of round ``r`` (its sampler, replayed) on the
    runner's batches; each client's duration is drawn as FedBuff's draw ``r`` would draw it
    (same ``ClientTimes``, same stream), and the round lasts as long as the slowest one.
    """
    data, alg = problem["data"], problem["algorithm"]
    spec = alg.data_spec
    builder = CohortBuilder(data, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
                            num_steps=spec.num_steps, cohort_size=cfg.buffer_size,
                            seed=cfg.seed, device_table=False)
    total, times = 0.0, []
    for r in range(max_rounds):
        clients = sample_clients(data.num_clients, cfg.buffer_size,
                                 rng_lib.host_rng(cfg.seed, rng_lib.SAMPLING_STREAM, r))
        work = np.array([np.count_nonzero(builder.client_index(int(c), r) >= 0)
                         for c in clients], np.float64)
        total += float(draw_durations(problem["times"], clients, work, seed=cfg.seed,
                                      draw=r).max())
        times.append(total)
        if total >= horizon and len(times) >= min_rounds:
            break
    return times


def time_to_accuracy(curve: dict[str, list[float]], target: float) -> float | None:
    """First simulated time at which the test accuracy is >= ``target`` (None if never)."""
    for t, acc in zip(curve["sim_time"], curve["test_accuracy"], strict=True):
        if acc >= target:
            return t
    return None


def run_comparison(cfg: FedBuffConfig) -> dict[str, Any]:
    """FedBuff (and, with ``compare_sync``, synchronous FedAvg); returns the JSON results."""
    cfg.validate()
    start = time.perf_counter()
    with RunFolder(cfg.out, overwrite=True, results=("results.json", "accuracy_vs_time.png")):
        problem = build(cfg)
        evaluate = problem["evaluate"]
        initial = evaluate(problem["params"])
        fb = run_fedbuff(
            problem["algorithm"], problem["data"], problem["params"],
            concurrency=cfg.concurrency, buffer_size=cfg.buffer_size, seed=cfg.seed,
            delays=problem["times"], server_steps=cfg.server_steps or None,
            time_budget=cfg.time_budget,
            staleness=staleness_weight(cfg.staleness, cfg.staleness_exponent),
            evaluate=evaluate, eval_every=cfg.eval_every, programs=ProgramCache(),
        )
        evaluated = [r for r in fb.history if "test_accuracy" in r]
        curves = {"fedbuff": {
            "sim_time": [0.0] + [r["sim_time"] for r in evaluated],
            "test_accuracy": [initial["test_accuracy"]]
            + [r["test_accuracy"] for r in evaluated],
            "train_loss": [r["train_loss"] for r in fb.history],
        }}
        results: dict[str, Any] = {
            "config": dataclasses.asdict(cfg),
            "num_params": problem["num_params"],
            "bandwidth": problem["time_model"].bandwidth,
            "initial_accuracy": initial["test_accuracy"],
            "fedbuff": {
                "history": fb.history,
                "server_steps": len(fb.history),
                "sim_time": fb.sim_time,
                "final_accuracy": curves["fedbuff"]["test_accuracy"][-1],
                "staleness_histogram": {str(k): v for k, v in fb.staleness_histogram.items()},
                "staleness_mean": fb.staleness_mean,
                "staleness_max": fb.staleness_max,
                "clients_started": fb.clients_started,
                "compiles": fb.compiles,
            },
        }
        if cfg.compare_sync and fb.history:
            # As many rounds as FedBuff took steps, and at least its simulated time.
            times = sync_round_times(cfg, problem, fb.sim_time, min_rounds=len(fb.history))
            sync = run(problem["algorithm"], VmapBackend(), problem["data"], problem["params"],
                       rounds=len(times), clients_per_round=cfg.buffer_size, seed=cfg.seed,
                       evaluate=evaluate, eval_every=cfg.eval_every)
            for rec, t in zip(sync.history, times, strict=True):
                rec["sim_time"] = t
            evaluated = [r for r in sync.history if "test_accuracy" in r]
            curves["sync"] = {
                "sim_time": [0.0] + [r["sim_time"] for r in evaluated],
                "test_accuracy": [initial["test_accuracy"]]
                + [r["test_accuracy"] for r in evaluated],
                "train_loss": [r["train_loss"] for r in sync.history],
            }
            results["sync"] = {
                "history": sync.history,
                "rounds": len(sync.history),
                "sim_time": times[-1],
                "final_accuracy": curves["sync"]["test_accuracy"][-1],
            }
            # The accuracy both reach; how long each takes to get there.
            target = min(max(c["test_accuracy"]) for c in curves.values())
            results["target_accuracy"] = target
            results["time_to_target"] = {m: time_to_accuracy(c, target)
                                         for m, c in curves.items()}
        results["curves"] = curves
        plot_curves(os.path.join(cfg.out, "accuracy_vs_time.png"),
                    {m: (c["sim_time"], c["test_accuracy"]) for m, c in curves.items()},
                    xlabel="simulated time", ylabel="test accuracy",
                    title=f"{cfg.dataset}: FedBuff (C={cfg.concurrency}, K={cfg.buffer_size}) "
                    f"vs sync FedAvg")
        results["wall_seconds"] = time.perf_counter() - start
        write_json(os.path.join(cfg.out, "results.json"), results)
    return results


HELP = {
    "population": "clients (digits: iid split; synthetic: Synthetic(1,1) devices)",
    "concurrency": "clients training at the same time (C)",
    "buffer_size": "updates per server step (K <= C); also the sync baseline's clients/round",
    "staleness": f"staleness weight s(tau), one of {STALENESS_WEIGHTS}",
    "staleness_exponent": "a of the polynomial weight (1 + tau)^-a",
    "weighting": "client weights p_i: uniform (the paper's /K) or examples",
    "comm_ratio": "C_comm/C_comp: one dense upload's time over one example's compute time",
    "shift": "per-example deterministic compute time (FedPAQ time model)",
    "scale": "rate of the per-example exponential compute time",
    "slowdown_sigma": "sigma of each device's fixed lognormal slowdown (heavy tail)",
    "server_steps": "server steps to run (0: until --time-budget)",
    "time_budget": "stop before the first server step after this simulated time",
    "eval_every": "test accuracy every this many server steps / sync rounds",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbuff.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    p.add_argument("--no-compare-sync", dest="compare_sync", action="store_false",
                   help="run FedBuff only")
    defaults = FedBuffConfig()
    for f in dataclasses.fields(FedBuffConfig):
        if f.name == "compare_sync":
            continue
        value = getattr(defaults, f.name)
        kind = float if f.name == "time_budget" else type(value)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=value,
                       help=f"{HELP.get(f.name, '')} (default: {value})".strip())
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, validate (exit 2 with one ``error:`` line), run, write JSON, print a summary."""
    args = vars(_parser().parse_args(argv))
    json_out = args.pop("json_out")
    cfg = FedBuffConfig(**args)
    results = validated_run(cfg, json_out, run_comparison)
    if results is None:
        return 2
    fb = results["fedbuff"]
    print(f"fedbuff: {fb['server_steps']} steps in simulated time {fb['sim_time']:.4g}, "
          f"accuracy {fb['final_accuracy']:.4f}, staleness mean {fb['staleness_mean']:.2f} "
          f"max {fb['staleness_max']}")
    if "sync" in results:
        s = results["sync"]
        ttt = ", ".join(f"{m}={t:.4g}" if t is not None else f"{m}=never"
                        for m, t in results["time_to_target"].items())
        print(f"sync fedavg: {s['rounds']} rounds in simulated time {s['sim_time']:.4g}, "
              f"accuracy {s['final_accuracy']:.4f}; time to accuracy "
              f"{results['target_accuracy']:.4f}: {ttt}")
    print(f"outputs: {cfg.out}/results.json, {cfg.out}/accuracy_vs_time.png"
          + (f", {json_out}" if json_out else "")
          + f" ({results['wall_seconds']:.1f} s)")
    return 0
