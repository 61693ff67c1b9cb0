"""Ledgers built with snapshots, and the comparison of their counters: shared by test_snapshot, test_restore and
test_audit."""
from __future__ import annotations

import os

import ledger
from support.crash_workload import accounts, batch

COUNTERS = ["debits_posted", "credits_posted", "debits_pending", "credits_pending"]


def same_counters(actual, expected):
    assert actual["id"].tolist() == expected["id"].tolist()
    for name in COUNTERS:
        assert actual[name].tolist() == expected[name].tolist(), name


def build(directory, batches, snapshot_every, durability="fsync", clock=None):
    """Apply batches 0..batches-1, snapshotting every `snapshot_every`; return the journal end after each batch.
    With a clock, it moves 1,000,001 ns before each batch."""
    ends = []
    with ledger.open(directory, create=True, durability=durability, segment_records_log2=12, clock=clock) as handle:
        assert not handle.create_accounts(accounts()).any()
        for k in range(batches):
            if clock is not None:
                clock.advance(1_000_001)
            handle.transfers(batch(k))
            ends.append(handle.stats()["journal_position"])
            if snapshot_every and (k + 1) % snapshot_every == 0:
                info = handle.snapshot(keep=3)
                assert info.position == ends[-1] and os.path.exists(info.path)
    return ends


def pending_ledger(directory, clock):
    """Pending transfers with timeouts: 10 still pending, 11 posted, 13 expired; a snapshot after them."""
    with ledger.open(directory, create=True, clock=clock, segment_records_log2=12) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        for transfer_id in (10, 11):
            handle.transfer(transfer_id, 1, 2, 5, flags=ledger.TransferFlags.PENDING, timeout=3600)
        handle.transfer(13, 1, 2, 7, flags=ledger.TransferFlags.PENDING, timeout=1)
        handle.transfer(12, 0, 0, 0, flags=ledger.TransferFlags.POST_PENDING, pending_id=11)
        clock.advance(2 * 10**9)
        handle.transfer(14, 1, 2, 1)  # this batch expires 13
        assert handle.lookup_transfers([10, 11, 13])["state"].tolist() == [2, 3, 5]
        report = handle.verify()  # the live heap has popped entries that the replayed one still holds
        assert report.ok, report
        return handle.snapshot().path
