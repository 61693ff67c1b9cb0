"""The injected clock the tests drive by hand."""
from __future__ import annotations


class Clock:
    """An injected clock: a zero-argument callable returning int nanoseconds, moved by the test."""

    def __init__(self, t: int = 1_700_000_000 * 10**9):
        self.t = t

    def __call__(self) -> int:
        return self.t

    def advance(self, ns: int) -> None:
        self.t += ns

    def set(self, t: int) -> None:
        self.t = t
