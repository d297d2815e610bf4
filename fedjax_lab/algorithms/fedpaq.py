"""FedPAQ and its QSGD baseline: configurations of the FedAvg family.

Reisizadeh, Mokhtari, Hassani, Jadbabaie, Pedarsani (2020), "FedPAQ: A Communication-Efficient
Federated Learning Method with Periodic Averaging and Quantization", AISTATS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from fedjax_lab.algorithms import kit
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.types import Algorithm


def fedpaq(
    model: Any,
    client_optimizer: optax.GradientTransformation | kit.ClientOptimizer,
    *,
    num_steps: int,
    batch_size: int,
    compressor: Any = None,
    weighting: kit.Weighting = "uniform",
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    name: str = "fedpaq",
) -> Algorithm:
    """FedPAQ (Reisizadeh et al. 2020, Algorithm 1).

    Each of the ``r`` clients sampled uniformly per round (the runner's ``clients_per_round``)
    runs ``tau = num_steps`` local SGD iterations on minibatches of ``batch_size`` from the
    global model ``x_k`` and uploads ``Q(x_{k,tau} - x_k)``; the server sets
    ``x_{k+1} = x_k + (1/r) Σ_i Q(x^{(i)}_{k,tau} - x_k)``. This is :func:`fedavg` with
    a fixed number of local steps, the unweighted mean (``weighting="uniform"``, as in the
    paper; ``"examples"`` weighs clients by their dataset sizes) and a server step of 1.

    Args:
      model: a ``fedjax_lab.models.Model`` (only ``apply`` is used).
      client_optimizer: local optimizer (the paper's SGD: ``optax.sgd(eta)``); the step size
        ``eta_k`` of the convergence theorem decreases with the round ``k``:
        ``kit.per_round(optax.sgd, learning_rate=lambda k: eta0 / (1 + k / kappa))``.
      num_steps: local iterations per round ``tau`` (>= 1).
      batch_size: local minibatch size ``B`` (clients with fewer examples use all of them).
      compressor: the uplink quantizer ``Q``, e.g. ``qsgd(num_levels=s)`` (unbiased, as the
        analysis assumes); ``None`` sends unquantized float32 deltas.
      weighting: ``"uniform"`` (paper) or ``"examples"``.
      per_example_loss: ``(logits, labels) -> [B]`` loss.
      name: name used in logs.
    """
    return fedavg(model, client_optimizer, batch_size=batch_size, local_epochs=None,
                  num_steps=num_steps, compressor=compressor, weighting=weighting,
                  per_example_loss=per_example_loss)._replace(name=name)


def qsgd_baseline(
    model: Any,
    client_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    compressor: Any,
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Algorithm:
    """The QSGD baseline of FedPAQ §5: quantized distributed SGD, i.e. FedPAQ with ``tau = 1``.

    Alistarh et al. (2017), "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", NeurIPS, as compared against in Reisizadeh et al. (2020), Figure 1: every node
    takes one SGD step and uploads the quantized update ``Q(-eta * g_i)``, the server averages.
    In the paper every node participates in every round: run it with
    ``clients_per_round = num_clients`` (the algorithm itself does not know the population).

    Args:
      model: a ``fedjax_lab.models.Model``.
      client_optimizer: the SGD step (``optax.sgd(eta)``).
      batch_size: minibatch size per node.
      compressor: the quantizer, e.g. ``qsgd(num_levels=1)``; required (without quantization
        this is plain minibatch SGD, i.e. ``fedpaq(..., num_steps=1)``).
      per_example_loss: ``(logits, labels) -> [B]`` loss.
    """
    if compressor is None:
        raise ValueError(
            "qsgd_baseline needs a compressor (e.g. compressors.qsgd(num_levels=1)); for "
            "unquantized one-step averaging use fedpaq(..., num_steps=1, compressor=None)"
        )
    return fedpaq(
        model,
        client_optimizer,
        num_steps=1,
        batch_size=batch_size,
        compressor=compressor,
        weighting="uniform",
        per_example_loss=per_example_loss,
        name="qsgd",
    )
