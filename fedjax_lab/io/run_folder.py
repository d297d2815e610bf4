"""A run's output folder (``--out``): one owner at a time, earlier results never lost silently.

A run takes an exclusive OS lock (``fcntl.flock``) on ``<out>/.fedjax_lab.lock`` for as long as
it runs; the OS drops it when the process ends, however it ends (a crash or ``kill -9``
included), so a stale lock never blocks a later run. A second run on the same folder is refused
instead of interleaving its metrics and checkpoints with the first's.

Results of an earlier run (``metrics.jsonl``, ``summary.json``, the plot, checkpoints) are kept
unless the new run continues them (``resume``) or is told to replace them (``overwrite``); even
then nothing is deleted until :meth:`RunFolder.start_fresh`, which the caller invokes once every
check has passed, so a refused run leaves the folder as it found it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Sequence

LOCK_FILE = ".fedjax_lab.lock"
# What a run writes into its folder (and what --overwrite replaces).
RESULT_NAMES = ("metrics.jsonl", "summary.json", "accuracy.png", "checkpoints",
                "checkpoints.damaged", "edge_logs")


class RunFolder:
    """An output folder locked for one run.

    Args:
      path: the folder (created if missing).
      resume: the run continues the results in the folder.
      overwrite: the run replaces the results in the folder (at :meth:`start_fresh`).
      flag: how messages name the folder (e.g. ``"--out"``).
      results: the names that count as a run's results.

    Raises:
      ValueError: the folder cannot be created or written, another run holds it, or it holds
        results and neither ``resume`` nor ``overwrite`` is set. Nothing is changed then.
    """

    def __init__(self, path: str, *, resume: bool = False, overwrite: bool = False,
                 flag: str = "--out", results: Sequence[str] = RESULT_NAMES) -> None:
        if resume and overwrite:
            raise ValueError(f"{flag}: resume and overwrite exclude each other; pick one")
        self.path = path
        self.resume = resume
        self.overwrite = overwrite
        self.results = tuple(results)
        self._fd: int | None = None
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is a file, not a folder; choose a folder path")
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(
                f"{flag} {path!r} cannot be used as the run folder ({e.strerror}); choose a "
                "writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(
                    f"{flag} {path!r}: cannot lock the folder ({e.strerror})"
                ) from None
            raise ValueError(
                f"{flag} {path!r} is in use by another run{holder}; wait for it to finish or "
                "choose another folder"
            ) from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.existing = [n for n in self.results if os.path.exists(os.path.join(path, n))]
        if self.existing and not (resume or overwrite):
            self.close()
            raise ValueError(
                f"{flag} {path!r} already holds the results of a run ({', '.join(self.existing)})"
                "; pass --resume to continue it from its newest checkpoint, --overwrite to "
                "replace it, or choose another folder"
            )

    def start_fresh(self) -> None:
        """Deletes the earlier results (with ``overwrite``; call once every check has passed)."""
        if self.resume or self._fd is None:
            return
        for name in self.results:
            target = os.path.join(self.path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)

    def close(self) -> None:
        """Releases the lock (the lock file stays: removing it would race with a new owner)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_output_file(path: str, flag: str) -> None:
    """Raises ValueError unless a file can be written at ``path`` (checked before a long run).

    The parent folder is created if missing; nothing else is written.
    """
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"{flag} {path!r}: its folder cannot be created ({e.strerror}); choose a writable path"
        ) from None
    try:  # a real write: permission bits do not tell (root, read-only or special mounts)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ValueError(
            f"{flag} {path!r} cannot be written ({e.strerror}); choose a writable path"
        ) from None


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
