"""Run set-up, shared by every ``main_*`` script: what exists before any data or model is built.

* distributed initialisation (``util/dist.py``), device, mixed-precision dtype, seeding;
* the output folder, checked writable before any work, with its stale temporary files removed;
* logging (rank 0 only), TensorBoard;
* the SIGTERM / SIGUSR1 handlers of preemption (``util/preempt.py``), put back when the run ends.

Use it as a context manager (``with start_run(cfg) as run:``): the handlers are restored and the
process group is left however the script ends. Rank 0 takes the decisions that depend on the file
system and shares them (:meth:`Run.on_main`), so ranks never disagree because of a stale
network-file-system view and never wait forever in a collective for a rank 0 that failed.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from util import checkpoint as ckpt_util
from util import dist as dist_util
from util.config import RunConfig
from util.errors import Preempted, UserError
from util.misc import TensorBoard, check_writable, resolve_amp, save_json, seed_everything, setup_logging, to_plain
from util.preempt import StopSignal

_log = logging.getLogger(__name__)


@dataclass
class Run:
    """One training / evaluation job's environment."""

    info: dist_util.DistInfo
    device: torch.device
    out_dir: Path
    amp_dtype: Optional[torch.dtype]
    tb: TensorBoard
    cfg: RunConfig
    stop: StopSignal = field(default_factory=StopSignal)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def on_main(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on rank 0 while the others wait; if it fails, every rank raises (none hangs).

        A :class:`UserError` (a full disk, say) reaches every rank with its message; any other
        exception is re-raised on rank 0 and reported on the others.
        """
        error, failure = None, None
        if self.is_main:
            try:
                fn()
            except UserError as e:
                error = ("user", str(e))
            except Exception as e:
                failure, error = e, ("bug", f"{type(e).__name__}: {e}")
        error = dist_util.broadcast_object(error)  # also the barrier
        if failure is not None:
            raise failure
        if error is not None:
            kind, msg = error
            raise UserError(msg) if kind == "user" else RuntimeError(f"rank 0 failed: {msg}")

    def resolved_args(self, flags: Dict[str, Any], **resolved: Any) -> Dict[str, Any]:
        """What checkpoints store as ``args`` (and ``config.json``): the flags as parsed, the values
        the run resolved (device, processes, learning rate, model sizes, ...), as plain types."""
        info = self.info
        launch = dict(device=str(self.device), rank=info.rank, world_size=info.world_size, gpu=info.local_rank,
                      distributed=info.distributed)
        return to_plain({**flags, **launch, **resolved})

    def save_config(self, args: Dict[str, Any], **extra: Any) -> None:
        """The resolved flags (and e.g. the model config) as ``config.json``."""
        if self.is_main:
            save_json({"args": args, **extra}, self.out_dir / "config.json")

    def preempted(self, where: str) -> None:
        """Every rank: after checkpoint-last.pth is on disk, requeue (rank 0), then raise :class:`Preempted`.

        Args:
            where: the position the checkpoint holds, for the message (``"epoch 3, iteration 120"``).
        """
        msg = (f"{self.stop.signal_name} received: wrote {self.out_dir / ckpt_util.LAST} at {where}; "
               f"rerun the same command to continue")
        _log.info("%s", msg)
        # requeue before any rank exits: `srun --kill-on-bad-exit` may kill rank 0 once one rank has left
        job = dist_util.broadcast_object(self.stop.requeue() if self.is_main else None)
        if job:
            msg += f" (SLURM job {job} requeued)"
        self.finish()
        raise Preempted(msg)

    def finish(self) -> None:
        """Close the logs, leave the process group, put back the signal handlers (idempotent)."""
        self.stop.restore()
        self.tb.close()
        dist_util.cleanup()


def start_run(cfg: RunConfig, warnings: Sequence[str] = ()) -> Run:
    """Initialise everything a script needs before it builds data and models.

    Args:
        cfg: the run flags.
        warnings: what the script's flag checks found legal but suspicious, logged once logging is set up.
    """
    stop = StopSignal(cfg.stop_check_every)
    stop.install()  # first: a signal during start-up is then recorded, not fatal
    try:
        info = dist_util.init_distributed(cfg.device, cfg.local_rank, cfg.dist_on_itp, cfg.dist_url, cfg.dist_port)
        device = info.device
        out_dir = check_writable(cfg.output_dir)
        dist_util.barrier()
        setup_logging(info.rank, str(out_dir) if info.rank == 0 else None)
        if info.rank == 0:
            for message in warnings:
                _log.warning("%s", message)
        if info.distributed:
            _log.info("distributed (%s, %s): %d processes; master %s:%s", info.launcher, torch.distributed.get_backend(),
                      info.world_size, info.master_addr, info.master_port)
        if info.rank == 0:
            ckpt_util.remove_stale_temps(out_dir)
        amp_dtype = resolve_amp(cfg.amp, device)
    except BaseException:
        stop.restore()
        dist_util.cleanup()
        raise
    seed_everything(cfg.seed)  # identical model initialisation on every rank
    tb = TensorBoard(cfg.log_dir or str(out_dir), enabled=info.rank == 0)
    return Run(info, device, out_dir, amp_dtype, tb, cfg, stop)
