"""``--quick``: a preset's smoke run on a generated stand-in of its data (train.py/fedavg.py).

The FedML benchmark presets (``experiments/configs/fedml_*.yaml``; He et al. 2020, "FedML: A
Research Library and Benchmark for Federated Machine Learning") read TFF's h5 files, TFDS
MNIST/CIFAR or CINIC-10's image folders, which are not available offline. ``--config PRESET
--quick`` keeps everything that makes the preset (algorithm, model, batch size, learning rate,
client optimizer and weight decay, local epochs, partition) and swaps only what a smoke run
cannot have:

* data: TFF's h5 datasets -> :func:`fedjax_lab.data.datasets.standin.write_standin`'s tiny
  files in the same layout (4 clients, random examples), read by the real loaders; TFDS
  CIFAR-10/100 and CINIC-10 (the cross-silo rows) ->
  :func:`fedjax_lab.data.datasets.image_standin.write_image_standin`'s few random images per
  class, a TFDS data directory / CINIC-10 PNG tree read by the real loaders; TFDS MNIST ->
  scikit-learn's digits (8x8 instead of 28x28: the only stand-in whose shape differs);
* population: the stand-in's clients (``--max-clients``: one fewer, so the subset is used);
  4 clients for the datasets without natural clients; at most 2 clients per round;
* 2 rounds, evaluated after each; ``--out`` gets a ``-quick`` suffix;
* the deep cross-silo models (`ONE_EPOCH_MODELS`: ResNet-56, MobileNet) train one local epoch
  (of one step: the stand-in clients are smaller than the batch) instead of the preset's 20:
  on CPU the backend unrolls every local step of a conv model into the round program
  (fedjax_lab.backends.vmap, the ``unrolled`` plan), so each step would add a copy of the
  network to compile.

The stand-in files go to a folder under the system's temp directory named by dataset and
seed, written once and reused by later quick runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

QUICK_ROUNDS = 2
QUICK_CLIENTS_PER_ROUND = 2
# TFDS datasets replaced by an embedded dataset of the same task.
EMBEDDED_STANDIN = {"mnist": "digits"}
# Clients of a quick run on a dataset without natural clients (digits, the image stand-ins).
QUICK_PARTITION_CLIENTS = 4
# Models whose quick run trains one local epoch (see the module docstring).
ONE_EPOCH_MODELS = ("resnet56", "mobilenet")


def standin_dir(dataset: str, seed: int) -> str:
    """The folder holding (or to hold) the stand-in files of `dataset` for `seed`."""
    return os.path.join(tempfile.gettempdir(), f"fedjax_lab_standin_{dataset}_{seed}")


def _write_once(folder: str, write) -> None:
    """Runs ``write(scratch)`` and renames the scratch folder to `folder` unless it exists."""
    if os.path.isdir(folder):  # written once per dataset and seed, then reused
        return
    # Written aside and renamed into place: concurrent quick runs (pytest-xdist) never read a
    # half-written file; the loser of the rename race discards its copy.
    scratch = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".",
                               dir=os.path.dirname(folder))
    try:
        write(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        os.rename(scratch, folder)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)


def quick_values(values: dict[str, Any], class_out: str | None) -> dict[str, Any]:
    """The parsed flag values of a ``--quick`` run (see the module docstring).

    Args:
      values: the parsed ``--flag`` values (field name -> value) of the full run.
      class_out: the config class's default ``--out`` (used when the values have none).

    Returns:
      New values: stand-in data, population, rounds, evaluation and ``out`` replaced (and
      the local epochs of `ONE_EPOCH_MODELS`).

    Raises:
      ValueError: a flag that contradicts a smoke run (``--data-dir``, ``--download``,
        ``--resume``) or a dataset without a stand-in.
    """
    from fedjax_lab.data.datasets.image_standin import (
        IMAGE_STANDIN_DATASETS,
        write_image_standin,
    )
    from fedjax_lab.data.datasets.standin import STANDIN_CLIENTS, STANDIN_DATASETS, write_standin

    dataset = values["dataset"]
    for name in ("data_dir", "download", "resume"):
        if values.get(name):
            raise ValueError(f"--quick runs on generated stand-in data: drop --"
                             f"{name.replace('_', '-')}")
    out = dict(values)
    seed = values["seed"]
    if dataset in STANDIN_DATASETS:
        folder = standin_dir(dataset, seed)
        _write_once(folder, lambda scratch: write_standin(dataset, scratch, seed=seed))
        clients = STANDIN_CLIENTS
        out["data_dir"] = folder
    elif dataset in IMAGE_STANDIN_DATASETS:
        folder = standin_dir(dataset, seed)
        _write_once(folder, lambda scratch: write_image_standin(dataset, scratch, seed=seed))
        clients = QUICK_PARTITION_CLIENTS
        out["data_dir"] = folder
    elif dataset in EMBEDDED_STANDIN:
        out["dataset"] = EMBEDDED_STANDIN[dataset]
        clients = QUICK_PARTITION_CLIENTS
    else:
        known = (*STANDIN_DATASETS, *IMAGE_STANDIN_DATASETS, *EMBEDDED_STANDIN)
        raise ValueError(f"--quick has no stand-in for --dataset {dataset}; datasets with one: "
                         f"{', '.join(known)}")
    if values.get("model") in ONE_EPOCH_MODELS:
        out["local_epochs"] = 1
    if values.get("max_clients") is not None:
        clients -= 1  # exercise the subset: the first clients only
        out["max_clients"] = clients
    out["num_clients"] = clients
    out["clients_per_round"] = min(values["clients_per_round"], QUICK_CLIENTS_PER_ROUND,
                                   clients)
    out["rounds"] = QUICK_ROUNDS
    out["eval_every"] = 1
    base = values.get("out") or class_out
    out["out"] = None if base is None else f"{base.rstrip('/')}-quick"
    return out
