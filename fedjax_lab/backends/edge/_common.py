"""Pieces shared by the edge server and client: the problem, templates, codec, fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.backends.edge import protocol
from fedjax_lab.compressors import Compressor, identity
from fedjax_lab.compressors._base import tree_layout
from fedjax_lab.compressors.identity import IdentityPayload
from fedjax_lab.core.types import Algorithm, Batches, ClientOutput, DataSpec
from fedjax_lab.data.federated import FederatedData

ProblemFactory = Callable[[Sequence[str]], "EdgeProblem"]


class EdgeProblem(NamedTuple):
    """Everything an edge client process rebuilds locally from its command line.

    Attributes:
      algorithm: the algorithm whose ``client_update`` the client runs.
      compressor: the compressor ``algorithm`` encodes with (None: raw float32 deltas).
      data: the population; a client process keeps only the rows of the clients it hosts.
      init_params: initial model parameters (give the templates of the server state).
      seed: run seed (local data layout: ``CohortBuilder.client_index``).
    """

    algorithm: Algorithm
    compressor: Compressor | None
    data: FederatedData
    init_params: Any
    seed: int


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
    """
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


def fingerprint(
    algorithm: Algorithm,
    server_state: Any,
    client_state: Any,
    output: Any,
    steps: int,
    batch: int,
    features: dict[str, tuple[tuple[int, ...], str]],
) -> str:
    """Hash of everything both sides must agree on before exchanging a single array."""
    spec: DataSpec = algorithm.data_spec
    doc = {
        "algorithm": algorithm.name,
        "data_spec": [spec.batch_size, spec.local_epochs, spec.num_steps],
        "steps": steps,
        "batch": batch,
        "features": {k: [list(s), d] for k, (s, d) in sorted(features.items())},
        "server_state": [str(jax.tree.structure(server_state)), leaf_specs(server_state)],
        "client_state": [str(jax.tree.structure(client_state)), leaf_specs(client_state)],
        "output": [str(jax.tree.structure(output)), leaf_specs(output)],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


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
