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

Integrity: after orbax has written a step, a SHA-256 of every file of the step is written last,
atomically (``fedjax_lab.sha256.json``). A step is trusted only if its files match it exactly
and what it restores is consistent (the round it is stored as, its ``rounds_done``, its history
and the server state's round counter agree; every floating-point value is finite). A resumed run
falls back to the newest trusted step, says so on stderr and moves the damaged ones aside
(``<directory>.damaged/``); with no trusted step left it refuses (ValueError) and changes
nothing. The checksum detects damage (bit rot, truncation, a lost file, a hand edit); it is not
a signature against someone who can also rewrite the checksum file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_lab.backends.base import ClientStateStore
from fedjax_lab.core.types import ServerState
from fedjax_lab.io.writers import _jsonable

FORMAT = 1
# Written into each step after orbax finished it: {"files": {relative path: [bytes, sha256]}}.
CHECKSUM_FILE = "fedjax_lab.sha256.json"
_READ_CHUNK = 1 << 20


class CheckpointCorrupt(ValueError):
    """A checkpoint step that cannot be trusted: damaged files, unreadable, inconsistent or
    non-finite. A resumed run falls back to an older step when it meets one."""
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


def _file_digests(step_dir: str) -> dict[str, list[Any]]:
    """``{path relative to step_dir: [bytes, sha256 hex]}`` of every file but the checksum."""
    out: dict[str, list[Any]] = {}
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir).replace(os.sep, "/")
            if rel in (CHECKSUM_FILE, CHECKSUM_FILE + ".tmp"):
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    digest.update(chunk)
            out[rel] = [os.path.getsize(path), digest.hexdigest()]
    return out


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_step(step_dir: str) -> None:
    """Writes the SHA-256 of every file of a finished step, last and atomically.

    The checksum file is written to a temporary name, flushed to disk and renamed, so a step
    has either no checksum (the save did not finish: the step is not trusted) or a complete one.
    """
    manifest = {"format": 1, "algorithm": "sha256", "files": _file_digests(step_dir)}
    tmp = os.path.join(step_dir, CHECKSUM_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))
    _fsync_dir(step_dir)


def verify_step(step_dir: str) -> str | None:
    """Why the files of a step cannot be trusted, or None when they match their checksum."""
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return (f"it has no {CHECKSUM_FILE} (its save did not finish, or a fedjax_lab without "
                "checksums wrote it)")
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        want = {str(k): [int(v[0]), str(v[1])] for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"its {CHECKSUM_FILE} is unreadable ({type(e).__name__})"
    got = _file_digests(step_dir)
    problems = []
    for label, names in (
        ("changed", sorted(k for k in want if k in got and got[k] != want[k])),
        ("missing", sorted(set(want) - set(got))),
        ("unexpected", sorted(set(got) - set(want))),
    ):
        if names:
            problems.append(f"{len(names)} file(s) {label} (e.g. {names[0]})")
    return "; ".join(problems) + " since it was saved" if problems else None


def _non_finite(leaves: Sequence[np.ndarray], what: str) -> str | None:
    for i, x in enumerate(leaves):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            return f"{what} leaf {i} holds {bad} non-finite value(s)"
    return None


class Checkpointer:
    """Saves and restores run checkpoints in ``directory`` (one orbax step per saved round).

    Every saved step is sealed with a SHA-256 of its files (:func:`seal_step`); :meth:`restore`
    restores only a step whose files match it and whose content is consistent and finite.

    Args:
      directory: checkpoint directory (created on the first save).
      max_to_keep: how many most recent checkpoints to keep.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        self._manager = None  # created on the first save: restoring reads steps directly

    def _saver(self) -> Any:
        if self._manager is None:
            ocp = _orbax()
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep, enable_async_checkpointing=False, create=True
            )
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("arrays", "meta")
            )
        return self._manager

    def rounds(self) -> list[int]:
        """The rounds of the steps in the directory (complete or not, trusted or not), sorted."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(d) for d in os.listdir(self.directory)
                      if d.isdigit() and os.path.isdir(self.step_dir(int(d))))

    def latest_round(self) -> int | None:
        """Rounds done at the newest step in the directory, or None when there is none."""
        rounds = self.rounds()
        return rounds[-1] if rounds else None

    def step_dir(self, rounds_done: int) -> str:
        """The directory of the step saved after ``rounds_done`` rounds."""
        return os.path.join(self.directory, str(int(rounds_done)))

    def verify(self, rounds_done: int) -> str | None:
        """Why that step's files cannot be trusted, or None (see :func:`verify_step`)."""
        return verify_step(self.step_dir(rounds_done))

    def save(
        self,
        rounds_done: int,
        server_state: Any,
        client_store: Any,
        history: Sequence[Mapping[str, Any]],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Saves the state after ``rounds_done`` rounds (blocks until it is on disk, sealed)."""
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
        manager = self._saver()
        manager.save(
            int(rounds_done),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        manager.wait_until_finished()
        seal_step(self.step_dir(rounds_done))

    def restore(self, server_template: Any, client_store: Any,
                rounds_done: int | None = None) -> RunCheckpoint:
        """Restores a checkpoint (default: the newest) into a new server state and the store.

        The store is changed only when the whole step restored and passed every check.

        Args:
          server_template: a server state of this run (e.g. ``algorithm.init(params)``): its
            structure, shapes and dtypes must match the checkpoint's.
          client_store: the run's ``ClientStateStore``; its states are replaced.
          rounds_done: which checkpoint; None for the latest.

        Raises:
          FileNotFoundError: there is no checkpoint.
          CheckpointCorrupt: the step's files do not match their checksum, cannot be read, say
            another round than the one they are stored as, or hold non-finite values.
          ValueError: the checkpoint was written by a run with another model/algorithm.
        """
        step = self.latest_round() if rounds_done is None else int(rounds_done)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if not os.path.isdir(self.step_dir(step)):
            raise FileNotFoundError(f"no checkpoint of round {step} in {self.directory}")
        where = f"the checkpoint of round {step} in {self.directory}"
        reason = self.verify(step)
        if reason is not None:
            raise CheckpointCorrupt(f"{where} is damaged: {reason}")
        ocp = _orbax()
        try:
            reader = ocp.Checkpointer(ocp.JsonCheckpointHandler())
            try:
                meta = reader.restore(os.path.join(self.step_dir(step), "meta"))
            finally:
                reader.close()
        except Exception as e:  # orbax raises many types for unreadable data
            raise CheckpointCorrupt(f"{where} is unreadable: {type(e).__name__}: {e}") from e
        if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
            raise CheckpointCorrupt(
                f"{where} has format {meta.get('format') if isinstance(meta, Mapping) else '?'}"
                f", expected {FORMAT}"
            )
        if meta.get("rounds_done") != step:
            raise CheckpointCorrupt(
                f"{where} says rounds_done={meta.get('rounds_done')!r}, not {step}"
            )
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
        try:
            reader = ocp.StandardCheckpointer()
            try:
                restored = reader.restore(os.path.join(self.step_dir(step), "arrays"), abstract)
            finally:
                reader.close()
        except Exception as e:  # orbax/tensorstore raise many types for unreadable data
            raise CheckpointCorrupt(f"{where} is unreadable: {type(e).__name__}: {e}") from e
        server_saved = restored.get("server", {})
        server_leaves = [np.asarray(server_saved.get(f"s{i}", x))
                         for i, x in enumerate(server_arrays)]
        saved = restored.get("clients", {})
        stacked = [np.asarray(saved.get(f"c{i}", x)) for i, x in enumerate(client_arrays)]
        bad = _non_finite(server_leaves, "server state") or _non_finite(stacked, "client state")
        if bad is not None:
            raise CheckpointCorrupt(f"{where} is not usable: its {bad}")
        states = {}
        if k:
            for row, cid in enumerate(np.asarray(restored["client_ids"]).tolist()):
                states[int(cid)] = jax.tree.unflatten(
                    state_def, [np.array(x[row]) for x in stacked]
                )
        client_store.states = states
        return RunCheckpoint(step, jax.tree.unflatten(treedef, server_leaves),
                             list(meta["history"]), dict(meta["config"]))

    def close(self) -> None:
        if self._manager is not None:
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
# every backend/plan computes the same rounds, --rounds may be extended, and the divergence
# policy only decides when to stop).
OPERATIONAL_FIELDS = (
    "rounds", "resume", "checkpoint_every", "progress", "out", "backend", "plan", "chunk_size",
    "eval_every", "data_dir", "edge_clients", "edge_round_timeout", "overwrite", "on_divergence",
    "divergence_patience", "mpi_round_timeout",
    # How rounds are laid out (packing) changes no number (to float rounding), only speed.
    "packing", "slots", "segment_steps",
)


class RunCheckpointing:
    """Experiment glue: ``--checkpoint-every N`` and ``--resume`` around ``runner.run``.

    Use :meth:`restore` before the run (it fills the client store and returns the server state
    and first round), :meth:`record` as the FIRST round callback (keeps the full history and
    continues cumulative fields) and :meth:`save_state` as a state callback.

    Construction already checks what needs no model (collective with several processes, so
    every process raises the same ValueError): a fresh run refuses a directory that holds
    checkpoints unless ``overwrite``; a resumed one verifies the checksums of every step and
    refuses when none is intact. :meth:`restore` then restores the newest step that is also
    consistent (its round, history and server round counter agree; values finite), falling
    back to older ones with a note on stderr; the damaged steps are moved to
    ``<directory>.damaged/`` once the run resumes.

    Args:
      directory: checkpoint directory (``<out>/checkpoints``).
      every: checkpoint after every ``every`` rounds and after the last round; 0 disables.
      resume: continue from the newest intact checkpoint if there is one.
      config: the run's configuration (saved; a resumed run must match it outside ``ignore``).
      total_rounds: the run's last round (always checkpointed when ``every > 0``).
      ignore: config fields that may differ in a resumed run.
      process: the process group of a multi-process backend (``MpiBackend``: ``is_primary``
        and a collective ``broadcast(obj)``); None for one process. Only the primary touches
        ``directory``; the client states are gathered to it for a save
        (``ClientStateStore.snapshot``) and sent back to their owners on restore
        (``ClientStateStore.load``), so every process must construct this and call
        :meth:`restore` and :meth:`save_state`.
      overwrite: a fresh run may replace the checkpoints in ``directory`` (deleted just before
        its first save, so a run that fails to start leaves them).
    """

    def __init__(self, directory: str, *, every: int, resume: bool, config: Mapping[str, Any],
                 total_rounds: int, ignore: Sequence[str] = OPERATIONAL_FIELDS,
                 process: Any = None, overwrite: bool = False) -> None:
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
        self._primary = process is None or bool(process.is_primary)
        self._broadcast = process.broadcast if process is not None else (lambda obj: obj)
        self._ckpt = None
        self._clear_before_save = False
        self._candidates: list[int] = []  # intact steps, newest first (primary, resume)
        self._damaged: dict[int, str] = {}
        error = None
        if self._primary and (every > 0 or resume):
            self._ckpt = Checkpointer(directory)
            error = self._check_directory(overwrite)
        error = self._broadcast(error)  # collective: every process raises the same error
        if error is not None:
            self.close()
            raise ValueError(error)

    def _check_directory(self, overwrite: bool) -> str | None:
        rounds = self._ckpt.rounds()
        if not self.resume:
            if self.every > 0 and rounds and not overwrite:
                return (
                    f"{self.directory} holds the checkpoints of an earlier run (rounds "
                    f"{rounds}); continue it with --resume, replace it with --overwrite, or "
                    "use another --out"
                )
            self._clear_before_save = bool(rounds)
            return None
        for k in reversed(rounds):
            reason = self._ckpt.verify(k)
            if reason is None:
                self._candidates.append(k)
            else:
                self._damaged[k] = reason
        if rounds and not self._candidates:
            return self._none_intact()
        return None

    def _none_intact(self) -> str:
        reasons = "; ".join(f"round {k}: {r}" for k, r in sorted(self._damaged.items()))
        return (
            f"--resume: no intact checkpoint in {self.directory} ({reasons}). Nothing was "
            "changed; start over with --overwrite (or use another --out)"
        )

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
        """Restores the newest trusted checkpoint into ``full`` (None when there is none)."""
        if not self._candidates and not self._damaged:
            print(f"--resume: no checkpoint in {self.directory}; starting from round 0",
                  file=sys.stderr)
            return None
        for k, reason in sorted(self._damaged.items(), reverse=True):
            print(f"--resume: the checkpoint of round {k} in {self.directory} is damaged: "
                  f"{reason}", file=sys.stderr)
        for k in self._candidates:
            try:
                ck = self._ckpt.restore(server_template, full, rounds_done=k)
                check_consistent(ck, k)
            except CheckpointCorrupt as e:
                self._damaged[k] = str(e)
                print(f"--resume: {e}; trying an older checkpoint", file=sys.stderr)
                continue
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
            if self._damaged:
                self._set_aside_damaged(k)
            return ck.rounds_done, ck.server_state, ck.history
        raise ValueError(self._none_intact())

    def _set_aside_damaged(self, resumed: int) -> None:
        """Moves the damaged steps out of the way of the resumed run's saves (kept, not lost)."""
        aside = os.path.abspath(self.directory).rstrip(os.sep) + ".damaged"
        os.makedirs(aside, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for k in sorted(self._damaged):
            target = os.path.join(aside, f"round{k}-{stamp}")
            os.replace(self._ckpt.step_dir(k), target)
            moved.append(k)
        print(
            f"--resume: resuming from the checkpoint of round {resumed}, the newest intact one; "
            f"the damaged checkpoints of rounds {moved} were moved to {aside}",
            file=sys.stderr,
        )
        self._damaged = {}

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
                if self._clear_before_save:  # --overwrite: the old run's steps go now
                    shutil.rmtree(self.directory, ignore_errors=True)
                    self._clear_before_save = False
                self._ckpt.save(done, server_state, full, self.history, self.config)

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()


def check_consistent(ck: RunCheckpoint, rounds_done: int) -> None:
    """Raises CheckpointCorrupt unless a restored run checkpoint agrees with itself.

    Its metrics history must hold rounds ``1..rounds_done`` and, for a ``ServerState``, the
    round counter (every fedjax_lab algorithm counts rounds in ``server_update``) must equal
    ``rounds_done``: a checkpoint that disagrees would repeat or skip rounds when resumed.
    """
    rounds = [h.get("round") for h in ck.history if isinstance(h, Mapping)]
    if rounds != list(range(1, rounds_done + 1)):
        shown = rounds if len(rounds) <= 8 else [*rounds[:3], "...", *rounds[-3:]]
        raise CheckpointCorrupt(
            f"the checkpoint of round {rounds_done} is inconsistent: its metrics history holds "
            f"rounds {shown} instead of 1..{rounds_done}"
        )
    state = ck.server_state
    if isinstance(state, ServerState) and np.ndim(state.round) == 0:
        counted = int(np.asarray(state.round))
        if counted != rounds_done:
            raise CheckpointCorrupt(
                f"the checkpoint of round {rounds_done} is inconsistent: its server state has "
                f"counted {counted} rounds"
            )
