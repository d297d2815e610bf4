"""StackOverflow next-word prediction LSTM (Reddi et al. 2021)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from fedjax_lab.models._base import Model, check_positive_int, from_flax
from fedjax_lab.models.char_lstm import _TokenEmbed


class _NextWordLSTM(nn.Module):
    num_classes: int
    embed_dim: int
    hidden: int
    dense: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = _TokenEmbed(self.num_classes, self.embed_dim, name="embed")(tokens)
        x = nn.RNN(nn.OptimizedLSTMCell(self.hidden, name="lstm"))(x)
        # Linear projection back to the embedding width, then logits at every position.
        x = nn.Dense(self.dense, name="project")(x)
        return nn.Dense(self.num_classes, name="head")(x)


def nwp_lstm(num_classes: int = 10_004, seq_len: int = 20, embed_dim: int = 96,
             hidden: int = 670, dense: int = 96) -> Model:
    """Next-word LSTM of Reddi et al. 2021 ("Adaptive Federated Optimization", App. C).

    int32 tokens ``[B, seq_len]`` -> 96-dim embedding -> one LSTM layer of 670 units (every
    step) -> dense 96 (linear) -> dense logits over the extended vocabulary at every position,
    ``[B, seq_len, num_classes]`` (the next token after each position). With the defaults
    (10,000 words + pad, OOV, bos, eos) it has 4,050,748 parameters, the count the paper
    reports. Unlike TFF's Keras model (``mask_zero=True``), pad inputs are not masked: pads
    trail the sentence, so they change only the predictions at pad inputs, whose targets are
    pad (not counted by the accuracy).

    Args:
      num_classes: extended vocabulary size (words + 4 special tokens); also the embedding rows.
      seq_len: tokens per example.
      embed_dim: embedding width (and the projection width by default).
      hidden: LSTM units.
      dense: width of the linear projection before the logits.

    Returns:
      A `Model` with ``input_dtype='int32'`` whose ``apply`` returns per-position logits.
    """
    vocab = check_positive_int(num_classes, "num_classes")
    length = check_positive_int(seq_len, "seq_len")
    module = _NextWordLSTM(num_classes=vocab, embed_dim=check_positive_int(embed_dim, "embed_dim"),
                           hidden=check_positive_int(hidden, "hidden"),
                           dense=check_positive_int(dense, "dense"))

    def check_tokens(tokens: np.ndarray) -> None:
        bad = (tokens < 0) | (tokens >= vocab)
        if bad.any():
            raise ValueError(f"x holds token ids outside [0, num_classes={vocab}): e.g. "
                             f"{tokens[bad].ravel()[:5].tolist()}")

    return from_flax(module, input_shape=(length,), input_dtype="int32", num_classes=vocab,
                     has_conv=False, name="nwp_lstm", check_values=check_tokens)
