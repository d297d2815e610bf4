"""Split learning and SplitFed: a model cut at a named layer into a client part and a server part.

Vanilla split learning: Gupta & Raskar 2018, "Distributed learning of deep neural network over
multiple agents" (J. Network and Computer Applications 116). SplitFed: Thapa, Arachchige,
Camtepe & Sun 2022, "SplitFed: When Federated Learning Meets Split Learning" (AAAI),
Algorithm 1 (SFLV1).

A client holds the layers up to and including the *cut layer*; the server holds the rest and
the labels. Per minibatch the client sends the cut-layer activations ("smashed data") up, the
server runs its part and the loss, and sends the gradient of the loss with respect to those
activations down; the client back-propagates it through its part. Both messages are ``[B, F]``
float32 (``F`` the flattened cut-layer width), counted in bytes per round for the real
(unmasked) examples only.

Limitation, by design: the cut works on *sequential* models, a list of named layers
(:class:`Layer`); :func:`builtin_layers` gives the library's ``mlp`` and ``cnn``
(``femnist_cnn``) in that form, with the same flax submodule names and parameters as
``fedjax_lab.models`` (tested), so their ``init`` params split exactly. An arbitrary flax module
is not cut: a model with skip connections (``resnet18``) or recurrence (``char_lstm``) has no
single tensor that carries all the information past a layer, so "the server part after layer
X" is not defined by a name alone.

The cut-layer messages are exchanged uncompressed. A compressor applied to a whole ``[B, F]``
batch would count the padded rows of a partial batch in its ``bits``; compressing each example's
row as its own payload (bits summed over the real rows) would be exact, but is not implemented.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.core import softmax_cross_entropy
from fedjax_lab.data import CohortBuilder, FederatedData
from fedjax_lab.models import Model, Params

LAYER_KINDS = ("dense", "conv")
BYTES_PER_FLOAT = 4


class Layer(NamedTuple):
    """One named layer of a sequential model.

    Attributes:
      name: flax submodule name; also the parameter key and the name to cut at.
      kind: ``"dense"`` (flattens its input first) or ``"conv"`` (``kernel x kernel``,
        ``padding``, HWIO kernel as in ``fedjax_lab.models``).
      features: output units / channels.
      relu: apply ReLU after the layer.
      pool: conv only; ``p > 0`` max-pools ``p x p`` with stride ``p`` ('VALID') after the ReLU.
      kernel: conv kernel size.
      padding: conv padding (``"SAME"`` or ``"VALID"``).
    """

    name: str
    kind: str
    features: int
    relu: bool = True
    pool: int = 0
    kernel: int = 5
    padding: str = "SAME"


class _Stack(nn.Module):
    """``layers`` applied in order to ``x`` reshaped to ``in_shape``; output flattened if asked."""

    layers: tuple[Layer, ...]
    in_shape: tuple[int, ...]
    flatten_out: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.reshape(x, (x.shape[0], *self.in_shape))
        for layer in self.layers:
            if layer.kind == "dense":
                # Explicit feature count (not -1) so that an empty batch still reshapes.
                x = jnp.reshape(x, (x.shape[0], math.prod(x.shape[1:])))
                x = nn.Dense(layer.features, name=layer.name)(x)
            else:
                x = nn.Conv(layer.features, (layer.kernel, layer.kernel),
                            padding=layer.padding, name=layer.name)(x)
            if layer.relu:
                x = nn.relu(x)
            if layer.pool:
                x = nn.max_pool(x, (layer.pool, layer.pool), strides=(layer.pool, layer.pool),
                                padding="VALID")
        if self.flatten_out:
            x = jnp.reshape(x, (x.shape[0], math.prod(x.shape[1:])))
        return x


@functools.partial(jax.jit, static_argnums=0)
def _init(module: _Stack, key: jax.Array) -> Params:
    variables = module.init(key, jnp.zeros((1, *module.in_shape), jnp.float32))
    return flax.core.unfreeze(variables["params"])


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: _Stack, params: Params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)


def _as_model(module: _Stack, input_shape: tuple[int, ...], out: int, name: str) -> Model:
    """A `Model` (plain-dict params, ``apply(params, x) -> [B, out]``) around ``module``."""

    def apply(params: Params, x: jax.Array) -> jax.Array:
        if tuple(x.shape[1:]) != input_shape or x.ndim != len(input_shape) + 1:
            raise ValueError(f"x must have shape [batch, *{input_shape}] for '{name}', got "
                             f"{tuple(x.shape)}.")
        return _apply(module, params, jnp.asarray(x, jnp.float32))

    return Model(init=lambda key: _init(module, key), apply=apply, input_shape=input_shape,
                 input_dtype="float32", num_classes=out,
                 has_conv=any(layer.kind == "conv" for layer in module.layers), name=name)


def _out_shape(layers: tuple[Layer, ...], in_shape: tuple[int, ...]) -> tuple[int, ...]:
    module = _Stack(layers, in_shape, flatten_out=False)
    params = jax.eval_shape(_init, module, jax.random.key(0))
    out = jax.eval_shape(_apply, module, params,
                         jax.ShapeDtypeStruct((1, *in_shape), jnp.float32))
    return tuple(out.shape[1:])


class SplitModel(NamedTuple):
    """A sequential model cut after layer ``cut``.

    Attributes:
      client: ``apply(client_params, x[B, *input_shape]) -> acts[B, cut_size]``, the layers up to
        and including ``cut``, flattened (``num_classes`` is ``cut_size`` here: the "logits" of
        the client part are the cut-layer activations it sends).
      server: ``apply(server_params, acts[B, cut_size]) -> logits[B, num_classes]``.
      whole: the uncut model; its params are ``{**client_params, **server_params}``.
      cut: the cut layer's name.
      cut_shape: per-example shape of the cut-layer output (before flattening).
      client_layers: names of the client's layers, in order.
      server_layers: names of the server's layers, in order.
    """

    client: Model
    server: Model
    whole: Model
    cut: str
    cut_shape: tuple[int, ...]
    client_layers: tuple[str, ...]
    server_layers: tuple[str, ...]

    @property
    def cut_size(self) -> int:
        """Floats per example in each cut-layer message (activations or their gradients)."""
        return math.prod(self.cut_shape)

    def split_params(self, params: Params) -> tuple[Params, Params]:
        """``(client_params, server_params)`` of the whole model's ``params``."""
        names = set(self.client_layers) | set(self.server_layers)
        if not isinstance(params, dict) or set(params) != names:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"params must be the whole model's dict with keys {sorted(names)}, "
                             f"got {got}")
        return ({n: params[n] for n in self.client_layers},
                {n: params[n] for n in self.server_layers})

    def merge_params(self, client_params: Params, server_params: Params) -> Params:
        """The whole model's params from its two parts."""
        return {**client_params, **server_params}


def check_layers(layers: Sequence[Layer]) -> tuple[Layer, ...]:
    """Validates a layer list (kinds, names unique, positive sizes); returns it as a tuple."""
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must hold at least one Layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"layers[{i}] must be a Layer, got {type(layer).__name__}")
        if layer.kind not in LAYER_KINDS:
            raise ValueError(f"layers[{i}].kind must be one of {LAYER_KINDS}, got {layer.kind!r}")
        if not layer.name or not isinstance(layer.name, str):
            raise ValueError(f"layers[{i}].name must be a non-empty string")
        for field in ("features", "kernel"):
            value = getattr(layer, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"layers[{i}].{field} must be a positive int, got {value!r}")
        if isinstance(layer.pool, bool) or not isinstance(layer.pool, int) or layer.pool < 0:
            raise ValueError(f"layers[{i}].pool must be an int >= 0, got {layer.pool!r}")
        if layer.kind == "conv" and layer.padding not in ("SAME", "VALID"):
            raise ValueError(f"layers[{i}].padding must be 'SAME' or 'VALID', got "
                             f"{layer.padding!r}")
        if layer.kind == "dense" and layer.pool:
            raise ValueError(f"layers[{i}] ({layer.name!r}): pool is for conv layers only")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique, got {names}")
    return layers


def builtin_layers(name: str, input_shape: Sequence[int], num_classes: int,
                   **kwargs: Any) -> tuple[Layer, ...]:
    """The library's sequential models as layer lists (same names and params as ``models``).

    Args:
      name: ``"mlp"`` (``fedjax_lab.models.mlp``; ``hidden=`` widths, default (200, 200)) or
        ``"cnn"`` (``fedjax_lab.models.femnist_cnn``, McMahan et al. 2017).
      input_shape: per-example input shape; unused (the layers do not depend on it), taken for
        the same call signature as ``fedjax_lab.models.get_model``.
      num_classes: number of logits.
      **kwargs: ``hidden`` for ``"mlp"``.

    Returns:
      The layers; cut names are all but the last (``"head"``).

    Raises:
      ValueError: on another model name (``logreg`` has one layer, nothing to cut; ``resnet18``
        and ``char_lstm`` are not sequential; ``cnn_dropout`` trains with dropout).
    """
    del input_shape
    if name == "mlp":
        hidden = tuple(kwargs.pop("hidden", (200, 200)))
        layers = [Layer(f"dense_{i}", "dense", int(w)) for i, w in enumerate(hidden)]
    elif name == "cnn":
        layers = [Layer("conv_0", "conv", 32, pool=2), Layer("conv_1", "conv", 64, pool=2),
                  Layer("dense_0", "dense", 512)]
    else:
        raise ValueError(f"builtin_layers: model {name!r} cannot be cut; split learning supports "
                         "the sequential models 'mlp' and 'cnn' (logreg has a single layer, "
                         "resnet18/char_lstm are not sequential), or pass your own Layer list "
                         "to split_model")
    if kwargs:
        raise TypeError(f"builtin_layers({name!r}) got unexpected arguments {sorted(kwargs)}")
    return check_layers([*layers, Layer("head", "dense", int(num_classes), relu=False)])


def split_model(layers: Sequence[Layer], input_shape: Sequence[int], *, cut: str) -> SplitModel:
    """Cuts a sequential model after the layer named ``cut``.

    Args:
      layers: the model (:func:`builtin_layers` or your own :class:`Layer` list); the last
        layer's ``features`` is the number of classes.
      input_shape: per-example input shape.
      cut: name of the last client layer; any layer but the last.

    Returns:
      The :class:`SplitModel`.

    Raises:
      ValueError: on an unknown ``cut`` or the last layer (the message lists the valid names),
        or a bad layer list / input shape.
    """
    layers = check_layers(layers)
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    names = [layer.name for layer in layers]
    valid = names[:-1]
    if cut not in valid:
        reason = ("it is the last layer (the server part would be empty)" if cut == names[-1]
                  else "no layer has that name")
        raise ValueError(f"cut={cut!r} is not a valid cut layer: {reason}; valid cut names are "
                         f"{valid}" + ("" if valid else " (a one-layer model cannot be cut)"))
    i = names.index(cut) + 1
    client_layers, server_layers = layers[:i], layers[i:]
    cut_shape = _out_shape(client_layers, shape)
    cut_size = math.prod(cut_shape)
    classes = layers[-1].features
    return SplitModel(
        client=_as_model(_Stack(client_layers, shape, flatten_out=True), shape, cut_size,
                         f"client[:{cut}]"),
        server=_as_model(_Stack(server_layers, cut_shape, flatten_out=False), (cut_size,),
                         classes, f"server[{cut}:]"),
        whole=_as_model(_Stack(layers, shape, flatten_out=False), shape, classes, "whole"),
        cut=cut,
        cut_shape=cut_shape,
        client_layers=tuple(names[:i]),
        server_layers=tuple(names[i:]),
    )


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree's array leaves as sent (their dtypes' item sizes)."""
    return int(sum(np.dtype(leaf.dtype).itemsize * math.prod(np.shape(leaf))
                   for leaf in jax.tree.leaves(tree)))


def split_grads(split: SplitModel, client_params: Params, server_params: Params,
                x: jax.Array, y: jax.Array, mask: jax.Array) -> tuple[jax.Array, Params, Params]:
    """One minibatch of split learning, written as its two messages.

    The client computes ``acts = client(x)`` (sent up); the server computes the masked mean
    cross-entropy of ``server(acts)``, its own gradient and ``d loss / d acts`` (sent down); the
    client pulls that back through its part (``jax.vjp``). By the chain rule the two gradients
    are those of the whole model's loss.

    Returns:
      ``(loss, client_grads, server_grads)``.
    """
    acts, client_vjp = jax.vjp(lambda p: split.client.apply(p, x), client_params)

    def server_loss(params: Params, a: jax.Array) -> jax.Array:
        per_example = softmax_cross_entropy(split.server.apply(params, a), y)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    loss, (server_grads, act_grads) = jax.value_and_grad(server_loss, argnums=(0, 1))(
        server_params, acts)
    (client_grads,) = client_vjp(act_grads)
    return loss, client_grads, server_grads


class SplitState(NamedTuple):
    """Training state: both parts, their optimizer states and the round counter.

    ``client_opt_state`` travels with the client weights in vanilla split learning (the relay);
    SplitFed restarts the clients' optimizers every round (only weights are averaged).
    """

    client_params: Params
    server_params: Params
    client_opt_state: Any
    server_opt_state: Any
    round: int


def init_state(split: SplitModel, params: Params, optimizer: optax.GradientTransformation
               ) -> SplitState:
    """The state of a whole-model ``params`` split in two, fresh optimizer states."""
    client_params, server_params = split.split_params(params)
    return SplitState(client_params, server_params, optimizer.init(client_params),
                      optimizer.init(server_params), 0)


def _apply_step(optimizer: optax.GradientTransformation, params: Params, opt_state: Any,
                grads: Params, active: jax.Array) -> tuple[Params, Any]:
    """An optimizer step, or nothing (params and state unchanged) when ``active`` is False."""
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(active, new, old))
    return keep(new_params, params), keep(new_state, opt_state)


def _round_data(data: FederatedData, batch_size: int, local_epochs: int, seed: int,
                round_idx: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every client's shuffled batches ``[K, S, B, ...]`` and mask, the library's cohort layout."""
    builder = CohortBuilder(data, batch_size=batch_size, local_epochs=local_epochs,
                            cohort_size=data.num_clients, seed=seed, device_table=False,
                            ladder=None)
    cohort = builder.build(round_idx, np.arange(data.num_clients))
    return cohort.arrays, cohort.mask


class SplitTrainer(NamedTuple):
    """``run_round(state, round_idx) -> (state, metrics)`` for one split-learning variant.

    Metrics per round: ``train_loss`` (mean over the round's real examples),
    ``activation_bytes`` (client -> server cut-layer activations), ``gradient_bytes`` (server
    -> client activation gradients), ``model_bytes`` (client-part weights: vanilla SL's relay,
    or SplitFed's FedAvg upload plus download) and ``total_bytes``.
    """

    run_round: Any
    name: str


def _message_bytes(split: SplitModel, mask: np.ndarray) -> int:
    return int(mask.sum()) * split.cut_size * BYTES_PER_FLOAT


def vanilla_split_learning(split: SplitModel, optimizer: optax.GradientTransformation,
                           data: FederatedData, *, batch_size: int, local_epochs: int = 1,
                           seed: int = 0) -> SplitTrainer:
    """Vanilla split learning with a relay of the client part (Gupta & Raskar 2018, §2).

    Each round, clients ``0, 1, ..., K-1`` take turns: client ``k`` trains on its
    ``local_epochs`` shuffled passes (batches of ``batch_size``, last one partial) with the
    server, one optimizer step of both parts per batch, then hands the client part's weights
    and optimizer state to client ``k+1`` (the last client to client 0 of the next round). The
    server part and its optimizer state stay on the server. This is exactly centralized
    training of the whole model over the clients' batches in relay order (tested).

    Bytes per round: activations and gradients ``real examples x cut_size x 4`` each; the relay
    ``K x`` (client params + client optimizer state).
    """

    @jax.jit
    def train(state: SplitState, xs: jax.Array, ys: jax.Array, masks: jax.Array):
        def step(carry, batch):
            cp, sp, cs, ss = carry
            x, y, mask = batch
            loss, cg, sg = split_grads(split, cp, sp, x, y, mask)
            active = jnp.sum(mask) > 0
            cp, cs = _apply_step(optimizer, cp, cs, cg, active)
            sp, ss = _apply_step(optimizer, sp, ss, sg, active)
            return (cp, sp, cs, ss), loss * jnp.sum(mask)

        carry = (state.client_params, state.server_params, state.client_opt_state,
                 state.server_opt_state)
        carry, loss_sums = jax.lax.scan(step, carry, (xs, ys, masks))
        return carry, jnp.sum(loss_sums)

    def run_round(state: SplitState, round_idx: int) -> tuple[SplitState, dict[str, float]]:
        arrays, mask = _round_data(data, batch_size, local_epochs, seed, round_idx)
        # Relay order: client 0's batches, then client 1's, ...; padding steps are dropped.
        flat_mask = mask.reshape(-1, mask.shape[-1])
        real = flat_mask.sum(axis=1) > 0
        xs = arrays["x"].reshape(-1, *arrays["x"].shape[2:])[real]
        ys = arrays["y"].reshape(-1, *arrays["y"].shape[2:])[real]
        (cp, sp, cs, ss), loss_sum = train(state, xs, ys, flat_mask[real])
        act = _message_bytes(split, mask)
        relay = data.num_clients * (tree_bytes(cp) + tree_bytes(cs))
        metrics = {"train_loss": float(loss_sum) / float(mask.sum()), "activation_bytes": act,
                   "gradient_bytes": act, "model_bytes": relay, "total_bytes": 2 * act + relay}
        return SplitState(cp, sp, cs, ss, state.round + 1), metrics

    return SplitTrainer(run_round, "vanilla_sl")


def splitfed(split: SplitModel, optimizer: optax.GradientTransformation, data: FederatedData,
             *, batch_size: int, local_epochs: int = 1, seed: int = 0) -> SplitTrainer:
    """SplitFed, SFLV1 with one synchronous server step per local step (Thapa et al. 2022, Alg. 1).

    Each round every client starts from the global client part, all in parallel (``vmap``).
    At local step ``s`` each client sends the activations of its ``s``-th batch; the one server
    part computes every client's loss and gradients, takes *one* optimizer step with the
    example-weighted average of the clients' server-part gradients
    (``sum_k m_k g_k / sum_k m_k``, ``m_k`` the real examples of client ``k``'s batch; the
    paper's ``sum_k (n_k/n) grad l_k(W^S)``), and sends each client its activation gradients;
    each client steps its own client part. At the end of the round the client parts are
    FedAvg'd (weights ``n_k`` = examples the client trained on) and broadcast. Clients with
    fewer steps are padded with masked no-op steps. The clients' optimizer states restart
    every round; the server's persists.

    This is Algorithm 1's server update applied per local step with a single server copy, not
    the variant of per-client server copies averaged at the end of the round (the two agree
    when each client has one batch per round). With one client it is centralized training of
    the whole model (tested).

    Bytes per round: activations and gradients ``real examples x cut_size x 4`` each; client
    weights ``2 K x client params`` (FedAvg upload and broadcast).
    """

    @jax.jit
    def train(state: SplitState, xs: jax.Array, ys: jax.Array, masks: jax.Array):
        num = masks.shape[0]
        stack = functools.partial(jax.tree.map, lambda a: jnp.broadcast_to(a, (num, *a.shape)))
        cps = stack(state.client_params)
        css = jax.vmap(optimizer.init)(cps)
        grads = jax.vmap(split_grads, in_axes=(None, 0, None, 0, 0, 0))

        def step(carry, batch):
            cps, sp, css, ss = carry
            x, y, mask = batch  # [K, B, ...]
            losses, cgs, sgs = grads(split, cps, sp, x, y, mask)
            m = jnp.sum(mask, axis=1)
            total = jnp.sum(m)
            weights = m / jnp.maximum(total, 1.0)
            sg = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), sgs)
            sp, ss = _apply_step(optimizer, sp, ss, sg, total > 0)
            cps, css = jax.vmap(functools.partial(_apply_step, optimizer))(cps, css, cgs, m > 0)
            return (cps, sp, css, ss), jnp.sum(losses * m)

        # Scan over local steps: [S, K, B, ...].
        steps = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), (xs, ys, masks))
        carry = (cps, state.server_params, css, state.server_opt_state)
        (cps, sp, _, ss), loss_sums = jax.lax.scan(step, carry, steps)
        n = jnp.sum(masks, axis=(1, 2))
        client = jax.tree.map(lambda c: jnp.tensordot(n / jnp.sum(n), c, axes=1), cps)
        return client, sp, ss, jnp.sum(loss_sums)

    def run_round(state: SplitState, round_idx: int) -> tuple[SplitState, dict[str, float]]:
        arrays, mask = _round_data(data, batch_size, local_epochs, seed, round_idx)
        client, sp, ss, loss_sum = train(state, arrays["x"], arrays["y"], mask)
        act = _message_bytes(split, mask)
        fedavg = 2 * data.num_clients * tree_bytes(client)
        metrics = {"train_loss": float(loss_sum) / float(mask.sum()), "activation_bytes": act,
                   "gradient_bytes": act, "model_bytes": fedavg, "total_bytes": 2 * act + fedavg}
        return SplitState(client, sp, optimizer.init(client), ss, state.round + 1), metrics

    return SplitTrainer(run_round, "splitfed")
