"""Run set-up, shared by every ``main_*`` script: what exists before any data or model is built.

* distributed initialisation (``util/run/dist.py``), device, mixed-precision dtype, seeding;
* the output folder: locked for this run (``util/run/lock.py``: one run per folder; rank 0 holds the
  lock until the run ends), the partial checkpoints of dead writers removed, then checked
  writable, in that order, so that a disk filled by a killed run's partial file gets its space
  back before anything tests it;
* logging (rank 0 only), TensorBoard;
* the SIGTERM / SIGUSR1 handlers of preemption (``util/run/preempt.py``), put back when the run ends.

Use it as a context manager (``with start_run(cfg) as run:``): the handlers are restored and the
process group is left however the script ends. Rank 0 takes the decisions that depend on the file
system and shares them (:meth:`Run.on_main`), so ranks never disagree because of a stale
network-file-system view and never wait forever in a collective for a rank 0 that failed.
"""
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from util.checkpoints import reader as ckpt_util
from util.checkpoints.files import check_writable, save_json, to_plain
from util.config.typed import RunConfig
from util.run import dist as dist_util
from util.run import lock as lock_util
from util.run import provenance
from util.run.amp import resolve_amp
from util.run.errors import Preempted, UserError
from util.run.logs import TensorBoard, setup_logging
from util.run.preempt import StopSignal, all_ranks, write_preempted_marker
from util.run.seed import seed_everything

import torch

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
    lock: Optional[lock_util.FolderLock] = None  # rank 0's lock on out_dir

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
        on_rank0(self.is_main, fn)

    def resolved_args(self, flags: Dict[str, Any], **resolved: Any) -> Dict[str, Any]:
        """What checkpoints store as ``args`` (and ``config.json``): the flags as parsed, the values
        the run resolved (device, processes, learning rate, model sizes, ...), as plain types."""
        info = self.info
        launch = dict(device=str(self.device), rank=info.rank, world_size=info.world_size, gpu=info.local_rank,
                      distributed=info.distributed)
        return to_plain({**flags, **launch, **resolved})

    def save_config(self, args: Dict[str, Any], **extra: Any) -> None:
        """The resolved flags (and e.g. the model config) and the run's provenance (code, stack,
        hardware, hosts, command line, numerics settings: :mod:`util.run.provenance`) as
        ``config.json``; the provenance printed once as a short block. Every rank calls it (each
        reports its host)."""
        hosts = dist_util.all_gather_object(socket.gethostname())
        if self.is_main:
            record = provenance.collect(self.device, self.info.world_size, hosts)
            _log.info("run provenance:\n  %s", provenance.summary(record).replace("\n", "\n  "))
            save_json({"args": args, **extra, "provenance": record}, self.out_dir / "config.json")

    def preempted(self, where: str) -> None:
        """Every rank: after checkpoint-last.pth is on disk, requeue (rank 0), then raise :class:`Preempted`.

        Args:
            where: the position the checkpoint holds, for the message (``"epoch 3, iteration 120"``).
        """
        last = self.out_dir / ckpt_util.LAST
        msg = f"{self.stop.signal_name} received: wrote {last} at {where}; rerun the same command to continue"
        _log.info("%s", msg)
        # requeue and mark before any rank exits: a launcher (srun --kill-on-bad-exit, torchrun) may
        # kill the other ranks as soon as one has left
        job = dist_util.broadcast_object(self.stop.requeue() if self.is_main else None)
        if job:
            msg += f" (SLURM job {job} requeued)"
        # every rank marks: the marker is per node when each node's launch script has its own
        reported = all_ranks(write_preempted_marker(self.stop.signal_name, job, last, msg))
        self.finish()
        raise Preempted(msg, reported=reported)

    def finish(self) -> None:
        """Close the logs, leave the process group, put back the signal handlers, release the
        output folder (idempotent)."""
        self.stop.restore()
        self.tb.close()
        dist_util.cleanup()
        if self.lock is not None:
            self.lock.release()


def on_rank0(is_main: bool, fn: Callable[[], None]) -> None:
    """:meth:`Run.on_main` for code that runs before the :class:`Run` exists."""
    error, failure = None, None
    if is_main:
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


@dataclass
class Claim:
    """Rank 0's hold on the output folder (:func:`claim_output_dir`)."""

    out: Path
    lock: lock_util.FolderLock
    removed: List[str]  # dead writers' partial checkpoints removed
    kept: List[str]  # partial checkpoints kept, with the reason

    def report(self) -> None:
        """Log what start-up found in the folder (once logging is set up)."""
        message = self.lock.takeover_message()
        if message:
            _log.warning("%s", message)
        if self.removed:
            _log.info("removed %d partial checkpoint file(s) left by a killed run: %s", len(self.removed),
                      ", ".join(self.removed))
        for kept in self.kept:
            _log.info("kept the partial checkpoint file %s", kept)


def claim_output_dir(output_dir: str) -> Claim:
    """Rank 0's start-up in the output folder: create it, lock it, remove dead writers' partial
    checkpoints, then prove it writable.

    The order matters: the lock first (a second run must not delete the first one's partial
    file), the clean-up before the write test (a full disk gets the dead file's space back first).
    """
    out = check_writable(output_dir, probe=False)  # created
    lock = lock_util.acquire(out)
    try:
        removed, kept = ckpt_util.remove_stale_temps(out)
        check_writable(output_dir)
    except BaseException:
        lock.release()
        raise
    return Claim(out, lock, removed, kept)


def start_run(cfg: RunConfig, warnings: Sequence[str] = ()) -> Run:
    """Initialise everything a script needs before it builds data and models.

    Args:
        cfg: the run flags.
        warnings: what the script's flag checks found legal but suspicious, logged once logging is set up.
    """
    stop = StopSignal(cfg.stop_check_every)
    stop.install()  # first: a signal during start-up is then recorded, not fatal
    claim: List[Claim] = []  # rank 0's, once made
    try:
        info = dist_util.init_distributed(cfg.device, cfg.local_rank, cfg.dist_on_itp, cfg.dist_url, cfg.dist_port)
        device = info.device
        # a refusal (folder in use, not writable) reaches every rank
        on_rank0(info.rank == 0, lambda: claim.append(claim_output_dir(cfg.output_dir)))
        out_dir = claim[0].out if claim else check_writable(cfg.output_dir)
        setup_logging(info.rank, str(out_dir) if info.rank == 0 else None)
        if info.rank == 0:
            for message in warnings:
                _log.warning("%s", message)
        if info.distributed:
            _log.info("distributed (%s, %s): %d processes; master %s:%s", info.launcher, torch.distributed.get_backend(),
                      info.world_size, info.master_addr, info.master_port)
        if claim:
            claim[0].report()
        amp_dtype = resolve_amp(cfg.amp, device)
        seed_everything(cfg.seed)  # identical model initialisation on every rank
        tb = TensorBoard(cfg.log_dir or str(out_dir), enabled=info.rank == 0)
    except BaseException:
        stop.restore()
        if claim:
            claim[0].lock.release()
        dist_util.cleanup()
        raise
    return Run(info, device, out_dir, amp_dtype, tb, cfg, stop, claim[0].lock if claim else None)
