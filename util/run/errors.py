"""What a script turns into one line on stderr and an exit status: every exit status of the project.

0: done (or preempted, when the launch script asked for the ``DEEPMIM_PREEMPTED_FILE`` marker and it
was written); 1: a bug (Python's traceback); 2: a user's mistake (:class:`UserError`, one ``error:``
line); 3: stopped by a signal after writing ``checkpoint-last.pth`` (:class:`Preempted`; rerun to
continue).
"""
import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2  # exit status: one ``error:`` line on stderr says what to fix
EXIT_PREEMPTED = 3  # exit status: stopped by a signal after writing checkpoint-last.pth; rerun to continue


class UserError(Exception):
    """A problem with the user's input (flags, files, data) rather than a bug.

    The ``main_*`` scripts catch it, print its message (which must say what to do) and exit with
    status 2, without a traceback and without touching anything already written.
    """


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGUSR1 after writing ``checkpoint-last.pth``.

    The ``main_*`` scripts exit with status 3 (:data:`EXIT_PREEMPTED`): a batch script can
    tell it from a failure; rerunning the same command resumes. ``reported``: the launch script asked
    for a marker file (``DEEPMIM_PREEMPTED_FILE``) and rank 0 wrote it, so every process exits 0
    and the script turns the marker into status 3 (``util/run/preempt.py``).
    """

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


def say(line: str) -> None:
    """``line`` and its newline to stderr in one write: the ranks of a job share one stream, and a
    line written in two parts (``print`` writes the text, then the newline) interleaves with theirs."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_cli(main: Callable[[Any], Any], args: Any) -> None:
    """Run a script's ``main(args)``; a :class:`UserError` prints one message and exits with
    :data:`EXIT_USER_ERROR`, :class:`Preempted` (stopped by a signal, checkpoint written) exits with
    :data:`EXIT_PREEMPTED`, or with 0 when the launch script was told so through
    ``DEEPMIM_PREEMPTED_FILE`` (``util/run/preempt.py``)."""
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
