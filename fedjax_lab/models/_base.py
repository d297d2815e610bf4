"""The `Model` contract and the glue that turns a flax module into a pure (init, apply) pair.

Parameter convention: `init(key)` returns the flax ``'params'`` collection *unwrapped*, as plain
nested ``dict``s of float32 arrays (no ``FrozenDict``, no ``{'params': ...}`` wrapper), and
`apply(params, x)` accepts exactly that. Users never see flax. Conv kernels keep flax's HWIO
layout (``[K, K, C_in, C_out]``), which is how the SSTC compressor recognises them.

Both functions validate their arguments with plain Python on static information (shapes,
dtypes, tree structure), so a wrong call fails with a clear error before anything is compiled;
the numerical work is a `jax.jit`-compiled flax call, so eager use is fast and the pair nests
inside user `jit`/`vmap`/`grad` unchanged.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
"""A parameter pytree: plain nested dicts of arrays, exactly as returned by `Model.init`."""


class Model(NamedTuple):
    """A model as a pair of pure functions plus the static facts backends need.

    Attributes:
      init: ``init(key) -> params``; deterministic in `key` (same key, identical params).
        Returns plain nested dicts of float32 arrays (see the module docstring).
      apply: ``apply(params, x) -> logits`` with ``x`` of shape ``[B, *input_shape]`` and
        logits ``[B, num_classes]`` float32 (``[B, T, num_classes]`` for a per-position model,
        e.g. next-word prediction, whose targets are ``[B, T]``). Deterministic (no dropout, no
        batch statistics), hence jit-able and vmap-able over a leading client axis of both
        params and x.
      input_shape: Per-example input shape (without the batch axis).
      input_dtype: ``'float32'`` for image/feature models, ``'int32'`` for token models.
      num_classes: Number of output logits per example.
      has_conv: True iff some parameter leaf is a conv kernel ``[K, K, C_in, C_out]``; backends
        use it to choose an execution plan (convolutions are slow inside XLA:CPU loops).
      name: Short human-readable model name.
      apply_train: None for deterministic models; for models with randomness in training
        (dropout), ``apply_train(params, x, *, key) -> logits``, the training-mode forward pass
        whose randomness is a pure function of ``key``. ``apply`` is then the evaluation mode
        (``train=False``: no dropout). Local training (``kit.model_objective``) uses
        ``apply_train`` with a key per local step; evaluation always uses ``apply``.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    has_conv: bool
    name: str
    apply_train: Callable[..., jax.Array] | None = None


def check_positive_int(value: Any, name: str) -> int:
    """Returns `value` as an int, or raises a ValueError/TypeError that names `name`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive integer, got the bool {value!r}.")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}."
        ) from None
    if as_int <= 0:
        raise ValueError(f"{name} must be a positive integer, got {as_int}.")
    return as_int


def check_shape(
    input_shape: Any, *, name: str = "input_shape", rank: int | None = None
) -> tuple[int, ...]:
    """Validates a per-example shape (a sequence of positive ints, optionally of fixed rank).

    Args:
      input_shape: The candidate shape.
      name: Argument name used in error messages.
      rank: Required number of dimensions, or None for any rank >= 1.

    Returns:
      The shape as a tuple of Python ints.

    Raises:
      TypeError: If `input_shape` is not a sequence of integers.
      ValueError: If it has the wrong rank or a non-positive dimension.
    """
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(
            f"{name} must be a tuple of positive ints (per-example shape without the batch "
            f"axis), got {input_shape!r}."
        )
    dims = tuple(check_positive_int(d, f"{name}[{i}]") for i, d in enumerate(input_shape))
    if rank is None and not dims:
        raise ValueError(f"{name} must have at least one dimension, got {input_shape!r}.")
    if rank is not None and len(dims) != rank:
        raise ValueError(
            f"{name} must have rank {rank} (per-example shape without the batch axis), got "
            f"{input_shape!r} of rank {len(dims)}."
        )
    return dims


def check_key(key: Any) -> None:
    """Raises TypeError unless `key` is one JAX PRNG key (typed scalar or raw uint32[2])."""
    dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", (None,)))
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return
    if dtype == jnp.uint32 and shape == (2,):
        return
    raise TypeError(
        f"key must be a single JAX PRNG key such as jax.random.key(0), got {key!r}. "
        "To initialise several clients, use jax.vmap(model.init) over jax.random.split(key, n)."
    )


def flat_size(input_shape: tuple[int, ...]) -> int:
    """Number of features of one flattened example."""
    return math.prod(input_shape)


def _leaf_shapes(tree: Params) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


def _params_mismatch(params: Params, treedef: Any, expected: dict[str, tuple[int, ...]]) -> str:
    """Describes how `params` differs from the expected tree, or returns '' if it matches."""
    if jax.tree.structure(params) != treedef:
        got = sorted(_leaf_shapes(params))
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        return (
            f"tree structure differs (missing leaves {missing}, unexpected leaves {extra}; "
            f"got {type(params).__name__} with {len(got)} leaves, expected {len(expected)})"
        )
    for path, shape in _leaf_shapes(params).items():
        if shape != expected[path]:
            return f"leaf {path} has shape {shape}, expected {expected[path]}"
    return ""


# Module-level jits with the (hashable, immutable) module as a static argument: equal models
# built by separate factory calls share one compilation instead of recompiling per closure.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_params(module: nn.Module, dummy: jax.ShapeDtypeStruct, key: jax.Array) -> Params:
    # flax>=0.7 already returns dicts; unfreeze makes the plain-dict contract explicit.
    variables = module.init(key, jnp.zeros(dummy.shape, dummy.dtype))
    return flax.core.unfreeze(variables["params"])


@functools.partial(jax.jit, static_argnums=0)
def _apply_module(module: nn.Module, params: Params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)


@functools.partial(jax.jit, static_argnums=0)
def _apply_module_train(module: nn.Module, params: Params, x: jax.Array,
                        key: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x, key=key)


def from_flax(
    module: nn.Module,
    *,
    input_shape: tuple[int, ...],
    input_dtype: str,
    num_classes: int,
    has_conv: bool,
    name: str,
    check_values: Callable[[np.ndarray], None] | None = None,
    stochastic: bool = False,
) -> Model:
    """Wraps a flax.linen module ``x[B, *input_shape] -> [B, num_classes]``.

    Args:
      module: The flax module; it must have no mutable collections other than ``'params'``.
      input_shape: Per-example input shape (already validated).
      input_dtype: ``'float32'`` (any floating `x` is accepted and cast) or ``'int32'`` (any
        integer `x` is accepted and cast).
      num_classes: Number of logits.
      has_conv: Whether the module holds conv kernels.
      name: Model name.
      check_values: Optional host-side check of concrete (non-traced) inputs, e.g. token ids
        in range; it cannot run under `jit`, where the module must make bad values visible.
      stochastic: the module's ``__call__(x, key=None)`` draws its training randomness
        (dropout) from ``key`` and is deterministic with ``key=None``; the model then has
        ``apply_train(params, x, *, key)``.

    Returns:
      The `Model`.
    """
    dummy = jax.ShapeDtypeStruct((1, *input_shape), jnp.dtype(input_dtype))

    # Expected parameter structure/shapes, computed once by abstract tracing (no FLOPs).
    expected: dict[str, Any] = {}

    def _expected() -> tuple[Any, dict[str, tuple[int, ...]]]:
        if not expected:
            abstract = jax.eval_shape(_init_params, module, dummy, jax.random.key(0))
            expected["treedef"] = jax.tree.structure(abstract)
            expected["shapes"] = _leaf_shapes(abstract)
        return expected["treedef"], expected["shapes"]

    def init(key: jax.Array) -> Params:
        check_key(key)
        return _init_params(module, dummy, key)

    def checked(params: Params, x: jax.Array) -> jax.Array:
        mismatch = _params_mismatch(params, *_expected())
        if mismatch:
            raise ValueError(
                f"params do not match model '{name}': {mismatch}. Pass exactly what "
                "model.init(key) returns (plain nested dicts, no {'params': ...} wrapper); "
                "under vmap over clients each client's params must have the init shapes."
            )
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape:
            raise ValueError(
                f"x must have shape [batch, *{input_shape}] for model '{name}', got "
                f"{tuple(x.shape)}. Add a leading batch axis or reshape the inputs."
            )
        if input_dtype == "int32":
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(
                    f"x must hold integer token ids for model '{name}', got dtype {x.dtype}. "
                    "Convert with x.astype(np.int32)."
                )
        elif not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"x must be floating point for model '{name}', got dtype {x.dtype}. Convert "
                "(and scale) it explicitly, e.g. x.astype(np.float32) / 255."
            )
        if check_values is not None and not isinstance(x, jax.core.Tracer):
            check_values(np.asarray(x))
        return jnp.asarray(x, input_dtype)

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return _apply_module(module, params, checked(params, x))

    def apply_train(params: Params, x: jax.Array, *, key: jax.Array) -> jax.Array:
        check_key(key)
        return _apply_module_train(module, params, checked(params, x), key)

    return Model(
        init=init,
        apply=apply,
        input_shape=input_shape,
        input_dtype=input_dtype,
        num_classes=num_classes,
        has_conv=has_conv,
        name=name,
        apply_train=apply_train if stochastic else None,
    )
