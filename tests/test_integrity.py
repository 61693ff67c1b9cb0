"""Promises that no crash test can see: the hash chain (a batch with a valid checksum whose `previous_checksum`
does not name the batch before it is corruption, wherever the journal is read), and the system calls behind
durability "fsync" (kill -9 cannot tell a missing fdatasync: the page cache survives a killed process)."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import ledger
from ledger import _core
from ledger.journal import COMMIT_MAGIC, RECORD_SIZE, SEGMENT_HEADER_BYTES, segment_name
from ledger.restore import restore
from ledger.tail import tail

SEGMENT_RECORDS_LOG2 = 10
BATCHES = 4
WORD = struct.Struct("<Q")
PREVIOUS_CHECKSUM_OFFSET, CHECKSUM_OFFSET, COMMIT_OFFSET = 32, 40, 56   # docs/FORMAT.md: the batch header words
HASHED_HEADER_BYTES = 40   # the header bytes under the checksum: up to and including previous_checksum


def segment_file(directory, index=0):
    return os.path.join(directory, "journal", segment_name(index))


def write_ledger(directory, durability="fsync", batches=BATCHES, close=True):
    """Accounts, then `batches` batches of two transfers: returns (handle or None, header positions)."""
    handle = ledger.open(directory, create=True, durability=durability, segment_records_log2=SEGMENT_RECORDS_LOG2)
    accounts = ledger.accounts_batch(3)
    accounts["id"] = [1, 2, 3]
    accounts["ledger"] = 1
    accounts["min_balance"][0] = ledger.BALANCE_MIN
    assert not handle.create_accounts(accounts).any()
    headers = []
    for k in range(batches):
        headers.append(handle.stats()["journal_position"])
        rows = ledger.transfers_batch(2)
        rows["id"] = [10 + 2 * k, 11 + 2 * k]
        rows["debit_account"] = 1
        rows["credit_account"] = [2, 3]
        rows["ledger"] = 1
        rows["amount"] = [5 + k, 1]
        assert not handle.transfers(rows).any()
    if close:
        handle.close()
        handle = None
    return handle, headers


def forge_chain(path, header_position):
    """Give the batch at `header_position` a wrong previous_checksum and recompute its checksum (and commit word)
    so that the batch is self-consistent: only the chain can tell. The batches after it are re-chained to the
    forged one, so the one break is where the forgery is. Written with pwrite (a live writer's shared mapping
    sees it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        position = header_position
        previous = None
        while True:
            offset = SEGMENT_HEADER_BYTES + position * RECORD_SIZE
            header = bytearray(os.pread(fd, RECORD_SIZE, offset))
            (commit,) = WORD.unpack_from(header, COMMIT_OFFSET)
            if commit >> 32 != COMMIT_MAGIC:
                break
            count = WORD.unpack_from(header, 24)[0]
            (stored_previous,) = WORD.unpack_from(header, PREVIOUS_CHECKSUM_OFFSET)
            wrong = (stored_previous ^ 0x5A5A5A5A) & 0xFFFFFFFF if previous is None else previous
            WORD.pack_into(header, PREVIOUS_CHECKSUM_OFFSET, wrong)
            events = os.pread(fd, count * RECORD_SIZE, offset + RECORD_SIZE)
            checksum = _core.crc32c(bytes(header[:HASHED_HEADER_BYTES]), _core.crc32c(events))
            WORD.pack_into(header, CHECKSUM_OFFSET, checksum)
            WORD.pack_into(header, COMMIT_OFFSET, (COMMIT_MAGIC << 32) | checksum)
            os.pwrite(fd, bytes(header), offset)
            previous = checksum
            position += 1 + count
    finally:
        os.close(fd)
    assert previous is not None, f"no committed batch at {header_position}"


@pytest.fixture(params=["middle", "last"])
def forged(request, tmp_path):
    """A closed ledger whose batch 1 (middle) or last batch has a valid checksum and a broken chain."""
    directory = str(tmp_path / "data")
    _, headers = write_ledger(directory)
    forge_chain(segment_file(directory), headers[1] if request.param == "middle" else headers[-1])
    return directory


def test_forged_chain_is_corruption_at_open(forged):
    for readonly in (False, True):
        with pytest.raises(ledger.LedgerCorruptError, match="chain"):
            ledger.open(forged, readonly=readonly, segment_records_log2=SEGMENT_RECORDS_LOG2)


def test_forged_chain_stops_the_tailer(forged):
    with pytest.raises(ledger.LedgerCorruptError, match="chain"):
        list(tail(forged, follow=False))


def test_forged_chain_is_refused_by_restore(forged, tmp_path):
    destination = str(tmp_path / "restored")
    with pytest.raises(ledger.LedgerCorruptError, match="chain"):
        restore(forged, destination)
    assert not os.path.exists(destination)


def test_forged_chain_fails_verify_of_a_live_ledger(tmp_path):
    """A batch forged under an open writer ("os": its mapping is the page cache, so it sees the bytes): verify
    replays the journal and must stop at the forgery, although the live state equals what the batches say."""
    directory = str(tmp_path / "data")
    handle, headers = write_ledger(directory, durability="os", close=False)
    try:
        assert handle.verify().ok
        forge_chain(segment_file(directory), headers[1])
        report = handle.verify()
        assert not report.ok
        assert any("chain" in problem for problem in report.problems), report.problems
    finally:
        handle.close()


def test_an_intact_journal_passes_every_reader(tmp_path):
    """The other side of the forgery tests: the same ledger unforged opens, tails, restores and verifies."""
    directory = str(tmp_path / "data")
    write_ledger(directory)
    with ledger.open(directory, segment_records_log2=SEGMENT_RECORDS_LOG2) as handle:
        assert handle.verify().ok
    events = np.concatenate(list(tail(directory, follow=False)))
    assert len(events) == 3 + 2 * BATCHES
    assert restore(directory, str(tmp_path / "restored")).verified


# -- the system calls of durability "fsync" --

class SyscallLog:
    """Wraps os.pwrite, os.fdatasync and os.fsync (every path of ledger.journal reaches the files through them)
    and records (call, path) in order: the path is what the descriptor names in /proc, so a sync of the wrong
    file does not count."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("pwrite", "fdatasync", "fsync"):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def wrapper(fd, *arguments):
            self.calls.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            return real(fd, *arguments)
        return wrapper

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def assert_synced_after_last_write(calls, path):
    writes = [index for index, (name, target) in enumerate(calls) if name == "pwrite" and target == path]
    assert writes, f"nothing was written to {path}: {calls}"
    syncs = [index for index, (name, target) in enumerate(calls)
             if name in ("fdatasync", "fsync") and target == path and index > writes[-1]]
    assert syncs, f"{path} was written and not synced before the call returned: {calls}"


def test_fsync_mode_syncs_each_batch_before_the_call_returns(tmp_path, monkeypatch):
    directory = str(tmp_path / "data")
    handle, _ = write_ledger(directory, batches=0, close=False)
    try:
        log = SyscallLog(monkeypatch)
        path = os.path.realpath(segment_file(directory))
        for k in range(3):
            rows = ledger.transfers_batch(1 + k)
            rows["id"] = 100 + 10 * k + np.arange(1 + k)
            rows["debit_account"], rows["credit_account"], rows["ledger"], rows["amount"] = 1, 2, 1, 3
            assert not handle.transfers(rows).any()
            assert_synced_after_last_write(log.take(), path)
        assert handle.transfer(id=200, debit_account=1, credit_account=3, amount=1, ledger=1) == 0
        assert_synced_after_last_write(log.take(), path)
    finally:
        monkeypatch.undo()
        handle.close()


def test_a_new_segment_and_its_directory_entry_are_synced(tmp_path, monkeypatch):
    """Batches that fill segment 0 make the journal create segment 1 (in the background, ahead of need): the file
    is synced before it is renamed into place, and the journal directory after the rename, before any batch in it
    is acknowledged."""
    directory = str(tmp_path / "data")
    handle, _ = write_ledger(directory, batches=0, close=False)
    journal_directory = os.path.realpath(os.path.join(directory, "journal"))
    second = os.path.join(journal_directory, segment_name(1))
    try:
        log = SyscallLog(monkeypatch)
        real_rename = os.rename
        renamed = []

        def rename(source, destination, *arguments, **keywords):
            real_rename(source, destination, *arguments, **keywords)
            log.calls.append(("rename", os.path.realpath(destination)))
            renamed.append(destination)

        monkeypatch.setattr(os, "rename", rename)
        rows_per_batch = 300
        for k in range(8):   # 2400 records: into segment 2 of 1024-record segments
            rows = ledger.transfers_batch(rows_per_batch)
            rows["id"] = 1000 + k * rows_per_batch + np.arange(rows_per_batch)
            rows["debit_account"], rows["credit_account"], rows["ledger"], rows["amount"] = 1, 2, 1, 1
            assert not handle.transfers(rows).any()
        handle.flush()
        calls = log.take()
    finally:
        monkeypatch.undo()
        handle.close()
    names = [(name, target) for name, target in calls]
    assert ("rename", second) in names, f"segment 1 was not created by a rename: {names}"
    renamed_at = names.index(("rename", second))
    temporary = os.path.join(journal_directory, f".{segment_name(1)}.tmp")
    assert any(name in ("fsync", "fdatasync") and target == temporary for name, target in names[:renamed_at]), \
        "the new segment file was not synced before its rename"
    assert ("fsync", journal_directory) in names[renamed_at:], "the journal directory was not synced after the rename"
    assert_synced_after_last_write(names, second)


# The same promise seen from outside the process: the system calls themselves (strace), so no way of reaching the
# disk that bypasses the os module (or a wrapper around it) can pass for a sync.
STRACED_WRITER = r"""
import os, sys
import numpy as np
import ledger
directory = sys.argv[1]
handle = ledger.open(directory, create=True, segment_records_log2=10)
accounts = ledger.accounts_batch(2)
accounts["id"] = [1, 2]
accounts["min_balance"][0] = ledger.BALANCE_MIN
assert not handle.create_accounts(accounts).any()
for k in range(3):
    rows = ledger.transfers_batch(1 + k)
    rows["id"] = 100 + 10 * k + np.arange(1 + k)
    rows["debit_account"], rows["credit_account"], rows["amount"] = 1, 2, 3
    os.access(f"/ledger-marker-call-{k}", os.F_OK)      # seen by strace: the call starts
    assert not handle.transfers(rows).any()
    os.access(f"/ledger-marker-returned-{k}", os.F_OK)  # the call has returned
handle.close()
"""
STRACE_CALLS = "pwrite64,pwritev,pwritev2,write,fdatasync,fsync,msync,sync_file_range,faccessat,faccessat2,access"


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")
def test_fsync_mode_syncs_each_batch_seen_by_strace(tmp_path):
    directory = str(tmp_path / "data")
    trace = str(tmp_path / "trace")
    completed = subprocess.run(["strace", "-f", "-qq", "-y", "-e", f"trace={STRACE_CALLS}", "-o", trace,
                                sys.executable, "-c", STRACED_WRITER, directory], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    segment = os.path.realpath(segment_file(directory))
    with open(trace) as file:
        lines = file.read().splitlines()
    for k in range(3):
        start = next(i for i, line in enumerate(lines) if f"/ledger-marker-call-{k}" in line)
        end = next(i for i, line in enumerate(lines) if f"/ledger-marker-returned-{k}" in line)
        inside = lines[start:end]
        writes = [i for i, line in enumerate(inside) if line.split()[1].startswith(("pwrite", "write(")) and
                  f"<{segment}>" in line]
        assert writes, f"call {k}: nothing written to {segment}: {inside}"
        assert any(succeeded_sync(inside, i, segment) for i in range(writes[-1], len(inside))), \
            f"call {k}: {segment} written, not synced before the call returned: {inside}"


def succeeded_sync(lines, index, path):
    """Line `index` of an strace -f log starts an fdatasync or fsync of `path` that returned 0 (on that line, or
    on its "resumed" line when another thread's call was logged in between)."""
    pid, call = lines[index].split()[:2]
    if not call.startswith(("fdatasync(", "fsync(")) or f"<{path}>" not in call:
        return False
    if lines[index].rstrip().endswith("= 0"):
        return True
    name = call.split("(")[0]
    return lines[index].rstrip().endswith("<unfinished ...>") and any(
        line.split()[:1] == [pid] and f"<... {name} resumed>" in line and line.rstrip().endswith("= 0")
        for line in lines[index + 1:])
