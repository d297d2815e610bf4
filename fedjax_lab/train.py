"""The general experiment: any registered algorithm, compressor and aggregator from flags.

``python experiments/train.py`` parses a :class:`TrainConfig` whose ``--algorithm``,
``--compressor`` and ``--aggregator`` choices, and each component's hyperparameter flags, come
from :mod:`fedjax_lab.registry` (filled by the packages' ``__init__``), then runs it with
:func:`fedjax_lab.experiment.run_fedavg_experiment` (outputs, checkpoints, resume, every
backend). A hyperparameter of a component that is not selected, or a combination the backends
cannot run, exits with status 2 naming both flags before anything is built.
:class:`FedAvgConfig` is ``experiments/fedavg.py``: a preset of the same flags (FedAvg/FedOpt).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedjax_lab.experiment import (
    RunConfig,
    add_config_fields,
    build_problem,
    problem_config,
    settings_argv,
)
from fedjax_lab.registry import CLIENT_OPTIMIZERS

STRAGGLER_POLICIES = ("partial", "drop")
STRAGGLER_SAMPLINGS = ("bernoulli", "exact")
STRAGGLER_WORK = ("steps", "epochs")
SYSTEM_CHOICES = {"straggler_policy": STRAGGLER_POLICIES,
                  "straggler_sampling": STRAGGLER_SAMPLINGS, "straggler_work": STRAGGLER_WORK}
# Backends that reduce partial sums of the aggregate over shards/ranks, or aggregate elsewhere.
NON_ROBUST_BACKENDS = ("sharded", "mpi", "edge")
# Backends on which the runner simulates availability and the time model.
SYSTEM_BACKENDS = ("vmap", "sharded")

# fedjax_lab.attacks from flags: data poisoning (host side) and model poisoning (in the round).
DATA_ATTACKS = ("label_flip", "backdoor")
MODEL_ATTACKS = ("scale", "noise", "sign_flip", "alie", "ipm")
ATTACKS = ("none", *DATA_ATTACKS, *MODEL_ATTACKS)
# Each attack hyperparameter flag: (type, optional, the attacks that read it, help).
ATTACK_PARAMS = {
    "attack_boost": (float, True, ("scale", "backdoor"),
                     "boost factor gamma of a malicious upload (Bagdasaryan et al. 2020): needed "
                     "by --attack scale; with --attack backdoor it adds model replacement "
                     "(none: no boosting)"),
    "attack_sigma": (float, False, ("noise",), "std of the Gaussian-noise uploads"),
    "alie_z": (float, True, ("alie",), "ALIE's z (none: Baruch et al. 2019's z_max formula)"),
    "ipm_epsilon": (float, False, ("ipm",), "IPM's epsilon (Xie et al. 2020): upload "
                    "-epsilon x mean of the honest updates"),
    "flip_map": (str, False, ("label_flip",), "label flip map: reverse (y -> K-1-y) or "
                 "permutation (a seeded random permutation)"),
    "backdoor_target": (int, False, ("backdoor",), "the backdoor's target label"),
    "trigger_size": (int, False, ("backdoor",), "side of the square trigger patch (pixels, "
                     "bottom-right corner, value 1.0)"),
}
ATTACK_HELP = ("poison the run: data poisoning (label_flip, backdoor: the malicious clients' "
               "examples) or model poisoning of the malicious clients' uploads (scale, noise, "
               "sign_flip; alie and ipm are omniscient: they see the round's honest updates)")

MAX_CLIENTS_HELP = (
    "--partition natural: keep only the first N natural clients in the files' order (e.g. "
    "FedML's 200-writer FEMNIST-LR row); --num-clients must equal it")
QUICK_HELP = (
    "smoke run of a preset: the data become a tiny generated stand-in of the same layout "
    "(written to a temp folder; MNIST -> sklearn digits), 2 rounds, <= 2 clients per round, "
    "evaluation every round, --out gets a '-quick' suffix (a real run's results are never "
    "touched); refused with --data-dir/--download/--resume")
SYSTEM_HELP = {
    "dropout": "probability that a sampled client drops out of a round (Bonawitz et al. 2019)",
    "straggler_fraction": "probability that a client straggles: it completes a random part "
                          "of its local steps (FedProx §5.2)",
    "straggler_policy": "stragglers' partial work: partial (kept, FedProx) or drop (FedAvg)",
    "straggler_sampling": "bernoulli (a coin per client) or exact (round(m x fraction) of the "
                          "m eligible clients straggle, as the FedProx code)",
    "straggler_work": "a straggler's work: a uniform number of steps, or of whole local epochs "
                      "below --local-epochs (the FedProx code's randint(1, E))",
    "comm_comp_ratio": "FedPAQ time model: communication/computation time ratio of one "
                       "uncompressed upload (none: no simulated time)",
    "comp_shift": "FedPAQ time model: deterministic computation time per example",
    "comp_scale": "FedPAQ time model: rate of the exponential computation time",
}
TRAINING_HELP = {
    "client_optimizer": "local optimizer: sgd (with --client-momentum), adam (PyTorch's Adam) "
                        "or amsgrad (PyTorch's Adam with amsgrad=True: what FedML's "
                        "--client_optimizer adam runs); its state is fresh every round",
    "client_weight_decay": "L2 coefficient wd >= 0 added to every local gradient as wd * "
                           "params (PyTorch's weight_decay), for each --client-optimizer "
                           "(0: none)",
    "local_steps": "a fixed number of local steps per round instead of --local-epochs",
    "error_feedback": "add error feedback to the compressor (Seide et al. 2014; Stich et al. "
                      "2018): clients keep what compression lost",
    "clip_norm": "clip each client's update to this L2 norm before the aggregator (none: off)",
    "weak_dp_std": "weak DP (Sun et al. 2019): std of the Gaussian noise the server adds to "
                   "every model parameter each round, key from --seed (none: off)",
    "secure_aggregation": "sum the cohort's weighted updates through a real SecAgg round "
                          "(Bonawitz et al. 2017; fedjax_lab.secagg): vmap runs it on the host "
                          "each round, --backend edge over the wire; needs --compressor "
                          "identity and --aggregator mean",
    "secagg_neighbours": "SecAgg+ (Bell et al. 2020): each client masks with this many "
                         "neighbours (even; none: every other client, plain SecAgg)",
    "secagg_bits": "bits of the fixed-point ring Z_(2^bits) the masked sums live in",
    "secagg_frac_bits": "fractional bits of the fixed-point code (resolution 2^-frac_bits)",
    "secagg_bound": "largest |w_i u_i| and w_i a client may send; beyond it coordinates are "
                    "clipped and counted in the round metric secagg_clipped",
}
SECAGG_DEFAULTS = {"secagg_neighbours": None, "secagg_bits": 48, "secagg_frac_bits": 24,
                   "secagg_bound": 1024.0}


def _registries() -> tuple[Any, Any, Any]:
    # Importing the packages fills the registries (their __init__ registers the constructors).
    import fedjax_lab.algorithms
    import fedjax_lab.compressors  # noqa: F401
    from fedjax_lab.registry import AGGREGATORS, ALGORITHMS, COMPRESSORS

    return ALGORITHMS, COMPRESSORS, AGGREGATORS


def add_component_flags(
    parser: Any, registries: Sequence[Any], defaults: dict[str, str],
    extra_flags: Any = None,
) -> None:
    """Adds ``--<kind>`` (one per registry) and every component's hyperparameter flags.

    A flag of a component that is not selected parses (default ``argparse.SUPPRESS``: absent
    unless given) and :func:`pop_component_hparams` refuses it, naming the component it needs.

    Args:
      parser: a ``fedjax_lab.cli.StrictParser``.
      registries: e.g. ``(ALGORITHMS, COMPRESSORS)`` of :mod:`fedjax_lab.registry`.
      defaults: the default component name of each registry kind.
      extra_flags: ``(parser, registry kind, argument group) -> None`` adding a kind's own
        flags next to it (``--error-feedback`` next to ``--compressor``).
    """
    for registry in registries:
        group = parser.add_argument_group(registry.kind, registry.description)
        catalog = "; ".join([f"{c.name}: {c.description}" for c in registry]
                            + [f"{name}: refused ({reason})"
                               for name, reason in registry.refused().items()])
        # Refused names parse, so that validation exits 2 with their reason.
        parser.add_flag(registry.kind, str, defaults[registry.kind], catalog,
                        choices=(*registry.names(), *registry.refused()), group=group)
        if extra_flags is not None:
            extra_flags(parser, registry.kind, group)
        for name, users in registry.params().items():
            first = users[0][1]
            values = sorted({repr(p.default) for _, p in users})
            default_text = (f"default {values[0]}" if len(values) == 1 else "defaults "
                            + ", ".join(f"{c.name} {p.default!r}" for c, p in users))
            used_by = "|".join(c.name for c, _ in users)
            parser.add_flag(
                name, first.type, argparse.SUPPRESS,
                f"{first.help} [--{registry.kind} {used_by}; {default_text}]",
                optional=any(p.default is None for _, p in users), choices=first.choices,
                group=group)


def pop_component_hparams(values: dict[str, Any], registries: Sequence[Any]) -> dict[str, Any]:
    """Moves the given hyperparameter flags out of ``values`` (parsed flags by name).

    Raises:
      ValueError: a hyperparameter flag of a component that is not selected (naming the
        ``--<kind>`` values that read it), or an unknown/refused component name.
    """
    hparams = {}
    for registry in registries:
        selected = registry.get(values[registry.kind])
        for name in registry.params():
            if name not in values:
                continue
            value = values.pop(name)
            if selected.param(name) is None:
                raise ValueError(
                    f"--{name.replace('_', '-')} needs --{registry.kind} "
                    f"{'|'.join(registry.users(name))} (got --{registry.kind} "
                    f"{selected.name})")
            hparams[name] = value
    return hparams


def _component_extras(parser: Any, kind: str, group: Any) -> None:
    """train.py's flags next to its components: error feedback, norm clipping, weak DP."""
    if kind == "compressor":
        parser.add_flag("error_feedback", bool, False, TRAINING_HELP["error_feedback"],
                        group=group)
    if kind == "aggregator":
        parser.add_flag("clip_norm", float, None, TRAINING_HELP["clip_norm"], optional=True,
                        group=group)
        parser.add_flag("weak_dp_std", float, None, TRAINING_HELP["weak_dp_std"],
                        optional=True, group=group)
        parser.add_flag("secure_aggregation", bool, False, TRAINING_HELP["secure_aggregation"],
                        group=group)
        parser.add_flag("secagg_neighbours", int, None, TRAINING_HELP["secagg_neighbours"],
                        optional=True, group=group)
        for name in ("secagg_bits", "secagg_frac_bits", "secagg_bound"):
            default = SECAGG_DEFAULTS[name]
            parser.add_flag(name, type(default), default, TRAINING_HELP[name], group=group)


@dataclass
class TrainConfig(RunConfig):
    """Any registered algorithm x compressor x aggregator, with availability and time models.

    Every field is a ``--flag-name`` CLI flag; the selected components' hyperparameters are
    flags too and land in ``hparams`` (only those of the selected components).
    """

    algorithm: str = "fedavg"
    compressor: str = "identity"
    error_feedback: bool = False
    aggregator: str = "mean"
    clip_norm: float | None = None
    weak_dp_std: float | None = None
    secure_aggregation: bool = False
    secagg_neighbours: int | None = None
    secagg_bits: int = 48
    secagg_frac_bits: int = 24
    secagg_bound: float = 1024.0
    local_steps: int | None = None
    client_optimizer: str = "sgd"
    client_weight_decay: float = 0.0
    dropout: float = 0.0
    straggler_fraction: float = 0.0
    straggler_policy: str = "partial"
    straggler_sampling: str = "bernoulli"
    straggler_work: str = "steps"
    comm_comp_ratio: float | None = None
    comp_shift: float = 1.0
    comp_scale: float = 1.0
    attack: str = "none"
    malicious_fraction: float = 0.0
    attack_boost: float | None = None
    attack_sigma: float = 1.0
    alie_z: float | None = None
    ipm_epsilon: float = 0.1
    flip_map: str = "reverse"
    backdoor_target: int = 0
    trigger_size: int = 3
    max_clients: int | None = None  # --partition natural: only the files' first N clients
    out: str | None = None  # none: a new runs/<algorithm>/<timestamp>-<config hash>/
    hparams: dict[str, Any] = field(default_factory=dict)
    auto_out: bool = field(default=False, repr=False)  # out was named by resolve_out()

    EDGE_PROBLEM: ClassVar[str] = "fedjax_lab.train:edge_problem"

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None, prog: str | None = None) -> TrainConfig:
        """The validated config of a command line; ValueError (exit 2) names the bad flags."""
        from fedjax_lab.cli import StrictParser

        registries = _registries()
        parser = StrictParser(prog=prog, description=cls.__doc__)
        add_config_fields(parser, RunConfig)
        parser.add_flag("local_steps", int, None, TRAINING_HELP["local_steps"], optional=True)
        parser.add_flag("client_optimizer", str, cls.client_optimizer,
                        TRAINING_HELP["client_optimizer"], choices=CLIENT_OPTIMIZERS)
        parser.add_flag("client_weight_decay", float, cls.client_weight_decay,
                        TRAINING_HELP["client_weight_decay"])
        add_component_flags(parser, registries,
                            {r.kind: getattr(cls, r.kind) for r in registries},
                            extra_flags=_component_extras)
        group = parser.add_argument_group("systems", "client availability and simulated time")
        for name, tp, optional in (("dropout", float, False), ("straggler_fraction", float, False),
                                   ("straggler_policy", str, False),
                                   ("straggler_sampling", str, False),
                                   ("straggler_work", str, False),
                                   ("comm_comp_ratio", float, True), ("comp_shift", float, False),
                                   ("comp_scale", float, False)):
            parser.add_flag(name, tp, getattr(cls, name), SYSTEM_HELP[name], optional=optional,
                            group=group, choices=SYSTEM_CHOICES.get(name))
        group = parser.add_argument_group("attacks", "malicious clients (fedjax_lab.attacks)")
        parser.add_flag("attack", str, cls.attack, ATTACK_HELP, choices=ATTACKS, group=group)
        parser.add_flag("malicious_fraction", float, cls.malicious_fraction,
                        "fraction in [0, 1) of the population that is malicious (a fixed set "
                        "drawn from --seed)", group=group)
        for name, (tp, optional, users, text) in ATTACK_PARAMS.items():
            parser.add_flag(name, tp, getattr(cls, name), f"{text} [--attack {'|'.join(users)}]",
                            optional=optional, group=group,
                            choices=("reverse", "permutation") if name == "flip_map" else None)
        parser.add_flag("max_clients", int, None, MAX_CLIENTS_HELP, optional=True)
        parser.add_flag("quick", bool, False, QUICK_HELP)
        # The class's own default (a preset's folder; None: a new named folder per run).
        parser.set_defaults(out=cls.out)
        values = vars(parser.parse_args(argv))
        values.pop("config")
        if values.pop("quick"):
            from fedjax_lab.experiments_lib.quick import quick_values

            values = quick_values(values, cls.out)
        hparams = pop_component_hparams(values, registries)
        cfg = cls(**values, hparams=hparams)
        cfg.validate()
        return cfg

    def _selected(self) -> tuple[Any, Any, Any]:
        algorithms, compressors, aggregators = _registries()
        return (algorithms.get(self.algorithm), compressors.get(self.compressor),
                aggregators.get(self.aggregator))

    def _params(self, component: Any) -> dict[str, Any]:
        """The component's hyperparameters: given in ``hparams`` or its defaults."""
        return {p.name: self.hparams.get(p.name, p.default) for p in component.params}

    def validate(self) -> None:
        """Raises ValueError naming the bad flag(s); runs before anything is built."""
        if self.max_clients is not None:
            if self.max_clients < 1:
                raise ValueError(f"--max-clients must be >= 1 (or none), got {self.max_clients}")
            if self.partition != "natural":
                raise ValueError("--max-clients keeps the first N natural clients: it needs "
                                 f"--partition natural (got --partition {self.partition})")
            if self.num_clients != self.max_clients:
                raise ValueError(f"--num-clients ({self.num_clients}) must equal --max-clients "
                                 f"({self.max_clients}): the population is those clients")
            if self.client_eval == "natural":
                raise ValueError("--max-clients with --client-eval natural is not supported "
                                 "(the test writers would not match): use --client-eval off")
        super().validate()
        algorithm, compressor, aggregator = self._selected()
        known = {p.name for c in (algorithm, compressor, aggregator) for p in c.params}
        extra = sorted(set(self.hparams) - known)
        if extra:
            raise ValueError(f"hparams {extra} belong to no selected component "
                             f"(--algorithm {self.algorithm}, --compressor {self.compressor}, "
                             f"--aggregator {self.aggregator})")
        for name, value in self._params(algorithm).items():
            # Learning rates are positive: optax would step backwards on a negative one.
            if name.endswith("_lr") and not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, "
                                 f"got {value}")
        self.validate_privacy_params(self._params(algorithm))
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"--local-steps must be >= 1 (or none), got {self.local_steps}")
        if "fixed_local_steps" in algorithm.tags and self.local_steps is None:
            raise ValueError(f"--algorithm {self.algorithm} runs a fixed number of local steps "
                             "(the paper's tau): pass --local-steps")
        if "plain_sgd" in algorithm.tags and self.client_momentum:
            raise ValueError(f"--algorithm {self.algorithm} runs plain local SGD: "
                             f"--client-momentum must be 0, got {self.client_momentum}")
        self.validate_client_optimizer(algorithm)
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"--clip-norm must be > 0 (or none), got {self.clip_norm}")
        if self.weak_dp_std is not None and not (math.isfinite(self.weak_dp_std)
                                                 and self.weak_dp_std > 0):
            raise ValueError(f"--weak-dp-std must be a finite number > 0 (or none), got "
                             f"{self.weak_dp_std}")
        self.validate_secure_aggregation()
        robust = "additive" not in aggregator.tags
        if robust and self.backend in NON_ROBUST_BACKENDS:
            raise ValueError(
                f"--aggregator {self.aggregator} needs every client's update in one place; "
                f"--backend {self.backend} adds partial sums: use --backend vmap or "
                "--aggregator mean")
        if robust and self.chunk_size is not None:
            raise ValueError(f"--aggregator {self.aggregator} needs every client's update in "
                             "one place; --chunk-size adds partial sums per chunk: drop it")
        if "noisy_aggregate" in algorithm.tags and (robust or self.clip_norm is not None):
            flag = f"--aggregator {self.aggregator}" if robust else "--clip-norm"
            raise ValueError(f"--algorithm {self.algorithm} clips and noises its own aggregate; "
                             f"{flag} would replace it: drop {flag}")
        if "raw_uploads" in algorithm.tags and (self.compressor != "identity"
                                                 or self.error_feedback):
            flag = ("--error-feedback" if self.compressor == "identity"
                    else f"--compressor {self.compressor}")
            raise ValueError(f"--algorithm {self.algorithm} clips on the client against a bound "
                             f"that changes every round and uploads the raw clipped update; "
                             f"{flag} would change it after clipping: drop {flag}")
        for name in ("dropout", "straggler_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        for name, choices in SYSTEM_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {choices}, got "
                                 f"{getattr(self, name)!r}")
        shaped = [f"--{n.replace('_', '-')} {getattr(self, n)}"
                  for n in ("straggler_sampling", "straggler_work")
                  if getattr(self, n) != getattr(type(self), n)]
        if shaped and not self.straggler_fraction:
            raise ValueError(f"{' and '.join(shaped)} shape(s) the stragglers: they need "
                             f"--straggler-fraction > 0")
        if self.straggler_work == "epochs" and self.local_steps is not None:
            raise ValueError("--straggler-work epochs counts whole local epochs; --local-steps "
                             "fixes steps instead: drop --local-steps or use --straggler-work "
                             "steps")
        for name in ("comm_comp_ratio", "comp_shift", "comp_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, "
                                 f"got {value}")
        systems = self.dropout or self.straggler_fraction or self.comm_comp_ratio is not None
        if systems and self.backend not in SYSTEM_BACKENDS:
            raise ValueError(
                f"--dropout/--straggler-fraction/--comm-comp-ratio are simulated over a whole "
                f"round's clients in one process; --backend {self.backend} splits them: use "
                f"--backend {' or '.join(SYSTEM_BACKENDS)}")
        if self.comm_comp_ratio is None and (self.comp_shift != 1.0 or self.comp_scale != 1.0):
            raise ValueError("--comp-shift/--comp-scale shape the FedPAQ time model: they need "
                             "--comm-comp-ratio")
        self.validate_attack()
        self.build_compressor()
        self.build_aggregation()
        if self.out is None:
            if self.resume:
                raise ValueError("--resume continues the run in --out: pass --out with the "
                                 "run's folder (e.g. runs/<algorithm>/latest)")
            self.resolve_out()

    def validate_privacy_params(self, params: dict[str, Any]) -> None:
        """The DP algorithms' hyperparameters by name (and adaptive clipping's sigma_b vs z),
        so that a bad value exits 2 before data or models are built."""
        ranges = {"dp_clip_norm": (0.0, math.inf, "a finite number > 0", False),
                  "noise_multiplier": (0.0, math.inf, "a finite number >= 0", True),
                  "target_quantile": (0.0, 1.0, "in [0, 1]", True),
                  "clip_count_stddev": (0.0, math.inf, "a finite number >= 0 (or none)", True),
                  "server_momentum": (0.0, 1.0, "in [0, 1)", True)}
        for name, (lo, hi, text, closed) in ranges.items():
            value = params.get(name)
            if value is None:
                continue
            ok = math.isfinite(value) and (lo <= value if closed else lo < value) and (
                value <= hi if name == "target_quantile" else value < hi)
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {text}, got {value}")
        if "target_quantile" in params:  # adaptive clipping: the count's share of the budget
            from fedjax_lab.algorithms.dp_adaptive_clip import update_noise_multiplier

            sigma_b = params["clip_count_stddev"]
            sigma_b = self.clients_per_round / 20.0 if sigma_b is None else sigma_b
            try:
                update_noise_multiplier(params["noise_multiplier"], sigma_b)
            except ValueError as e:
                raise ValueError(f"--clip-count-stddev (default --clients-per-round / 20 = "
                                 f"{self.clients_per_round / 20.0:g}) with --noise-multiplier "
                                 f"{params['noise_multiplier']}: {e}") from None

    def secagg_fixed_point(self) -> Any:
        """The ``FixedPoint`` code of the ``--secagg-*`` flags (validated)."""
        from fedjax_lab.secagg import FixedPoint

        try:
            return FixedPoint(self.secagg_bits, self.secagg_frac_bits,
                              self.secagg_bound).validate()
        except ValueError as e:
            raise ValueError(f"--secagg-bits/--secagg-frac-bits/--secagg-bound: {e}") from None

    def validate_secure_aggregation(self) -> None:
        """``--secure-aggregation`` and its flags; ValueError naming the flag and the fix."""
        if not self.secure_aggregation:
            changed = [n for n, d in SECAGG_DEFAULTS.items() if getattr(self, n) != d]
            if changed:
                raise ValueError(f"--{changed[0].replace('_', '-')} needs --secure-aggregation")
            return
        if self.compressor != "identity" or self.error_feedback:
            raise ValueError("--secure-aggregation sums dense weighted updates (the server "
                             "decodes only the sum): use --compressor identity without "
                             "--error-feedback")
        if self.aggregator != "mean" or self.clip_norm is not None or self.weak_dp_std:
            raise ValueError("--secure-aggregation gives the server only the cohort's sum: "
                             "robust aggregators, --clip-norm and --weak-dp-std need every "
                             "update; use --aggregator mean without them")
        if self.backend in ("sharded", "mpi") or self.chunk_size is not None:
            raise ValueError(f"--secure-aggregation runs one protocol over the whole cohort "
                             f"(per-shard or per-chunk sums would reveal partial sums): use "
                             f"--backend vmap without --chunk-size, or --backend edge (got "
                             f"--backend {self.backend})")
        if self.clients_per_round < 2:
            raise ValueError("--secure-aggregation needs --clients-per-round >= 2 (one client's "
                             "sum is its update)")
        n = self.secagg_neighbours
        if n is not None and (n < 2 or n % 2):
            raise ValueError(f"--secagg-neighbours must be an even number >= 2 (or none: "
                             f"plain SecAgg), got {n}")
        fixed_point = self.secagg_fixed_point()
        try:
            fixed_point.check_capacity(self.clients_per_round)
        except ValueError as e:
            raise ValueError(f"--secagg-bits with --clients-per-round "
                             f"{self.clients_per_round}: {e}") from None

    def validate_client_optimizer(self, algorithm: Any) -> None:
        """``--client-optimizer``/``--client-weight-decay``; ValueError naming the flags."""
        if self.client_optimizer not in CLIENT_OPTIMIZERS:
            raise ValueError(f"--client-optimizer must be one of {CLIENT_OPTIMIZERS}, got "
                             f"{self.client_optimizer!r}")
        wd = self.client_weight_decay
        if not (math.isfinite(wd) and wd >= 0):
            raise ValueError(f"--client-weight-decay must be a finite number >= 0, got {wd}")
        if self.client_optimizer != "sgd" and self.client_momentum:
            raise ValueError(f"--client-momentum is SGD's heavy ball; --client-optimizer "
                             f"{self.client_optimizer} keeps its own moments: drop "
                             "--client-momentum")
        if "own_local_sgd" in algorithm.tags and (self.client_optimizer != "sgd" or wd):
            raise ValueError(f"--algorithm {self.algorithm} runs its own local SGD from "
                             "--client-lr: --client-optimizer must be sgd and "
                             "--client-weight-decay 0")

    def model_attack(self) -> bool:
        """Whether the attack changes uploads inside the round (backdoor with a boost too)."""
        return self.attack in MODEL_ATTACKS or (
            self.attack == "backdoor" and self.attack_boost is not None)

    def validate_attack(self) -> None:
        """The attack flags; ValueError naming them (the dataset is checked when loaded)."""
        if self.attack not in ATTACKS:
            raise ValueError(f"--attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        fraction = self.malicious_fraction
        if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
            raise ValueError(f"--malicious-fraction must be in [0, 1), got {fraction}")
        if self.attack == "none" and fraction:
            raise ValueError("--malicious-fraction needs --attack (got --attack none)")
        if self.attack != "none" and not fraction:
            raise ValueError(f"--attack {self.attack} needs --malicious-fraction > 0")
        for name, (_, _, users, _) in ATTACK_PARAMS.items():
            if getattr(self, name) != getattr(type(self), name) and self.attack not in users:
                raise ValueError(f"--{name.replace('_', '-')} needs --attack {'|'.join(users)} "
                                 f"(got --attack {self.attack})")
        if self.attack == "scale" and self.attack_boost is None:
            raise ValueError("--attack scale needs --attack-boost (e.g. clients_per_round / "
                             "server lr for model replacement)")
        from fedjax_lab import attacks

        builders = {"scale": lambda: attacks.scale(self.attack_boost),
                    "noise": lambda: attacks.noise(self.attack_sigma),
                    "alie": lambda: attacks.alie(self.alie_z),
                    "ipm": lambda: attacks.ipm(self.ipm_epsilon),
                    "backdoor": lambda: (attacks.scale(self.attack_boost)
                                         if self.attack_boost is not None else None)}
        try:
            builders.get(self.attack, lambda: None)()
        except (TypeError, ValueError) as e:
            raise ValueError(f"--attack {self.attack}: {e}") from None
        if self.attack == "label_flip" and self.flip_map not in attacks.FLIP_MAPS:
            raise ValueError(f"--flip-map must be one of {attacks.FLIP_MAPS}, got "
                             f"{self.flip_map!r}")
        if self.attack == "backdoor" and self.trigger_size < 1:
            raise ValueError(f"--trigger-size must be >= 1, got {self.trigger_size}")
        if not self.model_attack():
            return
        what = f"--attack {self.attack}" + (" --attack-boost" if self.attack == "backdoor"
                                            else "")
        if self.backend != "vmap" or self.chunk_size is not None:
            raise ValueError(f"{what} changes malicious clients' uploads inside the round (the "
                             "omniscient ones from every client's update); --backend "
                             f"{self.backend}{' --chunk-size' if self.chunk_size else ''} "
                             "splits the round's clients: use --backend vmap without "
                             "--chunk-size")
        if self.compressor != "identity":
            raise ValueError(f"{what} poisons raw uploads; --compressor {self.compressor} "
                             "compresses them: use --compressor identity")

    def build_attack(self) -> Any:
        """The ``ModelAttack`` of the flags, or None (no model poisoning)."""
        from fedjax_lab import attacks

        if not self.model_attack():
            return None
        if self.attack == "noise":
            return attacks.noise(self.attack_sigma)
        if self.attack == "sign_flip":
            return attacks.sign_flip()
        if self.attack == "alie":
            return attacks.alie(self.alie_z)
        if self.attack == "ipm":
            return attacks.ipm(self.ipm_epsilon)
        return attacks.scale(self.attack_boost)  # scale, or backdoor's model replacement

    def attack_problem(self, dataset: Any, train: Any, model: Any, evaluate: Any
                       ) -> tuple[Any, Any]:
        """The population poisoned / marked for ``--attack`` and the evaluator with the
        backdoor's ``attack_success_rate``; ValueError (before compiling) for a backdoor on a
        non-image dataset."""
        from fedjax_lab import attacks

        if self.attack == "none":
            return train, evaluate
        malicious = attacks.select_malicious(train.num_clients, self.malicious_fraction,
                                             self.seed)
        if not len(malicious):
            raise ValueError(f"--malicious-fraction {self.malicious_fraction} of "
                             f"{train.num_clients} clients rounds to no malicious client: raise "
                             "it to at least 1 / (2 x clients)")
        try:
            if self.attack == "label_flip":
                train = attacks.label_flip(train, malicious, self.flip_map, self.seed)
            elif self.attack == "backdoor":
                success = attacks.attack_success_evaluator(
                    model.apply, dataset.test, target=self.backdoor_target,
                    size=self.trigger_size, num_classes=model.num_classes)
                train = attacks.backdoor(train, malicious, target=self.backdoor_target,
                                         size=self.trigger_size)
                clean = evaluate

                def evaluate(params: Any) -> dict[str, float]:
                    return {**clean(params), **success(params)}
        except ValueError as e:
            raise ValueError(f"--attack {self.attack} (--dataset {self.dataset}): {e}") from None
        if self.model_attack() or self.scores_detection():
            train = attacks.mark_malicious(train, malicious)
        return train, evaluate

    def scores_detection(self) -> bool:
        """Whether a data attack's malicious flags travel into the round so that a selecting
        aggregator's exclusions are scored (``detection_precision``/``detection_recall``)."""
        return (self.attack in DATA_ATTACKS and not self.model_attack()
                and self.build_aggregation()[0].selects)

    def config_hash(self) -> str:
        """8 hex digits of SHA-256 over the settings that change results (not the folder)."""
        import hashlib
        import json

        from fedjax_lab.io.checkpoint import OPERATIONAL_FIELDS

        values = {k: v for k, v in self.as_dict().items() if k not in OPERATIONAL_FIELDS}
        text = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def resolve_out(self) -> None:
        """Names a new run folder ``runs/<algorithm>/<UTC timestamp>-<config hash>``.

        Runs never overwrite each other by default; ``runs/<algorithm>/latest`` points at the
        newest (made when the run starts). MPI ranks could disagree on the timestamp, so an MPI
        run names its folder with ``--out``.
        """
        import time

        if self.backend == "mpi":
            raise ValueError("--backend mpi: pass --out (the ranks must agree on one folder)")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        base = os.path.join("runs", self.algorithm, f"{stamp}-{self.config_hash()}")
        self.out, n = base, 1
        while os.path.exists(self.out):  # the same config twice within a second
            n += 1
            self.out = f"{base}-{n}"
        self.auto_out = True

    def on_start(self) -> None:
        """Points ``runs/<algorithm>/latest`` at this run's folder when it was named here."""
        if not self.auto_out:
            return
        link = os.path.join(os.path.dirname(self.out), "latest")
        tmp = f"{link}.{os.getpid()}.tmp"
        os.symlink(os.path.basename(self.out), tmp)
        os.replace(tmp, link)  # atomic: a concurrent run's link is replaced, never half-made

    def config_file_dict(self) -> dict[str, Any]:
        values = super().config_file_dict()
        if self.auto_out:
            values["out"] = None  # re-running the file names a new folder (same hash)
        return values

    def build_compressor(self) -> Any:
        """The uplink ``Compressor`` (with error feedback when asked); ValueError names it."""
        from fedjax_lab.compressors import with_error_feedback

        _, component, _ = self._selected()
        try:
            compressor = component.build(**self._params(component))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--compressor {self.compressor}: {e}") from None
        return with_error_feedback(compressor) if self.error_feedback else compressor

    def build_aggregation(self) -> tuple[Any, tuple[Any, ...]]:
        """``(aggregator, transforms)`` of ``--aggregator`` and ``--clip-norm``."""
        from fedjax_lab.algorithms import clip_norm

        _, _, component = self._selected()
        try:
            aggregator = component.build(**self._params(component))
            transforms = (clip_norm(self.clip_norm),) if self.clip_norm is not None else ()
        except (TypeError, ValueError) as e:
            raise ValueError(f"--aggregator {self.aggregator}: {e}") from None
        # The rule's cohort condition (Krum 2f + 3, Bulyan 4f + 3 slots), before compiling.
        if self.clients_per_round < aggregator.min_slots:
            raise ValueError(f"--aggregator {self.aggregator} ({aggregator.name}) needs at "
                             f"least {aggregator.min_slots} client slots per round: raise "
                             f"--clients-per-round (got {self.clients_per_round}) or lower "
                             "its hyperparameters")
        return aggregator, transforms

    def make_algorithm(self, model: Any) -> Any:
        """The algorithm of the flags: the registered constructor, then ``with_aggregator``.

        ``--aggregator mean`` without ``--clip-norm`` is the algorithm's own aggregate,
        untouched (the additive form every backend runs).
        """
        import jax

        from fedjax_lab.algorithms import with_aggregator, with_weak_dp
        from fedjax_lab.data.datasets import TARGET_KIND_OF
        from fedjax_lab.metrics.tasks import training_loss
        from fedjax_lab.registry import AlgorithmContext

        component, _, _ = self._selected()
        context = AlgorithmContext(
            model=model, client_lr=self.client_lr, client_momentum=self.client_momentum,
            batch_size=self.batch_size, local_epochs=self.local_epochs,
            local_steps=self.local_steps, num_clients=self.num_clients,
            clients_per_round=self.clients_per_round, seed=self.seed,
            # The dataset's targets pick the loss (sigmoid cross-entropy for multi-hot tags).
            per_example_loss=training_loss(TARGET_KIND_OF.get(self.dataset, "class")),
            client_optimizer_name=self.client_optimizer,
            client_weight_decay=self.client_weight_decay)
        try:
            algorithm = component.build(context, compressor=self.build_compressor(),
                                        **self._params(component))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--algorithm {self.algorithm}: {e}") from None
        aggregator, transforms = self.build_aggregation()
        if not (self.aggregator == "mean" and not transforms):
            algorithm = with_aggregator(algorithm, aggregator, transforms=transforms)
        if self.weak_dp_std is not None:
            # The server's noise key is the run seed's key, as for DP-FedAvg's noise.
            algorithm = with_weak_dp(algorithm, self.weak_dp_std, jax.random.key(self.seed))
        if self.secure_aggregation and self.backend != "edge":  # edge: its own protocol
            from fedjax_lab.secagg import with_secure_aggregation

            try:
                algorithm = with_secure_aggregation(algorithm, self.secagg_fixed_point(),
                                                    neighbours=self.secagg_neighbours)
            except ValueError as e:
                raise ValueError(f"--secure-aggregation with --algorithm {self.algorithm}: "
                                 f"{e}") from None
        attack = self.build_attack()
        if attack is None:
            if self.scores_detection():
                from fedjax_lab.attacks import with_malicious_flag

                return with_malicious_flag(algorithm)
            return algorithm
        from fedjax_lab.attacks import with_model_poisoning

        # After the aggregator: an omniscient attack replaces uploads before the rule sees them.
        return with_model_poisoning(algorithm, attack)

    def systems(self, num_params: int) -> dict[str, Any]:
        """``availability`` and ``time_model`` keywords of ``fedjax_lab.runner.run``."""
        from fedjax_lab.systems import Availability, TimeModel

        out: dict[str, Any] = {}
        if self.dropout or self.straggler_fraction:
            out["availability"] = Availability(
                self.dropout, self.straggler_fraction, self.straggler_policy,
                straggler_sampling=self.straggler_sampling,
                straggler_epochs=self.local_epochs if self.straggler_work == "epochs" else None)
        if self.comm_comp_ratio is not None:
            out["time_model"] = TimeModel.from_ratio(self.comm_comp_ratio, num_params,
                                                     shift=self.comp_shift, scale=self.comp_scale)
        return out

    def as_dict(self) -> dict[str, Any]:
        """Every setting by flag field name, the selected components' hyperparameters included."""
        # Without an attack its fields stay out, so configs, hashes and checkpoints of runs
        # made before attacks existed are unchanged.
        skip = {"hparams", "auto_out"} | (
            {"attack", "malicious_fraction", *ATTACK_PARAMS} if self.attack == "none" else set())
        if self.max_clients is None:  # likewise for the natural-subset option
            skip.add("max_clients")
        # Likewise the client optimizer at its default (plain SGD without weight decay).
        if self.client_optimizer == "sgd" and not self.client_weight_decay:
            skip |= {"client_optimizer", "client_weight_decay"}
        if not self.secure_aggregation:  # and secure aggregation when off
            skip |= {"secure_aggregation", *SECAGG_DEFAULTS}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in skip}
        for component in self._selected():
            values.update(self._params(component))
        return values

    def to_argv(self) -> list[str]:
        return settings_argv(self.as_dict())


@dataclass
class FedAvgConfig(TrainConfig):
    """FedAvg (McMahan et al. 2017) and FedOpt (Reddi et al. 2021): `experiments/fedavg.py`.

    A preset of :class:`TrainConfig` (every flag of ``experiments/train.py``) whose defaults
    are ``--algorithm fedopt --server-optimizer sgd --server-lr 1.0`` (exactly FedAvg) and
    ``--out runs/fedavg``; ``--server-optimizer sgd|momentum|adam|yogi|adagrad`` with
    ``--server-lr`` picks the FedOpt server optimizer. The algorithm keeps the names this
    script has always logged: ``fedavg`` for the sgd server, else ``fed<server optimizer>``.
    """

    algorithm: str = "fedopt"
    out: str | None = "runs/fedavg"

    EDGE_PROBLEM: ClassVar[str] = "fedjax_lab.train:fedavg_edge_problem"

    def make_algorithm(self, model: Any) -> Any:
        algorithm = super().make_algorithm(model)
        if self.algorithm != "fedopt":
            return algorithm
        server = self.as_dict()["server_optimizer"]
        return algorithm._replace(name="fedavg" if server == "sgd" else f"fed{server}")


def _edge_problem(cls: type[TrainConfig], argv: Sequence[str]) -> Any:
    from fedjax_lab.backends.edge import EdgeProblem

    cfg = cls.parse(argv, prog="edge client")
    _, train, model, _, params = build_problem(cfg)
    return EdgeProblem(cfg.make_algorithm(model), train, params, cfg.seed, problem_config(cfg))


def edge_problem(argv: Sequence[str]) -> Any:
    """Problem factory of edge client processes: the experiment of these train.py flags."""
    return _edge_problem(TrainConfig, argv)


def fedavg_edge_problem(argv: Sequence[str]) -> Any:
    """Problem factory of edge client processes: the experiment of these fedavg.py flags (the
    default of ``python -m fedjax_lab.backends.edge client``)."""
    return _edge_problem(FedAvgConfig, argv)
