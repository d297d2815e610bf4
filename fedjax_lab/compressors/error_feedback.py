"""Error feedback (residual accumulation) around any compressor."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.compressors._base import Compressor, check_structure, tree_layout


class ErrorFeedbackState(NamedTuple):
    """Client-side memory: what previous rounds failed to send, and the inner state."""

    residual: Any  # same structure, shapes and dtypes as params
    inner: Any


def with_error_feedback(compressor: Compressor) -> Compressor:
    """Adds error feedback: compress ``update + residual``, remember what was lost.

    Seide, Fu, Droppo, Li, Yu (2014), "1-Bit Stochastic Gradient Descent and its Application to
    Data-Parallel Distributed Training of Speech DNNs"; Stich, Cordonnier, Jaggi (2018),
    "Sparsified SGD with Memory"; Karimireddy et al. (2019), "Error Feedback Fixes SignSGD";
    the client-side residual accumulation of STC (Sattler et al., 2019, Algorithm 2)::

        corrected = update + residual
        payload   = C(corrected)
        residual  = corrected - decode(payload)

    The residual lives in the compressor state (one per client; the simulation keeps it in the
    client state). Payload, ``decode``, ``bits`` and the wire codec are the inner compressor's.
    A non-finite update makes the residual non-finite until the state is re-initialised, which
    is why the algorithm layer rejects such updates before encoding.

    Args:
      compressor: any :class:`Compressor`.

    Returns:
      A :class:`Compressor` whose state is an :class:`ErrorFeedbackState`.
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(
            f"with_error_feedback: expected a Compressor, got {type(compressor).__name__}."
        )

    def init(params):
        tree_layout(params, what="with_error_feedback.init(params)", indexed=False)
        residual = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
        return ErrorFeedbackState(residual, compressor.init(params))

    def encode(updates, state, *, key):
        if not isinstance(state, ErrorFeedbackState):
            raise TypeError(
                "with_error_feedback.encode: state must be the ErrorFeedbackState returned by "
                f"init, got {type(state).__name__}."
            )
        layout = tree_layout(
            state.residual, what="with_error_feedback state.residual", indexed=False
        )
        check_structure(layout, updates, "with_error_feedback.encode(updates)")
        corrected = jax.tree.map(lambda u, r: (u + r).astype(r.dtype), updates, state.residual)
        payload, inner = compressor.encode(corrected, state.inner, key=key)
        sent = compressor.decode(payload)
        residual = jax.tree.map(lambda c, s: (c - s).astype(c.dtype), corrected, sent)
        return payload, ErrorFeedbackState(residual, inner)

    return Compressor(
        init,
        encode,
        compressor.decode,
        compressor.bits,
        compressor.to_bytes,
        compressor.from_bytes,
    )
