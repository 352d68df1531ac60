"""Commit points: what the trainer writes after a step, in an order a ``kill -9`` cannot break, and
the replay of a commit that a killed run left unfinished.

A commit writes ``checkpoint-last.pth`` first, with what the commit still has to do (the other
checkpoint names, the ``log.txt`` lines), then the numbered / best checkpoints, then the log lines
(:meth:`CommitLog.write`). A rerun resumes from the furthest checkpoint and first completes its
commit (:meth:`CommitLog.complete`: writes the missing files, appends the missing lines), and drops
``log.txt`` lines past the resume point (:meth:`CommitLog.tidy`; the rerun writes them again, with
the same numbers). A ``kill -9`` at any moment therefore loses no log line or checkpoint and
duplicates none.
"""
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from util.checkpoints import reader as ckpt_util
from util.checkpoints.files import append_jsonl, write_text
from util.run.errors import UserError

_log = logging.getLogger(__name__)


def record_step(record: Dict[str, Any], steps_per_epoch: int) -> int:
    """The global step a ``log.txt`` record belongs to (``iteration``, or the end of its ``epoch``; a
    rollback's: the step its skip ends at)."""
    if "rollback" in record:
        return int(record["skipped"][1])
    if "iteration" in record:
        return int(record["iteration"])
    if "epoch" in record:
        return (int(record["epoch"]) + 1) * steps_per_epoch
    return 0


def _record_key(record: Dict[str, Any]) -> Tuple[Any, ...]:
    return record.get("mode"), record.get("iteration"), record.get("epoch"), record.get("rollback")


class CommitLog:
    """A run's checkpoints and ``log.txt`` as commits write them (rank 0 only).

    Args:
        out_dir: the run's output folder.
        steps_per_epoch: places an epoch's ``log.txt`` record (its ``epoch``) on the step axis.
    """

    def __init__(self, out_dir: Path, steps_per_epoch: int) -> None:
        self.out_dir, self.steps_per_epoch = out_dir, steps_per_epoch
        self.log_path = out_dir / "log.txt"

    def write(self, state: Optional[Dict[str, Any]], files: Sequence[str], records: Sequence[Dict[str, Any]]) -> None:
        """One commit: ``checkpoint-last.pth`` (holding ``state`` and what follows) when ``files`` is not
        empty, then the other checkpoints of ``files`` (``state``), then the ``log.txt`` ``records``."""
        others = [f for f in files if f != ckpt_util.LAST]
        if files:
            assert state is not None
            ckpt_util.save_atomic({**state, "commit": {"files": others, "log": list(records)}},
                                  self.out_dir / ckpt_util.LAST)
            fail_point(ckpt_util.LAST)
            for name in others:
                ckpt_util.save_atomic(state, self.out_dir / name)
                fail_point(name)
        for record in records:
            append_jsonl(record, self.log_path)
            fail_point("log.txt")

    def tidy(self, start: int) -> None:
        """Drop ``log.txt`` records past step ``start``: a rerun from there writes them again."""
        if not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:  # a partial last line of a killed run
                continue
            if record_step(rec, self.steps_per_epoch) <= start:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            _log.info("log.txt: %d line(s) past the resume point dropped; this run writes them again",
                      len(lines) - len(keep))
            write_text(self.log_path, "".join(keep))

    def complete(self, ckpt: Dict[str, Any], start: int) -> None:
        """Finish the commit that wrote ``ckpt`` (the checkpoint resumed from; empty: none of this
        folder's): the checkpoints it names that are missing or older, and its missing ``log.txt``
        records; first :meth:`tidy` from ``start``."""
        self.tidy(start)
        commit = ckpt.get("commit") or {}
        state = {k: v for k, v in ckpt.items() if k != "commit"}
        for name in commit.get("files", []):
            target = self.out_dir / name
            try:
                present = ckpt_util.position(ckpt_util.read_checkpoint(str(target), mmap=True)) == ckpt_util.position(ckpt)
            except UserError:
                present = False
            if not present:
                _log.info("writing %s, which the interrupted run had not written yet", target)
                ckpt_util.save_atomic(state, target)
        records = commit.get("log", [])
        if records:
            have = set()
            if self.log_path.exists():
                have = {_record_key(json.loads(x)) for x in self.log_path.read_text().splitlines() if x.strip()}
            for record in records:
                if _record_key(record) not in have:
                    _log.info("log.txt: appending the line the interrupted run had not written yet")
                    append_jsonl(record, self.log_path)


def fail_point(name: str) -> None:
    """Testing crash consistency: ``DEEPMIM_KILL_AFTER=<file>:<n>`` kills this process (SIGKILL, as
    ``kill -9``) right after it writes ``<file>`` (a checkpoint name or ``log.txt``) the n-th time."""
    spec = os.environ.get("DEEPMIM_KILL_AFTER")
    if not spec:
        return
    target, _, count = spec.rpartition(":")
    if target != name:
        return
    _FAIL_COUNTS[name] = _FAIL_COUNTS.get(name, 0) + 1
    if _FAIL_COUNTS[name] == int(count):
        os.kill(os.getpid(), 9)


_FAIL_COUNTS: Dict[str, int] = {}
