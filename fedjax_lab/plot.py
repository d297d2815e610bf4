"""Plots of experiment runs: one run's curves, or several runs overlaid.

    python -m fedjax_lab.plot runs/a runs/b --out compare.png

Panels: test accuracy and test loss vs round and vs cumulative uplink bytes, train loss vs
round, and test accuracy/loss vs simulated time when a run has a time model (``sim_time``).
Labels and titles come from each run's config (``summary.json``): algorithm, compressor,
dataset, partition, alpha.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from fedjax_lab.io.writers import read_jsonl

# (y key, x key, y label, x label); x "uplink_bytes" is cum_uplink_bits / 8.
PANELS = (
    ("test_accuracy", "round", "test accuracy", "round"),
    ("test_loss", "round", "test loss", "round"),
    ("train_loss", "round", "train loss", "round"),
    ("test_accuracy", "uplink_bytes", "test accuracy", "cumulative uplink bytes"),
    ("test_loss", "uplink_bytes", "test loss", "cumulative uplink bytes"),
)
TIME_PANELS = (
    ("test_accuracy", "sim_time", "test accuracy", "simulated time"),
    ("test_loss", "sim_time", "test loss", "simulated time"),
)


def describe(config: Mapping[str, Any], algorithm: str | None = None) -> dict[str, str]:
    """The fields a title/label shows: algorithm, compressor, dataset, partition, alpha."""
    compressor = str(config.get("compressor", "identity"))
    if config.get("error_feedback"):
        compressor += "+EF"
    aggregator = config.get("aggregator")
    return {
        "algorithm": str(config.get("algorithm") or algorithm or "fedavg")
        + (f"+{aggregator}" if aggregator and aggregator != "mean" else ""),
        "compressor": compressor,
        "dataset": str(config.get("dataset", "?")),
        "partition": str(config.get("partition", "?")),
        # alpha shapes only the Dirichlet partitions.
        "alpha": f"α={config['alpha']:g}"
        if "alpha" in config and str(config.get("partition", "")).startswith("dirichlet") else "",
    }


def title(config: Mapping[str, Any], algorithm: str | None = None) -> str:
    """``"fedprox, qsgd, digits, dirichlet_per_class α=0.5"``."""
    d = describe(config, algorithm)
    return f"{d['algorithm']}, {d['compressor']}, {d['dataset']}, {d['partition']} {d['alpha']}"


def _xy(history: Sequence[Mapping[str, Any]], ykey: str, xkey: str) -> tuple[list, list]:
    xs, ys = [], []
    for record in history:
        if ykey not in record:
            continue
        if xkey == "uplink_bytes":
            if "cum_uplink_bits" not in record:
                continue
            x = float(record["cum_uplink_bits"]) / 8
        elif xkey in record:
            x = float(record[xkey])
        else:
            continue
        xs.append(x)
        ys.append(float(record[ykey]))  # "nan" strings of a JSON history parse as NaN
    return xs, ys


def plot_runs(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: str,
              suptitle: str = "") -> None:
    """Saves the panels of ``[(label, history), ...]`` (one line per run) to a PNG.

    Non-finite values are plotted as gaps (matplotlib skips NaN), never as 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = any("sim_time" in r for _, h in runs for r in h)
    panels = PANELS + (TIME_PANELS if timed else ())
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (ykey, xkey, ylabel, xlabel) in zip(axes.flat, panels, strict=False):
        for label, history in runs:
            xs, ys = _xy(history, ykey, xkey)
            ax.plot(xs, ys, label=label, marker="." if len(xs) < 40 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_run(run_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]], str | None]:
    """``(config, history, algorithm name)`` of a run folder; ValueError names what is missing.

    The history starts at round 0 (summary.json's ``initial_evaluation``) when the run has it.
    """
    summary_path = os.path.join(run_dir, "summary.json")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    for path in (summary_path, metrics_path):
        if not os.path.isfile(path):
            raise ValueError(f"{run_dir} is not a finished run folder: no {os.path.basename(path)}")
    with open(summary_path) as f:
        summary = json.load(f)
    # Round 0 (the initial model) lives in summary.json: metrics.jsonl holds rounds 1..N.
    initial = summary.get("initial_evaluation")
    history = ([initial] if initial else []) + read_jsonl(metrics_path)
    return summary.get("config", {}), history, summary.get("algorithm")


def labels(configs: Sequence[tuple[Mapping[str, Any], str | None]]) -> tuple[list[str], str]:
    """Per-run labels (the fields that differ between runs) and the title (those shared)."""
    described = [describe(c, a) for c, a in configs]
    keys = list(described[0])
    differ = [k for k in keys if len({d[k] for d in described}) > 1]
    shared = [described[0][k] for k in keys if k not in differ and described[0][k]]
    names = [", ".join(d[k] for k in differ) or d["algorithm"] for d in described]
    return names, ", ".join(shared)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedjax_lab.plot RUN_DIR... --out FILE.png``; exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m fedjax_lab.plot", description=__doc__,
                                     allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders to overlay")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        loaded = [load_run(d) for d in args.run_dirs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names, shared = labels([(c, a) for c, _, a in loaded])
    plot_runs([(n, h) for n, (_, h, _) in zip(names, loaded, strict=True)], args.out, shared)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
