"""A data directory whose journal begins at a snapshot (docs/FORMAT.md "Journal base"), as a node that rejoins
its cluster gets it (ledger.restore.restore_from_snapshot): it opens from that snapshot, verifies from it, writes
and recovers a torn tail after it as any journal does, keeps its base snapshot however few snapshots are kept, and
refuses every read of a record before it with LedgerHistoryUnavailableError naming the position. The build is
crash safe: a failure leaves no destination, and what a killed build left is deleted by the next one."""
from __future__ import annotations

import os

import numpy as np
import pytest

import ledger
from ledger import rebuild, restore
from ledger.format import RECORD_SIZE, SEGMENT_HEADER_BYTES, segment_name
from ledger.snapshot import JOURNAL_BASE_FILE, journal_base, list_snapshots

SEGMENT_RECORDS_LOG2 = 10
PENDING_ID = 50


def make_source(path: str) -> tuple[ledger.Ledger, ledger.SnapshotInfo]:
    """A ledger with a pending transfer and 1500 transfers (so its snapshot is in segment 2), and its snapshot."""
    handle = ledger.open(path, create=True, segment_records_log2=SEGMENT_RECORDS_LOG2)
    accounts = ledger.accounts_batch(3)
    accounts["id"] = [1, 2, 3]
    accounts["ledger"] = 1
    accounts["min_balance"][0] = ledger.BALANCE_MIN
    accounts["max_balance"] = ledger.BALANCE_MAX
    assert not handle.create_accounts(accounts).any()
    assert handle.transfer(PENDING_ID, 1, 2, 9, flags=ledger.TransferFlags.PENDING) == 0
    for index in range(1500):
        handle.transfer(100 + index, 1, 2, 1)
    return handle, handle.snapshot()


@pytest.fixture
def rejoined(tmp_path):
    source, snapshot = make_source(str(tmp_path / "source"))
    position = restore.restore_from_snapshot(snapshot.path, str(tmp_path / "node"))
    assert position == snapshot.position and position >> SEGMENT_RECORDS_LOG2 == 2
    yield str(tmp_path / "node"), source, position
    source.close()


def test_it_opens_from_its_base_and_verifies_and_writes_on(rejoined):
    path, source, position = rejoined
    assert journal_base(path) == position
    with ledger.open(path) as node:
        assert node.stats()["journal_position"] == position
        assert np.array_equal(node.accounts(), source.accounts())
        assert node.verify().ok
        for index in range(1200):   # into the next segment
            assert node.transfer(5000 + index, 1, 3, 1) == 0
            assert source.transfer(5000 + index, 1, 3, 1) == 0
        end = node.stats()["journal_position"]
        assert node.store.batch_bytes(position, end) != b""
        node.snapshot(keep=1)
        node.snapshot(keep=1)
        assert [p for p, _ in list_snapshots(path)][-1] == position   # the base is never deleted
    with ledger.open(path) as node:
        assert np.array_equal(node.accounts(), source.accounts())
        assert node.verify().ok


def test_every_read_before_the_base_says_why(rejoined):
    path, _, position = rejoined
    with ledger.open(path) as node:
        unavailable = pytest.raises(ledger.LedgerHistoryUnavailableError, match=f"before position {position}.*"
                                    f"rejoined")
        with unavailable:
            node.history(2)
        with unavailable:
            node.explain(2)
        with unavailable:
            node.balance(2, at=5)
        with unavailable:
            node.lookup_transfers([100])
        with unavailable:   # posting a pending transfer from before the base needs its record
            node.transfer(51, 1, 2, 0, flags=ledger.TransferFlags.POST_PENDING, pending_id=PENDING_ID)
        assert node.stats()["journal_position"] == position   # nothing was changed
        assert node.balance(2) == 1500
        assert node.verify().ok


def test_a_torn_tail_after_the_base_is_recovered_as_in_any_journal(rejoined):
    path, _, position = rejoined
    with ledger.open(path) as node:
        for index in range(3):
            node.transfer(5000 + index, 1, 3, 1)
        last = node.stats()["journal_position"] - 2   # the last batch: a header and one event
    os.unlink(os.path.join(path, "journal", "DURABLE"))   # as a killed "fsync" writer leaves it
    segment = os.path.join(path, "journal", segment_name(last >> SEGMENT_RECORDS_LOG2))
    with open(segment, "r+b") as file:
        file.seek(SEGMENT_HEADER_BYTES + (last & ((1 << SEGMENT_RECORDS_LOG2) - 1)) * RECORD_SIZE + 8)
        file.write(bytes(RECORD_SIZE))
    with pytest.warns(RuntimeWarning, match="torn tail"):
        node = ledger.open(path)
    with node:
        assert node.stats()["journal_position"] == last
        assert node.balance(3) == 2
        assert node.verify().ok


def test_a_missing_or_damaged_base_is_refused_by_name(rejoined):
    path, _, position = rejoined
    base_snapshot = list_snapshots(path)[0][1]
    os.rename(base_snapshot, base_snapshot + ".aside")
    with pytest.raises(ledger.LedgerCorruptError, match=f"begins at position {position}.*missing"):
        ledger.open(path)
    os.rename(base_snapshot + ".aside", base_snapshot)
    with open(os.path.join(path, JOURNAL_BASE_FILE), "w") as file:
        file.write("something else\n")
    with pytest.raises(ledger.LedgerCorruptError, match="not a journal base file"):
        ledger.open(path)


def test_the_build_is_crash_safe(tmp_path, monkeypatch):
    source, snapshot = make_source(str(tmp_path / "source"))
    source.close()
    destination = str(tmp_path / "node")

    def crash(directory: str, position: int) -> None:
        raise OSError("crash while writing the base file")
    monkeypatch.setattr(rebuild, "write_journal_base", crash)
    with pytest.raises(OSError, match="crash"):
        restore.restore_from_snapshot(snapshot.path, destination)
    assert sorted(os.listdir(tmp_path)) == ["source"]   # no destination, no staging left
    monkeypatch.undo()
    os.mkdir(tmp_path / ".node.restoring-killed")          # what a killed build leaves
    with pytest.warns(RuntimeWarning, match="did not finish"):
        restore.restore_from_snapshot(snapshot.path, destination)
    assert sorted(os.listdir(tmp_path)) == ["node", "source"]
    with pytest.raises(FileExistsError):
        restore.restore_from_snapshot(snapshot.path, destination)
    with open(snapshot.path, "r+b") as file:   # a damaged snapshot is never built from
        file.seek(-1, os.SEEK_END)
        file.write(b"\xff")
    with pytest.raises(ledger.LedgerCorruptError):
        restore.restore_from_snapshot(snapshot.path, str(tmp_path / "other"))


def test_the_expiry_of_a_pending_transfer_from_before_the_base_is_refused_by_name(tmp_path):
    """The known limit (docs/CLUSTER.md "Rejoin and retention"): the base snapshot holds no journal records, and
    expiring a pending transfer needs its record. The call that would expire it is refused whole, by name."""
    from support.clock import Clock
    clock = Clock()
    source = ledger.open(str(tmp_path / "source"), create=True, segment_records_log2=SEGMENT_RECORDS_LOG2,
                         clock=clock)
    source.create_account(1, min_balance=ledger.BALANCE_MIN)
    source.create_account(2)
    assert source.transfer(PENDING_ID, 1, 2, 9, flags=ledger.TransferFlags.PENDING, timeout=1) == 0
    snapshot = source.snapshot()
    source.close()
    position = restore.restore_from_snapshot(snapshot.path, str(tmp_path / "node"))
    with ledger.open(str(tmp_path / "node"), clock=clock) as node:
        clock.advance(2 * 10**9)
        with pytest.raises(ledger.LedgerHistoryUnavailableError, match=f"before position {position}"):
            node.transfer(60, 1, 2, 1)
        assert node.stats()["journal_position"] == position
