"""Vertical federated learning: parties hold disjoint feature columns of the same samples.

The setting of Hardy et al. 2017, "Private federated learning on vertically partitioned data
via entity resolution and additively homomorphic encryption" (arXiv:1711.10677), *without* the
encryption, and of FedML's ``classical_vertical_fl`` (guest/host parties); survey: Liu et al.
2022, "Vertical Federated Learning: Concepts, Advances and Challenges" (split-NN based VFL,
their §3).

Samples are aligned (entity resolution is assumed done): party ``p`` holds columns
``groups[p]`` of every example. Each party runs its *bottom model* on its columns and gets an
embedding ``h_p = f_p(x[:, groups[p]])``; party 0 is the *active* party: it also holds the
labels and the *top model* ``g``, which maps the combined embeddings (concatenated, or summed)
to logits. Per minibatch the passive parties ``1..P-1`` send ``h_p`` ([B, embed_dim] float32)
up and receive ``d loss / d h_p`` down; party 0's own embedding never leaves it. Bytes per
epoch are counted for the real (unmasked) examples: ``(P - 1) x examples x embed_dim x 4``
each way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.core import softmax_cross_entropy
from fedjax_lab.models import Model, Params, mlp

COMBINE = ("concat", "sum")
BYTES_PER_FLOAT = 4


def check_feature_groups(groups: Sequence[Any], num_features: int) -> tuple[np.ndarray, ...]:
    """Validates a feature split: every group non-empty, disjoint, together all columns.

    Args:
      groups: one sequence of column indices per party.
      num_features: number of columns ``D`` of the (flattened) examples.

    Returns:
      The groups as sorted int64 arrays.

    Raises:
      ValueError: naming the bad group (empty, out of range, overlapping, or columns left out).
    """
    if isinstance(num_features, bool) or not isinstance(num_features, int | np.integer) \
            or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if isinstance(groups, str | bytes) or not isinstance(groups, Sequence) or not groups:
        raise ValueError("groups must be a non-empty list of column-index lists, one per party")
    out = []
    owner = np.full(num_features, -1)
    for p, group in enumerate(groups):
        cols = np.asarray(group)
        if cols.ndim != 1 or cols.size == 0:
            raise ValueError(f"groups[{p}] must be a non-empty 1-D list of column indices; "
                             "every party needs at least one column")
        if not np.issubdtype(cols.dtype, np.integer):
            raise ValueError(f"groups[{p}] must hold integer column indices, got {cols.dtype}")
        if cols.min() < 0 or cols.max() >= num_features:
            raise ValueError(f"groups[{p}] has columns outside [0, {num_features})")
        if len(np.unique(cols)) != len(cols):
            raise ValueError(f"groups[{p}] repeats a column")
        taken = owner[cols] >= 0
        if taken.any():
            c = int(cols[taken][0])
            raise ValueError(f"column {c} is in groups[{int(owner[c])}] and groups[{p}]; the "
                             "parties' columns must be disjoint")
        owner[cols] = p
        out.append(np.sort(cols).astype(np.int64))
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        raise ValueError(f"columns {missing[:5].tolist()} (of {missing.size} unassigned) belong to "
                         "no party; the groups must cover all columns")
    return tuple(out)


def feature_split(num_features: int, num_parties: int,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, ...]:
    """Splits ``num_features`` columns among ``num_parties`` parties (sizes differ by <= 1).

    Args:
      num_features: columns ``D`` of the flattened examples (any tabular dataset; images are
        flattened row-major, e.g. digits' 8x8 pixels are columns 0..63).
      num_parties: ``P``, ``1 <= P <= D``.
      rng: None for contiguous blocks of columns (party 0 the first ones); a generator for a
        random assignment (a permutation cut into the same sizes).

    Returns:
      ``P`` sorted column-index arrays, validated by :func:`check_feature_groups`.
    """
    for value, name in ((num_features, "num_features"), (num_parties, "num_parties")):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_parties > num_features:
        raise ValueError(f"num_parties ({num_parties}) must be <= num_features ({num_features}): "
                         "every party needs at least one column")
    order = np.arange(num_features) if rng is None else rng.permutation(num_features)
    return check_feature_groups(np.array_split(order, num_parties), int(num_features))


def split_features(x: np.ndarray | jax.Array, groups: Sequence[np.ndarray]) -> list[Any]:
    """Each party's columns ``[N, d_p]`` of ``x [N, ...]`` (flattened row-major)."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return [flat[:, g] for g in groups]


class VerticalModel(NamedTuple):
    """Bottom models per party and the top model of the active party (party 0).

    Attributes:
      bottoms: party ``p``'s model ``[B, len(groups[p])] -> [B, embed_dim]``.
      top: ``[B, P*embed_dim]`` (concat) or ``[B, embed_dim]`` (sum) ``-> [B, num_classes]``.
      groups: the parties' columns.
      combine: ``"concat"`` or ``"sum"`` of the embeddings.
      embed_dim: width of each embedding message.
    """

    bottoms: tuple[Model, ...]
    top: Model
    groups: tuple[np.ndarray, ...]
    combine: str
    embed_dim: int

    @property
    def num_parties(self) -> int:
        return len(self.groups)

    def init(self, key: jax.Array) -> Params:
        """``{"bottom": (params_0, ..., params_{P-1}), "top": params}``."""
        keys = jax.random.split(key, self.num_parties + 1)
        return {"bottom": tuple(b.init(k) for b, k in zip(self.bottoms, keys[1:], strict=True)),
                "top": self.top.init(keys[0])}

    def combined(self, embeddings: Sequence[jax.Array]) -> jax.Array:
        """What the top model reads: the embeddings concatenated (party order) or summed."""
        if self.combine == "concat":
            return jnp.concatenate(list(embeddings), axis=1)
        return functools.reduce(jnp.add, embeddings)

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """Logits of the composed model on whole examples ``x [B, ...]`` (centralized view)."""
        parts = split_features(x, self.groups)
        embs = [b.apply(p, xp) for b, p, xp in zip(self.bottoms, params["bottom"], parts,
                                                  strict=True)]
        return self.top.apply(params["top"], self.combined(embs))


def vertical_model(groups: Sequence[Any], num_features: int, num_classes: int, *,
                   embed_dim: int = 16, bottom_hidden: Sequence[int] = (),
                   top_hidden: Sequence[int] = (), combine: str = "concat") -> VerticalModel:
    """Builds a split-NN vertical model from ``fedjax_lab.models.mlp`` pieces.

    Args:
      groups: the parties' columns (validated by :func:`check_feature_groups`).
      num_features: columns of the flattened examples.
      num_classes: number of logits.
      embed_dim: output width of every bottom model (the message width).
      bottom_hidden: hidden ReLU widths of the bottom models; ``()`` makes them linear
        (``mlp`` with no hidden layer: one dense layer ``'head'``).
      top_hidden: hidden ReLU widths of the top model.
      combine: ``"concat"`` or ``"sum"``.

    Raises:
      ValueError: on a bad split, width or ``combine``.
    """
    groups = check_feature_groups(groups, num_features)
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
    bottoms = tuple(mlp((len(g),), embed_dim, tuple(bottom_hidden)) for g in groups)
    top_in = embed_dim * (len(groups) if combine == "concat" else 1)
    top = mlp((top_in,), num_classes, tuple(top_hidden))
    return VerticalModel(bottoms, top, groups, combine, embed_dim)


def vertical_grads(vm: VerticalModel, params: Params, parts: Sequence[jax.Array], y: jax.Array,
                   mask: jax.Array) -> tuple[jax.Array, Params]:
    """One minibatch of vertical FL, written as its messages.

    Each party computes its embedding and keeps the pull-back (``jax.vjp``); the active party
    computes the masked mean cross-entropy of the top model, its gradient and the gradient of
    each embedding (sent back to the party that made it); each party pulls its embedding
    gradient back through its bottom model.

    Returns:
      ``(loss, grads)`` with ``grads`` shaped like ``params``.
    """
    embs, pullbacks = zip(*[jax.vjp(lambda p, b=b, xp=xp: b.apply(p, xp), p)
                            for b, p, xp in zip(vm.bottoms, params["bottom"], parts, strict=True)],
                          strict=True)

    def top_loss(top_params: Params, embeddings: tuple[jax.Array, ...]) -> jax.Array:
        logits = vm.top.apply(top_params, vm.combined(embeddings))
        per_example = softmax_cross_entropy(logits, y)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    loss, (top_grads, emb_grads) = jax.value_and_grad(top_loss, argnums=(0, 1))(
        params["top"], tuple(embs))
    bottom_grads = tuple(pb(g)[0] for pb, g in zip(pullbacks, emb_grads, strict=True))
    return loss, {"bottom": bottom_grads, "top": top_grads}


def epoch_batches(num_examples: int, batch_size: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A fresh permutation cut into ``ceil(N / B)`` batches: indices and mask ``[S, B]``."""
    steps = -(-num_examples // batch_size)
    index = np.zeros(steps * batch_size, np.int64)
    mask = np.zeros(steps * batch_size, np.float32)
    index[:num_examples] = rng.permutation(num_examples)
    mask[:num_examples] = 1.0
    return index.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def message_bytes(vm: VerticalModel, examples: int) -> int:
    """Bytes of one direction (embeddings up, or their gradients down) for ``examples``."""
    return (vm.num_parties - 1) * int(examples) * vm.embed_dim * BYTES_PER_FLOAT


def vertical_trainer(vm: VerticalModel, optimizer: optax.GradientTransformation, *,
                     batch_size: int) -> Any:
    """``train_epoch(params, opt_state, x, y, index, mask) -> (params, opt_state, metrics)``.

    One jitted scan over an epoch's minibatches (``index``/``mask`` from
    :func:`epoch_batches`); each party (and the top model) steps its own parameters with
    ``optimizer`` (one state per party inside ``opt_state = optimizer.init(params)``, which is
    the same thing for per-coordinate optimizers such as SGD or Adam). Metrics: ``train_loss``
    (mean over the epoch's examples), ``embedding_bytes`` (up), ``gradient_bytes`` (down),
    ``total_bytes``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    @jax.jit
    def run(params: Params, opt_state: Any, parts: tuple[jax.Array, ...], y: jax.Array,
            index: jax.Array, mask: jax.Array):
        def step(carry, batch):
            params, opt_state = carry
            idx, m = batch
            loss, grads = vertical_grads(vm, params, [p[idx] for p in parts], y[idx], m)
            updates, new_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            active = jnp.sum(m) > 0
            keep = functools.partial(jax.tree.map, lambda a, b: jnp.where(active, a, b))
            return (keep(new_params, params), keep(new_state, opt_state)), loss * jnp.sum(m)

        (params, opt_state), loss_sums = jax.lax.scan(step, (params, opt_state), (index, mask))
        return params, opt_state, jnp.sum(loss_sums)

    def train_epoch(params: Params, opt_state: Any, x: np.ndarray, y: np.ndarray,
                    index: np.ndarray, mask: np.ndarray) -> tuple[Params, Any, dict[str, float]]:
        index, mask = np.asarray(index), np.asarray(mask)
        if index.ndim != 2 or index.shape[1] != batch_size or mask.shape != index.shape:
            raise ValueError(f"index and mask must both be [steps, batch_size={batch_size}] "
                             f"(epoch_batches), got {index.shape} and {mask.shape}")
        if len(x) != len(y) or index.min() < 0 or index.max() >= len(y):
            raise ValueError(f"x ({len(x)}) and y ({len(y)}) must be the same aligned samples "
                             f"and index must lie in [0, {len(y)})")
        if not np.isin(mask, (0.0, 1.0)).all():
            raise ValueError("mask must hold 0 (padding) or 1 (a real example)")
        parts = tuple(jnp.asarray(p) for p in split_features(np.asarray(x, np.float32),
                                                               vm.groups))
        params, opt_state, loss_sum = run(params, opt_state, parts, jnp.asarray(y),
                                          jnp.asarray(index), jnp.asarray(mask))
        examples = float(mask.sum())
        up = message_bytes(vm, examples)
        return params, opt_state, {"train_loss": float(loss_sum) / examples,
                                   "embedding_bytes": up, "gradient_bytes": up,
                                   "total_bytes": 2 * up}

    return train_epoch
