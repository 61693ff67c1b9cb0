"""The clock rule (docs/SEMANTICS.md, "Time"): timestamps strictly increase, a clock that goes backwards is
overtaken by last + 1, and a clock past TIMESTAMP_MAX is refused with LedgerClockError before anything is
applied, so no timestamp and no pending deadline can wrap. verify() checks the journal's timestamps."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

import ledger
from ledger import _core
from ledger.journal import COMMIT_MAGIC, RECORD_SIZE, SEGMENT_HEADER_BYTES, segment_name

from support.clock import Clock

SEGMENT_RECORDS_LOG2 = 10
SECOND_NS = 10**9
TIMEOUT_MAX_S = 2**32 - 1


def funded(handle: ledger.Ledger) -> None:
    assert handle.create_account(1, min_balance=ledger.BALANCE_MIN) == ledger.AccountResult.OK
    assert handle.create_account(2) == ledger.AccountResult.OK


def test_timestamp_max_is_the_int64_limit():
    assert ledger.TIMESTAMP_MAX == 2**63 - 1
    # The farthest deadline a pending transfer can have still fits the engine's uint64 arithmetic.
    assert ledger.TIMESTAMP_MAX + TIMEOUT_MAX_S * SECOND_NS < 2**64


@pytest.mark.parametrize("now", [2**64 - 1, 2**64 - 5 * SECOND_NS, 2**63 + 2**62, ledger.TIMESTAMP_MAX + 1])
def test_a_clock_past_the_limit_is_refused_and_nothing_is_applied(now):
    clock = Clock()
    with ledger.open(None, clock=clock) as handle:
        funded(handle)
        position = handle._engine.write_position
        clock.set(now)
        with pytest.raises(ledger.LedgerClockError, match="TIMESTAMP_MAX"):
            handle.transfer(10, 1, 2, 5)
        rows = ledger.transfers_batch(3)
        rows["id"], rows["debit_account"], rows["credit_account"], rows["amount"] = [11, 12, 13], 1, 2, 1
        with pytest.raises(ledger.LedgerClockError):
            handle.transfers(rows)
        with pytest.raises(ledger.LedgerClockError):
            handle.create_account(3)
        with pytest.raises(ledger.LedgerClockError):
            handle.create_accounts(ledger.accounts_batch(2))
        assert handle._engine.write_position == position
        assert handle.balance(2) == 0 and handle.account(3) is None
        # The handle is not harmed: with a sane clock the same calls apply.
        clock.set(1_800_000_000 * SECOND_NS)
        assert handle.transfer(10, 1, 2, 5) == ledger.TransferResult.OK
        assert not handle.transfers(rows).any()
        assert handle.balance(2) == 8
        report = handle.verify()
        assert report.ok, report.problems


def test_a_batch_that_would_run_past_the_limit_is_refused_whole():
    """Events of one call get T, T+1, ...: the last one must not pass TIMESTAMP_MAX either."""
    clock = Clock()
    with ledger.open(None, clock=clock) as handle:
        funded(handle)
        rows = ledger.transfers_batch(3)
        rows["id"], rows["debit_account"], rows["credit_account"], rows["amount"] = [11, 12, 13], 1, 2, 1
        clock.set(ledger.TIMESTAMP_MAX - 1)  # room for two events, not three
        with pytest.raises(ledger.LedgerClockError, match="3 events"):
            handle.transfers(rows)
        assert handle.balance(2) == 0
        assert not handle.transfers(rows[:2]).any()   # two events end exactly at the limit
        assert handle.stats()["last_timestamp"] == ledger.TIMESTAMP_MAX
        # The clock stands at the limit: the next event would be TIMESTAMP_MAX + 1.
        with pytest.raises(ledger.LedgerClockError):
            handle.transfers(rows[2:])
        assert handle.verify().ok


def test_the_farthest_pending_deadline_does_not_wrap():
    """A pending transfer near the clock limit with the longest timeout stays pending (a wrapped deadline would be
    in the past and expire it at once)."""
    clock = Clock(ledger.TIMESTAMP_MAX - 10 * SECOND_NS)
    with ledger.open(None, clock=clock) as handle:
        funded(handle)
        flags = ledger.TransferFlags.PENDING
        assert handle.transfer(10, 1, 2, 5, flags=flags, timeout=TIMEOUT_MAX_S) == ledger.TransferResult.OK
        assert handle.transfer(11, 1, 2, 5, flags=flags, timeout=20) == ledger.TransferResult.OK
        clock.advance(5 * SECOND_NS)
        assert handle.transfers(ledger.transfers_batch(0)).size == 0   # runs the expiry pass
        states = handle.lookup_transfers([10, 11])["state"]
        assert states.tolist() == [ledger.TransferState.PENDING] * 2
        assert handle.transfer(12, 0, 0, 0, flags=ledger.TransferFlags.POST_PENDING,
                               pending_id=10) == ledger.TransferResult.OK
        assert handle.balance(2) == 5
        assert handle.verify().ok


@pytest.mark.parametrize("value, error", [(-1, ledger.LedgerClockError), (2**64, ledger.LedgerClockError),
                                          (1.7e18, TypeError), ("now", TypeError)])
def test_a_clock_that_returns_nonsense_gets_a_clear_error(value, error):
    with ledger.open(None, clock=lambda: value) as handle:
        with pytest.raises(error, match="clock"):
            handle.create_account(1)
        assert handle.account(1) is None


def test_a_clock_that_goes_backwards_is_overtaken():
    clock = Clock()
    with ledger.open(None, clock=clock) as handle:
        funded(handle)
        assert handle.transfer(10, 1, 2, 1) == ledger.TransferResult.OK
        clock.set(0)   # far in the past (a broken clock): time goes on from the last event, it is not refused
        assert handle.transfer(11, 1, 2, 1) == ledger.TransferResult.OK
        stamps = handle.lookup_transfers([10, 11])["timestamp"].tolist()
        assert stamps[1] == stamps[0] + 1
        assert handle.verify().ok


# -- verify checks the journal's timestamps --

def record_offset(position: int) -> tuple[str, int]:
    index = position >> SEGMENT_RECORDS_LOG2
    return segment_name(index), SEGMENT_HEADER_BYTES + (position & ((1 << SEGMENT_RECORDS_LOG2) - 1)) * RECORD_SIZE


def read_records(directory, position: int, count: int) -> bytes:
    name, offset = record_offset(position)
    with open(os.path.join(directory, "journal", name), "rb") as file:
        file.seek(offset)
        return file.read(RECORD_SIZE * count)


def restamp_last_batch(directory, headers: list[tuple[int, int, int]], timestamp: int, previous_checksum: int):
    """Rewrite the newest batch's timestamp and re-seal it (checksum and commit word), as a buggy or hostile
    writer could: every checksum and the hash chain still hold."""
    position, _, count = headers[-1]
    events = read_records(directory, position + 1, count)
    fields = struct.pack("<IIQQQQ", 0x5247444C, 1, timestamp, position, count, previous_checksum)
    crc = _core.crc32c(fields, _core.crc32c(events))
    record = fields + struct.pack("<QQQ", crc, 15 << 56, COMMIT_MAGIC << 32 | crc)
    name, offset = record_offset(position)
    with open(os.path.join(directory, "journal", name), "r+b") as file:
        file.seek(offset)
        file.write(record)


@pytest.mark.parametrize("case", ["not after the previous batch", "past TIMESTAMP_MAX"])
def test_verify_reports_timestamps_that_do_not_strictly_increase(tmp_path, case):
    directory = tmp_path / "data"
    clock = Clock()
    with ledger.open(directory, create=True, clock=clock, segment_records_log2=SEGMENT_RECORDS_LOG2) as handle:
        funded(handle)
        assert handle.transfer(10, 1, 2, 1) == ledger.TransferResult.OK
        checksum_before_last = handle._engine.last_checksum
        assert handle.transfer(11, 1, 2, 1) == ledger.TransferResult.OK
        headers = handle._engine.batch_headers(1)
        assert handle.verify().ok
    previous_time = headers[-2][1] + headers[-2][2] - 1
    forged = previous_time if case == "not after the previous batch" else 2**64 - 1
    restamp_last_batch(directory, headers, forged, checksum_before_last)
    with ledger.open(directory, readonly=True) as handle:
        assert handle._engine.batch_headers(1)[-1][1] == forged   # the journal opens (every checksum holds)
        report = handle.verify()
    assert not report.ok
    assert any("timestamp" in problem and str(headers[-1][0]) in problem for problem in report.problems), \
        report.problems


def test_verify_reports_a_wrapped_pending_deadline(tmp_path):
    """A deadline computed past 2**64 wraps to the past; verify recomputes each pending deadline and says so."""
    directory = tmp_path / "data"
    clock = Clock()
    with ledger.open(directory, create=True, clock=clock, segment_records_log2=SEGMENT_RECORDS_LOG2) as handle:
        funded(handle)
        checksum_before_last = handle._engine.last_checksum
        assert handle.transfer(10, 1, 2, 1, flags=ledger.TransferFlags.PENDING,
                               timeout=TIMEOUT_MAX_S) == ledger.TransferResult.OK
        headers = handle._engine.batch_headers(1)
    restamp_last_batch(directory, headers, 2**64 - SECOND_NS, checksum_before_last)
    with ledger.open(directory, readonly=True) as handle:
        heap = handle._engine.state_views()[1]["expiry_heap"]
        assert int(np.asarray(heap["deadline"]).max()) < 2**64 - SECOND_NS   # it wrapped in the replay
        report = handle.verify()
    assert not report.ok
    assert any("deadline" in problem for problem in report.problems), report.problems
