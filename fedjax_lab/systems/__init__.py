"""Systems models: client availability (dropouts, stragglers) and simulated round time."""

from fedjax_lab.systems.availability import Availability
from fedjax_lab.systems.time_model import (
    SimulatedClock,
    TimeModel,
    bandwidth_for_ratio,
    cohort_work,
)

__all__ = [
    "Availability",
    "SimulatedClock",
    "TimeModel",
    "bandwidth_for_ratio",
    "cohort_work",
]
