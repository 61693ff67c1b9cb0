"""Scrub: re-check every committed journal batch (header, checksum, hash chain) so that damage is reported before a
read meets it.

Opening a ledger replays only the journal after its newest snapshot; the batches before it are checked when first
read (Engine: verify_old_record). A scrub walks all of them, with the checks replay makes (Engine.scrub shares
replay's check_batch), and builds no state: `Ledger.scrub()` and `ledger scrub DIR` do one full pass; `ledger
serve` runs a `Scrubber` between drains at SCRUB_BYTES_PER_SECOND, pass after pass. A batch found good before the
snapshot position is remembered, so reads of it are not checked again."""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import TYPE_CHECKING, Any

from ledger import _core
from ledger.format import RECORD_SIZE

if TYPE_CHECKING:
    from ledger.store import Store

__all__ = ["SCRUB_BYTES_PER_SECOND", "ScrubDamage", "ScrubReport", "Scrubber", "scrub"]

# The background scrub of `ledger serve`: at most this many journal bytes checked per second (a 64 GiB journal is
# re-checked about every 70 minutes), in steps of at most SCRUB_STEP_RECORDS records (1 MiB: ~0.1 ms of CRC)
# taken between drains, so that the writer's latency barely moves. A single batch is checked whole (up to 2**24
# records, 1 GiB): a step never stops inside one.
SCRUB_BYTES_PER_SECOND = 16 * 2**20
SCRUB_STEP_RECORDS = (1 * 2**20) // RECORD_SIZE
# A full pass (Ledger.scrub) asks the core for this many records per call: bounds the time between Python checks.
SCRUB_PASS_RECORDS = 1 << 22
FIRST_POSITION = 1  # position 0 is never written; the first batch header is at 1


@dataclasses.dataclass(frozen=True)
class ScrubDamage:
    """One damaged batch: where its header is (file, byte offset, journal position) and why it fails."""

    position: int
    path: str | None
    byte_offset: int | None
    reason: str

    def __str__(self) -> str:
        where = f"in {self.path} at byte offset {self.byte_offset}, " if self.path is not None else ""
        return f"damaged batch {where}journal position {self.position}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (what `ledger scrub --json` prints per damaged batch)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ScrubReport:
    """The outcome of one scrub pass over the journal positions [1, end_position)."""

    ok: bool
    batches: int
    records: int
    end_position: int
    seconds: float
    damaged: list[ScrubDamage]

    @property
    def bytes(self) -> int:
        """The journal bytes checked (records * 64)."""
        return self.records * RECORD_SIZE

    def __str__(self) -> str:
        lines = [str(damage) for damage in self.damaged]
        lines.append(f"scrub {'OK' if self.ok else 'FAILED'}: {self.batches} batches ({self.bytes / 2**20:,.1f} MiB) "
                     f"checked through journal position {self.end_position} in {self.seconds:.3f} s; "
                     f"{len(self.damaged)} damaged")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as a dict of plain values (what `ledger scrub --json` prints)."""
        return {"ok": self.ok, "batches": self.batches, "records": self.records, "bytes": self.bytes,
                "end_position": self.end_position, "seconds": self.seconds,
                "damaged": [damage.to_dict() for damage in self.damaged]}


def _damage(store: Store, position: int, reason: int) -> ScrubDamage:
    path, offset = store.location(position)
    return ScrubDamage(position, path, offset, _core.DAMAGE_REASONS[reason])


class Scrubber:
    """An incremental scrub of one handle's journal: each step() checks the next batches and returns the damage
    found; at the end of the committed journal a pass is complete and the next step starts over at position 1."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.position = FIRST_POSITION
        self.previous_checksum = 0
        self.passes = 0            # complete passes so far
        self.batches = 0           # in the current pass
        self.records = 0
        self.damaged: list[ScrubDamage] = []  # in the current pass
        self.last_pass: ScrubReport | None = None
        self._pass_started = time.perf_counter()

    def step(self, records_max: int) -> list[ScrubDamage]:
        """Check batches worth about `records_max` records (at least one batch, if any is committed)."""
        assert records_max > 0
        engine = self.store.engine
        end = engine.write_position
        if self.position >= end:
            self._finish_pass(end)
            if end <= FIRST_POSITION:
                return []
        self.position, self.previous_checksum, batches, records, damaged = engine.scrub(
            self.position, self.previous_checksum, end, records_max)
        self.batches += batches
        self.records += records
        found = [_damage(self.store, position, reason) for position, reason in damaged]
        self.damaged += found
        return found

    def _finish_pass(self, end: int) -> None:
        self.last_pass = ScrubReport(not self.damaged, self.batches, self.records, end,
                                     time.perf_counter() - self._pass_started, self.damaged)
        self.passes += 1
        self.position, self.previous_checksum = FIRST_POSITION, 0
        self.batches = self.records = 0
        self.damaged = []
        self._pass_started = time.perf_counter()


def scrub(store: Store) -> ScrubReport:
    """One full pass over every batch committed when it starts (Ledger.scrub)."""
    scrubber = Scrubber(store)
    end = store.engine.write_position
    started = time.perf_counter()
    while scrubber.position < end:
        scrubber.position, scrubber.previous_checksum, batches, records, damaged = store.engine.scrub(
            scrubber.position, scrubber.previous_checksum, end, SCRUB_PASS_RECORDS)
        scrubber.batches += batches
        scrubber.records += records
        scrubber.damaged += [_damage(store, position, reason) for position, reason in damaged]
    return ScrubReport(not scrubber.damaged, scrubber.batches, scrubber.records, end,
                       time.perf_counter() - started, scrubber.damaged)


class BackgroundScrub:
    """`ledger serve`'s slow scrub: tick() between drains checks at most SCRUB_BYTES_PER_SECOND on average (a
    token bucket of one step), warns once (RuntimeWarning: stderr) per damaged batch, and keeps the figures that
    Server.status() reports."""

    def __init__(self, store: Store, bytes_per_second: int = SCRUB_BYTES_PER_SECOND) -> None:
        assert bytes_per_second > 0
        self.scrubber = Scrubber(store)
        self.bytes_per_second = bytes_per_second
        self.reported: dict[int, ScrubDamage] = {}  # every damaged batch found so far, by header position
        self._budget_bytes = 0.0
        self._last = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        step_bytes = SCRUB_STEP_RECORDS * RECORD_SIZE
        self._budget_bytes = min(step_bytes, self._budget_bytes + (now - self._last) * self.bytes_per_second)
        self._last = now
        if self._budget_bytes < step_bytes:
            return
        records_before = self.scrubber.records
        for damage in self.scrubber.step(SCRUB_STEP_RECORDS):
            if damage.position not in self.reported:
                self.reported[damage.position] = damage
                warnings.warn(f"ledger serve: scrub found a {damage}", RuntimeWarning, stacklevel=2)
        self._budget_bytes -= max(self.scrubber.records - records_before, 1) * RECORD_SIZE

    def status(self) -> dict[str, Any]:
        last = self.scrubber.last_pass
        return {"scrub_passes": self.scrubber.passes, "scrub_position": self.scrubber.position,
                "scrub_bytes_per_second": self.bytes_per_second,
                "scrub_last_pass_ok": None if last is None else last.ok,
                "scrub_damaged": [str(damage) for damage in self.reported.values()]}
