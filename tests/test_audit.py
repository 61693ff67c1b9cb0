"""Verify (ledger.audit): every snapshot file compared with the replay at its position, damaged snapshots
reported, snapshots pruned by the writer meanwhile."""
from __future__ import annotations

import glob
import os
import re
import warnings

import numpy as np
import pytest

import ledger
from ledger.snapshot import read_snapshot, write_snapshot
from support.snapshot_ledgers import build, pending_ledger


# ---- verify checks every snapshot file against the replay at its position --------------------------------------

def rewrite_snapshot(path, change):
    """Rewrite a snapshot file with `change(arrays)` applied and every checksum and the state hash recomputed:
    damage that only a comparison with the journal can find."""
    scalars, arrays, _ = read_snapshot(path)
    change(arrays)
    os.unlink(path)
    write_snapshot(os.path.dirname(os.path.dirname(path)), scalars, arrays, keep=1000, stall_seconds=0.0)


def set_transfer_state(transfer_id, state):
    def change(arrays):
        slots = arrays["transfer_slots"]
        slot = np.flatnonzero(slots["key"] == transfer_id)[0]
        slots["value"][slot] = (int(slots["value"][slot]) & (2**40 - 1)) | (int(state) << 40)
    return change


def renumber_transfer(old_id, new_id):
    def change(arrays):
        slots = arrays["transfer_slots"]
        slots["key"][np.flatnonzero(slots["key"] == old_id)[0]] = new_id   # same count, an id the journal lacks
    return change


def drop_transfer(transfer_id):
    def change(arrays):
        slots = arrays["transfer_slots"]
        slots[np.flatnonzero(slots["key"] == transfer_id)[0]] = (0, 0)
    return change


def repeat_transfer(repeated_id, replaced_id):
    def change(arrays):
        slots = arrays["transfer_slots"]
        source = np.flatnonzero(slots["key"] == repeated_id)[0]
        slots[np.flatnonzero(slots["key"] == replaced_id)[0]] = slots[source]   # same count, one id twice
    return change


def move_out_of_reach(transfer_id):
    def change(arrays):
        slots = arrays["transfer_slots"]
        slot = np.flatnonzero(slots["key"] == transfer_id)[0]
        empty = np.flatnonzero(slots["key"] == 0)
        far = empty[np.argmax(np.abs(empty.astype(np.int64) - int(slot)))]
        slots[far], slots[slot] = slots[slot], (0, 0)    # still in the table, where no lookup of it looks
    return change


def swap_account_slots(arrays):
    slots = arrays["account_slots"]
    first, second = np.flatnonzero(slots["key"] != 0)[:2]
    slots["value"][[first, second]] = slots["value"][[second, first]]   # ids pointing at each other's records


def drop_expiries(arrays):
    arrays["expiry_heap"] = arrays["expiry_heap"][:0]


def add_to_balance(arrays):
    arrays["accounts_hot"]["credits_posted"][1] += 1
    arrays["accounts_hot"]["debits_posted"][0] += 1  # still conserved: only the journal can tell


@pytest.mark.parametrize("change, expected", [
    (set_transfer_state(10, ledger.TransferState.PENDING_VOIDED), "transfer id table: 1 entries differ, first "
                                                                  "transfer 10 at position .* PENDING_VOIDED"),
    (renumber_transfer(14, 10**15), f"transfer id table: 1 entries differ, first transfer {10**15} .* no entry"),
    (drop_transfer(12), "transfer id table: 4 entries in .*, 5 in the replay"),
    (swap_account_slots, "account id table: 2 entries differ"),
    (repeat_transfer(10, 14), "transfer id table: 1 entries differ, first no entry for id 14 in .*, transfer 14 "),
    (move_out_of_reach(13), r"transfer id table: \d+ entries differ, first no entry for id 13 in .*, transfer 13 "),
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
    assert path in report.problems[0] and re.search(expected, report.problems[0]), report  # the first divergence


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


def test_verify_beside_a_writer_that_prunes_a_snapshot(tmp_path, monkeypatch):
    """A snapshot listed, then deleted by the writer's keep= before verify reads it, is not a divergence."""
    import ledger.audit as audit_module

    directory = str(tmp_path / "data")
    build(directory, 10, snapshot_every=5)
    real_list = audit_module.list_snapshots
    pruned = os.path.join(directory, "snapshots", f"snapshot-{2:016d}.snapshot")
    monkeypatch.setattr(audit_module, "list_snapshots", lambda folder: real_list(folder) + [(2, pruned)])
    with ledger.open(directory, readonly=True) as handle:
        report = handle.verify()
    assert report.ok and report.snapshots == 2, report
