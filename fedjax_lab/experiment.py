"""Config-driven experiments: typed config, CLI flags, building blocks, outputs.

Experiment scripts in ``experiments/`` only declare a config and call :func:`main`; everything
that builds datasets, models, algorithms and backends lives here so it is tested and shared.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax

from fedjax_lab import plot
from fedjax_lab.io.writers import (
    JsonlWriter,
    plot_curves,
    write_csv,
    write_json,
    write_tensorboard,
)

BACKENDS = ("vmap", "edge", "sharded", "mpi")
DIVERGENCE_POLICIES = ("warn", "stop")
# Federated evaluation: off, a seeded held-out fraction of every client (any partition), or
# every natural client's own test examples from the data (--partition natural).
CLIENT_EVAL_MODES = ("off", "split", "natural")
# Seeds feed numpy's SeedSequence and jax.random.key: one unsigned 32-bit word.
MAX_SEED = 2**32 - 1
# Exit status of a run that --on-divergence stop ended early (2 is bad input).
EXIT_DIVERGED = 3


@dataclass
class RunConfig(abc.ABC):
    """Settings every experiment run shares; every field is a ``--flag-name`` CLI flag.

    Subclasses add the algorithm's settings and say how to build it (:meth:`make_algorithm`).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False  # TFDS datasets: download and prepare them when not in --data-dir
    synthetic_alpha: float | None = None  # --dataset synthetic: model heterogeneity (default 1)
    synthetic_beta: float | None = None  # --dataset synthetic: feature heterogeneity (default 1)
    leaf_root: str | None = None  # --dataset leaf: folder with train/ and test/ JSON files
    leaf_task: str | None = None  # --dataset leaf: femnist, shakespeare or synthetic
    partition: str = "dirichlet_per_class"
    alpha: float = 0.5
    num_clients: int = 50
    clients_per_round: int = 10
    rounds: int = 100
    local_epochs: int = 2
    batch_size: int = 20
    client_lr: float = 0.2
    client_momentum: float = 0.0
    model: str = "mlp"
    seed: int = 0
    backend: str = "vmap"
    plan: str = "auto"
    chunk_size: int | None = None
    eval_every: int = 5
    out: str = "runs/fedavg"
    progress: bool = True
    edge_clients: int = 2  # --backend edge: client processes (population split over them)
    edge_round_timeout: float = 60.0  # --backend edge: seconds a round waits for its clients
    checkpoint_every: int = 0  # checkpoint to <out>/checkpoints every N rounds (0: off)
    resume: bool = False  # continue from the newest intact checkpoint in <out>/checkpoints
    overwrite: bool = False  # replace the results of an earlier run in <out> (else refused)
    on_divergence: str = "stop"  # a round whose clients were all rejected: warn, or stop...
    divergence_patience: int = 3  # ... after this many such rounds in a row (exit status 3)
    mpi_round_timeout: float | None = 300.0  # --backend mpi: seconds before a stuck job aborts
    packing: str = "auto"  # run clients back to back in slots: auto (cost model), on, off
    slots: int | None = None  # pack into exactly this many client slots (implies packing)
    segment_steps: int | None = None  # local steps per packed call (default: cost model)
    max_examples_per_client: int | None = None  # train each client on a fresh random subset
    max_local_steps: int | None = None  # stop each client after this many local steps
    client_eval: str | None = None  # off, split, natural (none: split iff a fraction is given)
    client_eval_fraction: float = 0.0  # --client-eval split: held-out fraction of each client

    def validate(self) -> None:
        """Raises ValueError naming the bad flag; runs before anything is built or compiled."""
        positive = ("num_clients", "clients_per_round", "local_epochs", "batch_size",
                    "divergence_patience")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("client_lr", "alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{_flag(name)} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.client_momentum) and 0 <= self.client_momentum < 1):
            raise ValueError(
                f"--client-momentum must be in [0, 1) (0: plain SGD), got {self.client_momentum}"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {self.seed}")
        if self.on_divergence not in DIVERGENCE_POLICIES:
            raise ValueError(
                f"--on-divergence must be one of {DIVERGENCE_POLICIES}, got {self.on_divergence!r}"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it; "
                             "pass one of them")
        if self.mpi_round_timeout is not None and not (
            math.isfinite(self.mpi_round_timeout) and self.mpi_round_timeout > 0
        ):
            raise ValueError(
                f"--mpi-round-timeout must be a finite number of seconds > 0 (or none), got "
                f"{self.mpi_round_timeout}"
            )
        check_dataset_flags(self)
        self.client_eval = check_client_eval(self)
        from fedjax_lab.backends.packed import PACKING

        if self.packing not in PACKING:
            raise ValueError(f"--packing must be one of {PACKING}, got {self.packing!r}")
        for name in ("slots", "segment_steps", "max_examples_per_client", "max_local_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1 (or none), got {value}")
        if self.packing == "off" and (self.slots is not None or self.segment_steps is not None):
            raise ValueError("--slots/--segment-steps shape packed rounds; they contradict "
                             "--packing off")
        if self.slots is not None and self.chunk_size is not None:
            raise ValueError("--slots (packing) and --chunk-size exclude each other; drop one")
        if self.slots is not None and self.slots > self.clients_per_round:
            raise ValueError(
                f"--slots={self.slots} > --clients-per-round={self.clients_per_round}: a slot "
                "would never hold a client; lower --slots"
            )
        if self.rounds < 0:
            raise ValueError(f"--rounds must be >= 0, got {self.rounds}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"--clients-per-round={self.clients_per_round} > --num-clients="
                f"{self.num_clients}; lower --clients-per-round"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        from fedjax_lab.backends.vmap import PLANS

        if self.plan not in PLANS:
            raise ValueError(f"--plan must be one of {PLANS}, got {self.plan!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.backend == "sharded" and self.plan == "loop":
            raise ValueError(
                "--plan loop runs clients from a host loop and cannot be sharded over devices; "
                "use --plan auto, vmap or unrolled with --backend sharded"
            )
        if self.backend == "edge" and self.EDGE_PROBLEM is None:
            raise ValueError(f"--backend edge: {type(self).__name__} names no problem factory "
                             "for the client processes (EDGE_PROBLEM); use another --backend")
        if self.edge_clients < 1:
            raise ValueError(f"--edge-clients must be >= 1, got {self.edge_clients}")
        if self.backend == "edge" and self.edge_clients > self.num_clients:
            raise ValueError(
                f"--edge-clients={self.edge_clients} > --num-clients={self.num_clients}: a "
                "client process would host no client; lower --edge-clients"
            )
        if not self.edge_round_timeout > 0:
            raise ValueError(f"--edge-round-timeout must be > 0, got {self.edge_round_timeout}")
        if self.checkpoint_every < 0:
            raise ValueError(
                f"--checkpoint-every must be >= 0 (0 disables), got {self.checkpoint_every}"
            )

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
        """The validated config of a command line (:func:`parse_config`)."""
        return parse_config(cls, argv, prog)

    def as_dict(self) -> dict[str, Any]:
        """Every setting by field name (summary.json, checkpoints, the edge join)."""
        return dataclasses.asdict(self)

    def config_file_dict(self) -> dict[str, Any]:
        """The settings config.yaml records (``--config`` of it reproduces the run)."""
        return {k: v for k, v in self.as_dict().items() if k not in NOT_REPRODUCED}

    def on_start(self) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """Called on the primary process once the run's folder is ready (before training)."""

    def to_argv(self) -> list[str]:
        """The command line that parses back into this config (edge client processes)."""
        return config_argv(self)

    @abc.abstractmethod
    def make_algorithm(self, model: Any) -> Any:
        """The ``Algorithm`` of this config for ``model``; ValueError names a bad flag."""

    def attack_problem(self, dataset: Any, train: Any, model: Any,
                       evaluate: Callable[[Any], dict[str, float]]) -> tuple[Any, Any]:
        """``(train, evaluate)`` after this config's attack (``fedjax_lab.attacks``): the
        poisoned / malicious-marked population and the evaluator with attack metrics. None here.
        """
        del dataset, model
        return train, evaluate

    def systems(self, num_params: int) -> dict[str, Any]:
        """``run`` keywords of the system simulation (availability, time model); none here."""
        del num_params
        return {}

    # The edge client processes' problem factory (``module:function`` building the problem
    # of this config's flags, e.g. ``fedjax_lab.train:edge_problem``); None: no edge backend.
    EDGE_PROBLEM: typing.ClassVar[str | None] = None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def check_data_dir(dataset: str, data_dir: str | None) -> None:
    """Raises ValueError when ``--data-dir`` is given for a dataset that reads no directory,
    or missing for TFF's h5 datasets (which have no default location)."""
    from fedjax_lab.data.datasets import H5_DATASETS, LAZY_DATASETS
    from fedjax_lab.data.datasets.stackoverflow import EXPECTED_FILES
    from fedjax_lab.data.datasets.tff_h5 import H5_FILES

    if dataset == "cinic10":  # the tree's layout is checked when it is opened (before compiling)
        if not data_dir:
            from fedjax_lab.data.datasets.cinic10 import LAYOUT

            raise ValueError(f"--dataset cinic10 reads CINIC-10's image folders: pass --data-dir "
                             f"DIR with {LAYOUT}")
        return
    if dataset in H5_DATASETS:
        if not data_dir:
            files, archive = H5_FILES.get(dataset) or (EXPECTED_FILES[dataset],
                                                       "stackoverflow*.tar.bz2")
            raise ValueError(f"--dataset {dataset} reads TFF's h5 files: pass --data-dir DIR, the "
                             f"folder holding {', '.join(files)} (from TFF's {archive})")
        return
    # The TFDS loaders (those with lazy=True) are the ones the CLI passes a data_dir to.
    if data_dir and dataset not in LAZY_DATASETS:
        raise ValueError(
            f"--data-dir is read only by the TFDS datasets ({', '.join(LAZY_DATASETS)}) and "
            f"TFF's h5 datasets ({', '.join(H5_DATASETS)}); --dataset {dataset} takes none: "
            "drop --data-dir"
        )


# Dataset-specific flags and the datasets that read them.
DATASET_FLAGS = {
    "synthetic_alpha": ("synthetic",),
    "synthetic_beta": ("synthetic",),
    "leaf_root": ("leaf",),
    "leaf_task": ("leaf",),
}


def check_dataset_flags(cfg: Any) -> None:
    """Raises ValueError for a dataset flag the chosen ``--dataset`` does not read, or missing.

    A flag of another dataset would otherwise be ignored silently.
    """
    from fedjax_lab.data.datasets import DATASET_NAMES, LAZY_DATASETS, LEAF_TASKS

    if cfg.dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid names: "
                         f"{', '.join(DATASET_NAMES)} (--dataset)")
    check_data_dir(cfg.dataset, cfg.data_dir)
    if cfg.download and cfg.dataset not in LAZY_DATASETS:
        raise ValueError(f"--download fetches the TFDS datasets ({', '.join(LAZY_DATASETS)}); "
                         f"--dataset {cfg.dataset} needs none: drop --download")
    for name, readers in DATASET_FLAGS.items():
        if getattr(cfg, name, None) is not None and cfg.dataset not in readers:
            raise ValueError(f"--{_flag(name)} needs --dataset {'|'.join(readers)} (got "
                             f"--dataset {cfg.dataset}): drop it")
    from fedjax_lab.data.datasets import TARGET_KIND_OF

    if cfg.dataset in TARGET_KIND_OF:
        # StackOverflow: the population is the files' users, read per user (no per-row arrays
        # for other partitions or a per-client split to draw from).
        if getattr(cfg, "partition", "natural") != "natural":
            raise ValueError(f"--dataset {cfg.dataset} is federated by its users: pass "
                             f"--partition natural (got --partition {cfg.partition})")
        if getattr(cfg, "client_eval", None) not in (None, "off") or getattr(
                cfg, "client_eval_fraction", 0.0):
            raise ValueError(f"--dataset {cfg.dataset} is evaluated on a sample of its test "
                             "sentences (test_loss and the task's metrics); per-client "
                             "evaluation is not supported: drop --client-eval*")
    if cfg.dataset == "leaf":
        if cfg.leaf_root is None or cfg.leaf_task is None:
            raise ValueError("--dataset leaf reads LEAF's preprocessed JSON: pass --leaf-root "
                             f"DIR (with train/ and test/) and --leaf-task {'|'.join(LEAF_TASKS)}")
        if cfg.leaf_task not in LEAF_TASKS:
            raise ValueError(f"--leaf-task must be one of {', '.join(LEAF_TASKS)}, got "
                             f"{cfg.leaf_task!r}")
    for name in ("synthetic_alpha", "synthetic_beta"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{_flag(name)} must be a finite number >= 0, got {value}")


def check_client_eval(cfg: Any) -> str:
    """The federated evaluation mode of ``--client-eval``/``--client-eval-fraction``.

    ``--client-eval`` none (unset) means ``split`` when ``--client-eval-fraction`` is given and
    ``off`` otherwise, so that ``--client-eval-fraction F`` alone keeps its meaning.

    Raises:
      ValueError: naming the flags of a contradictory or unsupported combination: a fraction
        without ``split`` or ``split`` without a fraction, or ``natural`` on a dataset whose
        test examples have no natural client or with a partition other than ``natural``.
    """
    from fedjax_lab.data.datasets import NATURAL_TEST_DATASETS

    fraction = cfg.client_eval_fraction
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--client-eval-fraction must be in [0, 1) (0: none), got {fraction}")
    mode = cfg.client_eval
    if mode is None:
        mode = "split" if fraction else "off"
    if mode not in CLIENT_EVAL_MODES:
        raise ValueError(f"--client-eval must be one of {', '.join(CLIENT_EVAL_MODES)} (or none), "
                         f"got {mode!r}")
    if mode == "split" and not fraction:
        raise ValueError("--client-eval split holds out a fraction of every client's examples: "
                         "pass --client-eval-fraction F with F in (0, 1)")
    if mode != "split" and fraction:
        why = (" (natural evaluates on the dataset's own test examples and takes none out of "
               "training)" if mode == "natural" else "")
        raise ValueError(f"--client-eval-fraction needs --client-eval split (got --client-eval "
                         f"{mode}){why}: drop --client-eval-fraction")
    if mode == "natural":
        if cfg.dataset not in NATURAL_TEST_DATASETS:
            raise ValueError(
                f"--client-eval natural needs a dataset whose test examples belong to natural "
                f"clients (--dataset {'|'.join(NATURAL_TEST_DATASETS)}), got --dataset "
                f"{cfg.dataset}: use --client-eval split --client-eval-fraction F")
        if cfg.partition != "natural":
            raise ValueError(
                f"--client-eval natural evaluates each natural client on its own test examples: "
                f"it needs --partition natural (got --partition {cfg.partition}); a partitioned "
                "population takes --client-eval split --client-eval-fraction F")
    return mode


def dataset_kwargs(cfg: Any) -> dict[str, Any]:
    """``load_dataset`` keywords of a config's ``--dataset`` and its dataset flags."""
    from fedjax_lab.data.datasets import H5_DATASETS, LAZY_DATASETS

    # Configs without the dataset flags (e.g. sweep.py's) read the loaders' defaults.
    alpha, beta = getattr(cfg, "synthetic_alpha", None), getattr(cfg, "synthetic_beta", None)
    if cfg.dataset == "synthetic":
        # FedProx's generator makes the population: one natural client per --num-clients.
        return {"alpha": 1.0 if alpha is None else alpha, "beta": 1.0 if beta is None else beta,
                "num_clients": cfg.num_clients, "seed": cfg.seed}
    if cfg.dataset == "synthetic_iid":
        return {"num_clients": cfg.num_clients, "seed": cfg.seed}
    if cfg.dataset == "leaf":
        return {"root_dir": getattr(cfg, "leaf_root", None),
                "task": getattr(cfg, "leaf_task", None)}
    kwargs: dict[str, Any] = {}
    if cfg.dataset in H5_DATASETS or cfg.dataset == "cinic10":
        # Always lazy: the train split is read client by client (CINIC-10: decoded once).
        return {"data_dir": cfg.data_dir}
    if cfg.dataset in LAZY_DATASETS:
        kwargs["download"] = getattr(cfg, "download", False)
        if cfg.data_dir:
            kwargs["data_dir"] = cfg.data_dir
        if getattr(cfg, "backend", None) == "mpi":
            # Each rank reads only the examples of the clients it trains in a round.
            kwargs["lazy"] = True
    return kwargs


# One line of --help per run setting (the default and the valid choices are added to it).
FIELD_HELP = {
    "dataset": "dataset: digits (embedded), synthetic, synthetic_iid, leaf, a TFDS dataset "
               "(mnist, fashion_mnist, emnist, cifar10, cifar100), CINIC-10's image folders "
               "(cinic10) or TFF's h5 files "
               "(fed_emnist, fed_shakespeare, fed_cifar100, stackoverflow_nwp, stackoverflow_lr)",
    "data_dir": "TFDS data directory (TFDS datasets), CINIC-10's folder with train/ and test/ "
                "(cinic10: required), or the folder of TFF's h5 files "
                "(fed_emnist, fed_shakespeare, fed_cifar100, stackoverflow_*: required)",
    "download": "download and prepare a TFDS dataset missing from --data-dir (needs network)",
    "synthetic_alpha": "FedProx Synthetic(alpha, beta): model heterogeneity (none: 1)",
    "synthetic_beta": "FedProx Synthetic(alpha, beta): feature heterogeneity (none: 1)",
    "leaf_root": "LEAF data folder holding train/ and test/ JSON (--dataset leaf)",
    "leaf_task": "LEAF task: femnist, shakespeare or synthetic (--dataset leaf)",
    "partition": "how the train set is split into clients: iid, dirichlet_label_mix, "
                 "dirichlet_per_class, shards, natural",
    "alpha": "Dirichlet concentration of the dirichlet_* partitions",
    "num_clients": "clients in the population",
    "clients_per_round": "clients sampled per round",
    "rounds": "communication rounds",
    "local_epochs": "local passes over each client's data per round",
    "batch_size": "local minibatch size",
    "client_lr": "local (client) learning rate",
    "client_momentum": "local heavy-ball momentum in [0, 1) (0: plain SGD)",
    "model": "model: logreg, mlp, cnn, resnet18, char_lstm, nwp_lstm",
    "seed": "run seed: partition, sampling, init, local shuffles",
    "backend": "where rounds run: vmap, sharded (devices), mpi (mpirun), edge (gRPC processes)",
    "plan": "how the vmap backend runs a round: auto, vmap, unrolled, loop",
    "chunk_size": "clients per chunk of a round (bounds memory; none: all at once)",
    "eval_every": "evaluate every N rounds (and after the last; 0: never)",
    "out": "output folder (metrics.jsonl, summary.json, config.yaml, plots)",
    "progress": "show a progress bar",
    "edge_clients": "--backend edge: client processes (the population is split over them)",
    "edge_round_timeout": "--backend edge: seconds a round waits for its clients",
    "checkpoint_every": "checkpoint to OUT/checkpoints every N rounds (0: off)",
    "resume": "continue the run in --out from its newest intact checkpoint",
    "overwrite": "replace the results of an earlier run in --out (else refused)",
    "on_divergence": "a round whose clients were all rejected: warn, or stop (exit 3)",
    "divergence_patience": "rounds in a row with every client rejected before stop",
    "mpi_round_timeout": "--backend mpi: seconds before a stuck job aborts (none: never)",
    "packing": "run clients back to back in slots: auto (cost model), on, off",
    "slots": "pack into exactly this many client slots (none: cost model)",
    "segment_steps": "local steps per packed call (none: cost model)",
    "max_examples_per_client": "train each client on a fresh random subset of this size",
    "max_local_steps": "stop each client after this many local steps",
    "client_eval": "federated evaluation of the global model on each client's own test "
                   "examples, reported as the distribution of per-client accuracy (mean, p10, "
                   "min) and clients_evaluated: split (hold out --client-eval-fraction of every "
                   "client's examples), natural (the dataset's own per-client test examples: "
                   "--dataset synthetic|synthetic_iid|leaf|fed_emnist|fed_shakespeare with "
                   "--partition natural; trains on "
                   "every example) or off; none: split if --client-eval-fraction is given, "
                   "else off",
    "client_eval_fraction": "--client-eval split: the seeded fraction of every client's "
                            "examples held out for its evaluation (0: none)",
}


def optional_type(tp: Any) -> tuple[type, bool]:
    """``(base type, whether None is allowed)`` of a config field annotation."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], True
    return tp, False


def add_config_fields(parser: Any, cls: type, exclude: Sequence[str] = ()) -> None:
    """Adds one flag per field of the config dataclass ``cls`` to a ``StrictParser``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp, optional = optional_type(hints[f.name])
        parser.add_flag(f.name, tp, f.default, FIELD_HELP.get(f.name, f.name.replace("_", " ")),
                        optional=optional)


def parse_config(cls: type, argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Builds a config dataclass from ``--flag-name value`` arguments (and ``--config``).

    Unknown flags (with the closest valid one), abbreviations, unparsable values and bad
    config files exit with status 2 and argparse's message; values that parse but are invalid
    raise ValueError from ``cfg.validate()`` (callers exit 2).
    """
    from fedjax_lab.cli import StrictParser

    parser = StrictParser(prog=prog, description=cls.__doc__)
    add_config_fields(parser, cls)
    values = vars(parser.parse_args(argv))
    values.pop("config")
    cfg = cls(**values)
    cfg.validate()
    return cfg


def check_round_memory(cfg: Any, train: Any) -> None:
    """Refuses (ValueError) a config whose round cohort cannot fit in this machine's memory.

    Runs on the population before the model is initialised or anything compiled; the bound is
    the cohort of the largest client (``fedjax_lab.data.budget``).
    """
    from fedjax_lab.data.budget import check_cohort_memory
    from fedjax_lab.data.cohort import padded_cohort_size

    check_cohort_memory(
        train, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs, num_steps=None,
        cohort_size=padded_cohort_size(cfg.clients_per_round, getattr(cfg, "chunk_size", None)),
        # MPI ranks and lazily read data gather each round's examples on the host.
        with_examples=train.is_lazy or getattr(cfg, "backend", None) == "mpi",
        max_examples_per_client=getattr(cfg, "max_examples_per_client", None),
        max_local_steps=getattr(cfg, "max_local_steps", None),
    )


def check_task_model(dataset: Any, model: Any, name: str) -> None:
    """Raises ValueError unless ``model``'s logits fit ``dataset``'s non-class targets.

    Traced abstractly (``jax.eval_shape``: nothing is compiled): per-position targets
    ``[T]`` need logits ``[B, T, num_classes]`` (``--model nwp_lstm``), multi-hot ``[K]``
    logits ``[B, K]``.
    """
    spec = dataset.train.feature_spec()
    x = jax.ShapeDtypeStruct((1, *spec["x"][0]), spec["x"][1])
    want = (1, *spec["y"][0], dataset.num_classes) if dataset.target_kind == "sequence" else (
        1, *spec["y"][0])
    hint = ("a per-position model: --model nwp_lstm" if dataset.target_kind == "sequence"
            else "one logit per tag, e.g. --model logreg")
    try:
        logits = jax.eval_shape(lambda k, x: model.apply(model.init(k), x), jax.random.key(0), x)
    except (TypeError, ValueError) as e:  # e.g. a float model given token ids
        raise ValueError(f"--model {name} cannot read {dataset.name}'s inputs ({e}): use "
                         f"{hint}") from None
    if tuple(logits.shape) != want:
        raise ValueError(f"--model {name} gives logits {tuple(logits.shape)[1:]} per example, "
                         f"but {dataset.name}'s targets need {want[1:]}: use {hint}")


def build_problem(cfg: RunConfig):
    """Dataset, federated train split, model, evaluator and initial params for a config.

    The labels (train and test) and the round's memory are checked before the model is
    initialised, i.e. before anything is compiled.
    """
    from fedjax_lab.data.datasets import LAZY_DATASETS, federate, load_dataset
    from fedjax_lab.metrics.client_evaluation import (
        make_client_evaluator,
        natural_client_examples,
        split_client_examples,
    )
    from fedjax_lab.metrics.evaluation import make_evaluator
    from fedjax_lab.metrics.tasks import task_of
    from fedjax_lab.models import get_model

    try:
        dataset = load_dataset(cfg.dataset, **dataset_kwargs(cfg))
    except FileNotFoundError as e:  # data not prepared (TFDS) or not where --leaf-root says
        hint = ("; add --download (needs network) or point --data-dir at the prepared data"
                if cfg.dataset in LAZY_DATASETS and not getattr(cfg, "download", False) else "")
        raise ValueError(f"{e}{hint}") from None
    model = get_model(cfg.model, dataset.input_shape, dataset.num_classes)
    task = task_of(dataset)
    if task is not None:
        check_task_model(dataset, model, cfg.model)
    max_clients = getattr(cfg, "max_clients", None)
    if max_clients is None:
        train = federate(
            dataset, cfg.partition, cfg.num_clients, seed=cfg.seed, alpha=cfg.alpha
        )
    else:  # the first N natural clients in the files' order (train.py --max-clients)
        train = federate(dataset, "natural", None, seed=cfg.seed)
        if max_clients > train.num_clients:
            raise ValueError(f"--max-clients {max_clients} > the {train.num_clients} natural "
                             f"clients of --dataset {cfg.dataset}; lower it")
        train = train.subset(range(max_clients))
    # Configs without the federated evaluation flags (e.g. sweep.py's) evaluate centrally.
    fraction = getattr(cfg, "client_eval_fraction", 0.0)
    mode = getattr(cfg, "client_eval", None) or ("split" if fraction else "off")
    if mode == "split":
        train, client_test = split_client_examples(train, fraction, cfg.seed)
    elif mode == "natural":
        client_test = natural_client_examples(train, dataset.test, dataset.test_client_ids)
    check_round_memory(cfg, train)
    if task is None:
        central = make_evaluator(model.apply, dataset.test, num_classes=model.num_classes)
    else:  # per-token or multi-hot targets: the task's loss and metrics (metrics/tasks.py)
        central = make_evaluator(model.apply, dataset.test, per_example_loss=task.loss,
                                 metrics=task.metrics)
    evaluate = central
    if mode != "off":
        per_client = make_client_evaluator(model.apply, client_test,
                                           num_classes=model.num_classes)

        def evaluate(params: Any) -> dict[str, float]:
            return {**central(params), **per_client(params)}
    # Attacks (fedjax_lab.attacks) poison the training population and add their evaluation;
    # other problem configs (sweeps, plain namespaces) carry no attack.
    if isinstance(cfg, RunConfig):
        train, evaluate = cfg.attack_problem(dataset, train, model, evaluate)
    params = model.init(jax.random.key(cfg.seed))
    return dataset, train, model, evaluate, params


def config_argv(cfg: Any) -> list[str]:
    """The ``--flag value`` command line that :func:`parse_config` turns back into ``cfg``."""
    return settings_argv({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def settings_argv(settings: dict[str, Any]) -> list[str]:
    """``--flag value`` pairs of settings by field name; the parsers read every value back."""
    argv = []
    for name, value in settings.items():
        if value is None:
            text = "none"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)  # str(float) round-trips exactly
        argv += [f"--{_flag(name)}", text]
    return argv


def problem_config(cfg: Any) -> dict[str, Any]:
    """The config fields that change results (all but the operational ones), for the edge join.

    The edge server and every client process derive it from the same flags; a client whose
    value differs (e.g. another --client-lr) is refused at join with the field named.
    """
    from fedjax_lab.io.checkpoint import OPERATIONAL_FIELDS

    return {k: v for k, v in cfg.as_dict().items() if k not in OPERATIONAL_FIELDS}


def build_edge_backend(cfg: RunConfig):
    """A loopback edge server that spawns and supervises ``--edge-clients`` CPU processes."""
    import secrets

    from fedjax_lab.backends.edge import EdgeBackend, WorkerLauncher

    launcher = WorkerLauncher(
        cfg.EDGE_PROBLEM, cfg.to_argv(),
        log_dir=os.path.join(cfg.out, "edge_logs"),
    )
    secure = None
    if getattr(cfg, "secure_aggregation", False):  # train.py's --secure-aggregation
        from fedjax_lab.backends.edge import SecureAggregation

        secure = SecureAggregation(cfg.secagg_fixed_point(),
                                   neighbours=cfg.secagg_neighbours).validate()
    return EdgeBackend(
        num_workers=cfg.edge_clients, token=secrets.token_hex(32).encode(),
        round_timeout=cfg.edge_round_timeout, launcher=launcher,
        problem_config=problem_config(cfg), secure_aggregation=secure,
    )


def build_backend(cfg: RunConfig):
    if cfg.backend == "edge":
        return build_edge_backend(cfg)
    from fedjax_lab.backends.packed import PackingPolicy

    packing = PackingPolicy(cfg.packing, slots=cfg.slots, segment_steps=cfg.segment_steps)
    if cfg.backend == "sharded":
        from fedjax_lab.backends.sharded import ShardedBackend

        return ShardedBackend(plan=cfg.plan, chunk_size=cfg.chunk_size, packing=packing)
    if cfg.backend == "mpi":  # imported only here: importing mpi4py initialises MPI
        from fedjax_lab.backends.mpi import MpiBackend

        return MpiBackend(plan=cfg.plan, chunk_size=cfg.chunk_size,
                          round_timeout=cfg.mpi_round_timeout, packing=packing)
    from fedjax_lab.backends.vmap import VmapBackend

    return VmapBackend(plan=cfg.plan, chunk_size=cfg.chunk_size, packing=packing)


class ProgressBar:
    """tqdm bar over rounds with the latest loss/accuracy (stderr; off with --progress false)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="round", file=sys.stderr)
        self._last: dict[str, float] = {}

    def __call__(self, round_idx: int, record: dict[str, float]) -> None:
        del round_idx
        self._last.update({k: record[k] for k in ("train_loss", "test_accuracy") if k in record})
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in self._last.items()})
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def summarize(cfg: Any, result: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary.json content of a run.

    Besides the final metrics it says whether the run finished (``status``: ``"completed"``,
    or ``"stopped"`` with ``stop_reason``), the last round's ``final_train_loss`` (NaN, written
    ``"nan"``, when no client contributed to it) and how many rounds had every client rejected
    (``rounds_all_rejected``) or no contributing client at all (``rounds_without_update``).
    """
    from fedjax_lab.metrics.divergence import all_rejected

    evals = [h for h in result.history if "test_accuracy" in h]
    last = evals[-1] if evals else {}
    stop_reason = result.stop_reason
    summary = {
        "status": "stopped" if stop_reason else "completed",
        "stop_reason": stop_reason,
        "final_test_accuracy": last.get("test_accuracy"),
        "final_test_loss": last.get("test_loss"),
        # Federated evaluation (--client-eval): the per-client accuracy distribution and how
        # many clients it is over.
        **{f"final_{k}": last[k] for k in ("client_accuracy_mean", "client_accuracy_p10",
                                           "client_accuracy_min", "clients_evaluated")
           if k in last},
        "final_train_loss": result.history[-1].get("train_loss") if result.history else None,
        "rounds_all_rejected": sum(all_rejected(h) for h in result.history),
        "rounds_without_update": sum(
            float(h.get("train_examples", 1.0)) == 0.0 for h in result.history
        ),
        "rounds": len(result.history),
        "wall_seconds": result.wall_seconds,
        "train_seconds": result.train_seconds,
        "examples_per_second": result.train_examples / max(result.train_seconds, 1e-9),
        "uplink_bits": sum(h.get("upload_bits", 0.0) for h in result.history),
        # Local steps with a real example / slot-steps computed, over the whole run (packing).
        "padding_efficiency": _efficiency(result.history),
        "compiled_programs": dict(result.compiles),
        "config": cfg.as_dict(),
        "jax_backend": jax.default_backend(),
    }
    summary.update(extra or {})
    return summary


# Settings that say how to run, not what: left out of the config.yaml that reproduces a run.
NOT_REPRODUCED = ("resume", "overwrite", "progress")


def write_config_yaml(path: str, cfg: Any) -> None:
    """Writes the resolved flags of ``cfg`` as YAML (keys: flag names); ``--config`` reads it.

    ``--resume``/``--overwrite``/``--progress`` are left out: re-running the file must not
    replace or continue a folder's results unless asked on the command line.
    """
    import yaml

    flags = {k.replace("_", "-"): v for k, v in cfg.config_file_dict().items()}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(flags, f, sort_keys=False)


def _efficiency(history: list[dict[str, float]]) -> float | None:
    """Real / computed local steps of the rounds that report them (None if none does)."""
    computed = sum(h.get("computed_steps", 0.0) for h in history)
    if not computed:
        return None
    return sum(h.get("real_steps", 0.0) for h in history) / computed


def _number(value: Any) -> str:
    """A metric for the summary screen: 4 decimals, ``nan``/``inf`` as such, n/a when absent."""
    if value is None:
        return "n/a"
    try:
        return f"{float(value):.4f}"  # float("nan") parses the "nan" of a resumed history
    except (TypeError, ValueError):
        return str(value)


def print_summary(summary: dict[str, Any], out: str) -> None:
    lines = [
        "",
        "=" * 60,
        f" {summary['config'].get('dataset')} / {summary['config'].get('model')}"
        f" / {summary.get('algorithm', 'fedavg')}",
    ]
    if summary.get("stop_reason"):
        lines.append(f" STOPPED EARLY       : {summary['stop_reason']}")
    if summary.get("rounds_all_rejected"):
        lines.append(f" all-rejected rounds : {summary['rounds_all_rejected']} (every client's "
                     "update was non-finite; the model did not move)")
    initial = summary.get("initial_evaluation") or {}
    lines += [
        f" round 0 test acc.   : {_number(initial.get('test_accuracy'))} (the initial model)",
        f" final test accuracy : {_number(summary['final_test_accuracy'])}",
        f" final test loss     : {_number(summary['final_test_loss'])}",
        f" final train loss    : {_number(summary.get('final_train_loss'))}",
        f" rounds              : {summary['rounds']}",
        f" wall time           : {summary['wall_seconds']:.1f} s",
        f" examples / second   : {summary['examples_per_second']:.0f}",
        f" padding efficiency  : {_number(summary.get('padding_efficiency'))}"
        f" ({sum(summary.get('compiled_programs', {}).values())} programs compiled)",
        f" outputs             : {out}/ metrics.jsonl, metrics.csv, events.out.tfevents.*,",
        "                       summary.json, config.yaml, curves.png, accuracy.png",
        "=" * 60,
    ]
    print("\n".join(lines))


def open_run_folder(cfg: Any, process: Any = None) -> Any:
    """Locks ``cfg.out`` for this run (``fedjax_lab.io.run_folder.RunFolder``) on the primary.

    With several processes (``process``: an ``MpiBackend``) only the primary touches the folder
    and every process raises the same ValueError when it is refused (collective).
    """
    from fedjax_lab.io.run_folder import RunFolder

    folder, error = None, None
    if process is None or process.is_primary:
        try:
            folder = RunFolder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        except ValueError as e:
            error = str(e)
    if process is not None:
        error = process.broadcast(error)
    if error is not None:
        if folder is not None:
            folder.close()
        raise ValueError(error)
    return folder


def run_fedavg_experiment(cfg: RunConfig, backend: Any = None) -> dict[str, Any]:
    """Builds everything from ``cfg``, trains, writes the run's outputs into ``cfg.out``.

    Outputs: metrics.jsonl (streamed, one line per round 1..N), metrics.csv and TensorBoard
    event files (the same numbers, written at the end, preceded by round 0), summary.json,
    config.yaml (the resolved flags; ``--config`` reproduces the run), curves.png (test
    accuracy/loss vs round, uplink bytes and simulated time; train loss) and accuracy.png.

    Round 0 is the initial model's evaluation (unless ``--eval-every 0``; computed after
    training so that it delays no round): summary.json's
    ``initial_evaluation``, the first row of metrics.csv, step 0 in TensorBoard and the first
    point of the plots. It is recomputed from the seed on every start, resumed ones included,
    so checkpoints and metrics.jsonl hold exactly the trained rounds.

    ``backend`` overrides ``build_backend(cfg)`` (the caller then closes it). ``cfg.out`` is
    locked for the run and an earlier run's results there are kept unless ``--resume`` or
    ``--overwrite`` (``fedjax_lab.io.run_folder``). With ``--checkpoint-every``/``--resume``
    the run checkpoints to and resumes from ``<out>/checkpoints`` (fedjax_lab.io.checkpoint);
    metrics.jsonl then holds the checkpointed rounds followed by the resumed ones. Every check
    (flags, folder, checkpoint checksums, labels, memory) runs before anything is compiled and
    raises ValueError. A run that ``--on-divergence stop`` ends early returns a summary with
    ``status`` ``"stopped"`` (``main`` exits 3).
    """
    from fedjax_lab.io.checkpoint import RunCheckpointing
    from fedjax_lab.metrics.divergence import DivergenceMonitor
    from fedjax_lab.runner import ClientStateStore, run

    start = time.perf_counter()
    owned = backend is None
    folder = ckpt = None
    try:
        if owned and cfg.backend == "mpi":
            backend = build_backend(cfg)  # the ranks agree on the checks below through it
        folder = open_run_folder(cfg, backend)
        ckpt = RunCheckpointing(  # verifies the checkpoints' checksums (no model needed)
            os.path.join(cfg.out, "checkpoints"), every=cfg.checkpoint_every, resume=cfg.resume,
            config=cfg.as_dict(), total_rounds=cfg.rounds, process=backend,
            overwrite=cfg.overwrite,
        )
        _, train, model, evaluate, params = build_problem(cfg)
        algorithm = cfg.make_algorithm(model)
        systems = cfg.systems(sum(x.size for x in jax.tree.leaves(params)))
        # MPI: each rank's store keeps the states of the clients it owns.
        initial = algorithm.client_init(params)
        store = (backend.client_store(initial) if backend is not None
                 else ClientStateStore(initial))
        server_state, start_round = ckpt.restore(algorithm.init(params), store)
        if folder is not None:
            folder.start_fresh()  # --overwrite: every check passed, the old results go now
            write_config_yaml(os.path.join(cfg.out, "config.yaml"), cfg)
            cfg.on_start()
        if owned and backend is None:
            backend = build_backend(cfg)
        primary = backend.is_primary
        monitor = DivergenceMonitor(
            cfg.on_divergence, cfg.divergence_patience, log=None if not primary else (
                lambda message: print(message, file=sys.stderr, flush=True)),
            hint=f"(--on-divergence {cfg.on_divergence}, --divergence-patience "
                 f"{cfg.divergence_patience}: stop ends the run after that many such rounds in "
                 "a row, with exit status 3)",
        )
        monitor.replay(ckpt.history)  # a resumed run continues the count of its rounds
        common = dict(
            rounds=cfg.rounds - start_round, clients_per_round=cfg.clients_per_round,
            seed=cfg.seed, server_state=server_state,
            start_round=start_round, client_store=store, state_callbacks=[ckpt.save_state],
            num_classes=model.num_classes, max_examples_per_client=cfg.max_examples_per_client,
            max_local_steps=cfg.max_local_steps, **systems,
        )
        if not primary:  # MPI ranks > 0: train, write nothing
            with backend.failure_guard():
                # The monitor sees the same (replicated) metrics as rank 0's and stops the same
                # round; the state callback is collective with rank 0's saves.
                result = run(algorithm, backend, train, params, callbacks=[monitor], **common)
            return {"primary_process": False, "stop_reason": result.stop_reason}
        # Round 0 is evaluated after training, from this host copy of the initial model, so
        # that it delays no round (edge clients and MPI ranks wait on round timeouts) and no
        # buffer donation during training can touch it.
        initial_params = jax.device_get(params)
        writer = JsonlWriter(os.path.join(cfg.out, "metrics.jsonl"))
        for record in ckpt.history:  # resumed: the rounds of the checkpoint, then the new ones
            writer.write(record)
        bar = ProgressBar(cfg.rounds - start_round, cfg.progress, algorithm.name)
        try:
            # MPI: a failing rank aborts every rank instead of hanging them.
            with backend.failure_guard():
                result = run(
                    algorithm, backend, train, params, evaluate=evaluate,
                    eval_every=cfg.eval_every,
                    callbacks=[ckpt.record, lambda r, rec: writer.write(rec), bar, monitor],
                    **common,
                )
        finally:
            bar.close()
            writer.close()
    finally:
        if ckpt is not None:
            ckpt.close()
        if owned and backend is not None:
            backend.close()
        if folder is not None:
            folder.close()
    result.history = ckpt.history
    result.wall_seconds = time.perf_counter() - start
    # Round 0: the initial model's evaluation. It is a function of the seed and the config
    # alone, so it is recomputed on every start (resumed too) and never checkpointed: the
    # checkpoint's history and metrics.jsonl stay exactly rounds 1..N.
    initial_evaluation = ({"round": 0, **evaluate(initial_params)} if cfg.eval_every > 0
                          else None)
    # The outputs written at the end start at round 0 (metrics.jsonl holds rounds 1..N).
    curve = [initial_evaluation, *result.history] if initial_evaluation else result.history
    evals = [h for h in curve if "test_accuracy" in h]
    plot_curves(
        os.path.join(cfg.out, "accuracy.png"),
        {algorithm.name: ([h["round"] for h in evals], [h["test_accuracy"] for h in evals])},
        xlabel="round", ylabel="test accuracy", title=plot.title(cfg.as_dict(), algorithm.name),
    )
    # Every round's numbers in the formats researchers read (same values as metrics.jsonl).
    write_csv(os.path.join(cfg.out, "metrics.csv"), curve)
    write_tensorboard(cfg.out, curve)
    plot.plot_runs([(algorithm.name, curve)], os.path.join(cfg.out, "curves.png"),
                   plot.title(cfg.as_dict(), algorithm.name))
    extra = {"algorithm": algorithm.name, "num_train_clients": train.num_clients,
             "initial_evaluation": initial_evaluation}
    for key in ("uplink_bytes", "uplink_message_bytes", "downlink_bytes", "dropped_clients"):
        if any(key in h for h in result.history):  # measured by the edge backend
            extra[key] = sum(h.get(key, 0.0) for h in result.history)
    summary = summarize(cfg, result, extra)
    write_json(os.path.join(cfg.out, "summary.json"), summary)
    return summary


def main(cls: type, runner: Callable[[Any], dict[str, Any]], argv=None, prog=None) -> int:
    """CLI entry: parse, validate (exit 2 with a clear message), run, print the summary.

    Exit status: 0 done, 2 bad input (flags, data, folder, checkpoint; nothing was run), 3 the
    run was stopped early because it diverged (``--on-divergence stop``; summary.json says why).
    """
    try:
        cfg = cls.parse(argv, prog) if issubclass(cls, RunConfig) else parse_config(cls, argv, prog)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = runner(cfg)
    except ValueError as e:  # bad names, data, folders or checkpoints found while building
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("primary_process", True):  # MPI: only rank 0 reports
        print_summary(summary, cfg.out)
    if summary.get("stop_reason"):
        if summary.get("primary_process", True):
            print(f"error: the run stopped early: {summary['stop_reason']}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0
