"""Next-character LSTM for Shakespeare (FedAvg / LEAF)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.models._base import Model, check_positive_int, from_flax


class _TokenEmbed(nn.Module):
    """Embedding lookup where out-of-range ids give NaN instead of a wrapped/clamped row.

    ``jnp.take`` wraps negative ids (-1 -> last row) and plain indexing clamps, both of which
    would silently train on the wrong character. NaN makes a bad id visible in the loss.
    """

    vocab_size: int
    features: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
            (self.vocab_size, self.features),
        )
        valid = (tokens >= 0) & (tokens < self.vocab_size)
        rows = jnp.take(table, jnp.where(valid, tokens, 0), axis=0)
        return jnp.where(valid[..., None], rows, jnp.nan)


class _CharLSTM(nn.Module):
    vocab_size: int
    embed_dim: int
    hidden: int
    num_layers: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = _TokenEmbed(self.vocab_size, self.embed_dim, name="embed")(tokens)
        for i in range(self.num_layers):
            x = nn.RNN(nn.OptimizedLSTMCell(self.hidden, name=f"lstm_{i}"))(x)
        # Predict the character that follows the sequence from the last time step only.
        return nn.Dense(self.vocab_size, name="head")(x[:, -1, :])


def char_lstm(
    vocab_size: int = 80,
    seq_len: int = 80,
    embed_dim: int = 8,
    hidden: int = 256,
    num_layers: int = 2,
) -> Model:
    """Character-level LSTM predicting the next character of a Shakespeare line.

    The Shakespeare model of McMahan et al., "Communication-Efficient Learning of Deep Networks
    from Decentralized Data" (FedAvg), AISTATS 2017, as specified in LEAF (Caldas et al.,
    "LEAF: A Benchmark for Federated Settings", 2018): int32 tokens ``[B, seq_len]`` ->
    8-dim embedding -> 2 stacked LSTM layers of 256 units -> dense logits over the vocabulary
    for the character after the sequence. With the defaults it has 817,872 parameters.

    Token ids must lie in ``[0, vocab_size)``. Eager calls check this and raise; under `jit`
    values are unknown at trace time, so an out-of-range id yields NaN logits for that
    example (never a silently wrapped or clamped id).

    Args:
      vocab_size: Vocabulary size; also `num_classes`.
      seq_len: Tokens per example (`input_shape` is ``(seq_len,)``).
      embed_dim: Embedding width.
      hidden: LSTM units per layer.
      num_layers: Number of stacked LSTM layers.

    Returns:
      A `Model` with ``input_dtype='int32'`` and ``num_classes=vocab_size``.

    Raises:
      ValueError, TypeError: If any argument is not a positive integer.
    """
    vocab = check_positive_int(vocab_size, "vocab_size")
    length = check_positive_int(seq_len, "seq_len")
    module = _CharLSTM(
        vocab_size=vocab,
        embed_dim=check_positive_int(embed_dim, "embed_dim"),
        hidden=check_positive_int(hidden, "hidden"),
        num_layers=check_positive_int(num_layers, "num_layers"),
    )

    def check_tokens(tokens: np.ndarray) -> None:
        bad = (tokens < 0) | (tokens >= vocab)
        if bad.any():
            raise ValueError(
                f"x holds token ids outside [0, vocab_size={vocab}): e.g. "
                f"{tokens[bad].ravel()[:5].tolist()}. Fix the tokenizer or raise vocab_size."
            )

    return from_flax(
        module,
        input_shape=(length,),
        input_dtype="int32",
        num_classes=vocab,
        has_conv=False,
        name="char_lstm",
        check_values=check_tokens,
    )
