"""Shared contract checker for :class:`~fedjax_lab.compressors.Compressor` implementations.

Every compressor's test calls :func:`check_compressor`; algorithm tests can reuse it for any
compressor they plug in.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.compressors._base import Compressor

# The contract does not depend on XLA's optimisation level; compiling the checker's programs at
# level 0 makes it ~3x cheaper (tests compile many small programs). Pass None to use defaults.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _shapes(tree: Any) -> list[tuple[tuple[int, ...], np.dtype]]:
    return [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _assert_same_layout(got: Any, want: Any, what: str) -> None:
    got_def, want_def = jax.tree.structure(got), jax.tree.structure(want)
    assert got_def == want_def, f"{what}: tree structure {got_def} != {want_def}"
    assert _shapes(got) == _shapes(want), f"{what}: shapes/dtypes {_shapes(got)} != {_shapes(want)}"


def _assert_equal_exact(got: Any, want: Any, what: str) -> None:
    _assert_same_layout(got, want, what)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{what}: values differ"


def _counted(fn, traces: dict[str, int], name: str):
    # The Python body of a jitted function runs once per trace: count them (chex's
    # assert_max_traces keys on the definition site, which repeats across checker calls).
    def wrapped(*args):
        traces[name] += 1
        return fn(*args)

    return wrapped


def random_like(params: Any, rng: np.random.Generator, batch: tuple[int, ...] = ()) -> Any:
    """Standard-normal numpy tree shaped like ``params`` (with optional leading ``batch`` dims)."""
    return jax.tree.map(
        lambda x: np.asarray(rng.standard_normal((*batch, *jnp.shape(x))), jnp.result_type(x)),
        params,
    )


def check_compressor(
    compressor: Compressor,
    params_example: Any,
    *,
    seed: int = 0,
    num_clients: int = 3,
    nonfinite_policy: bool = True,
    compiler_options: dict[str, Any] | None = FAST_COMPILE,
) -> None:
    """Checks the compressor contract on one params example; raises ``AssertionError``.

    Checks: ``init``/``encode`` state trees agree; ``encode``, ``decode`` and ``bits`` trace
    once under jit for different values, keys and states; payload structure/shapes/dtypes do
    not depend on the values; encoding is a function of (updates, state, key) only;
    ``decode(encode(0)) == 0`` exactly; ``decode`` returns the structure/shapes/dtypes of the
    updates and finite values for finite updates; ``bits`` is an int32 scalar equal to the
    wire size (``0 <= 8 len(to_bytes(p)) - bits(p) < 8``); ``from_bytes(to_bytes(p))``
    reproduces ``p`` exactly with an abstract (``jax.eval_shape``) and a concrete template;
    ``vmap`` over clients matches client-by-client results; and, if ``nonfinite_policy``, the
    package's non-finite policy (a NaN/Inf update decodes to a non-finite update and
    ``to_bytes`` raises ``ValueError``).

    Args:
      compressor: the compressor under test.
      params_example: a params pytree (floating leaves of any shapes).
      seed: seeds the numpy updates and the encode keys.
      num_clients: clients stacked for the vmap check.
      nonfinite_policy: also check the NaN/Inf policy (skipped for size-0 trees).
      compiler_options: XLA options of the checker's jitted programs (default: fast compile).
    """
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), 3 + num_clients)
    client_keys = keys[3:]
    updates = random_like(params_example, rng)
    zeros = jax.tree.map(np.zeros_like, updates)
    state0 = compressor.init(params_example)

    def _encode(u, s, k):
        return compressor.encode(u, s, key=k)

    # One compiled program for a single client (encode -> decode, bits) and one for a vmapped
    # cohort keep the checker cheap; the counters prove that neither retraces.
    traces = {"encode": 0, "decode": 0, "bits": 0}
    encode_counted = _counted(_encode, traces, "encode")
    decode_counted = _counted(compressor.decode, traces, "decode")
    bits_counted = _counted(compressor.bits, traces, "bits")

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(u, s, k):
        payload, state = encode_counted(u, s, k)
        return payload, state, decode_counted(payload), bits_counted(payload)

    def run(u, s, k):
        return jax.device_get(step(u, s, k))

    p_rand, s_rand, d_rand, b_rand = run(updates, state0, keys[0])
    p_zero, s_zero, d_zero, b_zero = run(zeros, state0, keys[1])
    p_next, s_next, d_next, b_next = run(updates, s_rand, keys[2])
    p_again = run(updates, state0, keys[0])[0]
    _assert_equal_exact(p_again, p_rand, "encode with the same inputs and key")

    template = jax.eval_shape(lambda: _encode(updates, state0, keys[0])[0])
    for name, payload in (("zero", p_zero), ("next", p_next), ("template", template)):
        _assert_same_layout(payload, p_rand, f"payload ({name})")
    for name, state in (("random", s_rand), ("zero", s_zero), ("next", s_next)):
        _assert_same_layout(state, state0, f"state after encode ({name})")
    for name, decoded in (("random", d_rand), ("zero", d_zero), ("next", d_next)):
        _assert_same_layout(decoded, updates, f"decode ({name})")
    for leaf in jax.tree.leaves(d_zero):
        assert not np.any(leaf), "decode(encode(0)) != 0"
    for leaf in jax.tree.leaves((d_rand, d_next)):
        assert np.all(np.isfinite(leaf)), "decode of a finite update is not finite"

    for name, payload, n_bits in (
        ("random", p_rand, b_rand),
        ("zero", p_zero, b_zero),
        ("next", p_next, b_next),
    ):
        assert n_bits.shape == () and n_bits.dtype == np.int32, "bits must be an int32 scalar"
        data = compressor.to_bytes(payload)
        assert isinstance(data, bytes), f"to_bytes returned {type(data).__name__}"
        slack = 8 * len(data) - int(n_bits)
        assert 0 <= slack < 8, f"bits ({name}) = {n_bits} but the wire has {8 * len(data)} bits"
        _assert_equal_exact(compressor.from_bytes(data, template), payload, f"codec ({name})")
        _assert_equal_exact(compressor.from_bytes(data, payload), payload, f"codec ({name})")

    client_updates = random_like(params_example, rng, (num_clients,))
    client_states = jax.tree.map(
        lambda s: np.broadcast_to(np.asarray(s), (num_clients, *np.shape(s))), state0
    )
    vmapped = jax.jit(jax.vmap(step.__wrapped__), compiler_options=compiler_options)
    p_vmap, s_vmap, d_vmap, b_vmap = jax.device_get(
        vmapped(client_updates, client_states, client_keys)
    )
    assert b_vmap.shape == (num_clients,), "vmap(bits) must give one count per client"
    for c in range(num_clients):
        pick = lambda tree, c=c: jax.tree.map(lambda x: x[c], tree)  # noqa: E731
        p_c, s_c, d_c, b_c = run(pick(client_updates), state0, client_keys[c])
        chex.assert_trees_all_close(pick(p_vmap), p_c, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(pick(s_vmap), s_c, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(pick(d_vmap), d_c, rtol=1e-6, atol=1e-6)
        assert int(b_vmap[c]) == int(b_c), "vmap(bits) differs from bits"

    leaves, treedef = jax.tree.flatten(updates)
    sizes = [int(np.size(x)) for x in leaves]
    if nonfinite_policy and sum(sizes):
        first = next(i for i, n in enumerate(sizes) if n)
        for bad in (np.nan, np.inf):
            poisoned = list(leaves)
            poisoned[first] = np.array(poisoned[first], copy=True)
            poisoned[first].reshape(-1)[0] = bad
            p_bad, _, decoded, _ = run(jax.tree.unflatten(treedef, poisoned), state0, keys[0])
            assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(decoded)), (
                f"non-finite policy: an update with {bad} decoded to a finite update"
            )
            try:
                compressor.to_bytes(p_bad)
            except ValueError:
                pass
            else:
                raise AssertionError(f"non-finite policy: to_bytes accepted a {bad} payload")

    # The vmapped program traces each function once more (as a batched trace).
    assert traces == {"encode": 2, "decode": 2, "bits": 2}, f"retraced under jit: {traces}"
