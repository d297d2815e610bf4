"""Checkpoint/resume of a federated run with orbax (every backend).

A checkpoint after round ``k`` holds everything the rest of the run depends on:

* the server state (parameters, server optimizer state, round counter, extras);
* the client states of the ``ClientStateStore`` (error-feedback residuals, SCAFFOLD controls),
  as client ids plus the stacked states of the clients that have participated;
* the round counter ``k`` and the metrics history of rounds ``1..k`` (metrics.jsonl is rewritten
  from it on resume, so rounds the killed run logged after its last checkpoint are dropped);
* the run's configuration, to refuse resuming a different experiment.

There is no RNG state to save: every random draw of a run is a pure function of
``(seed, round)`` (client sampling ``host_rng(seed, SAMPLING, r)``, shuffling
``host_rng(seed, SHUFFLE, r, client)``, device keys ``fold_in(key(seed), r)``), so the round
counter is the RNG position. Resuming from round ``k`` therefore gives bit-identical results to an
uninterrupted run on the same backend.

Each save is synchronous and atomic (orbax writes a temporary directory and renames it once
complete), so a process killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_lab.io.writers import _jsonable
from fedjax_lab.runner import ClientStateStore

FORMAT = 1
# Runner record fields that accumulate within one run() call; a resumed run continues them.
CUMULATIVE_FIELDS = ("cum_uplink_bits", "sim_time", "sim_comm_time", "sim_comp_time")


class RunCheckpoint(NamedTuple):
    """What :meth:`Checkpointer.restore` returns (client states go into the given store)."""

    rounds_done: int
    server_state: Any
    history: list[dict[str, Any]]
    config: dict[str, Any]


def _specs(leaves: Sequence[Any]) -> list[list[Any]]:
    return [[list(np.shape(x)), np.asarray(x).dtype.name] for x in leaves]


def _split_empty(prefix: str, leaves: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    # orbax refuses zero-size arrays; they carry no data and are rebuilt from their spec.
    return {f"{prefix}{i}": x for i, x in enumerate(leaves) if x.size > 0}


def _orbax() -> Any:
    # Imported on first use: runs without checkpointing (and edge client processes) skip it.
    import orbax.checkpoint as ocp

    return ocp


class Checkpointer:
    """Saves and restores run checkpoints in ``directory`` (one orbax step per saved round).

    Args:
      directory: checkpoint directory (created if missing).
      max_to_keep: how many most recent checkpoints to keep.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        ocp = _orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("arrays", "meta")
        )

    def latest_round(self) -> int | None:
        """Rounds done at the newest complete checkpoint, or None when there is none."""
        return self._manager.latest_step()

    def save(
        self,
        rounds_done: int,
        server_state: Any,
        client_store: Any,
        history: Sequence[Mapping[str, Any]],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Saves the state after ``rounds_done`` rounds (blocks until it is on disk)."""
        if rounds_done < 1:
            raise ValueError(f"rounds_done must be >= 1, got {rounds_done}")
        server_leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(server_state))]
        ids = sorted(client_store.states) if not client_store.stateless else []
        client_leaves: list[np.ndarray] = []
        if ids:
            trees = [client_store.states[c] for c in ids]
            client_leaves = [np.stack([np.asarray(x) for x in xs])
                             for xs in zip(*(jax.tree.leaves(t) for t in trees), strict=True)]
        arrays = {"server": _split_empty("s", server_leaves),
                  "clients": _split_empty("c", client_leaves)}
        if ids:
            arrays["client_ids"] = np.asarray(ids, np.int32)
        arrays = {k: v for k, v in arrays.items() if not isinstance(v, dict) or v}
        meta = {
            "format": FORMAT,
            "rounds_done": int(rounds_done),
            "server_leaves": _specs(server_leaves),
            "client_leaves": _specs(client_leaves),
            "num_clients": len(ids),
            "history": _jsonable([dict(h) for h in history]),
            "config": _jsonable(dict(config or {})),
        }
        ocp = _orbax()
        self._manager.save(
            int(rounds_done),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, server_template: Any, client_store: Any,
                rounds_done: int | None = None) -> RunCheckpoint:
        """Restores a checkpoint (default: the newest) into a new server state and the store.

        Args:
          server_template: a server state of this run (e.g. ``algorithm.init(params)``): its
            structure, shapes and dtypes must match the checkpoint's.
          client_store: the run's ``ClientStateStore``; its states are replaced.
          rounds_done: which checkpoint; None for the latest.

        Raises:
          FileNotFoundError: there is no checkpoint.
          ValueError: the checkpoint was written by a run with another model/algorithm.
        """
        step = self.latest_round() if rounds_done is None else rounds_done
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        ocp = _orbax()
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        if meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {meta.get('format')} != {FORMAT}")
        leaves, treedef = jax.tree.flatten(jax.device_get(server_template))
        want = _specs([np.asarray(x) for x in leaves])
        if meta["server_leaves"] != want:
            raise ValueError(
                "the checkpoint's server state does not match this run (different model, "
                f"algorithm or optimizer): saved {meta['server_leaves']}, expected {want}"
            )
        state_leaves, state_def = jax.tree.flatten(client_store.initial)
        k = int(meta["num_clients"])
        want_clients = [[[k, *np.shape(x)], np.asarray(x).dtype.name] for x in state_leaves]
        if k and meta["client_leaves"] != want_clients:
            raise ValueError(
                "the checkpoint's client states do not match this run's algorithm/compressor: "
                f"saved {meta['client_leaves']}, expected {want_clients}"
            )
        server_arrays = [np.zeros(s, d) for s, d in meta["server_leaves"]]
        client_arrays = [np.zeros(s, d) for s, d in meta["client_leaves"]] if k else []
        abstract = {"server": _split_empty("s", server_arrays),
                    "clients": _split_empty("c", client_arrays)}
        if k:
            abstract["client_ids"] = np.zeros(k, np.int32)
        abstract = {key: v for key, v in abstract.items() if not isinstance(v, dict) or v}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))
        )["arrays"]
        server_saved = restored.get("server", {})
        server_leaves = [np.asarray(server_saved.get(f"s{i}", x))
                         for i, x in enumerate(server_arrays)]
        server_state = jax.tree.unflatten(treedef, server_leaves)
        client_store.states = {}
        if k:
            saved = restored.get("clients", {})
            stacked = [np.asarray(saved.get(f"c{i}", x)) for i, x in enumerate(client_arrays)]
            for row, cid in enumerate(np.asarray(restored["client_ids"]).tolist()):
                client_store.states[int(cid)] = jax.tree.unflatten(
                    state_def, [np.array(x[row]) for x in stacked]
                )
        return RunCheckpoint(int(meta["rounds_done"]), server_state, list(meta["history"]),
                             dict(meta["config"]))

    def close(self) -> None:
        self._manager.close()


def continue_cumulative(record: dict[str, Any], previous: Mapping[str, Any]) -> None:
    """Offsets a resumed run's per-call cumulative fields by the checkpointed totals."""
    for name in CUMULATIVE_FIELDS:
        if name in record and name in previous:
            record[name] = float(record[name]) + float(previous[name])


def config_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any],
                    ignore: Sequence[str]) -> list[str]:
    """Config fields (outside ``ignore``) whose values differ between two runs."""
    keys = (set(saved) | set(current)) - set(ignore)
    return sorted(k for k in keys if _jsonable(saved.get(k)) != _jsonable(current.get(k)))


# Config fields that may change between a run and its resumption (they do not change results:
# every backend/plan computes the same rounds, and --rounds may be extended).
OPERATIONAL_FIELDS = (
    "rounds", "resume", "checkpoint_every", "progress", "out", "backend", "plan", "chunk_size",
    "eval_every", "data_dir", "edge_clients", "edge_round_timeout",
)


class RunCheckpointing:
    """Experiment glue: ``--checkpoint-every N`` and ``--resume`` around ``runner.run``.

    Use :meth:`restore` before the run (it fills the client store and returns the server state
    and first round), :meth:`record` as the FIRST round callback (keeps the full history and
    continues cumulative fields) and :meth:`save_state` as a state callback.

    Args:
      directory: checkpoint directory (``<out>/checkpoints``). A fresh (non-resumed) run with
        checkpointing enabled deletes an older run's checkpoints there.
      every: checkpoint after every ``every`` rounds and after the last round; 0 disables.
      resume: continue from the newest checkpoint if there is one.
      config: the run's configuration (saved; a resumed run must match it outside ``ignore``).
      total_rounds: the run's last round (always checkpointed when ``every > 0``).
      process: the process group of a multi-process backend (``MpiBackend``: ``is_primary``
        and a collective ``broadcast(obj)``); None for one process. Only the primary touches
        ``directory``; the client states are gathered to it for a save
        (``ClientStateStore.snapshot``) and sent back to their owners on restore
        (``ClientStateStore.load``), so every process must call :meth:`restore` and
        :meth:`save_state`.
    """

    def __init__(self, directory: str, *, every: int, resume: bool, config: Mapping[str, Any],
                 total_rounds: int, ignore: Sequence[str] = OPERATIONAL_FIELDS,
                 process: Any = None) -> None:
        if every < 0:
            raise ValueError(f"checkpoint every must be >= 0 rounds, got {every}")
        self.directory = directory
        self.every = every
        self.resume = resume
        self.config = dict(config)
        self.total_rounds = total_rounds
        self.ignore = tuple(ignore)
        self.history: list[dict[str, Any]] = []
        self._previous: dict[str, Any] | None = None
        self._primary = bool(getattr(process, "is_primary", True))
        self._broadcast = getattr(process, "broadcast", lambda obj: obj)
        self._ckpt = None
        if self._primary:
            if every > 0 and not resume and os.path.isdir(directory):
                shutil.rmtree(directory)
            if every > 0 or resume:
                self._ckpt = Checkpointer(directory)

    def restore(self, server_template: Any, client_store: Any) -> tuple[Any, int]:
        """``(server_state or None, start_round)``; fills ``client_store`` when resuming.

        With several processes the primary reads the checkpoint and every process gets the same
        answer, including the same ValueError for a checkpoint that does not fit the run.
        """
        if not self.resume:
            return None, 0
        full = None
        outcome: tuple[str, Any]
        if self._primary:
            full = ClientStateStore(client_store.initial)
            try:
                outcome = ("ok", self._read(server_template, full))
            except ValueError as e:
                outcome = ("error", str(e))
        else:
            outcome = ("pending", None)
        kind, value = self._broadcast(outcome)
        if kind == "error":
            raise ValueError(value)
        if value is None:  # no checkpoint yet: a fresh run
            return None, 0
        client_store.load(full)
        rounds_done, server_state, history = value
        self.history = list(history)
        self._previous = dict(history[-1]) if history else None
        return server_state, rounds_done

    def _read(self, server_template: Any, full: Any) -> tuple[int, Any, list] | None:
        """Reads and checks the newest checkpoint into ``full`` (None when there is none)."""
        if self._ckpt.latest_round() is None:
            print(f"--resume: no checkpoint in {self.directory}; starting from round 0",
                  file=sys.stderr)
            return None
        ck = self._ckpt.restore(server_template, full)
        diff = config_mismatch(ck.config, self.config, self.ignore)
        if diff:
            raise ValueError(
                f"--resume: the checkpoint in {self.directory} was written with different "
                f"settings for {diff}; rerun with the same flags or use a new --out"
            )
        if ck.rounds_done > self.total_rounds:
            raise ValueError(
                f"--rounds={self.total_rounds} is below the {ck.rounds_done} rounds already "
                "done in the checkpoint; pass --rounds >= that"
            )
        return ck.rounds_done, ck.server_state, ck.history

    def record(self, round_idx: int, record: dict[str, Any]) -> None:
        del round_idx
        if self._previous is not None:
            continue_cumulative(record, self._previous)
        self.history.append(record)

    def save_state(self, round_idx: int, server_state: Any, client_store: Any) -> None:
        done = round_idx + 1
        if self.every > 0 and (done % self.every == 0 or done == self.total_rounds):
            full = client_store.snapshot()  # collective with several processes
            if self._primary:
                self._ckpt.save(done, server_state, full, self.history, self.config)

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
