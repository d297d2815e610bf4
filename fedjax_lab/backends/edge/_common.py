"""Pieces shared by the edge server and client: the problem, templates, codec, join documents."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.backends.edge import protocol
from fedjax_lab.compressors import Compressor, identity
from fedjax_lab.compressors._base import tree_layout
from fedjax_lab.compressors.identity import IdentityPayload
from fedjax_lab.core.types import Algorithm, Batches, ClientOutput, Cohort
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.data.federated import FederatedData

ProblemFactory = Callable[[Sequence[str]], "EdgeProblem"]


class EdgeProblem(NamedTuple):
    """Everything an edge client process rebuilds locally from its command line.

    Attributes:
      algorithm: the algorithm whose ``client_update`` the client runs; its uplink codec is
        that of ``algorithm.compressor`` (None: raw float32 deltas).
      data: the population; a client process keeps only the rows of the clients it hosts.
      init_params: initial model parameters (give the templates of the server state).
      seed: run seed (local data layout: ``CohortBuilder.client_index``).
      config: JSON-able description of everything else that changes results (e.g. the
        experiment's flags less the operational ones), derived from the same source as the
        server's ``EdgeBackend(problem_config=...)``; a client whose config differs is refused at
        join, with the differing keys named. None when the factory has no such description
        (the compiled client program and the shapes are still compared).
    """

    algorithm: Algorithm
    data: FederatedData
    init_params: Any
    seed: int
    config: Mapping[str, Any] | None = None


def load_problem_factory(spec: str) -> ProblemFactory:
    """``"package.module:function"`` -> the function (an import, never unpickling)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--problem must look like 'package.module:function', got {spec!r}")
    factory = getattr(importlib.import_module(module), name, None)
    if not callable(factory):
        raise ValueError(f"--problem {spec!r}: {name!r} is not a function of {module!r}")
    return factory


@dataclasses.dataclass(frozen=True)
class PopulationLayout:
    """Population metadata a ``CohortBuilder`` needs to lay out one client (no examples)."""

    offsets: np.ndarray
    arrays: dict = dataclasses.field(default_factory=dict)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def take(self, rows: np.ndarray) -> dict:
        """No examples: a cohort built on a layout carries only its index, mask and weight."""
        del rows
        return {}

    def feature_spec(self) -> dict:
        return {}


def layout_digest(index: np.ndarray) -> str:
    """Digest of one client's ``[S, B]`` global example rows (-1 = padding) for a round.

    The server sends it with each task and the client recomputes it from its own layout: a
    different seed, population, data spec or round number is caught instead of trained on.
    Trailing all-padding steps are left out: the server's ``S`` follows the round's clients,
    the client lays out its own steps, and both describe the same batches.
    """
    index = np.asarray(index)
    real = np.flatnonzero((index >= 0).any(axis=1))
    index = index[: real[-1] + 1 if len(real) else 0]
    return hashlib.sha256(np.ascontiguousarray(index, dtype="<i8").tobytes()).hexdigest()


def leaf_specs(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """``[(shape, dtype name)]`` of a pytree's leaves (arrays or ShapeDtypeStructs)."""
    specs = []
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(
                "typed PRNG keys cannot travel on the edge wire; keep keys out of server/client "
                "state or store jax.random.key_data(key)"
            )
        specs.append((tuple(int(s) for s in leaf.shape), protocol.dtype_name(leaf.dtype)))
    return specs


def unstacked_specs(stacked: Any) -> Any:
    """ShapeDtypeStructs of one client's slice of a stacked ``[C, ...]`` pytree."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype), stacked)


def shape_structs(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(np.shape(x)), x.dtype), tree)


def canonical_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``config`` as it reads back from JSON (what the other side of the wire sees)."""
    if config is None:
        return None
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the problem config must be JSON-able (finite numbers): {err}") from err


def client_program(algorithm: Algorithm) -> Callable[..., Any]:
    """One client's update as the edge client compiles it (the server lowers the same function)."""

    def one_client(server_state, state, index, mask, weight, key, table):
        batches = Batches(None, mask, weight, index=index, table=table)
        return algorithm.client_update(server_state, state, batches, key=key)

    return one_client


FINGERPRINT_STEPS = 2


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Shapes of one client's update; both sides derive it, the server from its first round.

    Attributes:
      server: ShapeDtypeStructs of the server state.
      state: ShapeDtypeStructs of one client's state.
      steps: local steps of the ``[S, B]`` layout the program is lowered with for the join
        fingerprint. Rounds lay out each client's own steps (``S`` follows the clients), so the
        fingerprint uses a canonical :data:`FINGERPRINT_STEPS`: hyperparameters are constants
        of the program whatever its length.
      batch: batch size.
      features: ``{name: (per-example shape, dtype name)}`` of the example table as the
        compiled program sees it (JAX-canonical dtypes).
    """

    server: Any
    state: Any
    steps: int
    batch: int
    features: dict[str, tuple[tuple[int, ...], str]]

    @classmethod
    def of_problem(cls, problem: EdgeProblem) -> ProgramSpec:
        """The client's view: templates from the problem, one example row for the features."""
        spec = problem.algorithm.data_spec
        builder = CohortBuilder(
            PopulationLayout(np.asarray(problem.data.offsets)), batch_size=spec.batch_size,
            local_epochs=spec.local_epochs, num_steps=spec.num_steps, cohort_size=1,
            seed=problem.seed, device_table=False,
        )
        # One row (a lazy population reads just it): per-example shapes, and the dtypes that
        # jnp.asarray gives the client's table.
        row = problem.data.take(np.zeros(1, np.int64))
        features = {k: (tuple(int(d) for d in np.shape(v)[1:]),
                        np.dtype(jax.dtypes.canonicalize_dtype(np.asarray(v).dtype)).name)
                    for k, v in row.items()}
        return cls(
            server=shape_structs(problem.algorithm.init(problem.init_params)),
            state=shape_structs(problem.algorithm.client_init(problem.init_params)),
            steps=FINGERPRINT_STEPS, batch=builder.batch, features=features,
        )

    @classmethod
    def of_round(cls, server_state: Any, client_states: Any, cohort: Cohort) -> ProgramSpec:
        """The server's view, from its first round (stacked client states, device table)."""
        batch = int(cohort.mask.shape[2])
        features = {k: (tuple(int(d) for d in v.shape[1:]), np.dtype(v.dtype).name)
                    for k, v in cohort.arrays.items()}
        return cls(server=shape_structs(server_state), state=unstacked_specs(client_states),
                   steps=FINGERPRINT_STEPS, batch=batch, features=features)

    def table(self, rows: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct((rows, *shape), np.dtype(dtype))
                for k, (shape, dtype) in self.features.items()}

    def output(self, algorithm: Algorithm) -> ClientOutput:
        return output_template(algorithm, self.server, self.state, self.steps, self.batch,
                               self.table())

    def document(self, algorithm: Algorithm, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """What the join handshake compares: shapes, the compiled program, the config.

        ``program`` hashes the StableHLO of :func:`client_program` lowered for CPU with a
        one-row table. Hyperparameters that an algorithm or compressor closes over (learning
        rates, momentum, quantization levels, k, proximal terms ...) are constants in that
        program, so a client built with other values is caught even when every shape agrees.
        Lowering only traces; nothing is compiled.
        """
        output = self.output(algorithm)
        structure = {
            "algorithm": algorithm.name,
            "data_spec": [algorithm.data_spec.batch_size, algorithm.data_spec.local_epochs,
                          algorithm.data_spec.num_steps],
            "steps": self.steps,
            "batch": self.batch,
            "features": {k: [list(s), d] for k, (s, d) in sorted(self.features.items())},
            "server_state": [str(jax.tree.structure(self.server)), leaf_specs(self.server)],
            "client_state": [str(jax.tree.structure(self.state)), leaf_specs(self.state)],
            "output": [str(jax.tree.structure(output)), leaf_specs(output)],
        }
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        layout = jax.ShapeDtypeStruct((self.steps, self.batch), jnp.int32)
        mask = jax.ShapeDtypeStruct((self.steps, self.batch), jnp.float32)
        weight = jax.ShapeDtypeStruct((), jnp.float32)
        hlo = jax.jit(client_program(algorithm)).trace(
            self.server, self.state, layout, mask, weight, key, self.table()
        ).lower(lowering_platforms=("cpu",)).as_text()
        return {
            "structure": _digest(json.dumps(structure, sort_keys=True)),
            "program": _digest(hlo),
            "config": canonical_config(config),
            "jax": jax.__version__,
        }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def compare_documents(server: dict[str, Any], client: Any) -> list[str]:
    """Why a client's join document (untrusted JSON) differs from the server's; [] if equal."""
    if not isinstance(client, dict):
        return ["the client sent no configuration document"]
    problems = []
    ours, theirs = server["config"], client.get("config")
    if ours != theirs:
        if isinstance(ours, dict) and isinstance(theirs, dict):
            keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            problems.append("flags differ: " + ", ".join(
                f"{k} (server {ours.get(k)!r}, client {theirs.get(k)!r})" for k in keys
            ))
        else:
            problems.append(
                f"problem config: the server's is {'set' if ours else 'absent'}, the client's "
                f"is {'set' if theirs else 'absent'} (both must come from the same factory)"
            )
    if client.get("structure") != server["structure"]:
        problems.append("model, algorithm state or data shapes differ")
    if client.get("program") != server["program"]:
        versions = ""
        if client.get("jax") != server["jax"]:
            versions = (f"; jax versions differ: server {server['jax']}, client "
                        f"{client.get('jax')!r}")
        problems.append(
            "the compiled client program differs (a hyperparameter of the algorithm or "
            f"compressor, e.g. a learning rate or quantization levels{versions})"
        )
    return [p[:600] for p in problems]


def all_finite(tree: Any) -> bool:
    """Whether every element of every (host or device) leaf of ``tree`` is finite."""
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


def output_template(
    algorithm: Algorithm, server_state: Any, client_state: Any, steps: int, batch: int,
    table: dict[str, Any],
) -> ClientOutput:
    """Shapes of one client's ``ClientOutput`` (abstract evaluation, nothing runs)."""
    batches = Batches(
        None,
        jax.ShapeDtypeStruct((steps, batch), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
        index=jax.ShapeDtypeStruct((steps, batch), jnp.int32),
        table=table,
    )
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    out, _ = jax.eval_shape(
        lambda s, c, b, k: algorithm.client_update(s, c, b, key=k),
        server_state, client_state, batches, key,
    )
    return out


class PayloadCodec:
    """The uplink codec: the compressor's ``to_bytes``/``from_bytes``, or float32 for None.

    Args:
      compressor: the algorithm's compressor, or None when ``ClientOutput.update`` is the raw
        delta pytree (then it travels as the 32-bit ``identity()`` payload).
      template: shapes of ``ClientOutput.update`` (from :func:`output_template`).
    """

    def __init__(self, compressor: Compressor | None, template: Any) -> None:
        self.compressor = compressor
        if compressor is None:
            layout = tree_layout(template, what="edge: the uncompressed update")
            self._identity = identity()
            self.template = IdentityPayload(
                jax.ShapeDtypeStruct((layout.size,), jnp.float32), layout
            )
            self.max_bytes = 4 * layout.size
        else:
            if not isinstance(compressor, Compressor):
                raise TypeError(
                    f"compressor must be a fedjax_lab Compressor or None, got {type(compressor)}"
                )
            self.template = template
            max_bits = getattr(template, "max_bits", None)
            if not isinstance(max_bits, int):
                raise TypeError(
                    f"edge: the payload {type(template).__name__} has no integer max_bits; the "
                    "server needs it to cap the upload size before decoding"
                )
            self.max_bytes = -(-max_bits // 8)

    def decode(self, payload: Any) -> Any:
        """The update a payload stands for (what ``aggregate`` sums), for the finiteness check."""
        return payload if self.compressor is None else self.compressor.decode(payload)

    def to_bytes(self, payload: Any) -> bytes:
        if self.compressor is None:
            layout = self.template.layout
            values = layout.flatten(payload)
            return self._identity.to_bytes(IdentityPayload(values, layout))
        return self.compressor.to_bytes(payload)

    def from_bytes(self, data: bytes) -> Any:
        """Decodes untrusted bytes (length capped first); raises ValueError when malformed."""
        if len(data) > self.max_bytes:
            raise ValueError(f"payload of {len(data)} bytes > the largest valid {self.max_bytes}")
        if self.compressor is None:
            payload = self._identity.from_bytes(data, self.template)
            layout = self.template.layout
            values = np.asarray(payload.values)
            leaves = [
                values[o : o + n].reshape(shape).astype(dtype)
                for o, n, shape, dtype in zip(
                    layout.offsets, layout.sizes, layout.shapes, layout.dtypes, strict=True
                )
            ]
            return jax.tree.unflatten(layout.treedef, leaves)
        return self.compressor.from_bytes(data, self.template)


def tree_arrays(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    """``{prefix + index: leaf}`` host arrays of a pytree, for a frame."""
    return {f"{prefix}{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def read_tree(message: protocol.Message, prefix: str, template: Any) -> Any:
    """Rebuilds a pytree from ``prefix``-named arrays, each checked against ``template``."""
    leaves, treedef = jax.tree.flatten(template)
    values = [
        np.array(message.array(f"{prefix}{i}", leaf.shape, protocol.resolve_dtype(
            protocol.dtype_name(leaf.dtype))))
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, values)


def tree_names(prefix: str, template: Any) -> set[str]:
    return {f"{prefix}{i}" for i in range(len(jax.tree.leaves(template)))}


def metric_names(output: ClientOutput) -> list[str]:
    return sorted(output.metrics)
