"""Moments in a ledger's history, and reading them: the `At` type, what `since`, `until` and `at` accept
(`Moment`), the command line's forms of a moment (`At.parse`), and nanoseconds written as ISO-8601 (`format_ns`).

Pure values: nothing here reads a journal (turning a moment into a journal position is ledger/history.py's).

Moments: `since`, `until` and `at` accept
- an `int`: a journal position (`Ledger.stats()["journal_position"]` is the next free one; an event's position is
  its `sequence` in `lookup_transfers`);
- a `datetime.datetime`: a moment (timezone-aware; a naive one is read as UTC);
- `At(position=...)` or `At(ns=...)`: the same, explicit (ns = integer nanoseconds since the Unix epoch, the unit
  of every engine timestamp).
`since` is inclusive (events at or after it), `until` and `at` are inclusive (events at or before it).
"""
from __future__ import annotations

import dataclasses
import datetime
import operator
import re
from typing import Any

from ledger.format import POSITION_LIMIT  # positions are 40 bits (docs/FORMAT.md)

__all__ = [
    "NANOSECONDS_PER_SECOND",
    "UNIX_EPOCH",
    "At",
    "Moment",
    "as_at",
    "format_ns",
]

NANOSECONDS_PER_SECOND = 10**9
UNIX_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class At:
    """A point in the ledger's history: exactly one of `position` (a journal position) or `ns` (nanoseconds since
    the Unix epoch, the engine's timestamp unit). "At" a point means: after every event at or before it."""

    ns: int | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        if (self.ns is None) == (self.position is None):
            raise ValueError("At takes exactly one of ns= or position=")
        # Normalise numpy integers to int so that equal moments compare and hash equal.
        if self.position is not None:
            object.__setattr__(self, "position", _check_position(self.position))
        if self.ns is not None:
            if isinstance(self.ns, bool):
                raise TypeError("At(ns=...) must be an int of nanoseconds, not bool")
            object.__setattr__(self, "ns", operator.index(self.ns))

    @classmethod
    def from_datetime(cls, moment: datetime.datetime) -> At:
        """The moment `moment` (timezone-aware; naive means UTC) as nanoseconds since the Unix epoch."""
        return cls(ns=_datetime_to_ns(moment))

    @classmethod
    def parse(cls, text: str) -> At:
        """Read a moment as typed on a command line: `12345` is a journal position (a bare number of 2**40 or
        more is an error that suggests the `ns` suffix: no position is that large), `1700000000000000000ns` is
        nanoseconds since the epoch, anything else is an ISO-8601 time (up to 9 fractional digits; `Z` or an
        offset; without one it is UTC; a date alone is its midnight)."""
        text = text.strip()
        if text.isascii() and text.isdigit():
            value = int(text)
            if value >= POSITION_LIMIT:
                # Most likely a timestamp copied from --json output without its unit: reading it as a position
                # would be past any journal's end, and reading it as nanoseconds would be a guess.
                raise ValueError(f"{text} is larger than any journal position (at most {POSITION_LIMIT - 1}); "
                                 f"for nanoseconds since the epoch write {text}ns")
            return cls(position=value)
        if text.isascii() and text.endswith("ns") and text[:-2].isdigit():
            return cls(ns=int(text[:-2]))
        return cls(ns=_parse_iso_ns(text))

    def __str__(self) -> str:
        if self.position is not None:
            return f"journal position {self.position}"
        assert self.ns is not None
        return format_ns(self.ns)


Moment = int | datetime.datetime | At  # what since, until and at accept


def _check_position(position: Any) -> int:
    if isinstance(position, bool):
        raise TypeError("a journal position must be an int, not bool")
    position = operator.index(position)
    if position < 0:
        raise ValueError(f"a journal position must be >= 0, got {position}")
    return position


def _datetime_to_ns(moment: datetime.datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)  # naive means UTC, as the engine's clock
    delta = moment - UNIX_EPOCH
    # Integer arithmetic: a float of nanoseconds since 1970 has no room for the last digits.
    return (delta.days * 86_400 + delta.seconds) * NANOSECONDS_PER_SECOND + delta.microseconds * 1_000


_FRACTION = re.compile(r"(?P<head>.*\d\d:\d\d:\d\d)[.,](?P<fraction>\d+)(?P<tail>.*)")


def _parse_iso_ns(text: str) -> int:
    """ISO-8601 with nanoseconds (datetime stops at microseconds, but the engine's timestamps are ns)."""
    typed = text  # the errors name the value as it was written, not the rewritten form below
    fraction_ns = 0
    match = _FRACTION.fullmatch(text)
    if match:
        digits = match["fraction"]
        if len(digits) > 9:
            raise ValueError(f"time {typed!r} has more than 9 fractional digits")
        fraction_ns = int(digits.ljust(9, "0"))
        text = match["head"] + match["tail"]
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"  # Python 3.10's fromisoformat does not read Z
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{typed!r} is neither a journal position nor an ISO-8601 time "
                         f"(e.g. 2024-05-01T12:00:00.123456789Z)") from None
    return _datetime_to_ns(moment) + fraction_ns


def format_ns(ns: int) -> str:
    """Nanoseconds since the epoch as ISO-8601 UTC with all 9 fractional digits."""
    seconds, fraction = divmod(int(ns), NANOSECONDS_PER_SECOND)
    moment = UNIX_EPOCH + datetime.timedelta(seconds=seconds)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"


def as_at(moment: Moment) -> At:
    """`moment` (a journal position, a datetime or an At) as an At; TypeError for anything else (a str is not
    parsed here: the command line's forms are At.parse's)."""
    if isinstance(moment, At):
        return moment
    if isinstance(moment, datetime.datetime):
        return At.from_datetime(moment)
    if isinstance(moment, (str, bytes, float, bool)):
        raise TypeError(f"a moment is an int journal position, a datetime or ledger.At(...), "
                        f"not {type(moment).__name__} {moment!r}")
    return At(position=_check_position(moment))
