"""The internal tier (ledger/store.py): what a Store holds and does, seen through its public names only."""
from __future__ import annotations

import os

import pytest

import ledger
from ledger.journal import RECORD_SIZE, SEGMENT_HEADER_BYTES
from ledger.store import Store, open_store


def test_a_store_holds_engine_journal_and_pipeline_and_a_ledger_wraps_it(tmp_path):
    directory = str(tmp_path / "data")
    store = open_store(directory, create=True)
    assert isinstance(store, Store) and store.path == directory and store.durability == "fsync"
    assert store.on_disk and store.recovered_from is None and not store.commits.grouped
    handle = ledger.Ledger(store)
    assert handle.store is store and handle.path == directory and handle.durability == "fsync"
    handle.create_account(1, min_balance=ledger.BALANCE_MIN)
    assert store.engine.account_count == 1 and store.engine.write_position == handle.stats()["journal_position"]
    path, offset = store.location(1)
    assert path == os.path.join(directory, "journal", "00000000.segment")
    assert offset == SEGMENT_HEADER_BYTES + RECORD_SIZE
    assert store.segment_bytes > 0 and store.lock_fd is not None
    handle.close()
    assert store.engine.closed
    store.close()   # idempotent


def test_a_memory_store(tmp_path):
    store = open_store(None)
    assert store.path is None and store.durability == "memory" and not store.on_disk
    assert store.location(1) == (None, None) and store.segment_bytes == 0 and store.lock_fd is None
    with ledger.Ledger(store) as handle:
        handle.create_account(1)
        assert handle.verify().ok and handle.scrub().ok


def test_poison_makes_every_later_command_refuse(tmp_path):
    store = open_store(str(tmp_path / "data"), create=True)
    with ledger.Ledger(store) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        store.poison()
        with pytest.raises(ledger.LedgerPoisonedError):
            handle.create_account(2)
        with pytest.raises(ledger.LedgerPoisonedError):
            handle.flush()


def test_recovered_from_names_the_snapshot_it_opened_from(tmp_path):
    directory = str(tmp_path / "data")
    with ledger.open(directory, create=True) as handle:
        handle.create_account(1)
        info = handle.snapshot()
    store = open_store(directory, readonly=True)
    try:
        assert store.recovered_from is not None and store.recovered_from.position == info.position
        assert store.engine.readonly and store.lock_fd is None
    finally:
        store.close()


def test_a_failed_open_lets_go_of_the_directory(tmp_path):
    directory = str(tmp_path / "data")
    with ledger.open(directory, create=True) as handle:
        handle.create_account(1)
    with pytest.raises(ValueError, match="accounts_capacity"):
        open_store(directory, accounts_capacity=-1)
    with pytest.raises(ledger.LedgerLockedError):
        with ledger.open(directory):
            open_store(directory)
    store = open_store(directory)   # the failed opens above left no lock behind
    store.close()
