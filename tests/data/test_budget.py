"""The cohort memory estimate bounds what the cohort builder allocates, and refuses early."""

import numpy as np
import pytest

from fedjax_lab.data.budget import check_cohort_memory, cohort_bytes
from fedjax_lab.data.cohort import CohortBuilder
from tests.helpers import make_population


@pytest.mark.parametrize("device_table", [True, False], ids=["indices", "examples"])
def test_estimate_bounds_the_built_cohort(device_table):
    data = make_population([7, 3, 12, 5], seed=0)
    kw = dict(batch_size=4, local_epochs=3, num_steps=None)
    builder = CohortBuilder(data, batch_size=4, local_epochs=3, cohort_size=3, seed=0,
                            device_table=device_table)
    cohort = builder.build(0, [0, 2, 3])
    built = sum(np.asarray(a).nbytes for a in (cohort.mask, cohort.weight, cohort.client_ids))
    built += np.asarray(cohort.index).nbytes if device_table else sum(
        a.nbytes for a in cohort.arrays.values())
    estimate = cohort_bytes(data, cohort_size=3, with_examples=not device_table, **kw)
    assert built <= estimate
    # [C, S, B] = [3, 3 * ceil(12 / 4), 4]: the estimate follows the largest client.
    assert estimate == 3 * 9 * 4 * (21 + (0 if device_table else 5 * 4 + 4))


def test_refuses_a_cohort_over_the_limit_naming_the_arguments():
    data = make_population([7, 3, 12, 5], seed=0)
    kw = dict(batch_size=4, local_epochs=10**8, num_steps=None, cohort_size=3,
              with_examples=False)
    with pytest.raises(ValueError, match=r"3 client slots x 300000000 local steps "
                                         r"\[local_epochs=100000000 x ceil\(12 examples"):
        check_cohort_memory(data, **kw)  # the machine's physical memory
    assert check_cohort_memory(data, **{**kw, "local_epochs": 1}, limit_bytes=10**6) > 0
