"""The read side: `ledger.tail` follows a journal written by another process, and `ledger.project` keeps a SQLite
read model of it exactly once (docs: ledger/tail.py, ledger/project.py)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import ledger
from ledger import _core
from ledger.audit import check_invariants
from ledger.format import COMMIT_MAGIC, RECORD_SIZE, SEGMENT_HEADER_BYTES, segment_name
from ledger.project import SqliteProjection
from ledger.tail import EVENT_DTYPE, Tailer, tail

SEGMENT_RECORDS_LOG2 = 10          # 1024 records per segment: batches roll over and span segments
KIND_ACCOUNT, KIND_EXPIRE = 1, 6

# A writer process: accounts in two ledgers, then batches of transfers with LINKED chains (some fail), pending
# transfers (some with a 1 s timeout, so expiries happen), posts (full and partial), voids, and one snapshot.
WRITER = r'''
import json, sys, time
import numpy as np
import ledger
from ledger import TransferFlags

options = json.loads(sys.argv[1])
handle = ledger.open(options["directory"], create=True, durability=options["durability"],
                     segment_records_log2=options["segment_records_log2"])
rng = np.random.default_rng(options["seed"])
ACCOUNTS = 60
ids = np.arange(100, 100 + ACCOUNTS, dtype=np.uint64)
accounts = ledger.accounts_batch(ACCOUNTS + 2)
accounts["id"][:2] = [1, 2]                      # the settlement account of ledger 1 and of ledger 2
accounts["ledger"][:2] = [1, 2]
accounts["min_balance"][:2] = ledger.BALANCE_MIN
accounts["id"][2:] = ids
accounts["ledger"][2:] = 1 + ids % 2
accounts["user_data"][2:] = (1 << 63) + ids      # above 2**63: stored as signed in SQLite
assert not handle.create_accounts(accounts).any()
next_id = 1 << 32
pendings = {}                                    # id -> amount, applied and not resolved by us yet
first_expiry = None                              # when the first pending with a timeout is due
batch = 0
while options["batches"] < 0 or batch < options["batches"]:
    count = int(rng.choice(options["sizes"]))
    rows = ledger.transfers_batch(count)
    rows["id"] = np.arange(next_id, next_id + count, dtype=np.uint64)
    next_id += count
    debit = rng.choice(ids, count)
    credit = 100 + (debit - 100 + 2 * rng.integers(1, ACCOUNTS // 2, count).astype(np.uint64)) % ACCOUNTS
    funding = rng.random(count) < 0.3
    debit[funding] = 1 + credit[funding] % 2
    rows["debit_account"], rows["credit_account"] = debit, credit
    rows["ledger"] = 1 + credit % 2
    rows["amount"] = rng.integers(1, 1000, count)
    rows["code"] = rng.integers(0, 100, count)
    rows["user_data"] = rng.integers(0, 2**64 - 1, count, dtype=np.uint64)
    pending = rng.random(count) < 0.2
    rows["flags"] = np.where(pending, int(TransferFlags.PENDING), 0) | np.where(rng.random(count) < 0.2, 1, 0)
    rows["timeout"] = np.where(pending & (rng.random(count) < 0.5), 1, 0)
    results = handle.transfers(rows)
    for row in np.flatnonzero((results == 0) & pending):
        if rows["timeout"][row]:                 # left to expire
            first_expiry = first_expiry or time.monotonic() + 1.05
        else:
            pendings[int(rows["id"][row])] = int(rows["amount"][row])
    if pendings and batch % 3 == 0:              # resolve a few: partial and full posts, voids
        chosen = list(pendings)[: int(rng.integers(1, 6))]
        resolve = ledger.transfers_batch(len(chosen))
        resolve["id"] = np.arange(next_id, next_id + len(chosen), dtype=np.uint64)
        next_id += len(chosen)
        resolve["pending_id"] = chosen
        void = rng.random(len(chosen)) < 0.3
        resolve["flags"] = np.where(void, int(TransferFlags.VOID_PENDING), int(TransferFlags.POST_PENDING))
        resolve["amount"] = [0 if v else int(rng.integers(0, pendings[p] + 1)) for p, v in zip(chosen, void)]
        handle.transfers(resolve)                # some fail (expired already): fine
        for p in chosen:
            del pendings[p]
    if batch == options["snapshot_at"]:
        handle.snapshot()
    if options["sleep_ms"] and batch % 4 == 0:
        time.sleep(options["sleep_ms"] / 1000)
    batch += 1
if options["expire_at_end"] and first_expiry is not None:
    time.sleep(max(0.0, first_expiry - time.monotonic()))
    handle.transfers(ledger.transfers_batch(0))  # an empty call expires what is due: EXPIRE events
handle.close()
print("done", flush=True)
'''


def writer_options(directory, **overrides) -> dict:
    options = {"directory": str(directory), "durability": "os", "segment_records_log2": SEGMENT_RECORDS_LOG2,
               "seed": 1, "batches": 300, "sizes": [1, 3, 20, 150], "snapshot_at": 100, "sleep_ms": 0,
               "expire_at_end": True}
    options.update(overrides)
    return options


def start_writer(directory, **overrides) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(writer_options(directory, **overrides))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_writer(directory, **overrides) -> None:
    process = start_writer(directory, **overrides)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err


def journal_events(directory) -> tuple[np.ndarray, int]:
    """Every committed event as the engine itself decodes it, and the end position (the ledger must be closed:
    opened read-only, a torn tail is refused)."""
    with ledger.open(directory, readonly=True) as handle:
        return _engine_events(handle)


def _engine_events(handle) -> tuple[np.ndarray, int]:
    engine = handle._engine
    headers = engine.batch_headers(1, limit=1 << 30)
    positions = np.concatenate([np.arange(h + 1, h + 1 + n, dtype=np.uint64) for h, _, n in headers]) \
        if headers else np.empty(0, np.uint64)
    return engine.decode_events(positions), engine.write_position


def follow_while(process: subprocess.Popen, tailer: Tailer) -> list[np.ndarray]:
    """Poll until the writer has exited and nothing new is committed; check each array ends at tailer.position."""
    arrays = []
    while True:
        finished = process.poll() is not None
        events = tailer.poll()
        if events.size:
            assert int(events["position"][-1]) + 1 == tailer.position
            arrays.append(events)
        elif finished:
            return arrays
        else:
            time.sleep(0.001)


def concatenated(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, EVENT_DTYPE)


# -- journal surgery for the torn and corrupt cases --

def record_offset(position: int) -> tuple[str, int]:
    index = position >> SEGMENT_RECORDS_LOG2
    return segment_name(index), SEGMENT_HEADER_BYTES + (position & ((1 << SEGMENT_RECORDS_LOG2) - 1)) * RECORD_SIZE


def read_record(directory, position: int) -> bytes:
    name, offset = record_offset(position)
    with open(os.path.join(directory, "journal", name), "rb") as file:
        file.seek(offset)
        return file.read(RECORD_SIZE)


def write_record(directory, position: int, data: bytes) -> None:
    assert len(data) == RECORD_SIZE
    name, offset = record_offset(position)
    with open(os.path.join(directory, "journal", name), "r+b") as file:
        file.seek(offset)
        file.write(data)


def small_ledger(directory, batches: int = 6) -> list[tuple[int, int, int]]:
    """A closed ledger with a few batches of 2 transfers; returns its batch headers."""
    with ledger.open(directory, create=True, segment_records_log2=SEGMENT_RECORDS_LOG2, durability="os") as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        for k in range(batches):
            rows = ledger.transfers_batch(2)
            rows["id"] = [10 + 2 * k, 11 + 2 * k]
            rows["debit_account"], rows["credit_account"], rows["amount"] = 1, 2, [5, 7]
            assert not handle.transfers(rows).any()
        return handle._engine.batch_headers(1)


def forge_batch(directory, position: int, previous_checksum: int, events: list[bytes], commit: bool,
                good_checksum: bool = True) -> int:
    """Write a batch at `position` by hand (events first, then the header, the commit word last)."""
    for offset, event in enumerate(events, 1):
        write_record(directory, position + offset, event)
    fields = struct.pack("<IIQQQQ", 0x5247444C, 1, time.time_ns(), position, len(events), previous_checksum)
    crc = _core.crc32c(fields, _core.crc32c(b"".join(events)))
    if not good_checksum:
        crc ^= 1
    commit_word = (COMMIT_MAGIC << 32 | crc) if commit else 0
    write_record(directory, position, fields + struct.pack("<QQQ", crc, 15 << 56, commit_word))
    return crc


def transfer_event(id: int, offset: int, previous_debit: int, previous_credit: int) -> bytes:
    word_a = previous_debit | (2 << 56)
    word_b = previous_credit | (offset << 40)
    return struct.pack("<QQQqQQQQ", id, 1, 2, 3, 0, 0, word_a, word_b)


# -- tests --

@pytest.mark.parametrize("durability", ["os", "fsync"])   # shared mapping; write-through (pwrite, header last)
def test_follows_a_live_writer_exactly_once_in_order(tmp_path, durability):
    directory = tmp_path / "data"
    directory.mkdir()     # the writer creates the journal inside it; the tailer waits for segment 0
    process = start_writer(directory, sleep_ms=3, batches=400, durability=durability)
    with Tailer(directory, interval_ms=1) as tailer:
        arrays = follow_while(process, tailer)
    assert process.returncode == 0, process.stderr.read()
    seen = concatenated(arrays)
    expected, end = journal_events(directory)
    assert tailer.position == end
    assert seen.size == expected.size and (seen == expected).all()       # every event once, in order, intact
    assert np.all(np.diff(seen["position"].astype(np.int64)) > 0)
    kinds = set(np.unique(seen["kind"]).tolist())
    assert kinds == {1, 2, 3, 4, 5, 6}, kinds                              # incl. post, void and expire
    assert len(arrays) > 10                                               # it really followed, array by array
    assert os.listdir(directory / "snapshots")
    assert len(os.listdir(directory / "journal")) > 5                     # rolled over many small segments
    assert len(tailer._segments._maps) <= 2                               # passed segments are unmapped


def test_batches_spanning_segments_and_timestamps(tmp_path):
    directory = tmp_path / "data"
    run_writer(directory, batches=60, sizes=[700], snapshot_at=-1)        # 701 records per batch, 1024 per segment
    with ledger.open(directory, readonly=True) as handle:
        headers = handle._engine.batch_headers(1)
    spanning = [(h, n) for h, _, n in headers if (h >> SEGMENT_RECORDS_LOG2) != ((h + n) >> SEGMENT_RECORDS_LOG2)]
    assert len(spanning) > 10
    events = concatenated(list(tail(directory, follow=False, max_events=1)))   # one batch per array
    expected, _ = journal_events(directory)
    assert (events == expected).all()
    # timestamp = header timestamp + offset - 1: strictly increasing over the whole journal
    assert np.all(np.diff(events["timestamp"].astype(np.int64)) > 0)
    stamps = {h: t for h, t, _ in headers}
    first = events[events["position"] == headers[5][0] + 1][0]
    assert int(first["timestamp"]) == stamps[headers[5][0]]


def kill_writer_mid_batch(directory) -> tuple[np.ndarray, int]:
    """Follow a writer of large batches and SIGKILL it while a batch is being written (records past the committed
    end are non-zero); then let the tailer drain. Returns what it yielded and where it stopped."""
    process = start_writer(directory, batches=-1, sizes=[100_000, 300_000], snapshot_at=-1,
                           segment_records_log2=KILL_SEGMENT_RECORDS_LOG2)
    arrays = []
    with Tailer(directory, interval_ms=1, idle_timeout_ms=300) as tailer:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            events = tailer.poll()
            if events.size:
                arrays.append(events)
            elif tailer.events_read > 200_000 and tailer.end_position() > tailer.position + 1_000:
                break                                            # a batch is half written right now
        process.send_signal(signal.SIGKILL)
        process.wait()
        arrays += list(tailer)            # drains what was committed, then the idle timeout ends it
        return concatenated(arrays), tailer.position


KILL_SEGMENT_RECORDS_LOG2 = 16         # large batches: a kill lands inside one (writing it takes milliseconds)


def test_sigkill_writer_mid_batch_tailer_stops_at_last_committed(tmp_path):
    for attempt in range(4):           # until the kill tore a batch (the first attempt nearly always does)
        directory = tmp_path / f"data{attempt}"
        directory.mkdir()
        seen, position = kill_writer_mid_batch(directory)
        # Recovery (opening for writing) keeps exactly the committed batches and zeroes the torn tail.
        with ledger.open(directory) as handle:
            expected, end = _engine_events(handle)
            torn = handle._journal.torn_records_zeroed
        assert position == end
        assert seen.size == expected.size and (seen == expected).all()
        if torn:
            break
    assert torn > 0


def test_header_without_commit_word_is_not_yielded_until_committed(tmp_path):
    directory = tmp_path / "data"
    headers = small_ledger(directory)
    end = headers[-1][0] + 1 + headers[-1][2]
    with ledger.open(directory, readonly=True) as handle:
        last_checksum = handle._engine.last_checksum
    events = [transfer_event(500, 1, end - 2, end - 2), transfer_event(501, 2, end + 1, end + 1)]
    crc = forge_batch(directory, end, last_checksum, events, commit=False)
    with Tailer(directory, follow=False) as tailer:
        seen = concatenated(list(tailer))
        assert tailer.position == end                        # stopped at the header without its commit word
        assert int(seen["position"].max()) < end
        assert tailer.poll().size == 0                       # polling again: still nothing
        header = read_record(directory, end)
        write_record(directory, end, header[:56] + struct.pack("<Q", COMMIT_MAGIC << 32 | crc))
        late = tailer.poll()                                 # the commit word arrived: now it is yielded
        assert late["id"].tolist() == [500, 501] and tailer.position == end + 3
        assert late["timestamp"][1] == late["timestamp"][0] + 1


def test_torn_and_corrupt_batches(tmp_path):
    directory = tmp_path / "data"
    headers = small_ledger(directory)
    end = headers[-1][0] + 1 + headers[-1][2]
    with ledger.open(directory, readonly=True) as handle:
        last_checksum = handle._engine.last_checksum
    events = [transfer_event(500, 1, end - 2, end - 2)]
    # A commit word with a checksum that does not match, at the tail: a torn write, not yielded, no error.
    forge_batch(directory, end, last_checksum, events, commit=True, good_checksum=False)
    with Tailer(directory, follow=False) as tailer:
        assert concatenated(list(tailer)).size == sum(n for _, _, n in headers)
        assert tailer.position == end
    # A damaged batch with committed batches after it: corruption, named with file, offset and position.
    damaged_position = headers[2][0] + 1
    record = bytearray(read_record(directory, damaged_position))
    record[24] ^= 0x01                                       # the amount
    write_record(directory, damaged_position, bytes(record))
    with pytest.raises(ledger.LedgerCorruptError, match=rf"checksum.*{segment_name(0)}.*position {headers[2][0]}"):
        list(tail(directory, follow=False))
    record[24] ^= 0x01
    write_record(directory, damaged_position, bytes(record))
    # A valid checksum but a broken hash chain: always corruption.
    forge_batch(directory, end, last_checksum ^ 0x5A5A, events, commit=True)
    with pytest.raises(ledger.LedgerCorruptError, match="chain"):
        list(tail(directory, follow=False))


def test_resume_from_a_stored_position(tmp_path):
    directory = tmp_path / "data"
    run_writer(directory, batches=120, snapshot_at=-1)
    expected, end = journal_events(directory)
    first = Tailer(directory, follow=False, max_events=500)
    part = [next(first), next(first)]
    stored_position, stored_checksum = first.position, first.checksum
    first.close()
    rest = list(tail(directory, stored_position, follow=False, previous_checksum=stored_checksum))
    assert (concatenated(part + rest) == expected).all()
    assert concatenated(rest)["position"][0] == stored_position + 1
    # The callback form, stopped by its idle timeout, returns where to resume.
    received = []
    assert tail(directory, stored_position, callback=received.append, idle_timeout_ms=50) == end
    assert (concatenated(received) == concatenated(rest)).all()
    # 0 and 1 are the start; a position inside a batch, past the end, or with a foreign checksum is refused.
    assert (concatenated(list(tail(directory, 0, follow=False))) == expected).all()
    assert (concatenated(list(tail(directory, 1, follow=False))) == expected).all()
    with pytest.raises(ValueError, match=rf"inside the batch at {stored_position}.*resume from {stored_position}"):
        Tailer(directory, stored_position + 2)
    with pytest.raises(ValueError, match="inside the batch at 1 "):
        Tailer(directory, 2)
    with pytest.raises(ValueError, match="past the end"):
        Tailer(directory, end + 5)
    with pytest.raises(ledger.LedgerCorruptError, match="not the journal"):
        Tailer(directory, stored_position, previous_checksum=stored_checksum ^ 1)
    with pytest.raises(ValueError, match="interval_ms"):
        Tailer(directory, interval_ms=0)
    with pytest.raises(ValueError, match="max_events"):
        Tailer(directory, max_events=(1 << 24) + 1)
    with pytest.raises(FileNotFoundError):
        Tailer(tmp_path / "nothing-here")


def test_stop_event_ends_a_following_tailer(tmp_path):
    import threading
    directory = tmp_path / "data"
    small_ledger(directory)
    stop = threading.Event()
    received = []

    def callback(events):
        received.append(events)
        stop.set()                      # the first array ends it

    position = tail(directory, callback=callback, stop=stop, interval_ms=5)   # returns: it does not follow on
    assert position == received[-1]["position"][-1] + 1


# -- the SQLite projection --

def projector(directory, database, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ledger.project", "sqlite", str(directory), str(database),
                             "--progress-interval-ms", "100", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stored_position(database) -> int:
    if not os.path.exists(database):
        return 0
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return connection.execute("SELECT next_position FROM position").fetchone()[0]
    except sqlite3.OperationalError:      # not created yet
        return 0
    finally:
        connection.close()


def assert_projection_matches(directory, database) -> None:
    with ledger.open(directory, readonly=True) as handle:
        accounts = handle.accounts()
        events, end = _engine_events(handle)
    with SqliteProjection(database) as projection:
        balances = projection.balances()
        assert projection.next_position == end
        connection = projection.connection
        assert connection.execute("SELECT count(*) FROM transfers").fetchone()[0] == \
            int((events["kind"] != KIND_ACCOUNT).sum())
        assert connection.execute("SELECT events FROM position").fetchone()[0] == events.size
        amounts = dict(connection.execute("SELECT kind, sum(amount) FROM transfers GROUP BY kind").fetchall())
    for kind, name in _core.EVENT_KINDS.items():
        if kind != KIND_ACCOUNT:
            assert amounts.get(name, 0) == int(events["amount"][events["kind"] == kind].sum())
    assert balances.size == accounts.size
    for name in balances.dtype.names:
        assert (balances[name] == accounts[name]).all(), name
    assert check_invariants(balances) == []               # conservation per ledger, and the limits
    assert int(balances["debits_pending"].sum()) > 0      # the workload leaves pendings open: they are counted


def test_projection_catches_up_and_equals_the_ledger(tmp_path):
    directory = tmp_path / "data"
    run_writer(directory, batches=200)
    database = tmp_path / "read.db"
    process = projector(directory, database)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "lag 0 events, 0 ms" in out.splitlines()[-1]
    assert_projection_matches(directory, database)
    with SqliteProjection(database) as projection:
        kinds = dict(projection.connection.execute("SELECT kind, count(*) FROM transfers GROUP BY kind").fetchall())
    assert set(kinds) == {"transfer", "pending", "post", "void", "expire"}, kinds
    # Running it again projects nothing more.
    process = projector(directory, database)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and out.startswith("projected 0 events")
    assert_projection_matches(directory, database)


def test_projection_follows_a_live_writer(tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    database = tmp_path / "read.db"
    writer = start_writer(directory, sleep_ms=2, batches=300)
    process = projector(directory, database, "--follow", "--interval-ms", "2")
    assert writer.wait(timeout=60) == 0
    with ledger.open(directory, readonly=True) as handle:
        end = handle._engine.write_position
    deadline = time.monotonic() + 30
    while stored_position(database) != end and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)                    # ends after the transaction in progress
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "lag" in out
    assert_projection_matches(directory, database)


def test_projector_killed_mid_run_restarts_without_double_counting(tmp_path):
    directory = tmp_path / "data"
    run_writer(directory, batches=600, sizes=[50, 400], snapshot_at=-1)
    database = tmp_path / "read.db"
    with ledger.open(directory, readonly=True) as handle:
        end = handle._engine.write_position
    killed_at = []                                       # stored positions after each SIGKILL
    rng = np.random.default_rng(3)
    while len(killed_at) < 3 and stored_position(database) < end:
        before = stored_position(database)
        process = projector(directory, database, "--max-events", "2000")
        deadline = time.monotonic() + 20
        while stored_position(database) == before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0, 0.05)))          # land anywhere: between or inside transactions
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        killed_at.append(stored_position(database))
    assert len(killed_at) == 3 and 0 < killed_at[0] < killed_at[1] < killed_at[2] < end, (killed_at, end)
    process = projector(directory, database)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert_projection_matches(directory, database)


def test_projection_refuses_a_different_journal(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    small_ledger(first, batches=4)
    small_ledger(second, batches=5)
    database = tmp_path / "read.db"
    assert projector(first, database).wait(timeout=60) == 0
    process = projector(second, database)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 3 and "not the journal" in err
    shorter = tmp_path / "shorter"                        # the read model is ahead of this journal
    small_ledger(shorter, batches=2)
    process = projector(shorter, database)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 3 and "past the end" in err and "rebuild" in err


def test_projection_follows_ledger_serve(tmp_path):
    """`ledger serve` writes through (pwrite, one sync per drained group, durability fsync) while clients submit
    from this process: a following projection ends equal to the ledger."""
    directory = tmp_path / "data"
    database = tmp_path / "read.db"
    writer = subprocess.Popen([sys.executable, "-m", "ledger", "serve", str(directory), "--create", "--slots", "1024",
                               "--snapshot-every-s", "0"], stderr=subprocess.PIPE, text=True)
    process = None
    try:
        assert "serving" in writer.stderr.readline()
        process = projector(directory, database, "--follow", "--interval-ms", "2")
        with ledger.connect(str(directory)) as client:
            accounts = ledger.accounts_batch(21)
            accounts["id"] = np.arange(1, 22, dtype=np.uint64)
            accounts["min_balance"][0] = ledger.BALANCE_MIN
            assert not client.create_accounts(accounts).any()
            rng = np.random.default_rng(5)
            for batch in range(60):
                count = int(rng.choice([1, 7, 40]))
                rows = ledger.transfers_batch(count)
                rows["id"] = np.arange(1000 * batch + 1, 1000 * batch + 1 + count, dtype=np.uint64)
                rows["debit_account"] = 1
                rows["credit_account"] = rng.integers(2, 22, count)
                rows["amount"] = rng.integers(1, 100, count)
                rows["flags"] = np.where(rng.random(count) < 0.3, int(ledger.TransferFlags.PENDING), 0)
                assert not client.transfers(rows).any()
                if batch % 10 == 0:
                    client.account(2)                                  # a query between writes: its own group
    finally:
        writer.send_signal(signal.SIGTERM)
        assert writer.wait(timeout=30) == 0
    with ledger.open(directory, readonly=True) as handle:
        end = handle._engine.write_position
    deadline = time.monotonic() + 30
    while stored_position(database) != end and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert_projection_matches(directory, database)
