"""Progress bars for long work (replay, verify, restore, demo): on a terminal only, silent otherwise."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """A minimal bar on stderr, redrawn at most every 100 ms; off when stderr is not a terminal."""

    def __init__(self, total: int, label: str, unit: str = "", enabled: bool | None = None) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.unit = unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._drawn = 0.0
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= 0.1 or done >= self.total):
            self._drawn = now
            width = 30
            filled = min(width, int(width * done / self.total))
            rate = done / max(now - self.started, 1e-9)
            print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{self.total:,} {self.unit} "
                  f"({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.update(self.total)
            print(file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
