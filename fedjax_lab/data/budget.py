"""Memory a round's cohort needs, checked before anything is allocated (DESIGN.md "Errors").

A round lays its clients out as ``[C, S, B]`` (client slots x local steps x batch), so a large
``local_epochs``, ``num_steps`` or ``chunk_size`` (which pads ``C``) asks for memory in
proportion: ``local_epochs=10**8`` wants hundreds of GiB of indices. Such a configuration is
refused with a message naming the arguments instead of failing inside numpy (or being killed by
the OS) mid-run.
"""

from __future__ import annotations

import math
import os

import numpy as np

from fedjax_lab.data.federated import FederatedData

# Host bytes per [C, S, B] position besides the examples: the int64 index and its clamped copy,
# the float32 mask and the boolean validity mask of the cohort builder.
_INDEX_BYTES = 8 + 8 + 4 + 1


def round_shape(
    data: FederatedData,
    *,
    batch_size: int,
    local_epochs: int | None,
    num_steps: int | None,
    max_examples_per_client: int | None = None,
    max_local_steps: int | None = None,
) -> tuple[int, int]:
    """``(S, B)``: local steps and batch of the largest client (the round's upper bound),
    after the cohort builder's caps."""
    max_n = int(data.sizes.max())
    if max_examples_per_client is not None:
        max_n = min(max_n, int(max_examples_per_client))
    batch = min(int(batch_size), max_n)
    if num_steps is not None:
        steps = int(num_steps)
    else:
        steps = int(local_epochs) * math.ceil(max_n / int(batch_size))
    if max_local_steps is not None:
        steps = min(steps, int(max_local_steps))
    return steps, batch


def cohort_bytes(
    data: FederatedData,
    *,
    batch_size: int,
    local_epochs: int | None,
    num_steps: int | None,
    cohort_size: int,
    with_examples: bool,
    max_examples_per_client: int | None = None,
    max_local_steps: int | None = None,
) -> int:
    """Upper bound of the host bytes one round's cohort takes.

    Args:
      data: the population (its largest client fixes ``S`` and ``B``).
      batch_size: local batch size.
      local_epochs: local epochs (or None with ``num_steps``).
      num_steps: fixed local steps (or None with ``local_epochs``).
      cohort_size: client slots ``C`` of the round.
      with_examples: the examples themselves are gathered on the host (no device table).
      max_examples_per_client, max_local_steps: the cohort builder's caps.
    """
    steps, batch = round_shape(data, batch_size=batch_size, local_epochs=local_epochs,
                               num_steps=num_steps, max_examples_per_client=max_examples_per_client,
                               max_local_steps=max_local_steps)
    per_position = _INDEX_BYTES
    if with_examples:
        per_position += sum(
            math.prod(shape) * np.dtype(dtype).itemsize
            for shape, dtype in data.feature_spec().values()
        )
    return int(cohort_size) * steps * batch * per_position


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_cohort_memory(
    data: FederatedData,
    *,
    batch_size: int,
    local_epochs: int | None,
    num_steps: int | None,
    cohort_size: int,
    with_examples: bool,
    limit_bytes: int | None = None,
    max_examples_per_client: int | None = None,
    max_local_steps: int | None = None,
) -> int:
    """Raises ValueError when a round's cohort cannot fit in memory; returns its bytes.

    Args:
      data, batch_size, local_epochs, num_steps, cohort_size, with_examples,
        max_examples_per_client, max_local_steps: as in :func:`cohort_bytes`.
      limit_bytes: the budget; default this machine's physical memory (a cohort larger than
        that can never be built).
    """
    caps = {"max_examples_per_client": max_examples_per_client,
            "max_local_steps": max_local_steps}
    need = cohort_bytes(data, batch_size=batch_size, local_epochs=local_epochs,
                        num_steps=num_steps, cohort_size=cohort_size,
                        with_examples=with_examples, **caps)
    limit = physical_memory_bytes() if limit_bytes is None else int(limit_bytes)
    if limit is not None and need > limit:
        steps, batch = round_shape(data, batch_size=batch_size, local_epochs=local_epochs,
                                   num_steps=num_steps, **caps)
        how = (f"num_steps={num_steps}" if num_steps is not None else
               f"local_epochs={local_epochs} x ceil({int(data.sizes.max())} examples of the "
               f"largest client / batch_size={batch_size})")
        raise ValueError(
            f"one round's cohort needs about {need / 2**30:.3g} GiB of host memory "
            f"({cohort_size} client slots x {steps} local steps [{how}] x {batch} examples), "
            f"more than the {limit / 2**30:.3g} GiB available; lower local_epochs / num_steps "
            "(--local-epochs), the client slots (--clients-per-round, --chunk-size pads the "
            "cohort to a multiple of itself) or batch_size"
        )
    return need
