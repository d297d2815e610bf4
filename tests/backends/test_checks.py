"""require_additive: the guard partial-sum backends call before running an algorithm."""

import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import clip_norm, mean, median, with_aggregator
from fedjax_lab.backends._checks import require_additive
from tests.helpers import LinearModel

MODEL = LinearModel(dim=3, classes=2)


def test_additive_algorithms_pass():
    base = fedavg(MODEL, optax.sgd(0.1), batch_size=4)
    require_additive(base, "sharded")
    require_additive(with_aggregator(base, mean(), transforms=(clip_norm(1.0),)), "mpi")


def test_robust_algorithm_is_rejected_with_the_backend_name_and_fix():
    robust = with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=4), median())
    with pytest.raises(ValueError, match=r"the mpi backend adds partial aggregates.*"
                                         r"fedavg\+median.*without chunk_size"):
        require_additive(robust, "mpi")


def test_non_algorithm_is_a_type_error():
    with pytest.raises(TypeError, match="algorithm must be a fedjax_lab Algorithm"):
        require_additive(object(), "sharded")
