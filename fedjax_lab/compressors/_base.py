"""The ``Compressor`` contract and helpers shared by every compressor.

A compressor is an optax-style NamedTuple of pure functions:

* ``init(params) -> state``: per-client compressor state (e.g. an error-feedback residual).
* ``encode(updates, state, *, key) -> (payload, state)``: jit/vmap-able; the payload is a pytree
  of fixed-shape arrays whose static metadata (tree structure, shapes, dtypes, hyperparameters)
  lives in non-pytree fields, so ``decode`` needs nothing but the payload. All randomness comes
  from ``key``.
* ``decode(payload) -> updates``: the reconstructed update, same structure/shapes/dtypes as the
  encoded ``updates``.
* ``bits(payload) -> int32 scalar``: the exact wire size of ``to_bytes(payload)`` in bits,
  computed inside jit. Payloads of this package are byte aligned, so
  ``8 * len(to_bytes(p)) == bits(p)``. Every compressor checks at ``init``/``encode`` time that
  its *largest possible* payload fits in int32 (2**31 - 1 bits = 256 MiB) and raises a
  ``ValueError`` otherwise; int32 keeps ``bits`` usable inside jit without enabling x64.
* ``to_bytes(payload) -> bytes`` / ``from_bytes(data, template) -> payload``: the host-side wire
  codec. ``template`` is any payload with the right static metadata and shapes, e.g.
  ``jax.eval_shape(lambda: c.encode(u, s, key=k)[0])``.

``decode`` and ``bits`` take ONE payload; for stacked client payloads use ``jax.vmap``.

Non-finite policy: ``encode`` cannot raise under jit, so if any input coordinate is NaN/Inf every
float field of the payload (norm, scale, kept values) is set to NaN. ``decode`` of such a payload
is therefore not all-finite, ``bits`` stays well defined, and ``to_bytes`` raises ``ValueError``.
The algorithm layer is expected to reject non-finite client deltas before encoding (an error
feedback residual that has absorbed a NaN stays NaN).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.compressors import _once

Params = Any
Updates = Any
Payload = Any
CompressorState = Any
PRNGKey = jax.Array

_INT32_MAX = 2**31 - 1


class Compressor(NamedTuple):
    """Pure-function compressor (see the module docstring for the contract)."""

    init: Callable[[Params], CompressorState]
    encode: Callable[..., tuple[Payload, CompressorState]]
    decode: Callable[[Payload], Updates]
    bits: Callable[[Payload], jax.Array]
    to_bytes: Callable[[Payload], bytes]
    from_bytes: Callable[[bytes, Payload], Payload]


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(int(s) for s in leaf.shape), np.dtype(leaf.dtype)
    return tuple(np.shape(leaf)), np.dtype(jnp.result_type(leaf))


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """Static description of an update pytree: structure, leaf shapes and dtypes.

    Hashable, so it can sit in a payload's static (non-pytree) fields. Leaves are flattened in
    ``jax.tree.flatten`` order and concatenated into one float32 vector of length ``size``.
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0, *self.sizes))[:-1])

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    def flatten(self, tree: Updates) -> jax.Array:
        """Concatenates the leaves of ``tree`` into one float32 vector.

        Vmapped (a round compresses its cohort's updates), an update of at least
        ``_once.LOOP_MIN_SIZE`` coordinates is flattened one batch element at a time
        (:func:`~fedjax_lab.compressors._once.looped_under_vmap`): slice updates of a batched
        buffer ran ~2x slower on XLA:CPU (10 FEMNIST CNN updates: QSGD's round trip 139 vs
        94 ms, identity's 108 vs 54 ms).
        """
        flat = [jnp.ravel(jnp.asarray(leaf)).astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
        if len(flat) == 1:
            return flat[0]
        if self.size >= _once.LOOP_MIN_SIZE:
            return _once.looped_under_vmap(self._concatenate)(flat)
        return self._concatenate(flat)

    def _concatenate(self, flat: list[jax.Array]) -> jax.Array:
        # In-place slice updates: XLA:CPU runs a large concatenate 2-3x slower than this.
        vector = jnp.zeros((self.size,), jnp.float32)
        for offset, leaf in zip(self.offsets, flat, strict=True):
            if leaf.size:
                vector = jax.lax.dynamic_update_slice(vector, leaf, (offset,))
        return vector

    def unflatten(self, vector: jax.Array) -> Updates:
        """Inverse of :meth:`flatten`: splits, reshapes and casts back to the leaf dtypes."""
        leaves = [
            vector[o : o + n].reshape(shape).astype(dtype)
            for o, n, shape, dtype in zip(
                self.offsets, self.sizes, self.shapes, self.dtypes, strict=True
            )
        ]
        return jax.tree.unflatten(self.treedef, leaves)


def tree_layout(tree: Updates, *, what: str, indexed: bool = True) -> TreeLayout:
    """Validates an update/params pytree and returns its :class:`TreeLayout`.

    Args:
      tree: pytree of floating arrays (or ``jax.ShapeDtypeStruct``), any shapes incl. 0-d/size 0.
      what: name used in error messages (e.g. ``"qsgd.encode(updates)"``).
      indexed: the tree is compressed as one vector with int32 indices (wrappers that hand
        leaves to inner compressors pass False; the inner compressors check their part).

    Raises:
      TypeError: a leaf is not a floating-point array.
      ValueError: the total size exceeds int32 indexing (2**31 - 1 coordinates).
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths, shapes, dtypes = [], [], []
    for path, leaf in path_leaves:
        name = jax.tree_util.keystr(path) or "<root>"
        try:
            shape, dtype = _shape_dtype(leaf)
        except TypeError as err:
            raise TypeError(
                f"{what}: leaf {name} is a {type(leaf).__name__}, not an array; updates must be "
                "a pytree of floating-point arrays."
            ) from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{what}: leaf {name} has dtype {dtype}; compressors take floating-point "
                "updates. Cast it (e.g. .astype(jnp.float32)) or keep it out of the update tree."
            )
        paths.append(name)
        shapes.append(shape)
        dtypes.append(dtype)
    layout = TreeLayout(treedef, tuple(paths), tuple(shapes), tuple(dtypes))
    if indexed and layout.size > _INT32_MAX:
        raise ValueError(
            f"{what}: the update has {layout.size} coordinates; indices are int32, so one "
            f"compressed vector has at most {_INT32_MAX}. Compress leaves separately with "
            "per_leaf(...) (each leaf is then its own vector)."
        )
    return layout


def check_structure(payload_layout: TreeLayout, tree: Updates, what: str) -> None:
    """Raises ``ValueError`` unless ``tree`` has the structure and leaf shapes of the layout."""
    layout = tree_layout(tree, what=what, indexed=False)
    if layout.treedef != payload_layout.treedef or layout.shapes != payload_layout.shapes:
        raise ValueError(
            f"{what}: the update tree does not match the tree given to init "
            f"(got {layout.treedef} with shapes {layout.shapes}, expected "
            f"{payload_layout.treedef} with shapes {payload_layout.shapes}). Call init(params) "
            "with params of the same structure as the updates."
        )


def resolve_count(k: int | float, d: int, *, what: str) -> int:
    """Turns a count-or-fraction ``k`` into a count for a vector of ``d`` coordinates.

    An ``int`` is a count and must satisfy ``1 <= k <= d``. A ``float`` is a fraction in
    ``(0, 1]`` and gives ``max(1, round(k * d))`` (Python ``round``: nearest, ties to even;
    ``0`` only when ``d == 0``).
    """
    validate_count_spec(k, what=what)
    if isinstance(k, numbers.Integral):
        if k > d:
            raise ValueError(
                f"{what}: k={k} exceeds the number of coordinates d={d}; pass k <= d or a "
                "fraction such as k=0.01."
            )
        return int(k)
    return 0 if d == 0 else max(1, round(float(k) * d))


def validate_count_spec(k: int | float, *, what: str) -> None:
    """Validates a count-or-fraction hyperparameter at factory time."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"{what}: k must be an int count or a float fraction, got {k!r}.")
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"{what}: k={k} must be >= 1 (a count) or a fraction in (0, 1].")
    elif not 0.0 < float(k) <= 1.0:
        raise ValueError(f"{what}: the fraction k={k} must be in (0, 1]; pass an int for a count.")


def validate_fraction(p: float, *, what: str) -> float:
    """Validates a fraction in ``(0, 1]`` at factory time."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"{what} must be a float in (0, 1], got {p!r}.")
    return float(p)


def poison(value: jax.Array, finite: jax.Array) -> jax.Array:
    """Non-finite policy: ``value`` where the input was all finite, NaN otherwise."""
    return jnp.where(finite, value, jnp.nan).astype(value.dtype)


def check_array(value: Any, shape: tuple[int, ...], dtype: Any, what: str) -> None:
    """Raises ``ValueError`` if a payload field has the wrong shape/dtype (e.g. batched)."""
    got_shape, got_dtype = _shape_dtype(value)
    if got_shape != tuple(shape) or got_dtype != np.dtype(dtype):
        raise ValueError(
            f"{what}: expected shape {tuple(shape)} dtype {np.dtype(dtype)}, got shape "
            f"{got_shape} dtype {got_dtype}. decode/bits/to_bytes take ONE payload; use "
            "jax.vmap(c.decode) / jax.vmap(c.bits) for stacked client payloads, and index "
            "one client out before to_bytes."
        )


def host(value: Any) -> np.ndarray:
    """Payload field as a numpy array (device_get if needed)."""
    return np.asarray(jax.device_get(value))


LeafPredicate = Callable[[Any, Any], bool]


def select_leaves(tree: Updates, compress: LeafPredicate | None, *, what: str) -> tuple[bool, ...]:
    """Evaluates ``compress(path, leaf)`` on every leaf (static: only shapes/dtypes are used).

    ``None`` selects every leaf. The predicate must return a Python bool.
    """
    path_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if compress is None:
        return tuple(True for _ in path_leaves)
    chosen = []
    for path, leaf in path_leaves:
        flag = compress(path, leaf)
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(
                f"{what}: compress(path, leaf) must return a bool for leaf "
                f"{jax.tree_util.keystr(path)}, got {flag!r} (decide from static shapes/paths)."
            )
        chosen.append(bool(flag))
    return tuple(chosen)


def payload_max_bits(payload: Payload, what: str) -> int:
    """``payload.max_bits`` (a static int every payload of this package exposes)."""
    max_bits = getattr(payload, "max_bits", None)
    if not isinstance(max_bits, int):
        raise TypeError(
            f"{what}: the inner compressor's payload ({type(payload).__name__}) has no integer "
            "max_bits property; wrappers need it to size their headers and cap from_bytes."
        )
    return max_bits
