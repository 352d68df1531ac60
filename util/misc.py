"""Small shared helpers: logging, seeding, mixed precision, metric logs, CLI plumbing."""
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from util.errors import Preempted, UserError
from util.preempt import EXIT_PREEMPTED

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
    """Run a script's ``main(args)``; a :class:`UserError` prints one message and exits with 2,
    :class:`Preempted` (stopped by a signal, checkpoint written) exits with 3."""
    try:
        main(args)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the message only
            msg = msg.rsplit("UserError: ", 1)[-1].strip()
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


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


def check_writable(path: str, what: str = "--output_dir") -> Path:
    """Create ``path`` and prove it is writable now, before hours of training (clear error if not)."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
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


def save_json(obj: Any, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(to_plain(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
            import wandb
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
