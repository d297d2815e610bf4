"""Robust and clipped aggregation rules usable with any FedAvg-family algorithm.

``with_aggregator(algorithm, median())`` replaces an algorithm's weighted mean by a robust rule;
``transforms=(clip_norm(S),)`` clips each client's update first; ``with_weak_dp(alg, sigma,
key)`` adds Sun et al.'s (2019) weak-DP noise to the server's model. Rules: ``median``,
``trimmed_mean``, ``krum``/``multi_krum``, ``bulyan``, ``geometric_median`` (RFA),
``centered_clipping``; ``with_foolsgold(alg)`` (FoolsGold) re-weights clients by the similarity
of their update histories, kept per client in the client-state store. Selecting rules report
which slots they excluded (:mod:`~fedjax_lab.algorithms.robust.detection`). Robust rules are
not additive: they run on the ``vmap`` backend without chunking; chunked, sharded and MPI
backends reject them (see :mod:`fedjax_lab.algorithms.robust._base`).
"""

from fedjax_lab.algorithms.robust._base import (
    Aggregator,
    Transform,
    client_contributions,
    with_aggregator,
)
from fedjax_lab.algorithms.robust.bulyan import bulyan
from fedjax_lab.algorithms.robust.centered_clipping import centered_clipping
from fedjax_lab.algorithms.robust.clip_norm import clip_norm
from fedjax_lab.algorithms.robust.foolsgold import with_foolsgold
from fedjax_lab.algorithms.robust.geometric_median import geometric_median
from fedjax_lab.algorithms.robust.krum import krum, multi_krum
from fedjax_lab.algorithms.robust.mean import mean
from fedjax_lab.algorithms.robust.median import median
from fedjax_lab.algorithms.robust.trimmed_mean import trimmed_mean
from fedjax_lab.algorithms.robust.weak_dp import with_weak_dp

__all__ = [
    "Aggregator",
    "Transform",
    "bulyan",
    "centered_clipping",
    "client_contributions",
    "clip_norm",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "trimmed_mean",
    "with_aggregator",
    "with_foolsgold",
    "with_weak_dp",
]
