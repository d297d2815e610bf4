"""Named registries of algorithms, compressors and aggregators, read by the experiment CLI.

The packages register their public constructors here (``fedjax_lab/algorithms/_registered.py``,
``fedjax_lab/compressors/_registered.py``, imported by their ``__init__``), each with a one-line
description and its hyperparameters. ``python experiments/train.py`` builds its ``--algorithm``,
``--compressor`` and ``--aggregator`` choices, their flags and their ``--help`` groups from these
registries, so registering a new component adds it to the CLI and to config files without
editing either. This module imports nothing heavy (no JAX) so that ``--help`` stays instant.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a component; the CLI flag is ``--name-with-dashes``.

    Attributes:
      name: snake_case name; also the keyword the component's ``build`` receives.
      type: ``int``, ``float``, ``str`` or ``bool``.
      default: the value when the flag is not given (``None`` allowed: "off").
      help: one line for ``--help``.
      choices: the valid values of a ``str`` parameter.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Component:
    """A registered component: ``build(context, **params)`` returns the library object.

    Attributes:
      name: the CLI choice (e.g. ``"fedprox"``).
      description: one line for ``--help`` (what it is, the paper).
      build: ``(context, **params) -> object``; ``context`` is what the kind needs (e.g. the
        model and the client training settings for algorithms, nothing for compressors).
      params: this component's hyperparameters.
      tags: free-form properties the CLI checks combinations with (e.g. ``"biased"``).
    """

    name: str
    description: str
    build: Callable[..., Any]
    params: tuple[Param, ...] = ()
    tags: frozenset[str] = frozenset()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# Local optimizers of AlgorithmContext.client_optimizer (the CLI's --client-optimizer).
CLIENT_OPTIMIZERS = ("sgd", "adam", "amsgrad")


@dataclass(frozen=True)
class AlgorithmContext:
    """What every algorithm builder receives besides its own hyperparameters.

    Attributes:
      model: the ``fedjax_lab.models.Model``.
      client_lr: local learning rate.
      client_momentum: local heavy-ball momentum (0: plain SGD).
      batch_size: local minibatch size.
      local_epochs: local passes per round (used when ``local_steps`` is None).
      local_steps: a fixed number of local steps per round instead of epochs, or None.
      num_clients: population size.
      clients_per_round: clients sampled per round.
      seed: run seed (e.g. for DP noise keys).
      per_example_loss: the training loss of the dataset's targets when it is not softmax
        cross-entropy (e.g. sigmoid cross-entropy of multi-hot tags,
        ``fedjax_lab.metrics.tasks``), passed to the constructors; None: their default.
      client_optimizer_name: one of `CLIENT_OPTIMIZERS`: ``"sgd"``, ``"adam"`` or
        ``"amsgrad"`` (PyTorch's Adam / Adam with ``amsgrad=True``,
        ``fedjax_lab.algorithms.torch_adam``: FedML's ``--client_optimizer adam``).
      client_weight_decay: L2 coefficient added to the local gradient (PyTorch's
        ``weight_decay``) by every client optimizer; 0: none.
    """

    model: Any
    client_lr: float
    client_momentum: float
    batch_size: int
    local_epochs: int
    local_steps: int | None
    num_clients: int
    clients_per_round: int
    seed: int
    per_example_loss: Callable[[Any, Any], Any] | None = None
    client_optimizer_name: str = "sgd"
    client_weight_decay: float = 0.0

    def client_optimizer(self) -> Any:
        """The local optimizer, an optax transformation: SGD (with momentum when
        ``client_momentum > 0``), or PyTorch's Adam / AMSGrad; with ``client_weight_decay``
        the L2 term ``wd * p`` joins the gradient first, as PyTorch's ``weight_decay``."""
        import optax

        if self.client_optimizer_name not in CLIENT_OPTIMIZERS:
            raise ValueError(f"client optimizer must be one of {CLIENT_OPTIMIZERS}, got "
                             f"{self.client_optimizer_name!r}")
        if self.client_optimizer_name == "sgd":
            sgd = optax.sgd(self.client_lr, momentum=self.client_momentum or None)
            if not self.client_weight_decay:
                return sgd
            return optax.chain(optax.add_decayed_weights(self.client_weight_decay), sgd)
        from fedjax_lab.algorithms.torch_adam import torch_adam

        return torch_adam(self.client_lr, weight_decay=self.client_weight_decay,
                          amsgrad=self.client_optimizer_name == "amsgrad")

    def local_work(self) -> dict[str, Any]:
        """``batch_size``, ``local_epochs``/``num_steps`` (and ``per_example_loss`` when set)
        keywords of the constructors."""
        loss = {} if self.per_example_loss is None else {"per_example_loss": self.per_example_loss}
        if self.local_steps is not None:
            return {"batch_size": self.batch_size, "local_epochs": None,
                    "num_steps": self.local_steps, **loss}
        return {"batch_size": self.batch_size, "local_epochs": self.local_epochs, **loss}


class Registry:
    """Components of one kind (``"algorithm"``, ``"compressor"``, ``"aggregator"``) by name."""

    def __init__(self, kind: str, description: str) -> None:
        self.kind = kind
        self.description = description
        self._components: dict[str, Component] = {}
        self._refused: dict[str, str] = {}

    def register(
        self,
        name: str,
        build: Callable[..., Any],
        *,
        description: str,
        params: tuple[Param, ...] = (),
        tags: tuple[str, ...] = (),
    ) -> None:
        """Adds a component; a name registered twice is a programming error (ValueError)."""
        if name in self._components:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        for p in params:
            if p.type not in (int, float, str, bool):
                raise TypeError(f"{self.kind} {name}: parameter {p.name} has type {p.type}")
            for other in self._components.values():
                same = other.param(p.name)
                if same is not None and (same.type is not p.type or same.choices != p.choices):
                    raise ValueError(
                        f"{self.kind} {name}: parameter {p.name} must have the type and choices "
                        f"it has in {other.name} (one flag serves both)"
                    )
        self._components[name] = Component(name, description, build, tuple(params),
                                           frozenset(tags))

    def refuse(self, name: str, reason: str) -> None:
        """Names a library component the CLI cannot run, and why (``get`` raises the reason).

        So that ``--algorithm fedbn`` says why and what to do instead of "not one of ...".
        """
        if name in self._components or name in self._refused:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._refused[name] = reason

    def refused(self) -> dict[str, str]:
        """The refused names with their reasons."""
        return dict(self._refused)

    def names(self) -> tuple[str, ...]:
        return tuple(self._components)

    def __iter__(self) -> Iterator[Component]:
        return iter(self._components.values())

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def get(self, name: str) -> Component:
        """The component ``name``; ValueError listing the valid names (and the closest), or
        the reason a refused name cannot run."""
        if name in self._refused:
            raise ValueError(f"--{self.kind} {name} cannot run from the CLI: "
                             f"{self._refused[name]}")
        if name not in self._components:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(
                f"--{self.kind} {name!r} is not one of {', '.join(self.names())}{hint}"
            )
        return self._components[name]

    def params(self) -> dict[str, list[tuple[Component, Param]]]:
        """Every parameter name with the components that take it (registration order)."""
        table: dict[str, list[tuple[Component, Param]]] = {}
        for component in self:
            for p in component.params:
                table.setdefault(p.name, []).append((component, p))
        return table

    def users(self, param_name: str) -> tuple[str, ...]:
        """Names of the components that take ``param_name``."""
        return tuple(c.name for c, _ in self.params().get(param_name, ()))


ALGORITHMS = Registry("algorithm", "the federated algorithm (client update + server step)")
COMPRESSORS = Registry("compressor", "uplink compression of each client's update")
AGGREGATORS = Registry("aggregator", "how the server combines the client updates")
REGISTRIES = (ALGORITHMS, COMPRESSORS, AGGREGATORS)


def register_algorithm(name: str, build: Callable[..., Any], **kwargs: Any) -> None:
    """``ALGORITHMS.register``: ``build(context, compressor=..., **params) -> Algorithm``."""
    ALGORITHMS.register(name, build, **kwargs)


def register_compressor(name: str, build: Callable[..., Any], **kwargs: Any) -> None:
    """``COMPRESSORS.register``: ``build(**params) -> Compressor``."""
    COMPRESSORS.register(name, build, **kwargs)


def register_aggregator(name: str, build: Callable[..., Any], **kwargs: Any) -> None:
    """``AGGREGATORS.register``: ``build(**params) -> Aggregator``."""
    AGGREGATORS.register(name, build, **kwargs)
