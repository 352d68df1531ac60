"""Small shared helpers: logging, seeding, mixed precision, metric logs, CLI plumbing."""
import contextlib
import errno
import json
import logging
import os
import random
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

from util import import_wandb
from util.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError, say

import numpy as np
import torch

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# logging


def setup_logging(rank: int = 0, output_dir: Optional[str] = None) -> None:
    """Rank 0 logs INFO to stderr (and ``output_dir/train.log``); other ranks only warnings."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and output_dir:
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    fmt = "%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", handlers=handlers, force=True)


def run_cli(main: Callable[[Any], Any], args: Any) -> None:
    """Run a script's ``main(args)``; a :class:`UserError` prints one message and exits with
    :data:`EXIT_USER_ERROR`, :class:`Preempted` (stopped by a signal, checkpoint written) exits with
    :data:`EXIT_PREEMPTED`, or with 0 when the launch script was told so through
    ``DEEPMIM_PREEMPTED_FILE`` (``util/preempt.py``)."""
    try:
        main(args)
    except Preempted as e:
        say(f"stopped: {e}")
        raise SystemExit(0 if e.reported else EXIT_PREEMPTED) from None
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the message only
            msg = msg.rsplit("UserError: ", 1)[-1].strip()
        say(f"error: {msg}")
        raise SystemExit(EXIT_USER_ERROR) from None


# --------------------------------------------------------------------------------------------
# randomness: every random stream is a pure function of (seed, position), so a resumed run
# continues with exactly the numbers an uninterrupted run would have drawn


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (e.g. base seed, epoch, sample index)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def seed_host(seed: int) -> None:
    """Seed torch's CPU generator, numpy and python's ``random``: the same CPU numbers as
    :func:`seed_everything`, for per-sample augmentation in loader workers.

    ``torch.manual_seed`` also seeds CUDA, XPU and MTIA; where those are not initialised (a CPU
    machine, or a forked loader worker) each of them records ``traceback.format_stack()`` to replay
    later, about 0.9 ms per call, a sixth of the reference pipeline's time per ImageNet image.
    """
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------------------------
# mixed precision

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """``--amp``: bf16 / fp16 / none; by default bf16 on GPUs that support it, else fp16; none on CPU."""
    if amp in (None, "", "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp {amp!r}: choose one of bf16, fp16, none.")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or --amp none.")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """Loss scaling only for fp16 (bf16 and fp32 need none; the disabled scaler is a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# --------------------------------------------------------------------------------------------
# output files


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


# --------------------------------------------------------------------------------------------
# atomic writes: a temporary file beside the target, fsync, rename


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


def save_json(obj: Any, path: Path, indent: int = 2, sort_keys: bool = True) -> None:
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


class TensorBoard:
    """A SummaryWriter on rank 0, nothing elsewhere (every call is then a no-op); other loggers
    (:class:`WandB`) attached with :meth:`attach` receive the same scalars and figures."""

    def __init__(self, log_dir: Optional[str], enabled: bool) -> None:
        self.writer = None
        self.sinks: List[Any] = []
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def attach(self, sink: Any) -> None:
        """Send every later scalar and figure also to ``sink`` (``scalars``, ``figure``, ``close``)."""
        self.sinks.append(sink)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        for sink in self.sinks:
            sink.scalars(values, step)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        """A matplotlib figure as an image (``add_figure``); the figure is closed afterwards."""
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step, close=False)
        for sink in self.sinks:
            sink.figure(tag, fig, step)
        import matplotlib.pyplot as plt

        plt.close(fig)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class WandB:
    """Weights & Biases logging (``--wandb``): the TensorBoard scalars and figures, on rank 0.

    wandb is an optional dependency, imported only here. The run id is kept in
    ``output_dir/wandb-run-id``, so a resumed training continues the same W&B run. Offline
    (``WANDB_MODE=offline``) the run is written under ``output_dir/wandb`` for ``wandb sync``.

    Args:
        project / name: the W&B project and run name (None: W&B's generated name).
        config: the run's resolved flags.
        out_dir: the output folder.
    """

    def __init__(self, project: str, name: Optional[str], config: Dict[str, Any], out_dir: Path) -> None:
        try:
            wandb = import_wandb()
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install wandb (or run without --wandb).") from None
        self.wandb = wandb
        id_file = Path(out_dir) / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # W&B's 8 characters
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=to_plain(config),
                              dir=str(out_dir))

    def scalars(self, values: Dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self.run.log({tag: self.wandb.Image(fig)}, step=step)

    def close(self) -> None:
        self.run.finish()


def peak_memory(device: torch.device) -> Tuple[float, str]:
    """(GiB, what): the most CUDA memory allocated on ``device`` so far, or on other devices the
    process's peak resident set size. Reads counters only (no device synchronisation)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "max mem"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "max RSS"  # KiB on Linux


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
