"""One run per output folder: an advisory lock on ``<output_dir>/.deepmim.lock``.

Two runs writing one folder would interleave their ``log.txt`` lines and overwrite each other's
checkpoints, and the second one's start-up would delete the first one's partial checkpoint. So
rank 0 of every run takes this lock at start-up (``util/run/runner.py``) and keeps it until the run
ends; a second run on the same folder stops with one message naming the holder.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when its process ends,
however it ends (``kill -9`` included), and data-loader workers forked from the holder do not
inherit it, so a killed run never blocks its rerun; on NFS and Lustre (mounted with ``flock``)
it holds across hosts. The file also holds the holder's host, PID, start time and command, for
the messages; a clean end empties it. A non-empty file whose lock is free is therefore a lock left
by a run that died: the next run takes it over and says whose it was.

POSIX locks belong to a process, not to a file descriptor: closing *any* descriptor of the lock
file in the holding process releases it. Nothing but this module opens the file; the holder
reads it through its own descriptor, and a second lock of the same folder in one process is
refused from a process-wide table before the file is even opened.
"""
import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from util.checkpoints.files import pid_running
from util.run.errors import UserError

_log = logging.getLogger(__name__)

LOCK_NAME = ".deepmim.lock"
_HELD: Dict[Tuple[int, int], "FolderLock"] = {}  # this process's locks, by the lock file's (device, inode)


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a folder's lock, as written in the lock file."""

    host: str
    pid: int
    started: str
    command: str

    def describe(self) -> str:
        return f"PID {self.pid} on host {self.host} ({self.command}, started {self.started})"

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"),
                   " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])[:300])

    @classmethod
    def parse(cls, text: bytes) -> Optional["Holder"]:
        try:
            d = json.loads(text.decode("utf-8"))
            return cls(str(d["host"]), int(d["pid"]), str(d.get("started", "?")), str(d.get("command", "?")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def _read(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


class FolderLock:
    """A held lock on a folder (:func:`acquire`); :meth:`release` (idempotent) empties and frees it.

    ``previous``: the holder named by a lock file that was left behind (its run died), or None.
    """

    def __init__(self, path: Path, fd: int, key: Tuple[int, int], previous: Optional[Holder]) -> None:
        self.path, self._fd, self._key, self.previous = path, fd, key, previous

    def holder(self) -> Optional[Holder]:
        """Who the lock file names now (read through the held descriptor: opening and closing the
        file again would release the lock)."""
        return Holder.parse(_read(self._fd)) if self._fd is not None else None

    def takeover_message(self) -> Optional[str]:
        """What to say about a lock left by a run that ended without releasing it (None: nothing)."""
        prev = self.previous
        if prev is None:
            return None
        if prev.host == socket.gethostname():
            state = "no longer running" if not pid_running(prev.pid) else "a process that no longer holds it"
            return f"{self.path.parent}: took over the lock left by {prev.describe()}, {state}"
        return (f"{self.path.parent}: took over the lock left by {prev.describe()}. The lock was free, so that run "
                f"has ended, unless this file system does not share locks between hosts; if it is still running "
                f"on {prev.host}, stop one of the two runs")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(self._key, None)
        try:
            os.ftruncate(fd, 0)  # empty: released cleanly (a non-empty free lock is a dead run's)
        except OSError:
            pass
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)


def acquire(folder: Path, what: str = "--output_dir") -> FolderLock:
    """Lock ``folder`` (which must exist) for this process, or raise :class:`UserError` naming the holder.

    A file system that cannot lock (``ENOLCK``: NFS without its lock service, say) gives a warning
    and a lock that protects nothing.
    """
    path = Path(folder) / LOCK_NAME
    try:
        st = os.stat(path)
        mine = _HELD.get((st.st_dev, st.st_ino))
    except FileNotFoundError:
        mine = None
    if mine is not None:
        raise UserError(f"{what} {str(folder)!r} is already in use by a run in this process; give each run its own "
                        f"{what}.")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"{what} {str(folder)!r} is not writable ({e.strerror or e}). Choose another directory.") from None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            holder = Holder.parse(_read(fd))
            os.close(fd)  # holds no lock of this process's: closing it releases nothing
            who = holder.describe() if holder else "another run (it has not written its name yet)"
            raise UserError(f"{what} {str(folder)!r} is in use by {who}. Wait for that run to end, stop it, or "
                            f"choose another {what}.") from None
        _log.warning("cannot lock %s (%s): make sure no other run uses this folder", path, e.strerror or e)
        lock = FolderLock(path, fd, key, None)
        _HELD[key] = lock
        return lock
    previous = Holder.parse(_read(fd)) if os.fstat(fd).st_size else None
    lock = FolderLock(path, fd, key, previous)
    _HELD[key] = lock
    data = json.dumps(dataclasses.asdict(Holder.me())).encode("utf-8")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:  # a full disk: the lock holds all the same, only the name for messages is missing
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
    return lock
