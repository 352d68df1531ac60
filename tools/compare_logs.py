"""Does my run match? Compare two MAE-format ``log.txt`` files epoch by epoch.

    python tools/compare_logs.py output_dir/finetune/log.txt reference/log.txt
    python tools/compare_logs.py RUN/log.txt OTHER/log.txt --tol test_acc1=0.3 --plot compare.png

Both files are JSON lines with an ``epoch`` field (this repo's, MAE's, the reference DeepMIM's published
logs, a colleague's). For every epoch both logs have, the numeric keys both have are printed side by
side with their difference; then one verdict line per key and one overall: within tolerance, or not
(and where first). Epochs only one log has are named, not compared. The exit status is 0 when every
compared key is within its tolerance, 1 when one is not, 2 on unreadable input.

Tolerances (``--tol KEY=VALUE``, absolute; ``KEY=VALUE%``, relative to the second log's value):
accuracies (``*acc*``) 0.3 points, learning rates (``*lr*``) identical up to 1e-6 relative (float
printing), losses (``*loss*``) 2 %, anything else 1 %.
"""
import argparse
import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from util.config.cli import Parser
from util.run.errors import UserError, run_cli

# the keys that describe a run rather than measure it: never compared
BOOKKEEPING = {"epoch", "n_parameters", "step", "iteration", "time", "timestamp"}
# (pattern, tolerance, relative): the first pattern that matches a key gives its default tolerance
DEFAULT_TOLERANCES: Tuple[Tuple[str, float, bool], ...] = (
    ("*acc*", 0.3, False), ("*lr*", 1e-6, True), ("*loss*", 0.02, True), ("*", 0.01, True))
# the keys users look for first, printed first when both logs have them
PREFERRED = ("test_acc1", "test_acc5", "test_loss", "train_loss", "train_lr")


@dataclass(frozen=True)
class Tolerance:
    value: float
    relative: bool

    def allows(self, ours: float, theirs: float) -> bool:
        bound = self.value * abs(theirs) if self.relative else self.value
        return abs(ours - theirs) <= bound + 1e-12

    def __str__(self) -> str:
        return f"{self.value * 100:g} %" if self.relative else f"{self.value:g}"


def read_log(path: str) -> Dict[int, Dict[str, float]]:
    """epoch -> the numeric entries of that epoch's line (a later line of the same epoch wins: a
    resumed run that wrote it again). A line that is not JSON is skipped only if it is the last one (a
    run killed mid-write); anywhere else it is an error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path} does not exist: pass the log.txt of a run (JSON lines with an 'epoch' field).")
    lines = [ln for ln in p.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    epochs: Dict[int, Dict[str, float]] = {}
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines):
                continue
            raise UserError(f"{path}:{i} is not a JSON line ({line[:60]!r}...): is this a log.txt of MAE's format?") from None
        if isinstance(rec, dict) and "rollback" in rec:  # --on_nonfinite rollback's line (rollbacks_of)
            continue
        if not isinstance(rec, dict) or "epoch" not in rec:
            raise UserError(f"{path}:{i} has no 'epoch' field: compare_logs reads MAE-format log.txt files "
                            f"(one JSON object per epoch).")
        epochs[int(rec["epoch"])] = {k: float(v) for k, v in rec.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not epochs:
        raise UserError(f"{path} holds no epoch line.")
    return epochs


def rollbacks_of(path: str) -> List[dict]:
    """The rollback lines of a log.txt (``--on_nonfinite rollback``: each names the steps it skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "rollback" in rec:
            out.append(rec)
    return out


def parse_tolerances(specs: Sequence[str]) -> Dict[str, Tolerance]:
    """``KEY=VALUE`` (absolute) or ``KEY=VALUE%`` (relative); KEY may be a glob (``test_*``)."""
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        try:
            relative = value.endswith("%")
            number = float(value[:-1]) / 100 if relative else float(value)
            if not sep or not key or number < 0 or not math.isfinite(number):
                raise ValueError
        except ValueError:
            raise UserError(f"--tol {spec!r}: write KEY=VALUE (absolute) or KEY=VALUE% (relative), e.g. "
                            f"test_acc1=0.3 or train_loss=2%.") from None
        out[key] = Tolerance(number, relative)
    return out


def tolerance_of(key: str, given: Dict[str, Tolerance]) -> Tolerance:
    for pattern, tol in given.items():
        if fnmatch.fnmatchcase(key, pattern):
            return tol
    value, relative = next((v, r) for p, v, r in DEFAULT_TOLERANCES if fnmatch.fnmatchcase(key, p))
    return Tolerance(value, relative)


def shared_keys(a: Dict[int, Dict[str, float]], b: Dict[int, Dict[str, float]], epochs: Sequence[int],
                only: Optional[Sequence[str]]) -> List[str]:
    """The keys both logs have at some shared epoch, the preferred ones first, then alphabetically."""
    both = set().union(*(a[e].keys() & b[e].keys() for e in epochs)) - BOOKKEEPING
    if only:
        missing = [k for k in only if k not in both]
        if missing:
            raise UserError(f"--keys {' '.join(missing)}: not in both logs; both have: {' '.join(sorted(both))}.")
        return list(only)
    return [k for k in PREFERRED if k in both] + sorted(both - set(PREFERRED))


def spans(epochs: Sequence[int]) -> str:
    """``0-4, 7, 9-10``."""
    out, start = [], None
    for i, e in enumerate(epochs):
        if start is None:
            start = e
        if i + 1 == len(epochs) or epochs[i + 1] != e + 1:
            out.append(f"{start}" if start == e else f"{start}-{e}")
            start = None
    return ", ".join(out)


def compare(a: Dict[int, Dict[str, float]], b: Dict[int, Dict[str, float]], keys: Sequence[str],
            tols: Dict[str, Tolerance], epochs: Sequence[int]) -> Tuple[List[str], bool]:
    """The verdict line of every key, and whether all are within tolerance."""
    lines, ok = [], True
    for k in keys:
        tol = tolerance_of(k, tols)
        pairs = [(e, a[e][k], b[e][k]) for e in epochs if k in a[e] and k in b[e]]
        worst = max(pairs, key=lambda p: abs(p[1] - p[2]))
        bad = [e for e, x, y in pairs if not tol.allows(x, y)]
        where = f"epochs {spans([e for e, _, _ in pairs])}"
        if not bad:
            what = "identical" if worst[1] == worst[2] else (f"within {tol} (largest difference {worst[1] - worst[2]:+.4g} "
                                                               f"at epoch {worst[0]})")
            lines.append(f"{where}: {k} {what}")
        else:
            ok = False
            first = next(p for p in pairs if p[0] == bad[0])
            lines.append(f"{where}: {k} differs by more than {tol} at {len(bad)} epoch(s), first at epoch {first[0]} "
                         f"({first[1]:.6g} against {first[2]:.6g}), largest {worst[1] - worst[2]:+.4g} at epoch {worst[0]}")
    return lines, ok


def table(a: Dict[int, Dict[str, float]], b: Dict[int, Dict[str, float]], keys: Sequence[str],
          epochs: Sequence[int]) -> List[str]:
    """One row per shared epoch: for every key, the first log's value, the second's, the difference."""
    head = ["epoch"] + [f"{k} {col}" for k in keys for col in ("run", "other", "delta")]
    rows = [head]
    for e in epochs:
        row = [str(e)]
        for k in keys:
            if k in a[e] and k in b[e]:
                row += [f"{a[e][k]:.6g}", f"{b[e][k]:.6g}", f"{a[e][k] - b[e][k]:+.3g}"]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]


def plot(a: Dict[int, Dict[str, float]], b: Dict[int, Dict[str, float]], keys: Sequence[str], names: Tuple[str, str],
         out: str) -> None:
    """Both curves of every key, one panel per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        for log, name, style in ((a, names[0], "-"), (b, names[1], "--")):
            xs = sorted(e for e in log if k in log[e])
            ax.plot(xs, [log[e][k] for e in xs], style, label=name)
        ax.set_ylabel(k)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> bool:
    tols = parse_tolerances(args.tol)
    a, b = read_log(args.run), read_log(args.other)
    epochs = sorted(a.keys() & b.keys())
    if not epochs:
        raise UserError(f"{args.run} (epochs {spans(sorted(a))}) and {args.other} (epochs {spans(sorted(b))}) share no "
                        f"epoch: nothing to compare.")
    keys = shared_keys(a, b, epochs, args.keys)
    if not keys:
        raise UserError(f"{args.run} and {args.other} share no measured key (both only have: "
                        f"{' '.join(sorted(BOOKKEEPING))}).")
    if not args.quiet:
        print("\n".join(table(a, b, keys, epochs)))
        print()
    for name, log in ((args.run, a), (args.other, b)):
        alone = sorted(set(log) - set(epochs))
        if alone:
            print(f"epochs {spans(alone)} only in {name}: not compared")
    for name in (args.run, args.other):
        done = rollbacks_of(name)
        if done:
            skipped = ", ".join(f"{r['skipped'][0]}-{r['skipped'][1] - 1}" for r in done if "skipped" in r)
            print(f"{name}: {len(done)} rollback{'s' if len(done) != 1 else ''} (--on_nonfinite rollback); its epochs "
                  f"trained without the steps {skipped}")
    lines, ok = compare(a, b, keys, tols, epochs)
    print("\n".join(lines))
    print(f"verdict: {'match' if ok else 'differ'} ({len(keys)} keys over {len(epochs)} shared epochs)")
    if args.plot:
        plot(a, b, keys, (args.run, args.other), args.plot)
        print(f"plot written to {args.plot}")
    return ok


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/compare_logs.py", "Compare two MAE-format log.txt files epoch by epoch, with a verdict")
    p.add_argument("run", help="the log.txt of your run")
    p.add_argument("other", help="the log.txt to compare with (a reference, a published log, a colleague's)")
    p.add_argument("--tol", nargs="+", default=[], metavar="KEY=VALUE",
                   help="tolerances: KEY=VALUE (absolute) or KEY=VALUE%% (relative); KEY may be a glob "
                        "(default: accuracies 0.3, lr 1e-6%%, losses 2%%, others 1%%)")
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help="compare only these keys (default: every measured key both logs have)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw both curves of every key into this file (default: no plot)")
    p.add_argument("--quiet", action="store_true", help="the verdict lines only, no table (default: the table too)")
    return p


if __name__ == "__main__":
    def _main(args: argparse.Namespace) -> None:
        if not main(args):
            raise SystemExit(1)

    run_cli(_main, get_args_parser().parse_args())
