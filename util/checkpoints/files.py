"""Files the project writes: the one atomic writer (temporary file beside the target, fsync,
rename), JSON and JSON-lines, and the disk checks before a write."""
import contextlib
import errno
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, Optional, Tuple

from util.run.errors import UserError

import torch


def check_writable(path: str, what: str = "--output_dir", probe: bool = True) -> Path:
    """Create ``path`` and (``probe``) prove it is writable now, before hours of training (clear error if not)."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        if probe:
            test = p / f".write-test-{os.getpid()}"
            test.write_bytes(b"ok")
            test.unlink()
    except OSError as e:
        raise UserError(f"{what} {path!r} is not writable ({e.strerror or e}). Choose another directory.") from None
    return p


def check_free_space(path: Path, need_bytes: int, what: str = "a checkpoint") -> None:
    """Refuse to start when ``path``'s file system cannot hold ``need_bytes`` more (clear error)."""
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise UserError(
            f"{path} has {free / 2**30:.2f} GiB free but {what} needs about {need_bytes / 2**30:.2f} GiB. "
            f"Free some space or choose another --output_dir."
        )


def pid_running(pid: int) -> bool:
    """Whether a process with this PID exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_space(path: Path) -> str:
    """The free space of ``path``'s file system, for a message (``"1.25 GiB free"``)."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if free >= size:
            return f"{free / size:.2f} {unit} free"
    return f"{free} bytes free"


_TEMP = re.compile(r"^\.(?P<target>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def temp_path(path: Path, pid: Optional[int] = None, host: Optional[str] = None) -> Path:
    """Where :func:`write_atomic` writes ``path`` first: ``.<name>.tmp-<host>-<pid>`` beside it.

    The writer's host and PID in the name let a later start-up tell a dead writer's partial file
    (removed) from a live one's (kept): :func:`parse_temp`.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{host or socket.gethostname()}-{os.getpid() if pid is None else pid}")


def parse_temp(name: str) -> Optional[Tuple[str, Optional[str], int]]:
    """(target name, writer host or None, writer PID) of a :func:`temp_path` name; None for other names.

    Names without a host (``.<name>.tmp-<pid>``, written by earlier versions) give None as host.
    """
    m = _TEMP.match(name)
    return (m["target"], m["host"], int(m["pid"])) if m else None


class _Recorder:
    """The file object a writer sees: remembers the OSError of a failed write.

    ``torch.save`` turns the OSError of its file into ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos``, which names neither the cause nor the file.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


_WRITE_ERRORS = {errno.ENOSPC: "No space left on the device", errno.EDQUOT: "Disk quota exceeded",
                 errno.EFBIG: "File too large for the file system or the process's file-size limit",
                 errno.EIO: "Input/output error", errno.EACCES: "Permission denied", errno.EROFS: "Read-only file system"}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield :func:`temp_path` of ``path`` to be written by any means; on a clean exit fsync it and
    ``os.replace`` it over ``path`` (then fsync the folder, so the rename itself is durable).

    The one way this project writes a file: a crash or ``kill -9`` never leaves a half-written file
    under the real name. On an exception the temporary file is removed and ``path`` is untouched.
    A write that fails with an ``OSError`` (disk full, quota, file-size limit, permission, I/O error)
    becomes one :class:`UserError` naming the path, the cause and the free space.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from None
    except BaseException:
        _remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _write_error(path: Path, cause: OSError) -> UserError:
    reason = _WRITE_ERRORS.get(cause.errno or 0) or cause.strerror or str(cause)
    return UserError(
        f"Cannot write {path}: {reason} ({free_space(path.parent)} on its file system); the partial "
        f"file was removed and any earlier file of that name is intact. Free some space (or choose "
        f"another folder) and rerun the same command: training resumes from its newest complete checkpoint."
    )


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(f)`` (a binary file object) by :func:`atomic_path`.

    ``torch.save`` reports a failed write as a ``RuntimeError`` that names neither the cause nor the
    file; the file object handed to ``write`` remembers the ``OSError`` so that it becomes the same
    clear :class:`UserError` as any other failed write.
    """
    path = Path(path)
    rec: Optional[_Recorder] = None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            rec = _Recorder(f)
            write(rec)  # type: ignore[arg-type]
    except RuntimeError:
        if rec is None or rec.error is None:
            raise  # a RuntimeError that is not a failed write: a bug, keep its traceback
        raise _write_error(path, rec.error) from None


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


def save_json(obj: Any, path: Path, indent: Optional[int] = 2, sort_keys: bool = True) -> None:
    """Write ``obj`` (made plain by :func:`to_plain`) as JSON to ``path`` atomically."""
    write_text(path, json.dumps(to_plain(obj), indent=indent, sort_keys=sort_keys) + "\n")


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def to_plain(obj: Any) -> Any:
    """Turn args-like values into JSON / ``weights_only``-safe plain types."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return str(obj)


def append_jsonl(obj: Dict[str, Any], path: Path) -> None:
    """One JSON line per call (MAE's ``log.txt``); a partial last line (a run killed mid-write) is dropped."""
    line = (json.dumps(to_plain(obj)) + "\n").encode("utf-8")
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write(line)
