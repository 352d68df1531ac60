"""Per-flag ranges: argparse ``type=`` functions that parse one value and refuse what is out of range.

A bad value names itself and the valid range (``0: must be an integer >= 1``); the parser
(:class:`util.config.cli.Parser`) puts the flag first. :func:`ranged` and its instances
(:data:`positive_int`, :data:`probability`, :data:`seed_int`, ...), :func:`str2list` for comma lists,
:class:`OrderedPair` for ``MIN MAX`` pairs, :func:`sha256_prefix` for digests.
"""
import argparse
import math
import re
from typing import Any, Callable, List, Optional, Sequence


def _interval(kind: type, lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    noun = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        if kind is int:
            return f"{noun} in {lo}..{hi}"
        return f"{noun} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{noun} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{noun} {'<' if hi_open else '<='} {hi:g}"
    return noun


def ranged(kind: type, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False, why: str = "", name: str = "") -> Callable[[str], Any]:
    """An argparse ``type=``: parse ``kind`` (int or float) and refuse values outside the interval.

    Args:
        kind: ``int`` or ``float`` (floats must also be finite: no nan / inf).
        lo / hi: bounds (None: unbounded); ``lo_open`` / ``hi_open``: exclusive bounds.
        why: appended to the message in parentheses (what the bound means).
        name: the function's name (argparse's fallback messages use it).

    The error reads ``VALUE: must be an integer >= 1 (why)``; :class:`Parser` puts the flag first.
    """
    expects = _interval(kind, lo, hi, lo_open, hi_open)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        ok = value is not None and (kind is int or math.isfinite(value))
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{text}: must be {expects}" + (f" ({why})" if why else ""))
        return value

    parse.__name__ = name or f"{kind.__name__}_range"
    parse.expects = expects  # type: ignore[attr-defined]  # read by str2list's messages
    return parse


positive_int = ranged(int, 1, name="positive_int")
nonneg_int = ranged(int, 0, name="nonneg_int")
positive_float = ranged(float, 0, lo_open=True, name="positive_float")
nonneg_float = ranged(float, 0, name="nonneg_float")
probability = ranged(float, 0, 1, name="probability")
rate = ranged(float, 0, 1, hi_open=True, name="rate")  # drop path, dropout, label smoothing: 1 would drop everything
share = ranged(float, 0, 1, lo_open=True, name="share")  # layer decay, crop areas, class shares: 0 would zero it
seed_int = ranged(int, 0, 2**32 - 1, why="numpy takes 32-bit seeds", name="seed_int")
port_number = ranged(int, 1, 65535, name="port_number")
mask_fraction = ranged(float, 0, 1, lo_open=True, hi_open=True, name="mask_fraction",
                    why="the fraction of patches removed: 0 would mask no patch, 1 every patch")


def str2list(kind: Callable[[str], Any], check: Optional[Callable[[List[Any]], Optional[str]]] = None
             ) -> Callable[[str], List[Any]]:
    """Parse ``"6,8,10,12"`` (or ``"6 8"``) into a non-empty list of ``kind`` (a type or a :func:`ranged`).

    Args:
        kind: the type of each value.
        check: an optional test of the whole list: returns what is wrong, or None.
    """
    expects = getattr(kind, "expects", f"a valid {getattr(kind, '__name__', 'value')}")

    def parse(s: str) -> List[Any]:
        items = s.replace(",", " ").split()
        if not items:
            raise argparse.ArgumentTypeError(f"{s!r}: give at least one value (comma-separated)")
        values = []
        for x in items:
            try:
                values.append(kind(x))
            except (argparse.ArgumentTypeError, TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"{s}: {x} is not {expects}") from None
        problem = check(values) if check else None
        if problem:
            raise argparse.ArgumentTypeError(f"{s}: {problem}")
        return values

    parse.__name__ = f"{getattr(kind, '__name__', 'value')}_list"
    parse.is_list = True  # type: ignore[attr-defined]  # HelpFormatter shows its default comma-separated
    return parse


def increasing(values: Sequence[float]) -> Optional[str]:
    """A :func:`str2list` check: strictly increasing values."""
    return None if all(a < b for a, b in zip(values, values[1:])) else "values must be increasing and distinct"


def positive_sum(values: Sequence[float]) -> Optional[str]:
    """A :func:`str2list` check: at least one value above 0 (weights of a loss that must not vanish)."""
    return None if sum(values) > 0 else "at least one weight must be > 0 (the loss would be 0)"


class OrderedPair(argparse.Action):
    """``nargs=2`` values ``MIN MAX`` with ``MIN <= MAX`` (each value's range: its ``type=``).

    ``nargs='+'`` works too (the count is then checked here), for flags that must keep timm's
    spelling. Subclass with ``strict = True`` for ``MIN < MAX``.
    """

    strict = False

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        text = " ".join(map(str, values))
        if len(values) != 2:
            raise argparse.ArgumentError(self, f"{text}: give two values, MIN MAX")
        lo, hi = values
        if lo > hi or (self.strict and lo == hi):
            raise argparse.ArgumentError(self, f"{text}: MIN must be {'<' if self.strict else '<='} MAX")
        setattr(namespace, self.dest, list(values))  # what argparse itself stores for nargs


class StrictPair(OrderedPair):
    strict = True


hex_digest = re.compile(r"^[0-9a-fA-F]{1,64}$")


def sha256_prefix(text: str) -> str:
    """An argparse ``type=``: a sha256 hex digest or a prefix of one."""
    if not hex_digest.match(text):
        raise argparse.ArgumentTypeError(f"{text}: must be a sha256 hex digest or a prefix of one (1-64 of 0-9a-f)")
    return text.lower()

