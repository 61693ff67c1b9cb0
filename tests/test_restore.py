"""Point-in-time restore (ledger.restore) against a model: cut points, the snapshot it starts from, and what a
failed or killed restore leaves behind."""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import random
import shutil
import subprocess
import sys
import warnings

import pytest

import ledger
import ledger.restore as restore_module
from ledger.moments import format_ns
from ledger.restore import parse_time, restore
from support.crash_workload import accounts, batch
from support.model import Model as ReferenceModel
from support.snapshot_ledgers import COUNTERS, build


class Reference:
    """The independent reference model (tests/support/model.py, plain Python) fed the same accounts and batches."""

    def __init__(self):
        self.model = ReferenceModel()
        assert not any(self.model.create_accounts(accounts(), now_ns=0))
        self.applied = 0

    def after(self, batches):
        assert batches >= self.applied, "the reference only moves forward"
        while self.applied < batches:
            self.model.transfers(batch(self.applied), now_ns=0)
            self.applied += 1
        return self.model


def same_as_reference(directory, reference, batches, checked_batches):
    """The restored ledger holds exactly the reference's state after `batches` batches: every account's counters
    and the state of every transfer id of batches 0 .. checked_batches - 1 (later ones must be unknown)."""
    model = reference.after(batches)
    with ledger.open(directory) as restored:
        for row in restored.accounts():
            expected = model.account(int(row["id"]))
            assert [int(row[name]) for name in COUNTERS] == [getattr(expected, name) for name in COUNTERS]
        assert restored.stats()["accounts"] == len(model.accounts)
        for k in range(checked_batches):
            ids = batch(k)["id"]
            assert restored.lookup_transfers(ids)["state"].tolist() == [model.state(int(i)) for i in ids], k


def test_point_in_time_restore_equals_the_model(tmp_path):
    directory = str(tmp_path / "data")
    ends = build(directory, 30, snapshot_every=8)
    reference = Reference()
    rng = random.Random(5)
    for k in sorted(rng.sample(range(30), 5)) + [29]:
        destination = str(tmp_path / f"restored-{k}")
        # Any position inside batch k+1 cuts after batch k (batches are atomic).
        until = ends[k] + (rng.randrange(ends[k + 1] - ends[k] - 1) if k + 1 < 30 else 0)
        result = restore(directory, destination, until_position=until)
        assert result.verified and result.cut_position == ends[k]
        assert result.snapshot is None or int(result.snapshot[-25:-9]) <= ends[k]
        same_as_reference(destination, reference, k + 1, min(k + 2, 30))


def test_restore_until_time_to_the_nanosecond(tmp_path, clock):
    """--until-time at the last event of batch 6 keeps it, one nanosecond earlier cuts it (batches are atomic);
    a cut read at microseconds would drop batch 6 in the first case too."""
    directory = str(tmp_path / "data")
    build(directory, 12, snapshot_every=5, clock=clock)
    with ledger.open(directory, readonly=True) as handle:
        header_position, timestamp, count = handle._engine.batch_headers(1)[7]  # [0] created the accounts
        last_event_ns = timestamp + count - 1
    assert last_event_ns % 1000 != 0
    reference = Reference()
    for until_ns, kept in ((last_event_ns - 1, 6), (last_event_ns, 7)):
        destination = str(tmp_path / f"restored-{until_ns}")
        result = restore(directory, destination, until_time=parse_time(format_ns(until_ns)))
        assert result.verified and result.cut_position == (header_position + 1 + count if kept == 7
                                                           else header_position)
        same_as_reference(destination, reference, kept, 8)
    with pytest.raises(ValueError, match="not '123'"):
        parse_time("123")  # a journal position, not a time


def test_restore_uses_the_named_snapshot(tmp_path):
    directory = str(tmp_path / "data")
    ends = build(directory, 24, snapshot_every=8)
    snapshots = sorted(glob.glob(os.path.join(directory, "snapshots", "*.snapshot")))
    assert len(snapshots) == 3
    result = restore(snapshots[0], str(tmp_path / "r1"), until_position=ends[20])
    assert result.verified and result.snapshot == snapshots[0] and result.cut_position == ends[20]
    with ledger.open(str(tmp_path / "r1")) as restored:
        assert restored.recovered_from.position == ends[7]  # the named one, not the newest at or before the cut
    same_as_reference(str(tmp_path / "r1"), Reference(), 21, 22)
    with pytest.raises(ValueError, match="after the cut"):
        restore(snapshots[2], str(tmp_path / "r2"), until_position=ends[20])
    # Held outside its data directory: --journal names the journal.
    outside = str(tmp_path / "kept" / "copy.snapshot")
    os.makedirs(os.path.dirname(outside))
    shutil.copyfile(snapshots[1], outside)
    with pytest.raises(FileNotFoundError, match="--journal"):
        restore(outside, str(tmp_path / "r3"))
    result = restore(outside, str(tmp_path / "r3"), journal=directory)
    assert result.verified and result.snapshot == outside and result.cut_position == ends[-1]
    with pytest.raises(ValueError, match="does not belong"):  # another journal
        build(str(tmp_path / "other"), 24, snapshot_every=0)  # same positions, other timestamps
        restore(outside, str(tmp_path / "r4"), journal=str(tmp_path / "other"))
    assert not [name for name in os.listdir(tmp_path) if "restoring" in name or name in ("r2", "r4")]


def flip_body_byte(path):
    with open(path, "r+b") as file:
        file.seek(4096 + 10)
        byte = file.read(1)
        file.seek(4096 + 10)
        file.write(bytes([byte[0] ^ 0x01]))


def test_restore_checks_the_snapshot_it_copies(tmp_path):
    directory = str(tmp_path / "data")
    ends = build(directory, 24, snapshot_every=8)
    snapshots = sorted(glob.glob(os.path.join(directory, "snapshots", "*.snapshot")))
    flip_body_byte(snapshots[1])
    with pytest.raises(ledger.LedgerCorruptError, match="body checksum"):
        restore(snapshots[1], str(tmp_path / "named"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = restore(directory, str(tmp_path / "skipped"), until_position=ends[20])
    assert result.verified and result.snapshot == snapshots[0]  # the damaged newer one was skipped
    assert any("snapshot skipped" in str(warning.message) for warning in caught)


def test_restore_fsyncs_what_it_writes(tmp_path, monkeypatch):
    """Every file and directory the restore creates is fsynced before the rename that publishes it."""
    directory = str(tmp_path / "data")
    ends = build(directory, 12, snapshot_every=5)
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    destination = str(tmp_path / "restored")
    result = restore(directory, destination, until_position=ends[9])
    monkeypatch.undo()
    staging = {os.path.dirname(path) for path in synced if path.endswith(".segment")}
    assert len(staging) == 1
    staging = staging.pop().removesuffix("/journal")
    assert ".restored.restoring-" in staging and not os.path.exists(staging)
    # The restore writes the segments up to the cut; the check that opens the result as a writer adds
    # journal/DURABLE and may create the next segment ahead of need (as any writer past its first segment does).
    written = [os.path.join("journal", name) for name in os.listdir(os.path.join(destination, "journal"))
               if name.endswith(".segment") and int(name.split(".")[0]) <= result.cut_position >> 12]
    assert result.segments_copied == len(written) > 1
    for relative in written + ["journal", "snapshots", ""]:
        assert os.path.normpath(os.path.join(staging, relative)) in synced, relative
    assert any(path.startswith(staging + "/snapshots/.snapshot-") for path in synced)  # before its rename
    assert str(tmp_path) in synced  # the parent, after the rename


def test_restore_refuses_existing_destination(tmp_path):
    directory = str(tmp_path / "data")
    build(directory, 2, snapshot_every=0)
    os.makedirs(tmp_path / "exists")
    with pytest.raises(FileExistsError):
        restore(directory, str(tmp_path / "exists"))


def lacking_renameat2(monkeypatch, how):
    """Make restore's rename see a C library without renameat2 ("missing": glibc < 2.28) or a kernel or file
    system that refuses RENAME_NOREPLACE ("einval"); "kernel": the real call. Everything else stays real."""
    if how == "kernel":
        return
    import ctypes
    real_library = ctypes.CDLL

    class Library:
        def __init__(self, *arguments, **options):
            self._library = real_library(*arguments, **options)

        def __getattr__(self, name):
            if name != "renameat2":
                return getattr(self._library, name)
            if how == "missing":
                raise AttributeError(name)

            def refused(*arguments):
                ctypes.set_errno(errno.EINVAL)
                return -1
            return refused

    monkeypatch.setattr(ctypes, "CDLL", Library)


@pytest.mark.parametrize("renameat2", ["kernel", "missing", "einval"])
@pytest.mark.parametrize("appears", ["empty directory", "file"])
def test_restore_does_not_replace_a_destination_that_appears_meanwhile(tmp_path, monkeypatch, appears, renameat2):
    """DEST is checked first, then built beside it for a while: something created at DEST meanwhile (even an empty
    directory, which a plain rename would silently replace) makes restore fail and stay untouched. Without
    RENAME_NOREPLACE (older libc, a file system that refuses it) the check just before the rename catches it."""
    directory = str(tmp_path / "data")
    destination = tmp_path / "restored"
    build(directory, 2, snapshot_every=0)
    lacking_renameat2(monkeypatch, renameat2)
    real_build = restore_module._build

    def build_while_someone_creates_destination(*arguments):
        segments = real_build(*arguments)
        if appears == "file":
            destination.write_bytes(b"theirs")
        else:
            destination.mkdir()
        return segments

    monkeypatch.setattr(restore_module, "_build", build_while_someone_creates_destination)
    with pytest.raises(FileExistsError):
        restore(directory, str(destination))
    assert sorted(os.listdir(tmp_path)) == ["data", "restored"]  # the staging directory was removed
    if appears == "file":
        assert destination.read_bytes() == b"theirs"
    else:
        assert list(destination.iterdir()) == []


@pytest.mark.parametrize("renameat2", ["missing", "einval"])
def test_restore_without_rename_noreplace_still_builds_the_ledger(tmp_path, monkeypatch, renameat2):
    directory = str(tmp_path / "data")
    build(directory, 2, snapshot_every=0)
    lacking_renameat2(monkeypatch, renameat2)
    result = restore(directory, str(tmp_path / "restored"))
    assert sorted(os.listdir(tmp_path)) == ["data", "restored"]
    with ledger.open(directory, readonly=True) as original, ledger.open(str(tmp_path / "restored")) as restored:
        assert restored.stats()["journal_position"] == result.cut_position == original.stats()["journal_position"]
        assert restored.accounts().tolist() == original.accounts().tolist()


KILLED_RESTORE = """
import sys, time
import ledger.restore as restore_module
real_build = restore_module._build
def build_then_hang(staging, *arguments):
    real_build(staging, *arguments)         # the staging directory is complete: then the process is killed
    print("built", flush=True)
    time.sleep(60)
restore_module._build = build_then_hang
restore_module.restore(sys.argv[1], sys.argv[2])
"""


def test_a_killed_restore_leaves_a_directory_the_next_restore_deletes(tmp_path):
    """SIGKILL a restore after it built its temporary directory (DEST not there yet): the directory stays behind.
    The next restore to the same DEST deletes it (with a warning) and builds DEST; a temporary directory that a
    live restore holds, or one for another DEST, is left alone."""
    directory = str(tmp_path / "data")
    build(directory, 3, snapshot_every=2)
    destination = tmp_path / "restored"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_RESTORE, directory, str(destination)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "built"
    finally:
        killed.kill()
        killed.wait()
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".restored.restoring-")]
    assert len(leftovers) == 1 and not destination.exists()
    assert os.listdir(tmp_path / leftovers[0] / "journal")                 # gigabytes, in real life
    live = tmp_path / ".restored.restoring-live"
    other = tmp_path / ".other.restoring-x"
    live.mkdir()
    other.mkdir()
    live_fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(live_fd, fcntl.LOCK_EX)                                # as a running restore holds it
        with pytest.warns(RuntimeWarning, match=rf"deleted .*{leftovers[0]}, left by an earlier restore"):
            result = restore(directory, str(destination))
    finally:
        os.close(live_fd)
    assert result.verified
    assert sorted(os.listdir(tmp_path)) == sorted([".other.restoring-x", ".restored.restoring-live", "data",
                                                   "restored"])


def test_failed_restore_leaves_nothing(tmp_path, tiny_filesystem):
    """Restore onto a real full disk (a 100 KiB tmpfs; a segment is 260 KiB): ENOSPC while copying, and neither
    DEST nor the temporary directory beside it is left; the source is untouched."""
    directory = str(tmp_path / "data")
    build(directory, 2, snapshot_every=0)
    mount = tiny_filesystem("100k")
    with pytest.raises(OSError) as raised:
        restore(directory, str(mount / "restored"))
    assert raised.value.errno == errno.ENOSPC
    assert os.listdir(mount) == []
    with ledger.open(directory, readonly=True, segment_records_log2=12) as handle:
        assert handle.verify().ok
