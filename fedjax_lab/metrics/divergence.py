"""Divergence watch: rounds in which every client's update was rejected as non-finite.

Clients whose local training produced a non-finite update are rejected (weight 0, counted in
the ``rejected`` metric); when all of a round's clients are rejected, nothing moved the model
and the round's means (``train_loss``, ``update_norm``) are NaN. Several such rounds in a row
mean the local training diverges (e.g. a client learning rate far too large): the run is no
longer learning and must not look like a finished one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fedjax_lab.runner import StopRun

POLICIES = ("warn", "stop")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def all_rejected(record: Mapping[str, Any]) -> bool:
    """Whether every client that trained in this round was rejected (``rejected == clients``)."""
    clients = float(record.get("clients", 0.0))
    return clients > 0 and float(record.get("rejected", 0.0)) >= clients


class DivergenceMonitor:
    """A round callback of ``fedjax_lab.runner.run`` that watches for all-rejected rounds.

    The first such round is reported once (``log``); with ``policy="stop"``, ``patience``
    consecutive ones end the run (raises ``StopRun``: ``run`` returns with ``stop_reason``).

    Args:
      policy: ``"warn"`` (report and go on) or ``"stop"``.
      patience: consecutive all-rejected rounds that stop the run (``policy="stop"``).
      log: where the report goes (default: stderr); None for silence (e.g. MPI ranks > 0,
        which must still stop at the same round as rank 0).
      hint: appended to the report (e.g. the CLI flags that control the policy).
    """

    def __init__(self, policy: str = "stop", patience: int = 3,
                 log: Callable[[str], None] | None = _stderr, hint: str = "") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        self.policy = policy
        self.patience = patience
        self.log = log
        self.hint = hint
        self.rounds = 0  # all-rejected rounds seen in total
        self.streak = 0  # ... in a row, up to the latest round
        self.stop_reason: str | None = None
        self._warned = False

    def replay(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Counts the rounds of a resumed run's history (no report, never stops)."""
        for record in history:
            self._count(record)

    def _count(self, record: Mapping[str, Any]) -> bool:
        rejected = all_rejected(record)
        self.rounds += rejected
        self.streak = self.streak + 1 if rejected else 0
        return rejected

    def __call__(self, round_idx: int, record: Mapping[str, Any]) -> None:
        if not self._count(record):
            return
        if not self._warned and self.log is not None:
            self._warned = True
            self.log(
                f"warning: round {round_idx + 1}: all {int(record['clients'])} clients were "
                "rejected (their updates were non-finite: the local training diverges); the "
                "model did not move and the round's train_loss/update_norm are NaN. Lower the "
                f"client learning rate. {self.hint}".rstrip()
            )
        if self.policy == "stop" and self.streak >= self.patience:
            self.stop_reason = (
                f"diverged: every client was rejected (non-finite updates) in {self.streak} "
                f"consecutive rounds, up to round {round_idx + 1}"
            )
            raise StopRun(self.stop_reason)
