"""DivergenceMonitor: all-rejected rounds are reported once and stop the run after `patience`."""

import pytest

from fedjax_lab.metrics.divergence import DivergenceMonitor, all_rejected
from fedjax_lab.runner import StopRun

OK = {"clients": 3.0, "rejected": 1.0}
BAD = {"clients": 3.0, "rejected": 3.0}
EMPTY = {"clients": 0.0, "rejected": 0.0}  # every sampled client dropped out: not divergence


def test_all_rejected_needs_clients_and_all_of_them_rejected():
    assert all_rejected(BAD) and not all_rejected(OK) and not all_rejected(EMPTY)


def test_stop_after_patience_consecutive_rounds_and_report_once():
    logged = []
    monitor = DivergenceMonitor("stop", patience=2, log=logged.append, hint="(hint)")
    monitor(0, BAD)
    monitor(1, OK)  # the streak restarts
    monitor(2, BAD)
    with pytest.raises(StopRun, match="in 2 consecutive rounds, up to round 4"):
        monitor(3, BAD)
    assert monitor.rounds == 3 and monitor.streak == 2
    assert len(logged) == 1 and logged[0].startswith("warning: round 1: all 3 clients")
    assert logged[0].endswith("(hint)")


def test_warn_never_stops_and_replay_continues_a_resumed_count():
    monitor = DivergenceMonitor("warn", patience=1, log=None)
    for r in range(5):
        monitor(r, BAD)
    assert monitor.rounds == 5 and monitor.stop_reason is None
    resumed = DivergenceMonitor("stop", patience=3, log=None)
    resumed.replay([OK, BAD, BAD])  # the checkpointed history: no report, no stop
    with pytest.raises(StopRun):
        resumed(3, BAD)


@pytest.mark.parametrize(("kwargs", "match"), [({"policy": "ignore"}, "policy must be one of"),
                                               ({"patience": 0}, "patience must be a positive")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DivergenceMonitor(**kwargs)
