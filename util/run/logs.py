"""What a run prints and records: logging set-up, the TensorBoard / W&B sinks, memory and time formats."""
import logging
import secrets
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from util import import_wandb
from util.checkpoints.files import to_plain, write_text
from util.run.errors import UserError

import torch


def setup_logging(rank: int = 0, output_dir: Optional[str] = None) -> None:
    """Rank 0 logs INFO to stderr (and ``output_dir/train.log``); other ranks only warnings."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and output_dir:
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    fmt = "%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", handlers=handlers, force=True)


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
        write_text(id_file, run_id + "\n")
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
