"""Preemption: SIGTERM / SIGUSR1 end the run cleanly after the current optimizer step.

SLURM sends SIGUSR1 ahead of the time limit (``#SBATCH --signal=USR1@120``) and SIGTERM when it
preempts or cancels a job. The signal reaches the tasks at slightly different times, or only one
of them (a ``kill`` by hand), so the handler only records it; the ranks then agree at a step
boundary: every ``--stop_check_every`` optimizer steps each rank contributes what it received to
an all-reduce (MAX) of one integer, and all of them stop after the same step. The all-reduce runs
on a CPU (gloo) group, so it never waits for the GPU stream (no device synchronisation); it only
makes the hosts meet, which DDP's gradient all-reduce makes them do within a step anyway. A check
costs a fraction of a millisecond (docs/PERFORMANCE.md); every 10 steps it is negligible against a
ViT-B step, and stops within 10 steps, a few seconds, well inside SLURM's warning.

After agreeing, the runner writes ``checkpoint-last.pth`` (atomically, with ``step_in_epoch``), and
every rank exits with :data:`EXIT_PREEMPTED`. On SIGUSR1 inside a SLURM job, rank 0 also asks SLURM
to requeue the job (``scontrol requeue $SLURM_JOB_ID``); on SIGTERM it does not: SLURM requeues a
job it preempts by itself (``PreemptMode=REQUEUE``), and a job cancelled with ``scancel`` must stay
cancelled. The requeued job reruns the same command, which resumes from ``checkpoint-last.pth``.

**Exit status under launchers.** Status 3 reaches the shell as such from a plain ``python`` run.
``torchrun`` (and ``torch.distributed.launch``, the same agent) treats any non-zero worker exit as a
failure: it SIGTERMs the workers still running (here: already past the checkpoint, tearing down),
prints its ``ChildFailedError`` report and exits 1; ``srun --kill-on-bad-exit`` likewise kills the
other tasks, and then reports 3 or 128 + a signal number. So a launch script can ask for a marker
instead: with ``DEEPMIM_PREEMPTED_FILE=<path>`` in the environment, every rank writes that file
(the same text; the path may be node-local, one per node's launch script) after the checkpoint and
the requeue, they agree that all of them did, and only then exits, with status 0, so the launcher
ends quietly and the script reads the marker and exits 3 (``scripts/torchrun.sh``,
``scripts/slurm_train.sbatch``). If any rank cannot write it, every rank exits 3. The marker
holds ``signal=``, ``requeued=`` (the SLURM job id, or empty), ``checkpoint=`` and ``message=``
lines. Set it only if you read it: with it, a preempted run exits 0.
"""
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Dict, Optional

from util.checkpoints.files import write_text
from util.run import dist as dist_util
from util.run.errors import EXIT_PREEMPTED, UserError

import torch
import torch.distributed as dist

_log = logging.getLogger(__name__)

PREEMPTED_FILE_VAR = "DEEPMIM_PREEMPTED_FILE"  # where rank 0 writes the preemption marker (see above)
# the signals we handle, by precedence: when ranks received different ones, SIGTERM (end of the
# job) wins over SIGUSR1 (time-limit warning, requeue)
_LEVELS: Dict[int, int] = {signal.SIGUSR1: 1, signal.SIGTERM: 2}
_BY_LEVEL = {v: k for k, v in _LEVELS.items()}


class StopSignal:
    """Records SIGTERM / SIGUSR1 and decides, identically on every rank, when to stop.

    Args:
        check_every: optimizer steps between two agreements (each one a tiny all-reduce when
            there are several processes).
    """

    def __init__(self, check_every: int = 10) -> None:
        self.check_every = max(1, int(check_every))
        self.received = 0  # level of the strongest signal this process received (0: none)
        self.agreed = 0  # level all ranks agreed to stop on (0: keep training)
        self._calls = 0
        self._previous: Dict[int, object] = {}

    # -- handler --------------------------------------------------------------------------
    def install(self) -> None:
        """Handle SIGTERM and SIGUSR1 in this process (main thread only, as Python requires)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _LEVELS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # async-signal context: record only; logging here could deadlock on the logging lock
        self.received = max(self.received, _LEVELS.get(signum, 0))

    # -- agreement ------------------------------------------------------------------------
    def __call__(self) -> bool:
        """``should_stop`` for :func:`util.loop.train_one_epoch`: called by every rank after each
        optimizer step; agrees every ``check_every`` calls (the same calls on every rank)."""
        self._calls += 1
        if self.agreed or self._calls % self.check_every == 0:
            return self.sync()
        return False

    def sync(self) -> bool:
        """Agree now (a collective: every rank must call it at the same point). True: stop."""
        if self.agreed:  # set by the same earlier call on every rank, so all skip the collective
            return True
        level = self.received
        if dist_util.get_world_size() > 1:
            t = torch.tensor([level], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dist_util.control_group())
            level = int(t.item())
        self.agreed = level
        return bool(level)

    @property
    def signal_name(self) -> str:
        return signal.Signals(_BY_LEVEL[self.agreed]).name if self.agreed else "none"

    # -- SLURM ----------------------------------------------------------------------------
    def requeue(self) -> Optional[str]:
        """On SIGUSR1 in a SLURM job, ``scontrol requeue $SLURM_JOB_ID``; returns the job id requeued.

        Call on one rank, after the checkpoint is on disk: SLURM terminates the running job.
        """
        job = os.environ.get("SLURM_JOB_ID")
        if not job or self.agreed != _LEVELS[signal.SIGUSR1]:
            return None
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            _log.warning("could not requeue SLURM job %s (%s); resubmit the same command to continue", job, e)
            return None
        if proc.returncode != 0:
            _log.warning("scontrol requeue %s failed (%s); resubmit the same command to continue", job,
                         (proc.stderr or proc.stdout).strip())
            return None
        _log.info("requeued SLURM job %s", job)
        return job


def write_preempted_marker(signal_name: str, requeued: Optional[str], checkpoint: Path, message: str) -> bool:
    """After the checkpoint: write the ``DEEPMIM_PREEMPTED_FILE`` marker if one is asked for.

    Returns True when written; False when none is asked for or it cannot be written (a warning).
    """
    path = os.environ.get(PREEMPTED_FILE_VAR)
    if not path:
        return False
    text = (f"signal={signal_name}\nrequeued={requeued or ''}\ncheckpoint={checkpoint}\n"
            f"message={' '.join(message.split())}\n")
    try:
        write_text(Path(path), text)
    except UserError as e:
        _log.warning("cannot write %s=%s (%s): exiting with status %d instead", PREEMPTED_FILE_VAR, path,
                     e, EXIT_PREEMPTED)
        return False
    return True


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (a collective on the CPU group when distributed)."""
    if dist_util.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=dist_util.control_group())
    return bool(t.item())


def worker_init(main_pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (bind ``main_pid`` with ``functools.partial``): a worker survives
    the SIGTERM / SIGUSR1 that SLURM sends to every process of a task.

    A worker killed by that SIGTERM would make the main process fail at once (the DataLoader treats
    a dead worker as an error) instead of writing its checkpoint. SIGUSR1 is ignored. SIGTERM is
    blocked and read by a thread, which ends the worker only when the sender is its own training
    process (or its parent): that is how the DataLoader shuts workers down. Workers also exit when
    the training process is gone (the DataLoader watches it).
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the training process's handler, inherited by fork
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no way to tell senders apart; keep the default
        return
    owners = {main_pid, os.getppid()}
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # every thread started later inherits the mask

    def wait_for_owner() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid not in owners:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)  # now delivered to this thread: the default action ends the worker

    threading.Thread(target=wait_for_owner, name="sigterm-from-owner", daemon=True).start()
