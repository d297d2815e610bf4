"""Simulated wall-clock of a federated run: communication and computation time per round.

The model of Reisizadeh et al. (2020), "FedPAQ: A Communication-Efficient Federated Learning
Method with Periodic Averaging and Quantization", AISTATS, §5:

* communication: the ``r`` participating clients upload over a shared link of bandwidth
  ``BW`` bits per time unit, so a round costs ``(Σ_i bits_i) / BW``; ``bits_i`` is the exact
  wire size of client ``i``'s message (the compressor's ``bits()``, summed into the round's
  ``upload_bits`` metric);
* computation: a client that processes ``w_i = τ·B`` examples takes
  ``w_i·shift + Exp(mean w_i/scale)`` (shifted exponential), and the round waits for the
  slowest client: ``max_i``.

One unquantized model upload costs ``C_comm = p·F/BW`` (``F = 32`` bits per float) and one
example's gradient ``C_comp = shift + 1/scale`` in expectation; the paper fixes the ratio
``C_comm/C_comp`` (100 for logistic regression, 1000 for the neural network), which
:func:`bandwidth_for_ratio` turns into ``BW``. Time units are arbitrary but shared.

Random draws come from ``host_rng(seed, SYSTEM_STREAM, round, TIME_SUBSTREAM)``: a round's
simulated time depends only on ``(seed, round)`` and on what the round did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np

from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import Cohort

# Sub-stream of SYSTEM_STREAM (availability uses 0), so the two never share draws.
TIME_SUBSTREAM = 1


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a positive float, got {value!r}")
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return float(value)


def bandwidth_for_ratio(
    ratio: float, num_params: int, *, shift: float, scale: float, float_bits: int = 32
) -> float:
    """``BW`` such that ``C_comm / C_comp = (p·F/BW) / (shift + 1/scale) = ratio``.

    Args:
      ratio: the target ``C_comm/C_comp`` (> 0), e.g. 100 (FedPAQ's logistic regression).
      num_params: ``p``, the number of model parameters (>= 1).
      shift: per-example deterministic computation time (> 0).
      scale: rate of the exponential part (> 0); its mean per example is ``1/scale``.
      float_bits: ``F``, bits per unquantized parameter (32 in the paper).
    """
    ratio = _positive(ratio, "ratio")
    if isinstance(num_params, bool) or not isinstance(num_params, int | np.integer):
        raise TypeError(f"num_params must be an int, got {num_params!r}")
    if num_params < 1:
        raise ValueError(f"num_params must be >= 1, got {num_params}")
    if isinstance(float_bits, bool) or not isinstance(float_bits, int) or float_bits < 1:
        raise ValueError(f"float_bits must be a positive int, got {float_bits!r}")
    c_comp = _positive(shift, "shift") + 1.0 / _positive(scale, "scale")
    return int(num_params) * float_bits / (ratio * c_comp)


def cohort_work(cohort: Cohort) -> np.ndarray:
    """``[C]`` examples each client slot processes this round (0 for padded/dropped slots).

    With FedPAQ's fixed ``τ`` steps of ``B`` examples this is ``τ·B``; with epochs or partial
    (straggler) work it is whatever the slot's mask lets through.
    """
    mask = np.asarray(jax.device_get(cohort.mask), np.float64)
    return mask.reshape(mask.shape[0], -1).sum(axis=1)


@dataclass(frozen=True)
class TimeModel:
    """FedPAQ §5 time model (see the module docstring).

    Attributes:
      bandwidth: ``BW``, uplink bits per time unit (> 0).
      shift: per-example deterministic computation time (> 0).
      scale: rate of the per-round exponential computation time (> 0); a client processing
        ``w`` examples has an exponential part of mean ``w/scale``.
    """

    bandwidth: float
    shift: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        _positive(self.bandwidth, "bandwidth")
        _positive(self.shift, "shift")
        _positive(self.scale, "scale")

    @classmethod
    def from_ratio(
        cls, ratio: float, num_params: int, *, shift: float = 1.0, scale: float = 1.0,
        float_bits: int = 32,
    ) -> TimeModel:
        """The model whose ``C_comm/C_comp`` equals ``ratio`` for a ``num_params`` model."""
        bw = bandwidth_for_ratio(ratio, num_params, shift=shift, scale=scale,
                                 float_bits=float_bits)
        return cls(bandwidth=bw, shift=shift, scale=scale)

    def comm_time(self, upload_bits: float) -> float:
        """``(Σ_i bits_i) / BW`` for the round's total uploaded bits."""
        if not 0.0 <= upload_bits < math.inf:
            raise ValueError(f"upload_bits must be a finite number >= 0, got {upload_bits}")
        return float(upload_bits) / self.bandwidth

    def sample_comp_time(self, work: np.ndarray, rng: np.random.Generator) -> float:
        """``max_i (w_i·shift + Exp(mean w_i/scale))`` over slots with ``w_i > 0`` (0 if none).

        One standard exponential is drawn per slot (padded ones included), so the draws of a
        slot do not depend on the others' work.
        """
        work = np.asarray(work, np.float64)
        if work.ndim != 1 or np.any(~np.isfinite(work)) or np.any(work < 0):
            raise ValueError(f"work must be a 1-D array of finite counts >= 0, got {work}")
        e = rng.standard_exponential(len(work))
        times = work * self.shift + e * work / self.scale
        return float(np.max(times, initial=0.0, where=work > 0))

    def comp_time(self, work: np.ndarray, *, seed: int, round_idx: int) -> float:
        """The computation time of round ``round_idx`` (seeded draw, see the module docstring)."""
        rng = rng_lib.host_rng(seed, rng_lib.SYSTEM_STREAM, round_idx, TIME_SUBSTREAM)
        return self.sample_comp_time(work, rng)


class SimulatedClock:
    """Accumulates a run's simulated time; one :meth:`tick` per round.

    Returns the cumulative ``sim_time`` (communication + computation), ``sim_comm_time`` and
    ``sim_comp_time`` after each round, the fields the runner adds to ``metrics.jsonl``.
    """

    def __init__(self, model: TimeModel) -> None:
        if not isinstance(model, TimeModel):
            raise TypeError(f"time_model must be a fedjax_lab.systems.TimeModel, got {model!r}")
        self.model = model
        self.comm = 0.0
        self.comp = 0.0

    def tick(
        self, cohort: Cohort, upload_bits: float, *, seed: int, round_idx: int
    ) -> dict[str, float]:
        self.comm += self.model.comm_time(upload_bits)
        self.comp += self.model.comp_time(cohort_work(cohort), seed=seed, round_idx=round_idx)
        return {
            "sim_time": self.comm + self.comp,
            "sim_comm_time": self.comm,
            "sim_comp_time": self.comp,
        }
