"""Run outputs: metrics.jsonl (one line per round), metrics.csv, TensorBoard events, summary.json,
plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible rather than dropping them
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return value


class JsonlWriter:
    """Appends one JSON object per line; flushed each line so a killed run keeps its history."""

    def __init__(self, path: str, append: bool = False) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a" if append else "w")

    def write(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(_jsonable(dict(record)), sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """Writes ``data`` as indented JSON (atomically: a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(dict(data)), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(
    path: str,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
) -> None:
    """Saves a line plot of ``{label: (xs, ys)}`` to a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), label=label, marker="." if len(xs) < 40 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(value: Any) -> float:
    """A history value as a float; the ``"nan"``/``"inf"`` strings of a resumed history too."""
    return float(value)


def write_csv(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Writes a run's history as CSV: one row per record, one column per metric (sorted, with
    ``round`` first); a metric a round does not have (e.g. test accuracy between evaluations)
    is an empty cell, and non-finite numbers are written ``nan``/``inf``/``-inf``."""
    import csv

    columns = sorted({k for r in records for k in r} - {"round"})
    columns = (["round"] if any("round" in r for r in records) else []) + columns
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            writer.writerow([("" if c not in r else str(int(r[c])) if c == "round"
                              else repr(_number(r[c]))) for c in columns])
    os.replace(tmp, path)


TENSORBOARD_PREFIX = "events.out.tfevents."


def write_tensorboard(logdir: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Writes a run's history as TensorBoard scalars (tensorboardX), step = ``round``.

    The event files of an earlier write in ``logdir`` are replaced, so a resumed run's folder
    holds one copy of every round. Non-finite values are written as such (TensorBoard shows
    them), never as 0.
    """
    from tensorboardX import SummaryWriter

    os.makedirs(logdir, exist_ok=True)
    for name in os.listdir(logdir):
        if name.startswith(TENSORBOARD_PREFIX):
            os.remove(os.path.join(logdir, name))
    writer = SummaryWriter(logdir=logdir)
    try:
        for r in records:
            step = int(r["round"])
            for key in sorted(r):
                if key != "round":
                    writer.add_scalar(key, _number(r[key]), global_step=step)
    finally:
        writer.close()


def read_tensorboard(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the event files in ``logdir``: ``{tag: [(step, value), ...]}``.

    Reads the records with tensorboardX's own protobuf classes and event-file reader format
    (length-prefixed, CRC-checked records), so tests need no TensorFlow.
    """
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(logdir)):
        if not name.startswith(TENSORBOARD_PREFIX):
            continue
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            body = data[offset + 12 : offset + 12 + length]  # skips the length CRC
            offset += 12 + length + 4  # body and its CRC
            event = Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
