"""Snapshots (round trips under load, fallback past damage, what a killed writer leaves behind, the file format).
Restore is in test_restore.py, verify in test_audit.py."""
from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import ledger
import ledger.snapshot as snapshot_module
from ledger.snapshot import write_snapshot
from support.crash_workload import Model, accounts, batch
from support.snapshot_ledgers import build, pending_ledger, same_counters

TESTS = os.path.dirname(os.path.abspath(__file__))


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


@pytest.fixture
def small_load_pieces(monkeypatch):
    """Snapshot loads in pieces of 4,112 bytes and steps of 1,040 (whole 16-byte slots, neither dividing the
    other): the small test files then take many pieces on several threads, as a 10M-account file does."""
    monkeypatch.setattr(snapshot_module, "LOAD_PIECE_BYTES", 4112)
    monkeypatch.setattr(snapshot_module, "LOAD_STEP_BYTES", 1040)


def damage_byte(path, offset):
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x01]))


def rewrite_header(path, **fields):
    """Set header fields (by HEADER position name) and recompute the header checksum, as a careless or hostile
    writer could."""
    names = ["magic", "version", "segment_records_log2", *snapshot_module.SCALARS, "created_ns", "state_hash",
             "body_checksum"]
    with open(path, "r+b") as file:
        page = bytearray(file.read(snapshot_module.PAGE_BYTES))
        values = list(snapshot_module.HEADER.unpack_from(page))
        for name, value in fields.items():
            values[names.index(name)] = value
        snapshot_module.HEADER.pack_into(page, 0, *values)
        page[snapshot_module.HEADER.size:snapshot_module.HEADER.size + 4] = ledger._core.crc32c(
            bytes(page[:snapshot_module.HEADER.size])).to_bytes(4, "little")
        file.seek(0)
        file.write(page)


@pytest.mark.parametrize("damage, message", [
    ("transfer_slots_byte", "body checksum"),  # a later piece than the first: every piece's checksum counts
    ("truncated", "truncated"),
    ("state_hash", "state hash"),
])
def test_snapshot_loaded_in_pieces(tmp_path, small_load_pieces, damage, message):
    directory = str(tmp_path / "data")
    model = Model()
    build(directory, 21, snapshot_every=10)
    older, newest = sorted(glob.glob(os.path.join(directory, "snapshots", "*.snapshot")))
    with ledger.open(directory) as handle:  # undamaged: loaded piece by piece, equal to the model
        assert handle.recovered_from.path == newest
        same_counters(handle.accounts(), model.state_after(21))
        assert handle.verify().ok
    with open(newest, "rb") as file:
        _, hash_expected, _, layout = snapshot_module._read_header(newest, file.fileno())
    transfer_slots_offset = layout[snapshot_module.SECTIONS.index("transfer_slots")][0]
    if damage == "transfer_slots_byte":
        damage_byte(newest, transfer_slots_offset + 3 * 4112 + 5)
    elif damage == "truncated":
        os.truncate(newest, transfer_slots_offset + 100)
    else:
        rewrite_header(newest, state_hash=hash_expected ^ 1)
    with pytest.raises(ledger.LedgerCorruptError, match=message):
        snapshot_module.read_snapshot(newest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ledger.open(directory) as handle:
            assert handle.recovered_from.path == older
            same_counters(handle.accounts(), model.state_after(21))
    assert any(message in str(warning.message) for warning in caught)


def test_capacities_asked_at_open_hold_after_a_snapshot_load(tmp_path):
    """A loaded snapshot brings its own table sizes; the capacities asked for at open are then made room for, as
    from genesis, so that the first batches after a restart do not pay for growing the tables."""
    directory = str(tmp_path / "data")
    build(directory, 10, snapshot_every=10)
    with ledger.open(directory) as handle:
        assert handle.recovered_from is not None
        small = handle.stats()
    assert small["memory_transfer_table_bytes"] < (1 << 18) * 16 and small["memory_account_table_bytes"] == 1024 * 16
    with ledger.open(directory, accounts_capacity=5000, transfers_capacity=100_000) as handle:
        assert handle.recovered_from is not None
        stats = handle.stats()
        assert stats["memory_transfer_table_bytes"] == (1 << 18) * 16  # the smallest table with 100,000 under 70%
        assert stats["memory_account_table_bytes"] == (1 << 13) * 16
        assert stats["memory_accounts_bytes"] >= 5000 * (64 + 32)
        same_counters(handle.accounts(), Model().state_after(10))
        assert handle.verify().ok


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


def test_a_reader_does_not_write_snapshots(tmp_path):
    """A read-only handle never changes the files: snapshots are the writer's (a reader's view of an os-mode
    journal may also run ahead of what the writer has synced)."""
    directory = str(tmp_path / "data")
    build(directory, 2, snapshot_every=0)
    with ledger.open(directory, readonly=True) as reader:
        with pytest.raises(ledger.LedgerError, match="read-only"):
            reader.snapshot()
    assert not os.path.exists(os.path.join(directory, "snapshots")) or snapshot_files(directory) == []


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


# ---- what the writer is held for, and what a killed writer leaves behind ---------------------------------------

class SyncGate:
    """A fault injector for durability "os" that holds the flusher inside its sync once armed, until released
    (then lets it sync, or fails it with EIO)."""

    def __init__(self, fail: bool = False) -> None:
        self.armed, self.held, self.released = threading.Event(), threading.Event(), threading.Event()
        self.fail = fail

    def __call__(self, operation: str) -> None:
        if operation == "sync" and self.armed.is_set():
            self.held.set()
            assert self.released.wait(60)
            if self.fail:
                raise OSError(errno.EIO, "injected sync failure")


def snapshot_files(directory):
    return sorted(os.listdir(os.path.join(directory, "snapshots")))


def test_os_mode_snapshot_holds_the_writer_only_for_the_fork(tmp_path):
    """durability os: the writer is not held while the journal is flushed; the child renames its file into place
    only once the flusher has made the journal durable through the snapshot's position."""
    directory = str(tmp_path / "data")
    gate = SyncGate()
    with ledger.api.open_with_hooks(directory, create=True, durability="os", fault_injector=gate) as handle:
        gate.armed.set()
        handle.create_accounts(accounts())
        assert gate.held.wait(10)  # the flusher is inside its sync of that batch, and stays there
        job = handle.snapshot(wait=False)  # returns: it used to flush first, which would wait here for the gate
        position = handle.stats()["journal_position"]
        time.sleep(0.3)  # room for a child that did not wait to write and rename its small file
        assert not job.done() and f"snapshot-{position:016d}.snapshot" not in snapshot_files(directory)
        gate.released.set()
        info = job.wait()
        assert info.position == position and snapshot_files(directory) == [f"snapshot-{position:016d}.snapshot"]
        assert handle._journal.wait_durable(position)
    with ledger.open(directory) as reopened:
        assert reopened.recovered_from.position == position


def test_closing_the_writer_lets_a_waiting_os_mode_snapshot_land(tmp_path):
    """A snapshot waiting for the flusher when the writer closes: the close's final flush makes the journal durable
    through it, and it lands. Past that, nothing more becomes durable: a wait returns False at once."""
    directory = str(tmp_path / "data")
    gate = SyncGate()
    handle = ledger.api.open_with_hooks(directory, create=True, durability="os", fault_injector=gate)
    gate.armed.set()
    handle.create_accounts(accounts())
    assert gate.held.wait(10)
    handle.transfers(batch(0))  # after the position the held sync covers
    job = handle.snapshot(wait=False)
    position = handle.stats()["journal_position"]
    gate.armed.clear()
    gate.released.set()
    journal = handle._journal
    handle.close()
    assert job.wait().position == position
    assert snapshot_files(directory) == [f"snapshot-{position:016d}.snapshot"]
    assert journal.wait_durable(position) and not journal.wait_durable(position + 1)


def test_snapshot_is_not_kept_when_the_journal_sync_fails(tmp_path):
    directory = str(tmp_path / "data")
    gate = SyncGate(fail=True)
    with ledger.api.open_with_hooks(directory, create=True, durability="os", fault_injector=gate) as handle:
        gate.armed.set()
        handle.create_accounts(accounts())
        assert gate.held.wait(10)
        job = handle.snapshot(wait=False)
        gate.released.set()  # the flusher's sync fails: the handle is poisoned, the journal never durable
        with pytest.raises(OSError, match="did not become durable through position"):
            job.wait()
        assert snapshot_files(directory) == []  # neither the file nor its temporary
        with pytest.raises(ledger.LedgerPoisonedError):
            handle.snapshot()


ORPHANED_SNAPSHOT_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[2])
import ledger
from support.crash_workload import accounts
from test_snapshot import SyncGate

gate = SyncGate()
handle = ledger.api.open_with_hooks(sys.argv[1], create=True, durability="os", fault_injector=gate)
gate.armed.set()
handle.create_accounts(accounts())
assert gate.held.wait(10)
writer = os.getpid()
try:  # as `ledger serve` does: a failed snapshot is reported, and the writer goes on
    job = handle.snapshot(wait=False)
except OSError:
    job = None
if os.getpid() != writer:  # the child came back out of snapshot(): it would go on as a second writer
    open(os.path.join(sys.argv[1], "child-ran-on"), "w").close()
    os._exit(0)
print(job._pid, flush=True)
time.sleep(0.3)
os.kill(writer, signal.SIGKILL)  # the writer dies before its journal is durable
"""


def process_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


EXITING_WRITER_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[2])
import ledger
from support.crash_workload import accounts

handle = ledger.open(sys.argv[1], create=True)  # durability fsync: every committed batch is durable already
handle.create_accounts(accounts())
job = handle.snapshot(wait=False)
print(job._pid, handle.stats()["journal_position"], flush=True)
os._exit(0)  # at once: no thread of the writer gets to run again
"""


def test_fsync_mode_snapshot_lands_even_if_the_writer_exits_at_once(tmp_path):
    """In fsync mode the journal is durable when the snapshot starts: the word that lets the child rename goes
    before snapshot() returns, not from a thread that the writer's exit could stop first."""
    directory = str(tmp_path / "data")
    outcome = subprocess.run([sys.executable, "-c", EXITING_WRITER_SCRIPT, directory, TESTS],
                             capture_output=True, text=True, timeout=120)
    assert outcome.returncode == 0, outcome.stderr
    child, position = map(int, outcome.stdout.split())
    deadline = time.monotonic() + 60
    while not process_gone(child):
        assert time.monotonic() < deadline, "the snapshot child did not finish"
        time.sleep(0.05)
    assert snapshot_files(directory) == [f"snapshot-{position:016d}.snapshot"]
    with ledger.open(directory) as reopened:
        assert reopened.recovered_from.position == position


def test_a_child_that_fails_before_the_journal_is_durable_reports_its_own_error(tmp_path):
    """The child fails at once (here: the snapshots folder is a file) and closes its end of the go-pipe before
    the journal is durable. The parent's word then meets EPIPE: wait() must still raise the child's error (it
    raised AssertionError from a dead reaper thread, and left the child unreaped)."""
    from ledger.snapshot import SnapshotJob
    directory = str(tmp_path / "data")
    with ledger.open(directory, create=True) as handle:
        handle.create_account(1)
        scalars, views = handle._engine.state_views()
        (tmp_path / "data" / "snapshots").write_bytes(b"not a folder")
        child_done = threading.Event()

        def durable_once_the_child_has_failed(position):
            assert child_done.wait(10)
            return True

        job = SnapshotJob(directory, scalars, views, 3, durable=durable_once_the_child_has_failed)
        time.sleep(0.3)                              # the child fails in milliseconds
        child_done.set()
        with pytest.raises(OSError, match="snapshot writer failed: error FileExistsError"):
            job.wait()
        assert job.done()


def test_snapshot_child_of_a_killed_writer_keeps_nothing(tmp_path):
    """The child waits for the parent's word that the journal is durable; a writer killed first closes the pipe
    without it: the child deletes its file and exits (it must not rename, nor run on in the parent's code)."""
    directory = str(tmp_path / "data")
    outcome = subprocess.run([sys.executable, "-c", ORPHANED_SNAPSHOT_SCRIPT, directory, TESTS],
                             capture_output=True, text=True, timeout=120)
    assert outcome.returncode == -signal.SIGKILL, outcome.stderr
    child = int(outcome.stdout.split()[0])
    deadline = time.monotonic() + 60
    while not process_gone(child):
        assert time.monotonic() < deadline, "the orphaned snapshot child did not exit"
        time.sleep(0.05)
    assert snapshot_files(directory) == []
    assert not os.path.exists(os.path.join(directory, "child-ran-on"))  # its report hit EPIPE: it still left
    with ledger.open(directory) as reopened:  # recovery: nothing acknowledged as durable was lost
        assert reopened.recovered_from is None


def test_snapshot_child_does_not_keep_the_writer_lock(tmp_path, monkeypatch):
    """A writer killed while its child still writes a snapshot must be reopenable at once: the child lets go of
    the LOCK it inherited (an flock lasts while any descriptor of it is open)."""
    directory = str(tmp_path / "data")
    release = str(tmp_path / "release")
    real_write = snapshot_module.write_snapshot

    def held_write(*arguments, **options):  # runs in the child: it writes only once the test has reopened
        deadline = time.monotonic() + 60     # a hang guard
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_write(*arguments, **options)

    monkeypatch.setattr(snapshot_module, "write_snapshot", held_write)
    handle = ledger.open(directory, create=True)
    handle.create_accounts(accounts())
    job = handle.snapshot(wait=False)
    handle.close()  # as if the writer died: its own descriptor of LOCK is gone, the child's is not
    try:
        reopened = None
        deadline = time.monotonic() + 30  # a hang guard: the child lets go first thing, and holds its write
        while reopened is None:
            try:
                reopened = ledger.open(directory)
            except ledger.LedgerLockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        with reopened:
            assert not job.done()
            assert reopened.stats()["accounts"] == accounts().shape[0]
    finally:
        open(release, "w").close()
    job.wait()


def test_unfinished_snapshot_files_are_removed_by_the_next_writer(tmp_path):
    directory = str(tmp_path / "data")
    build(directory, 2, snapshot_every=2)
    leftover = os.path.join(directory, "snapshots", ".snapshot-0000000000000099.tmp")
    with open(leftover, "wb") as file:
        file.write(b"half a snapshot")
    with ledger.open(directory, readonly=True):
        assert os.path.exists(leftover)  # a reader changes nothing on disk
    with ledger.open(directory) as handle:
        assert not os.path.exists(leftover)
        figures = handle.stats()
    snapshot_files = glob.glob(os.path.join(directory, "snapshots", "*.snapshot"))
    assert figures["disk_snapshot_bytes"] == sum(os.path.getsize(path) for path in snapshot_files) > 0
    segment_files = glob.glob(os.path.join(directory, "journal", "*.segment"))
    assert figures["disk_journal_bytes"] == sum(os.path.getsize(path) for path in segment_files) > 0


def test_replay_at_open_shows_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    """Replay in slices with a bar (forced on here, with tiny slices) reaches the same state and still finds a
    torn tail."""
    import ledger.store as store_module

    directory = str(tmp_path / "data")
    model = Model()
    build(directory, 12, snapshot_every=0)
    with ledger.open(directory, readonly=True) as handle:
        end = handle.stats()["journal_position"]
    segment = os.path.join(directory, "journal", f"{end >> 12:08d}.segment")  # 2**12 records per segment
    with open(segment, "r+b") as file:  # a torn tail: a header without its commit word, after the last batch
        file.seek(4096 + (end & 4095) * 64)
        file.write(b"\x4c\x44\x47\x52" + b"\x01" * 60)
    monkeypatch.setattr(store_module, "REPLAY_SLICE_RECORDS", 300)
    monkeypatch.setattr(store_module, "REPLAY_PROGRESS_RECORDS_MIN", 1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with ledger.open(directory) as handle:
        assert handle._journal.torn_records_zeroed > 0 and handle.stats()["journal_position"] == end
        same_counters(handle.accounts(), model.state_after(12))
    assert "replay [" in capsys.readouterr().err


# ---- docs/FORMAT.md "Snapshot file", read independently of ledger.snapshot ----------------------------------

MASK64 = 2**64 - 1


def mix(value):
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & MASK64
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def find_slot(keys, key):
    """The probe walk exactly as FORMAT.md describes it: the slot holding `key`, or None at an empty slot."""
    capacity_log2 = keys.size.bit_length() - 1
    group = ((key ^ mix(((key >> capacity_log2) + 0x9E3779B97F4A7C15) & MASK64)) & (keys.size - 1)) >> 2
    step = (mix(key ^ 0xD6E8FEB86659FD93) >> 7) | 1
    for _ in range(keys.size // 4):
        for slot in range(group * 4, group * 4 + 4):
            if int(keys[slot]) in (key, 0):
                return slot if int(keys[slot]) == key else None
        group = (group + step) % (keys.size // 4)
    return None


def test_snapshot_file_matches_format_md(tmp_path, clock):
    import struct

    from ledger._core import crc32c

    path = pending_ledger(str(tmp_path / "data"), clock)
    raw = open(path, "rb").read()
    fields = struct.unpack_from("<8sII7QII10Q", raw, 0)
    assert fields[:2] == (b"LDGRSNP\x00", 1) and fields[2] == 12
    assert struct.unpack_from("<I", raw, 160)[0] == crc32c(raw[:160]) and not any(raw[164:4096])
    write_position, account_count, transfer_count = fields[3], fields[7], fields[8]
    assert path.endswith(f"snapshot-{write_position:016d}.snapshot")
    entry_bytes = (64, 32, 16, 16, 16)
    offset, body, sections = 4096, 0, []
    for index, size in enumerate(entry_bytes):
        start, count = fields[12 + 2 * index], fields[13 + 2 * index]
        assert start == offset
        sections.append(raw[start:start + count * size])
        body = crc32c(sections[-1], body)
        offset += (count * size + 4095) // 4096 * 4096
    assert len(raw) == start + count * size
    assert fields[11] == body and fields[10] == crc32c(sections[1], crc32c(sections[0]))
    hot = np.frombuffer(sections[0], "<i8").reshape(account_count, 8)
    cold = np.frombuffer(sections[1], "<u8").reshape(account_count, 4)
    with ledger.open(str(tmp_path / "data"), readonly=True) as handle:
        assert hot[:, 1].tolist() == handle.accounts()["credits_posted"].tolist()
        assert cold[:, 0].tolist() == handle.accounts()["id"].tolist()
    for index, expected_count in ((2, account_count), (3, transfer_count)):
        slots = np.frombuffer(sections[index], "<u8").reshape(-1, 2)
        keys = slots[:, 0]
        assert int(np.count_nonzero(keys)) == expected_count
        for slot in np.flatnonzero(keys):
            assert find_slot(keys, int(keys[slot])) == slot
    transfers = np.frombuffer(sections[3], "<u8").reshape(-1, 2)
    states = {int(key): int(value) >> 40 for key, value in transfers if key}
    assert {key: states[key] for key in (10, 11, 13)} == {10: 2, 11: 3, 13: 5}


# ---- overlapping snapshot requests, and snapshots that fail ---------------------------------------------------

@pytest.mark.parametrize("durability", ["fsync", "os"])
def test_a_snapshot_requested_while_one_is_written_waits_for_it(tmp_path, durability):
    """snapshot(wait=False) then snapshot(): the second waits for the first (they are taken one at a time), so two
    children never prune the same old file at once (it raised FileNotFoundError in about a third of the rounds),
    and the newest `keep` positions are kept. Some rounds take both at the same position (nothing written
    between): the second replaces the first's file with the same state."""
    directory = str(tmp_path / "data")
    taken = []
    with ledger.open(directory, create=True, durability=durability, segment_records_log2=12) as handle:
        handle.create_accounts(accounts())
        for k in range(30):
            handle.transfers(batch(k))
            job = handle.snapshot(wait=False, keep=2)
            if k % 3:
                handle.transfers(batch(1000 + k))
            info = handle.snapshot(keep=2)
            assert job.wait().position <= info.position == handle.stats()["journal_position"]
            taken += [job.wait().position, info.position]
            newest = sorted(set(taken))[-2:]
            assert snapshot_files(directory) == [f"snapshot-{position:016d}.snapshot" for position in newest]
        final = handle.accounts()
    with ledger.open(directory) as reopened:
        assert reopened.recovered_from.position == taken[-1]
        same_counters(reopened.accounts(), final)


def unfinished_files(directory):
    folder = os.path.join(directory, "snapshots")
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp")) if os.path.isdir(folder) else []


SMALL_SEGMENT_RECORDS = 1 << 12  # segment_records_log2=12: 260 KiB segment files


def fill_past_one_segment(handle, first_batch):
    """Batches until the journal is well into its second segment (which it must allocate on the way)."""
    k = first_batch
    while handle.stats()["journal_position"] < SMALL_SEGMENT_RECORDS + 500:
        handle.transfers(batch(k))
        k += 1
    return k


def snapshot_folder_files(directory):
    folder = os.path.join(directory, "snapshots")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize("when", ["refused up front", "while writing"])
def test_a_snapshot_that_does_not_fit_deletes_what_it_wrote_and_the_journal_goes_on(tiny_filesystem, monkeypatch,
                                                                                      wait, when):
    """A real full disk (768 KiB tmpfs): the first segment takes 260 KiB, a snapshot with room for 65,536
    transfers needs 2 MiB. It is refused before anything is written; if it gets to write anyway ("while
    writing": the room check is turned off, as when the space goes between the check and the write) it fails
    with ENOSPC and must delete its partial temporary file: that file held the very space the journal's next
    segment needs (the next batches then failed with LedgerFullError)."""
    import ledger.api as api_module

    if when == "while writing":
        monkeypatch.setattr(api_module, "check_room", lambda *arguments: None)
    directory = str(tiny_filesystem("768k") / "data")
    with ledger.open(directory, create=True, segment_records_log2=12, transfers_capacity=1 << 16) as handle:
        handle.create_accounts(accounts())
        handle.transfers(batch(0))
        with pytest.raises(OSError, match="No space left on device") as raised:
            outcome = handle.snapshot(wait=wait)
            if not wait:
                outcome.wait()
        if when == "refused up front":
            assert isinstance(raised.value, ledger.LedgerFullError) and "nothing was written" in str(raised.value)
        assert snapshot_folder_files(directory) == []
        k = fill_past_one_segment(handle, 1)  # a new segment, in the space the snapshot had taken
        assert os.path.exists(os.path.join(directory, "journal", "00000001.segment"))
        with pytest.raises(OSError, match="No space left on device"):
            handle.snapshot()  # and again: still nothing left behind
        assert snapshot_folder_files(directory) == []
        handle.transfers(batch(k))
        final = handle.accounts()
    with ledger.open(directory) as reopened:
        same_counters(reopened.accounts(), final)
        assert reopened.verify().ok


def test_a_snapshot_that_leaves_room_for_the_next_segment_is_taken(tiny_filesystem):
    """The room check counts only what is needed: a small snapshot on the same small disk is written."""
    directory = str(tiny_filesystem("768k") / "data")
    with ledger.open(directory, create=True, segment_records_log2=12) as handle:
        handle.create_accounts(accounts())
        handle.transfers(batch(0))
        assert handle.snapshot().position == handle.stats()["journal_position"]


def test_write_snapshot_deletes_its_temporary_file_when_the_disk_is_full(tiny_filesystem):
    """What the forked child runs, called directly on a full disk: ENOSPC, and no temporary file."""
    directory = str(tiny_filesystem("256k") / "data")
    scalars = {"write_position": 7, "segment_records_log2": 12, "last_timestamp": 1, "last_checksum": 2,
               "last_header_position": 3, "account_count": 0, "transfer_count": 0}
    arrays = {name: np.zeros(count, snapshot_module.SECTION_DTYPES[name]) for name, count in
              (("accounts_hot", 0), ("accounts_cold", 0), ("account_slots", 16), ("transfer_slots", 1 << 15),
               ("expiry_heap", 0))}
    with pytest.raises(OSError) as raised:
        write_snapshot(directory, scalars, arrays, 3, 0.0)
    assert raised.value.errno == errno.ENOSPC
    assert os.listdir(os.path.join(directory, "snapshots")) == []


def test_a_snapshot_child_killed_mid_write_leaves_no_temporary_file(tmp_path):
    """The child dies (SIGKILL) after writing its temporary file, while it waits for the journal to become
    durable: it cannot clean up, so the parent, which reaps it, deletes the file."""
    directory = str(tmp_path / "data")
    gate = SyncGate()
    with ledger.api.open_with_hooks(directory, create=True, durability="os", fault_injector=gate) as handle:
        gate.armed.set()
        handle.create_accounts(accounts())
        assert gate.held.wait(10)  # the flusher holds: the child writes its file, then waits for the word
        job = handle.snapshot(wait=False)
        deadline = time.monotonic() + 30
        while not unfinished_files(directory):
            assert time.monotonic() < deadline, "the child wrote no temporary file"
            time.sleep(0.01)
        os.kill(job._pid, signal.SIGKILL)
        gate.armed.clear()
        gate.released.set()
        with pytest.raises(OSError, match="no report"):
            job.wait()
        assert snapshot_folder_files(directory) == []
        assert handle.snapshot().position == handle.stats()["journal_position"]  # the next one is fine
