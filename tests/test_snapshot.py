"""Snapshots (round trips under load, fallback past damage) and point-in-time restore against a model."""
from __future__ import annotations

import glob
import os
import random
import warnings

import numpy as np
import pytest

import ledger
from crash_workload import Model, accounts, batch
from ledger.restore import restore
from ledger.snapshot import read_snapshot, write_snapshot

COUNTERS = ["debits_posted", "credits_posted", "debits_pending", "credits_pending"]


def same_counters(actual, expected):
    assert actual["id"].tolist() == expected["id"].tolist()
    for name in COUNTERS:
        assert actual[name].tolist() == expected[name].tolist(), name


def build(directory, batches, snapshot_every, durability="fsync"):
    """Apply batches 0..batches-1, snapshotting every `snapshot_every`; return the journal end after each batch."""
    ends = []
    with ledger.open(directory, create=True, durability=durability, segment_records_log2=12) as handle:
        assert not handle.create_accounts(accounts()).any()
        for k in range(batches):
            handle.transfers(batch(k))
            ends.append(handle.stats()["journal_position"])
            if snapshot_every and (k + 1) % snapshot_every == 0:
                info = handle.snapshot(keep=3)
                assert info.position == ends[-1] and os.path.exists(info.path)
    return ends


def test_snapshot_round_trip_under_load(tmp_path):
    directory = str(tmp_path / "data")
    model = Model()
    build(directory, 40, snapshot_every=7)
    assert len(glob.glob(os.path.join(directory, "snapshots", "*.snapshot"))) == 3  # keep=3
    with ledger.open(directory) as handle:
        assert handle.recovered_from is not None and handle.recovered_from.position > 1
        same_counters(handle.accounts(), model.state_after(40))
        assert handle.verify().ok
        # The state after a snapshot load keeps working: idempotency across the snapshot boundary.
        applied = batch(3)[model.codes_of(3) == 0]
        applied["flags"] = 0  # LINKED does not take part in the comparison; dropping it avoids open chains
        assert (handle.transfers(applied) == ledger.TransferResult.EXISTS).all()
        handle.transfers(batch(40))
    with ledger.open(directory) as handle:
        same_counters(handle.accounts(), model.state_after(41))


def test_snapshot_while_writing_concurrently(tmp_path):
    """snapshot(wait=False): the writer keeps applying batches while the child writes the file."""
    directory = str(tmp_path / "data")
    model = Model()
    with ledger.open(directory, create=True, durability="os", segment_records_log2=12) as handle:
        handle.create_accounts(accounts())
        for k in range(10):
            handle.transfers(batch(k))
        job = handle.snapshot(wait=False)
        for k in range(10, 30):
            handle.transfers(batch(k))
        info = job.wait()
        assert info.stall_seconds < 5  # a sanity bound only: the fork, not the write, holds the writer
    with ledger.open(directory) as handle:
        assert handle.recovered_from.position == info.position
        same_counters(handle.accounts(), model.state_after(30))


def test_damaged_newest_snapshot_falls_back(tmp_path):
    directory = str(tmp_path / "data")
    model = Model()
    build(directory, 21, snapshot_every=10)
    snapshots = sorted(glob.glob(os.path.join(directory, "snapshots", "*.snapshot")))
    assert len(snapshots) == 2
    with open(snapshots[-1], "r+b") as file:
        file.seek(4096 + 10)
        byte = file.read(1)
        file.seek(4096 + 10)
        file.write(bytes([byte[0] ^ 0x01]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ledger.open(directory) as handle:
            assert handle.recovered_from.path == snapshots[0]
            same_counters(handle.accounts(), model.state_after(21))
    assert any("snapshot skipped" in str(warning.message) for warning in caught)
    os.unlink(snapshots[0])  # only the damaged one left: genesis replay
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with ledger.open(directory) as handle:
            assert handle.recovered_from is None
            same_counters(handle.accounts(), model.state_after(21))


def test_snapshot_from_another_journal_is_rejected(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    build(first, 5, snapshot_every=5)
    build(second, 6, snapshot_every=0)
    os.makedirs(os.path.join(second, "snapshots"))
    for path in glob.glob(os.path.join(first, "snapshots", "*")):
        os.link(path, os.path.join(second, "snapshots", os.path.basename(path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ledger.open(second) as handle:
            assert handle.recovered_from is None
    assert any("snapshot" in str(warning.message) for warning in caught)


def test_point_in_time_restore_equals_the_model(tmp_path):
    directory = str(tmp_path / "data")
    model = Model()
    ends = build(directory, 30, snapshot_every=8)
    rng = random.Random(5)
    for k in sorted(rng.sample(range(30), 5)) + [29]:
        destination = str(tmp_path / f"restored-{k}")
        # Any position inside batch k+1 cuts after batch k (batches are atomic).
        until = ends[k] + (rng.randrange(ends[k + 1] - ends[k] - 1) if k + 1 < 30 else 0)
        result = restore(directory, destination, until_position=until)
        assert result.verified and result.cut_position == ends[k]
        with ledger.open(destination) as restored:
            same_counters(restored.accounts(), model.state_after(k + 1))


def test_restore_until_time(tmp_path):
    directory = str(tmp_path / "data")
    model = Model()
    build(directory, 12, snapshot_every=5)
    with ledger.open(directory, readonly=True) as handle:
        last_of_batch_6 = int(handle.lookup_transfers(batch(6)["id"][:1])["timestamp"][0])
    result = restore(directory, str(tmp_path / "restored"), until_time=last_of_batch_6 + 1000 * 0)
    # The first row of batch 6 is its first event, so batch 6 is cut unless all its events are at or before.
    with ledger.open(str(tmp_path / "restored")) as restored:
        kept = restored.lookup_transfers(batch(6)["id"][:1])["state"][0] != 0
        same_counters(restored.accounts(), model.state_after(7 if kept else 6))
    assert result.verified


def test_restore_refuses_existing_destination(tmp_path):
    directory = str(tmp_path / "data")
    build(directory, 2, snapshot_every=0)
    os.makedirs(tmp_path / "exists")
    with pytest.raises(FileExistsError):
        restore(directory, str(tmp_path / "exists"))


def test_snapshot_of_memory_ledger_is_an_error():
    with ledger.open(None) as handle:
        with pytest.raises(ValueError, match="in-memory"):
            handle.snapshot()


def test_snapshot_counts(tmp_path):
    directory = str(tmp_path / "data")
    with ledger.open(directory, create=True) as handle:
        handle.create_accounts(accounts())
        handle.transfers(batch(0))
        info = handle.snapshot()
        assert info.accounts == handle.stats()["accounts"]
        assert info.transfers == handle.stats()["transfers"]
        assert np.isfinite(info.write_seconds)


# ---- verify checks every snapshot file against the replay at its position --------------------------------------

def rewrite_snapshot(path, change):
    """Rewrite a snapshot file with `change(arrays)` applied and every checksum and the state hash recomputed:
    damage that only a comparison with the journal can find."""
    scalars, arrays, _ = read_snapshot(path)
    change(arrays)
    os.unlink(path)
    write_snapshot(os.path.dirname(os.path.dirname(path)), scalars, arrays, keep=1000, stall_seconds=0.0)


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


def set_transfer_state(transfer_id, state):
    def change(arrays):
        slots = arrays["transfer_slots"]
        slot = np.flatnonzero(slots["key"] == transfer_id)[0]
        slots["value"][slot] = (int(slots["value"][slot]) & (2**40 - 1)) | (int(state) << 40)
    return change


def drop_expiries(arrays):
    arrays["expiry_heap"] = arrays["expiry_heap"][:0]


def add_to_balance(arrays):
    arrays["accounts_hot"]["credits_posted"][1] += 1
    arrays["accounts_hot"]["debits_posted"][0] += 1  # still conserved: only the journal can tell


@pytest.mark.parametrize("change, expected", [
    (set_transfer_state(10, ledger.TransferState.PENDING_VOIDED), "transfer id table"),
    (drop_expiries, "pending expiries"),
    (add_to_balance, "debits_posted"),
])
def test_verify_compares_each_snapshot_with_the_replay(tmp_path, clock, change, expected):
    directory = str(tmp_path / "data")
    path = pending_ledger(directory, clock)
    rewrite_snapshot(path, change)
    with ledger.open(directory, readonly=True, clock=clock) as handle:  # loads the rewritten snapshot
        report = handle.verify()
    assert not report.ok and report.snapshots == 1
    assert path in report.problems[0] and expected in report.problems[0], report  # the first divergence


def test_verify_reports_a_damaged_snapshot(tmp_path):
    directory = str(tmp_path / "data")
    build(directory, 21, snapshot_every=10)
    newest = sorted(glob.glob(os.path.join(directory, "snapshots", "*.snapshot")))[-1]
    with ledger.open(directory, readonly=True) as handle:
        assert handle.verify().ok and handle.verify().snapshots == 2
    with open(newest, "r+b") as file:
        file.seek(4096 + 10)
        byte = file.read(1)
        file.seek(4096 + 10)
        file.write(bytes([byte[0] ^ 0x01]))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with ledger.open(directory, readonly=True) as handle:  # skips it, with a warning
            report = handle.verify()
    assert not report.ok and len(report.problems) == 1
    assert newest in report.problems[0] and "body checksum" in report.problems[0]
