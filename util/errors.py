"""What a script turns into one line on stderr and an exit status: a user's mistake (2), a preemption (3)."""
import sys


class UserError(Exception):
    """A problem with the user's input (flags, files, data) rather than a bug.

    The ``main_*`` scripts catch it, print its message (which must say what to do) and exit with
    status 2, without a traceback and without touching anything already written.
    """


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGUSR1 after writing ``checkpoint-last.pth``.

    The ``main_*`` scripts exit with status 3 (``util.preempt.EXIT_PREEMPTED``): a batch script can
    tell it from a failure; rerunning the same command resumes. ``reported``: the launch script asked
    for a marker file (``DEEPMIM_PREEMPTED_FILE``) and rank 0 wrote it, so every process exits 0
    and the script turns the marker into status 3 (``util/preempt.py``).
    """

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


def say(line: str) -> None:
    """``line`` and its newline to stderr in one write: the ranks of a job share one stream, and a
    line written in two parts (``print`` writes the text, then the newline) interleaves with theirs."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
