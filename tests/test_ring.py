"""The command ring: many producer processes, one writer; crashes on both sides; hostile slots."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import ledger
from ledger import _ring
from ledger.ring import ABANDON_AFTER_MS_DEFAULT, GROUP_ROWS_MAX, OVERLAP_ROWS_MIN_DEFAULT, Server, connect
from support.ring_processes import ACCOUNTS, FIRST_ACCOUNT, IDS, SETTLEMENT, transfer_rows
from support.producers import producer

HERE = os.path.dirname(__file__)
RING_PROCESSES = os.path.join(HERE, "support", "ring_processes.py")
CONSUME_SEQUENCE_OFFSET = 128  # of the header word (docs/RING.md)
ENVIRONMENT = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))


def start_writer(directory, durability="fsync", abandon_after_ms=300, overlap_rows_min=OVERLAP_ROWS_MIN_DEFAULT):
    process = subprocess.Popen([sys.executable, RING_PROCESSES, "serve", directory,
                                durability, str(abandon_after_ms), str(overlap_rows_min)], stdout=subprocess.PIPE,
                               text=True, env=ENVIRONMENT)
    assert process.stdout.readline().strip() == "ready"
    return process


def stop(process):
    """SIGTERM, and SIGKILL if it has not exited within 30 s (a hang guard: the test then fails, and nothing it
    started is left running)."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def setup_accounts(directory):
    with connect(directory) as client:
        rows = ledger.accounts_batch(ACCOUNTS + 1)
        rows["id"] = [SETTLEMENT] + list(range(FIRST_ACCOUNT, FIRST_ACCOUNT + ACCOUNTS))
        rows["min_balance"][0] = ledger.BALANCE_MIN
        assert not client.create_accounts(rows).any()


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as log:
        return [tuple(map(int, line.split())) for line in log if line.strip()]


def expected_counters(applied_ids):
    """Balances after applying each id once (order does not matter: no transfer here can fail)."""
    rows = transfer_rows(np.array(sorted(applied_ids), dtype=np.uint64))
    credits = {FIRST_ACCOUNT + index: 0 for index in range(ACCOUNTS)}
    for credit, amount in zip(rows["credit_account"].tolist(), rows["amount"].tolist()):
        credits[credit] += amount
    return credits


@pytest.mark.parametrize("producers, overlap_rows_min", [(2, OVERLAP_ROWS_MIN_DEFAULT), (4, OVERLAP_ROWS_MIN_DEFAULT),
                                                       (4, 2)])
def test_producers_hammer_one_writer(tmp_path, producers, overlap_rows_min):
    """overlap_rows_min 2: nearly every group is synced and answered by the sync thread (docs/RING.md)."""
    directory = str(tmp_path / "data")
    writer = start_writer(directory, overlap_rows_min=overlap_rows_min)
    try:
        setup_accounts(directory)
        logs = [str(tmp_path / f"log{index}") for index in range(producers)]
        children = [subprocess.Popen([sys.executable, RING_PROCESSES, "produce", directory,
                                      str(index), "60", logs[index]], env=ENVIRONMENT) for index in range(producers)]
        for child in children:
            assert child.wait(timeout=120) == 0
    finally:
        stop(writer)
    answers = [entry for log in logs for entry in read_log(log)]
    ok = [identifier for identifier, code in answers if code == ledger.TransferResult.OK]
    assert len(ok) == len(set(ok)), "an id was applied twice"
    assert all(code in (ledger.TransferResult.OK, ledger.TransferResult.EXISTS) for _, code in answers)
    sent = {identifier for identifier, _ in answers}
    assert set(ok) == sent, "every id that was sent was applied exactly once"
    with ledger.open(directory, readonly=True) as handle:
        for account, credit in expected_counters(ok).items():
            assert handle.account(account).credits_posted == credit
        assert handle.verify().ok


def test_dead_producer_after_claim_does_not_wedge(tmp_path):
    directory = str(tmp_path / "data")
    writer = start_writer(directory, abandon_after_ms=200)
    try:
        setup_accounts(directory)
        with connect(directory) as client:
            client._ring.claim_without_publishing(3)  # a producer that died right after claiming
            started = time.monotonic()
            assert client.transfers(transfer_rows(np.array([1, 2], dtype=np.uint64))).tolist() == [0, 0]
            assert time.monotonic() - started < 20
            # Many laps around the (1024-slot) ring later, it still works.
            for start in range(0, 4000, 300):
                ids = np.arange(10 + start, 10 + start + 300, dtype=np.uint64) % IDS + 1
                assert set(client.transfers(transfer_rows(ids)).tolist()) <= {0, ledger.TransferResult.EXISTS}
    finally:
        stop(writer)


@pytest.mark.parametrize("overlap_rows_min", [OVERLAP_ROWS_MIN_DEFAULT, 2])
def test_writer_killed_mid_batch_then_restarted(tmp_path, overlap_rows_min):
    """SIGKILL the writer while producers run: clients get a clear error, not a hang; after a restart,
    retrying with the same ids is safe and nothing acknowledged is lost (also with nearly every group synced and
    answered by the sync thread: overlap_rows_min 2)."""
    directory = str(tmp_path / "data")
    writer = start_writer(directory, overlap_rows_min=overlap_rows_min)
    setup_accounts(directory)
    log = str(tmp_path / "log")
    producer = subprocess.Popen([sys.executable, RING_PROCESSES, "produce", directory, "9",
                                 "100000", log], env=ENVIRONMENT, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert producer.wait(timeout=60) != 0
    assert "LedgerUnavailableError" in producer.stderr.read()
    acknowledged = {identifier for identifier, code in read_log(log) if code == ledger.TransferResult.OK}
    assert acknowledged
    writer = start_writer(directory)
    try:
        with connect(directory) as client:
            every = np.arange(1, IDS + 1, dtype=np.uint64)
            for start in range(0, IDS, 500):
                codes = client.transfers(transfer_rows(every[start:start + 500]))
                assert set(codes.tolist()) <= {0, ledger.TransferResult.EXISTS}
            for identifier in list(acknowledged)[:50]:
                assert client.transfer(int(identifier), SETTLEMENT, 0, 0) != ledger.TransferResult.OK
    finally:
        stop(writer)
    with ledger.open(directory, readonly=True) as handle:
        states = handle.lookup_transfers(np.array(sorted(acknowledged), dtype=np.uint64))["state"]
        assert (states == ledger.TransferState.POSTED).all(), "an acknowledged transfer was lost"
        for account, credit in expected_counters(set(range(1, IDS + 1))).items():
            assert handle.account(account).credits_posted == credit
        assert handle.verify().ok


def test_no_writer_is_a_clear_error(tmp_path):
    with pytest.raises(ledger.LedgerUnavailableError, match="ledger serve"):
        connect(str(tmp_path))


def test_serve_refuses_world_writable_directory(tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        Server(str(directory))


def test_ring_file_is_private(tmp_path):
    server = Server(str(tmp_path / "data"))
    try:
        mode = os.stat(tmp_path / "data" / "commands.ring").st_mode & 0o777
        assert mode == 0o600
    finally:
        server.close()


def test_idle_writer_sleeps(tmp_path):
    writer = start_writer(str(tmp_path / "data"))
    try:
        time.sleep(0.5)
        before = _cpu_seconds(writer.pid)
        time.sleep(2.0)
        used = _cpu_seconds(writer.pid) - before
        assert used < 0.6, f"an idle writer used {used:.2f} s of CPU in 2 s"
    finally:
        stop(writer)


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


slot_bytes = st.binary(min_size=104, max_size=104)


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    """One writer for every example of the fuzz tests (opening a ledger costs ~0.2 s): each example claims
    sequences of its own, and the ledger must stay consistent across all of them."""
    server = Server(str(tmp_path_factory.mktemp("fuzz") / "data"), durability="os", slot_count=64,
                    abandon_after_ms=1)
    server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
    server.ledger.create_account(2)
    yield server
    assert server.ledger.verify().ok
    server.close()


@settings(max_examples=40, deadline=None)
@given(slots=st.lists(st.tuples(slot_bytes, st.integers(0, 3), st.integers(0, 3), st.integers(0, 2)),
                      min_size=1, max_size=12))
def test_hostile_slots_get_a_status_never_a_crash(fuzzed_server, slots):
    """Arbitrary bytes in published slots: the writer answers each one (a status or a result code), applies only
    what the core accepts, and the ledger stays consistent."""
    server = fuzzed_server
    ring = server.ring
    first = ring.claim_without_publishing(len(slots))
    for index, (raw, kind, batch_shape, hint) in enumerate(slots):
        data = bytearray(raw)
        if kind:  # often well-formed metadata, so the payload reaches the core
            data[4:6] = kind.to_bytes(2, "little")
            data[8:16] = (first + index).to_bytes(8, "little")
            data[16:20] = (1 if batch_shape else 0).to_bytes(4, "little")
            if hint == 1:  # a transfer between the two existing accounts
                data[24 + 8:24 + 16] = (1).to_bytes(8, "little")
                data[24 + 16:24 + 24] = (2).to_bytes(8, "little")
        ring.publish_raw(first + index, bytes(data))
    drained = 0
    while drained < len(slots):
        assert server.drain_once()
        drained = ring.consume_sequence - first
    assert server.ledger.verify().ok


def test_open_chain_at_a_batch_end_does_not_join_the_next_batch(tmp_path):
    """Two producer batches drained in one group: the first ends with LINKED (an open chain); it must fail with
    LINKED_CHAIN_OPEN on its own, and the second batch must apply as if alone."""
    directory = str(tmp_path / "data")
    os.makedirs(directory, mode=0o700)
    server = Server(directory, durability="os", slot_count=64)
    try:
        server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
        server.ledger.create_account(2)
        first_batch = ledger.transfers_batch(2)
        first_batch["id"] = [10, 11]
        first_batch["debit_account"], first_batch["credit_account"], first_batch["amount"] = 1, 2, 5
        first_batch["flags"] = ledger.TransferFlags.LINKED
        second_batch = ledger.transfers_batch(1)
        second_batch[0] = (12, 1, 2, 7, 0, 0, 1, 0, 0, 0)
        ring = server.ring
        start_a = ring.submit(_ring.SLOT_KIND_TRANSFER, first_batch, 1000)
        start_b = ring.submit(_ring.SLOT_KIND_TRANSFER, second_batch, 1000)
        assert server.drain_once()
        assert ring.consume_sequence == start_b + 1, "both batches were drained in one group"
        codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
        ring.wait_results(start_a, 2, codes, statuses, 1000, 1000)
        assert codes.tolist() == [ledger.TransferResult.LINKED_EVENT_FAILED, ledger.TransferResult.LINKED_CHAIN_OPEN]
        ring.wait_results(start_b, 1, codes[:1], statuses[:1], 1000, 1000)
        assert codes[0] == ledger.TransferResult.OK
        assert server.ledger.balance(2) == 7
    finally:
        server.close()


def test_sigkill_of_a_producer_does_not_wedge_the_others(tmp_path):
    """Kill -9 one of two busy producers at a random moment (it may die mid-claim or mid-publish): the other one
    and later clients carry on, and every transfer anyone was told is OK is in the ledger."""
    directory = str(tmp_path / "data")
    writer = start_writer(directory, abandon_after_ms=300)
    try:
        setup_accounts(directory)
        logs = [str(tmp_path / f"log{index}") for index in range(2)]
        children = [subprocess.Popen([sys.executable, RING_PROCESSES, "produce", directory,
                                      str(20 + index), "100000" if index == 0 else "150", logs[index]],
                                     env=ENVIRONMENT) for index in range(2)]
        time.sleep(random.Random(3).uniform(0.6, 1.2))
        children[0].send_signal(signal.SIGKILL)
        children[0].wait()
        assert children[1].wait(timeout=120) == 0
        with connect(directory) as client:  # a new client after the kill
            codes = client.transfers(transfer_rows(np.arange(1, 200, dtype=np.uint64)))
            assert set(codes.tolist()) <= {0, ledger.TransferResult.EXISTS}
    finally:
        stop(writer)
    acknowledged = {identifier for log in logs for identifier, code in read_log(log) if code == 0}
    with ledger.open(directory, readonly=True) as handle:
        states = handle.lookup_transfers(np.array(sorted(acknowledged), dtype=np.uint64))["state"]
        assert (states == ledger.TransferState.POSTED).all()
        assert handle.verify().ok


# Liveness bounds: they only end a hang, so they are far above anything a loaded machine takes. A "did not wait"
# check makes the wait it rules out long (BUSY_TIMEOUT_LONG_MS) and allows a quarter of it.
HANG_GUARD_S = 60
BUSY_TIMEOUT_LONG_MS = 60_000
NOT_WAITED_S = BUSY_TIMEOUT_LONG_MS / 1000 / 4


def drain_until(server, sequence, seconds=HANG_GUARD_S):
    """Run the writer's loop in this thread until it has consumed up to `sequence` (`seconds`: a hang guard);
    returns the seconds taken."""
    started = time.monotonic()
    while server.ring.consume_sequence < sequence:
        assert time.monotonic() - started < seconds, f"the writer is stuck at {server.ring.consume_sequence}"
        if not server.drain_once():
            server.ring.wait_for_work(20)
    return time.monotonic() - started


def test_dead_producers_large_batch_is_given_up_in_one_step(tmp_path):
    """A producer that claimed 300 slots and died before publishing any: with the default abandon timeout the
    writer gives the whole batch up at once (not one slot per timeout: 300 x 2 s), and the next batch applies."""
    server = Server(str(tmp_path / "data"), durability="os", slot_count=1024)
    try:
        server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
        server.ledger.create_account(2)
        ring = server.ring
        dead = ring.claim_without_publishing(300)
        rows = ledger.transfers_batch(2)
        rows["id"], rows["debit_account"], rows["credit_account"], rows["amount"] = [7, 8], 1, 2, 5
        live = ring.submit(_ring.SLOT_KIND_TRANSFER, rows, 1000)
        assert live == dead + 300
        seconds = drain_until(server, live + 2)   # one slot per timeout would be 300 x 2 s
        assert seconds >= ABANDON_AFTER_MS_DEFAULT / 1000 * 0.9
        codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
        ring.wait_results(live, 2, codes, statuses, 1000, 1000)
        assert codes.tolist() == [0, 0] and statuses.tolist() == [0, 0]
        assert server.ledger.balance(2) == 10
    finally:
        server.close()


def test_hostile_head_slot_cannot_push_the_writer_past_the_claimed_slots(tmp_path):
    """A published head slot that claims a 500-slot batch when only 1 slot was claimed is answered INVALID_SLOT
    alone; the writer never moves past claim_sequence, so the next honest batch is applied."""
    server = Server(str(tmp_path / "data"), durability="os", slot_count=1024, abandon_after_ms=1)
    try:
        server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
        server.ledger.create_account(2)
        ring = server.ring
        head = ring.claim_without_publishing(1)
        data = bytearray(104)
        data[4:6] = _ring.SLOT_KIND_TRANSFER.to_bytes(2, "little")
        data[8:16] = head.to_bytes(8, "little")
        data[16:20] = (500).to_bytes(4, "little")
        ring.publish_raw(head, bytes(data))
        for _ in range(3):
            server.drain_once()
            time.sleep(0.002)
            assert ring.consume_sequence <= ring.claim_sequence
        assert ring.consume_sequence == head + 1
        rows = ledger.transfers_batch(1)
        rows[0] = (9, 1, 2, 5, 0, 0, 1, 0, 0, 0)
        live = ring.submit(_ring.SLOT_KIND_TRANSFER, rows, 1000)
        drain_until(server, live + 1)
        assert server.ledger.balance(2) == 5
    finally:
        server.close()


def test_writer_keeps_its_consume_position_private(tmp_path):
    """A producer that overwrites the header's consume_sequence does not move the writer."""
    server = Server(str(tmp_path / "data"), durability="os", slot_count=64)
    try:
        server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
        server.ledger.create_account(2)
        ring = server.ring
        rows = ledger.transfers_batch(1)
        rows[0] = (9, 1, 2, 5, 0, 0, 1, 0, 0, 0)
        first = ring.submit(_ring.SLOT_KIND_TRANSFER, rows, 1000)
        server._memory[CONSUME_SEQUENCE_OFFSET:CONSUME_SEQUENCE_OFFSET + 8] = (40).to_bytes(8, "little")
        assert ring.consume_sequence == 40
        assert server.drain_once()
        assert ring.consume_sequence == first + 1
        assert server.ledger.balance(2) == 5
    finally:
        server.close()


def transfer_batch(ids, amount=5):
    rows = ledger.transfers_batch(len(ids))
    rows["id"], rows["debit_account"], rows["credit_account"], rows["amount"] = ids, 1, 2, amount
    return rows


def small_server(tmp_path, slot_count=16, abandon_after_ms=1, durability="os", **options):
    server = Server(str(tmp_path / "data"), durability=durability, slot_count=slot_count,
                    abandon_after_ms=abandon_after_ms, **options)
    server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
    server.ledger.create_account(2)
    return server




def give_up_head(server):
    """Let the writer see its head batch incomplete twice, abandon_after_ms apart: it gives it up."""
    server.drain_once()
    time.sleep(0.005)
    server.drain_once()


def test_a_stalled_producer_never_writes_into_the_next_laps_slot(tmp_path):
    """A producer stalls after its slot became free; meanwhile the writer gives its sequence up and the next lap's
    producer takes the slot and publishes. The stalled producer must fail without touching that slot."""
    server = small_server(tmp_path)
    try:
        stalled, next_lap = producer(server), producer(server)
        late = []

        def stall(sequence):
            stalled.set_stall_hook(None)
            give_up_head(server)
            assert server.ring.consume_sequence == sequence + 1
            next_lap.claim_without_publishing(15)
            late.append(next_lap.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([200], amount=2), 1000))
            assert late[0] == sequence + 16

        stalled.set_stall_hook(stall)
        with pytest.raises(_ring.RingAbandonedError):
            stalled.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([100], amount=1), 1000)
        drain_until(server, late[0] + 1)
        codes, statuses = np.zeros(1, np.uint8), np.zeros(1, np.uint8)
        next_lap.wait_results(late[0], 1, codes, statuses, 1000, 1000)
        assert (codes[0], statuses[0]) == (0, 0)
        found = server.ledger.lookup_transfers(np.array([100, 200], np.uint64))
        assert found["state"].tolist() == [ledger.TransferState.NOT_FOUND, ledger.TransferState.POSTED]
        assert server.ledger.balance(2) == 2
    finally:
        server.close()


def test_a_caller_that_stops_waiting_does_not_hold_its_slots(tmp_path):
    """A call that times out detaches its slots: once the writer has answered them, the next lap takes them at
    once instead of waiting for a release that never comes."""
    server = small_server(tmp_path)
    try:
        client = connect(server.directory, timeout_ms=20, busy_timeout_ms=500)
        with pytest.raises(ledger.LedgerTimeoutError):
            client.transfers(transfer_batch(list(range(10, 18))))      # slots 0..7; nobody drains yet
        assert server.drain_once()
        ring = producer(server)
        codes, statuses = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
        middle = ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(20, 28))), 500)    # slots 8..15
        assert server.drain_once()
        ring.wait_results(middle, 8, codes, statuses, 1000, 1000)
        started = time.monotonic()
        lapped = ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(10, 18))), BUSY_TIMEOUT_LONG_MS)
        assert time.monotonic() - started < NOT_WAITED_S, "slots 0..7 again: it waited for space it had"
        assert server.drain_once()
        ring.wait_results(lapped, 8, codes, statuses, 1000, 1000)
        assert (codes == ledger.TransferResult.EXISTS).all(), "the timed-out call was applied: a retry says EXISTS"
        client.close()
    finally:
        server.close()


def test_giving_up_a_waiting_producer_fails_it_at_once_and_keeps_the_last_laps_results(tmp_path):
    """A producer waits for a slot whose previous lap's result is still unread; the writer gives its sequence up.
    It fails at once (not after busy_timeout_ms), the unread result is intact, and later laps still get the
    slot."""
    server = small_server(tmp_path, abandon_after_ms=20)
    try:
        reader, waiter = producer(server), producer(server)
        first = reader.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(30, 38))), 500)
        second = reader.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(40, 48))), 500)
        drain_until(server, second + 8)                     # answered, not read: slots 0..15 held
        outcome = []

        def wait_for_space():
            started = time.monotonic()
            try:
                waiter.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([50]), BUSY_TIMEOUT_LONG_MS)   # slot 0
                outcome.append("submitted")
            except Exception as error:  # noqa: BLE001 - the test inspects it
                outcome.append(error)
            outcome.append(time.monotonic() - started)

        import threading
        thread = threading.Thread(target=wait_for_space)
        thread.start()
        deadline = time.monotonic() + HANG_GUARD_S
        while server.ring.consume_sequence < 17 and time.monotonic() < deadline:
            server.drain_once()
            time.sleep(0.005)
        thread.join(timeout=HANG_GUARD_S)
        assert isinstance(outcome[0], _ring.RingAbandonedError), outcome
        assert outcome[1] < NOT_WAITED_S, f"the producer noticed after {outcome[1]:.2f} s (busy timeout: 60 s)"
        codes, statuses = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
        reader.wait_results(first, 8, codes, statuses, 1000, 1000)      # the unread lap is intact
        assert codes.tolist() == [0] * 8 and statuses.tolist() == [0] * 8
        reader.wait_results(second, 8, codes, statuses, 1000, 1000)
        waiter.claim_without_publishing(15)                              # up to sequence 32: slot 0 again
        started = time.monotonic()
        waiter.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([51]), BUSY_TIMEOUT_LONG_MS)
        assert time.monotonic() - started < NOT_WAITED_S
    finally:
        server.close()


def test_a_result_of_another_sequence_is_a_ledger_error(tmp_path):
    """A slot answered with another sequence's result (a process that breaks the protocol) raises LedgerError
    naming the problem, not a bare RuntimeError."""
    import threading
    server = small_server(tmp_path)
    try:
        client = connect(server.directory, timeout_ms=5000)
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(_raised(client.transfers, transfer_batch([60, 61]))))
        thread.start()
        deadline = time.monotonic() + HANG_GUARD_S
        while server.ring.claim_sequence < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        for sequence, answered in ((0, 5), (1, 2)):             # result words hold sequence + 1: slot 0 is wrong
            offset = _ring.HEADER_SIZE + sequence * _ring.SLOT_SIZE + 8
            server._memory[offset:offset + 8] = (answered << 16).to_bytes(8, "little")
        thread.join(timeout=10)
        assert isinstance(outcome[0], ledger.LedgerError) and "another sequence" in str(outcome[0]), outcome
        client.close()
    finally:
        server.close()


def _raised(function, *arguments):
    try:
        function(*arguments)
    except Exception as error:  # noqa: BLE001 - returned for the test to inspect
        return error
    return None


def test_per_call_row_limit_fits_one_drain(tmp_path):
    """With a ring of 2**17 slots a call may still hold only what the writer gathers in one drain (32,768 rows):
    a bigger one is refused up front, not given up by the writer every time; the largest one is applied."""
    server = small_server(tmp_path, slot_count=1 << 17)
    try:
        client = connect(server.directory)
        assert client.batch_rows_max == GROUP_ROWS_MAX
        with pytest.raises(ValueError, match="at most 32768 rows"):
            client.transfers(transfer_batch(np.arange(1, 40_001, dtype=np.uint64)))
        client.close()
        ring = producer(server)
        with pytest.raises(ValueError, match="1 to 32768 rows"):
            ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(np.arange(1, 40_001, dtype=np.uint64)), 500)
        largest = transfer_batch(np.arange(1, GROUP_ROWS_MAX + 1, dtype=np.uint64), amount=1)
        first = ring.submit(_ring.SLOT_KIND_TRANSFER, largest, 500)
        assert server.drain_once()
        codes, statuses = np.zeros(GROUP_ROWS_MAX, np.uint8), np.zeros(GROUP_ROWS_MAX, np.uint8)
        ring.wait_results(first, GROUP_ROWS_MAX, codes, statuses, 1000, 1000)
        assert not codes.any() and not statuses.any()
        assert server.ledger.balance(2) == GROUP_ROWS_MAX
    finally:
        server.close()


def test_waiting_for_space_notices_a_stopped_writer(tmp_path):
    """A call that waits for ring space while the writer stops gets LedgerUnavailableError at once, not
    LedgerBusyError after busy_timeout_ms."""
    server = small_server(tmp_path)
    try:
        reader = producer(server)
        reader.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(30, 38))), 500)
        reader.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(40, 48))), 500)
        drain_until(server, 16)                                         # answered, never read: the ring is full
        client = connect(server.directory, busy_timeout_ms=BUSY_TIMEOUT_LONG_MS, timeout_ms=2 * BUSY_TIMEOUT_LONG_MS)
        # The writer stops while the call waits (a call that finds it stopped before sending waits for a new one).
        stopper = threading.Timer(0.2, server.ring.stop)
        started = time.monotonic()
        stopper.start()
        with pytest.raises(ledger.LedgerUnavailableError, match="waited for ring space"):
            client.transfer(50, 1, 2, 5)
        assert time.monotonic() - started < NOT_WAITED_S
        stopper.join()
        client.close()
    finally:
        server.close()


def test_a_call_on_a_full_ring_gets_busy_and_applies_nothing(tmp_path):
    """Every slot holds an answered, unread result for busy_timeout_ms: the call fails with LedgerBusyError and
    nothing of it is applied; once the results are read, the same call (same id) applies once."""
    server = small_server(tmp_path)
    try:
        reader = producer(server)
        first = reader.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(30, 38))), 500)
        second = reader.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(40, 48))), 500)
        drain_until(server, 16)                                         # answered, never read: the ring is full
        balance = server.ledger.balance(2)
        client = connect(server.directory, busy_timeout_ms=200)
        with pytest.raises(ledger.LedgerBusyError):
            client.transfer(50, 1, 2, 5)
        assert not server.drain_once() and server.ring.consume_sequence == 16   # nothing of it was published
        # The busy call left its sequence 16 claimed, unpublished: the writer gives it up after abandon_after_ms
        # (seen stuck above). Done here, before the retry claims: the retry's own claim is not the test's subject.
        time.sleep(server.abandon_after_ns / 1e9 * 5)
        assert not server.drain_once() and server.ring.consume_sequence == 17
        assert server.ledger.lookup_transfers(np.array([50], np.uint64))["state"].tolist() == [0]
        assert server.ledger.balance(2) == balance
        codes, statuses = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
        reader.wait_results(first, 8, codes, statuses, 1000, 1000)      # frees slots 0..7
        reader.wait_results(second, 8, codes, statuses, 1000, 1000)
        # The retry must not be given up as a slow producer if this busy machine deschedules it between its claim
        # and its publish for more than the 1 ms the test server allows.
        server.abandon_after_ns = BUSY_TIMEOUT_LONG_MS * 1_000_000
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(client.transfer(50, 1, 2, 5)))
        thread.start()
        deadline = time.monotonic() + HANG_GUARD_S
        while thread.is_alive():
            assert time.monotonic() < deadline, "the retry was never answered"
            if not server.drain_once():
                server.ring.wait_for_work(20)
        thread.join()
        assert outcome == [ledger.TransferResult.OK]
        assert server.ledger.balance(2) == balance + 5
        client.close()
    finally:
        server.close()


def test_a_batch_claimed_after_a_stuck_head_is_not_given_up_with_it(tmp_path):
    """The writer gives up a head batch whose first slot is unpublished together with the unpublished slots after
    it (it cannot tell where that batch ends), but only those claimed before it saw the head stuck: a producer that
    claimed later (here a retry, stalled between its claim and its publish while the writer gives the head up) is
    a live producer of its own batch, not part of the stuck one, and gets its own abandon timeout."""
    server = small_server(tmp_path)
    try:
        stuck = producer(server).claim_without_publishing(1)            # a busy call's claim, never published
        assert not server.drain_once()                                  # the writer sees the head stuck (timer)
        time.sleep(server.abandon_after_ns / 1e9 * 5)                   # the head is past abandon_after_ms
        retry = producer(server)
        given_up = []

        def writer_runs_now(sequence):                                  # the retry claimed, has not published
            assert sequence == stuck + 1
            assert not server.drain_once()                              # it gives the stuck head up
            given_up.append(server.ring.consume_sequence)
        retry.set_stall_hook(writer_runs_now)
        first = retry.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([60]), 1000)
        retry.set_stall_hook(None)
        assert first == stuck + 1 and given_up == [stuck + 1]           # only the stuck claim was given up
        drain_until(server, first + 1)
        codes, statuses = np.zeros(1, np.uint8), np.zeros(1, np.uint8)
        retry.wait_results(first, 1, codes, statuses, 1000, 1000)
        assert statuses.tolist() == [0] and codes.tolist() == [ledger.TransferResult.OK]
    finally:
        server.close()


def test_a_call_waiting_behind_another_on_the_same_client_times_out(tmp_path):
    import threading
    server = small_server(tmp_path)
    try:
        client = connect(server.directory, timeout_ms=100)
        outcome = []
        client._lock.acquire()                                          # another call in progress
        try:
            thread = threading.Thread(target=lambda: outcome.append(_raised(client.transfer, 50, 1, 2, 5)))
            thread.start()
            thread.join(timeout=3)
        finally:
            client._lock.release()
        thread.join()
        assert isinstance(outcome[0], ledger.LedgerTimeoutError), outcome
        client.close()
    finally:
        server.close()


# The child installs Python's own SIGINT handler: a test run started in the background of a non-interactive shell
# (`pytest ... &`, some CI launchers) has SIGINT ignored, its children inherit that, and Python then leaves it
# ignored: the SIGINT below did nothing and the client sat in its 30 s call (the one failure under load, with the
# process never killed afterwards). A user's Ctrl-C at a terminal meets the default handler.
CTRL_C_CLIENT = r'''
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import ledger
from ledger.ring import Server, connect
server = Server(sys.argv[1], durability="os", slot_count=16)            # beats, never drains
client = connect(sys.argv[1], timeout_ms=30000)
print("waiting", flush=True)
started = time.monotonic()
try:
    client.transfer(1, 1, 2, 5)
except KeyboardInterrupt:
    released = int.from_bytes(server._memory[4096 + 16:4096 + 24], "little")
    print(f"interrupted {time.monotonic() - started:.2f} {released >> 63} {released & 0xFFFF}", flush=True)
'''


def test_ctrl_c_interrupts_a_waiting_call_and_detaches_its_slots(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", CTRL_C_CLIENT, str(tmp_path / "data")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    try:
        assert process.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)   # a hang guard: uninterrupted, the call lasts 30 s
    finally:
        process.kill()
        process.wait()
    words = out.split()
    assert words[:1] == ["interrupted"], (out, err)
    assert float(words[1]) < 25.0, "the call ran to (near) its 30 s timeout: Ctrl-C did not interrupt it"
    assert words[2:] == ["1", "1"], "slot 0 is detached (DETACHED | sequence 0 + 1)"


def test_a_long_drain_does_not_look_like_a_dead_writer(tmp_path):
    """The heartbeat comes from its own thread: a drain longer than the client's writer_timeout_ms (a slow fsync)
    delays the answer, it does not make the client report the writer gone."""
    import threading
    server = small_server(tmp_path)
    apply = server._apply

    def slow_apply(*arguments):
        time.sleep(0.8)
        apply(*arguments)

    server._apply = slow_apply
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with connect(server.directory, writer_timeout_ms=300) as client:
            assert client.transfer(70, 1, 2, 5) == ledger.TransferResult.OK
    finally:
        server.stop()
        thread.join()


def test_wait_strategy_options_are_checked(tmp_path):
    directory = str(tmp_path / "data")
    for options in ({"spin_count": -1}, {"spin_count": 1_000_001}, {"idle_wait_ms": 0}, {"idle_wait_ms": 1001},
                    {"abandon_after_ms": 0}, {"abandon_after_ms": 600_001}, {"overlap_rows_min": 0},
                    {"overlap_rows_min": GROUP_ROWS_MAX + 2}):
        with pytest.raises(ValueError, match=next(iter(options))):
            Server(directory, **options)
    with pytest.raises(TypeError, match="idle_wait_ms must be an integer"):
        Server(directory, idle_wait_ms=2.5)
    server = small_server(tmp_path)
    try:
        for options in ({"spin_count": -1}, {"wait_slice_ms": 0}, {"wait_slice_ms": 1001},
                        {"writer_timeout_ms": 199}, {"busy_timeout_ms": 0}):
            with pytest.raises(ValueError, match=next(iter(options))):
                connect(server.directory, **options)
        with pytest.raises(TypeError, match="wait_slice_ms must be an integer"):
            connect(server.directory, wait_slice_ms=1.5)
        ring = producer(server)
        with pytest.raises(ValueError, match="spin_count"):
            ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([1]), 100, 3000, 2_000_000)
        with pytest.raises(ValueError, match="wait_slice_ms"):
            ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([1]), 100, 3000, 0, 0)
    finally:
        server.close()


def test_serve_command_takes_the_wait_strategy(tmp_path):
    """`ledger serve --spin-count 0 --idle-wait-ms 5 --abandon-after-ms 300`: a client that never spins works,
    and a dead producer's claim is given up after 300 ms, not the 2 s default."""
    directory = str(tmp_path / "data")
    writer = subprocess.Popen([sys.executable, "-m", "ledger", "serve", directory, "--create", "--durability", "os",
                               "--slots", "1024", "--spin-count", "0", "--idle-wait-ms", "5",
                               "--abandon-after-ms", "300"],
                              stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    try:
        assert "serving" in writer.stderr.readline()
        with connect(directory, spin_count=0, wait_slice_ms=1) as client:
            assert client.create_account(1, min_balance=ledger.BALANCE_MIN) == ledger.AccountResult.OK
            assert client.create_account(2) == ledger.AccountResult.OK
            client._ring.claim_without_publishing(5)                    # a producer that died after claiming
            started = time.monotonic()
            assert client.transfer(80, 1, 2, 5) == ledger.TransferResult.OK
            assert 0.25 < time.monotonic() - started < 1.5
    finally:
        stop(writer)


def test_releasing_a_slot_wakes_a_producer_waiting_for_it(tmp_path):
    """A producer waiting for ring space sleeps in slices of wait_slice_ms; the producer that frees the slot wakes
    it at once (the writer, idle, would not)."""
    import threading
    server = small_server(tmp_path)
    try:
        reader, waiter = producer(server), producer(server)
        first = reader.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(30, 38))), 500)
        second = reader.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch(list(range(40, 48))), 500)
        drain_until(server, 16)                              # answered, not read: the ring is full
        done = []
        thread = threading.Thread(target=lambda: done.append(
            (waiter.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([50]), 5000, 3000, 0, 1000), time.monotonic())))
        thread.start()
        time.sleep(0.2)                                                 # asleep in its first 1 s slice
        codes, statuses = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
        reader.wait_results(first, 8, codes, statuses, 1000, 1000)      # frees slots 0..7
        released = time.monotonic()
        thread.join(timeout=5)
        assert done and done[0][1] - released < 0.3, "the waiting producer slept through the release"
        reader.wait_results(second, 8, codes, statuses, 1000, 1000)
    finally:
        server.close()


def test_a_group_of_several_core_calls_never_has_two_unsynced_batches(tmp_path):
    """Transfers, then account creations, then transfers: three core calls (three journal batches) in one drain.
    Each batch is synced before the next is written; a single-call group is synced once."""
    server = Server(str(tmp_path / "data"), durability="fsync", slot_count=64)
    try:
        server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
        server.ledger.create_account(2)
        journal = server.ledger._journal
        events, write, sync = [], journal.write, journal.sync

        def logged_write(start, end):
            events.append(("write", start, end))
            write(start, end)

        def logged_sync(start, end):
            events.append(("sync", start, end))
            sync(start, end)

        journal.write, journal.sync = logged_write, logged_sync
        ring = producer(server)
        accounts = ledger.accounts_batch(1)
        accounts["id"] = 3
        firsts = [ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([90, 91]), 500),
                  ring.submit(_ring.SLOT_KIND_ACCOUNT, accounts, 500),
                  ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([92]), 500)]
        assert server.drain_once() and server.ring.consume_sequence == firsts[-1] + 1
        writes = [event for event in events if event[0] == "write"]
        assert len(writes) == 3
        synced_to = writes[0][1]
        for event in events:
            if event[0] == "write":
                assert event[1] == synced_to, f"batch at {event[1]} written with {synced_to}.. unsynced: {events}"
            else:
                assert event[1] == synced_to
                synced_to = event[2]
        assert events[-1][0] == "sync" and synced_to == server.ledger._engine.write_position
        events.clear()
        ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([93]), 500)
        assert server.drain_once()
        assert [event[0] for event in events] == ["write", "sync"]
    finally:
        server.close()


def test_a_failed_sync_poisons_the_writer_and_acknowledges_nothing(tmp_path):
    failing = []

    def inject(operation):
        if operation == "sync" and failing:
            raise OSError(5, "Input/output error (injected)")

    server = Server(str(tmp_path / "data"), durability="fsync", slot_count=64, fault_injector=inject)
    try:
        server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
        server.ledger.create_account(2)
        ring = producer(server)
        first = ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([95, 96]), 500)
        failing.append(True)
        with pytest.raises(OSError, match="injected"):
            server.drain_once()
        assert server.ledger._engine.poisoned
        with pytest.raises(ledger.LedgerPoisonedError):
            server.ledger.transfer(97, 1, 2, 5)
        codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
        with pytest.raises(_ring.RingTimeoutError):                    # never answered
            ring.wait_results(first, 2, codes, statuses, 50, 1000)
    finally:
        server.close()


def committed_record_on_disk(server, position):
    """The 64-byte record at a journal position as the segment file holds it (not the writer's private mapping)."""
    journal = server.ledger._journal
    segment = journal.segments[position >> journal.segment_records_log2]
    offset = ledger.journal.SEGMENT_HEADER_BYTES + (position & (journal.segment_records - 1)) * 64
    return os.pread(segment.fd, 64, offset)


def test_a_large_group_is_synced_in_the_background_and_its_successor_committed_only_after(tmp_path):
    """overlap_rows_min=2: a group of two transfers is synced (and answered) by the sync thread while the writer
    applies the next group. The next group's events may reach the files early, its commit word only once the
    first group's sync returned; no group is answered before its own sync returned."""
    release, syncing = threading.Event(), threading.Event()

    def inject(operation):
        if operation == "sync" and threading.current_thread().name.startswith("ledger-ring-sync"):
            syncing.set()
            assert release.wait(10)

    server = small_server(tmp_path, slot_count=64, abandon_after_ms=ABANDON_AFTER_MS_DEFAULT, durability="fsync",
                          fault_injector=inject, overlap_rows_min=2)
    try:
        ring = producer(server)
        codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
        first = ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([90, 91]), 500)
        assert server.drain_once()
        assert syncing.wait(5)                                          # its sync runs, held by the test
        with pytest.raises(_ring.RingTimeoutError):
            ring.wait_results(first, 2, codes, statuses, 50, 1000)      # not answered before its sync returns
        second = ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([92, 93]), 500)
        header = server.ledger._engine.write_position
        writer = threading.Thread(target=server.drain_once)
        writer.start()
        deadline = time.monotonic() + HANG_GUARD_S
        while server.ledger._engine.write_position == header and time.monotonic() < deadline:
            time.sleep(0.005)
        assert server.ledger._engine.write_position == header + 3      # applied in memory: header and 2 events
        time.sleep(0.1)
        assert writer.is_alive()                                        # waiting for the first group's sync
        assert committed_record_on_disk(server, header) == bytes(64)    # no commit word in the files yet
        assert committed_record_on_disk(server, header + 1) != bytes(64)  # its events may go ahead
        release.set()
        writer.join(5)
        assert not writer.is_alive()
        ring.wait_results(first, 2, codes, statuses, 5000, 5000)
        assert codes.tolist() == [0, 0] and statuses.tolist() == [0, 0]
        assert server.settle()                                          # the second group: synced and answered
        assert committed_record_on_disk(server, header) != bytes(64)
        ring.wait_results(second, 2, codes, statuses, 5000, 5000)
        assert codes.tolist() == [0, 0]
        assert server.ledger.balance(2) == 4 * 5
    finally:
        release.set()
        server.close()
    with ledger.open(str(tmp_path / "data")) as reopened:
        assert reopened.balance(2) == 4 * 5 and reopened.verify().ok


def test_a_failed_background_sync_poisons_the_writer_and_answers_nothing(tmp_path):
    failing = []

    def inject(operation):
        if operation == "sync" and failing:
            raise OSError(5, "Input/output error (injected)")

    server = small_server(tmp_path, slot_count=64, abandon_after_ms=ABANDON_AFTER_MS_DEFAULT, durability="fsync",
                          fault_injector=inject, overlap_rows_min=2)
    try:
        ring = producer(server)
        failing.append(True)
        first = ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([95, 96]), 500)
        assert server.drain_once()                                      # handed to the sync thread, which fails
        assert server.commits.pending.synced.wait(5)
        header = server.ledger._engine.write_position
        ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_batch([97, 98]), 500)
        with pytest.raises(OSError, match="injected"):                  # the real error, at the next drain
            server.drain_once()
        assert server.ledger._engine.poisoned and server.ledger._engine.write_position == header
        codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
        with pytest.raises(_ring.RingTimeoutError):                    # never answered
            ring.wait_results(first, 2, codes, statuses, 50, 1000)
    finally:
        with pytest.raises(OSError, match="injected"):
            server.close()                                              # still reported, never acknowledged


def made_ledger(tmp_path):
    directory = tmp_path / "data"
    Server(str(directory), durability="os").close()
    assert (directory / "journal" / "00000000.segment").exists() and (directory / "LOCK").exists()
    return directory


@pytest.mark.parametrize("relative, mode, message", [
    ("journal/00000000.segment", 0o666, "writable by others"),
    ("LOCK", 0o602, "writable by others"),
    ("journal", 0o777, "writable by others"),
    (".", 0o770, "writable by its group"),
    ("journal/00000000.segment", 0o660, "writable by its group"),
])
def test_serve_refuses_files_others_can_write_anywhere_in_the_directory(tmp_path, relative, mode, message):
    directory = made_ledger(tmp_path)
    os.chmod(directory / relative, mode)
    with pytest.raises(PermissionError, match=message) as raised:
        Server(str(directory), durability="os")
    assert str(raised.value).startswith(os.path.normpath(directory / relative))      # names the culprit


def test_serve_refuses_files_owned_by_another_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    directory = made_ledger(tmp_path)
    os.chown(directory / "journal" / "00000000.segment", 12345, -1)
    with pytest.raises(PermissionError, match="owned by uid 12345"):
        Server(str(directory), durability="os")


def test_serve_with_a_group_lets_the_group_reach_the_ring_only(tmp_path):
    directory = made_ledger(tmp_path)
    group = os.getgid()
    os.chmod(directory, 0o770)                                  # group-writable: accepted with --group only
    server = Server(str(directory), durability="os", group=group)
    try:
        status = os.stat(directory)
        assert (status.st_mode & 0o777, status.st_gid) == (0o750, group)
        ring = os.stat(directory / "commands.ring")
        assert (ring.st_mode & 0o777, ring.st_gid) == (0o660, group)
        assert os.stat(directory / "journal" / "00000000.segment").st_mode & 0o077 == 0
        assert os.stat(directory / "LOCK").st_mode & 0o077 == 0
    finally:
        server.close()


def test_serve_snapshots_periodically_so_a_restart_does_not_replay_from_genesis(tmp_path):
    directory = str(tmp_path / "data")
    writer = subprocess.Popen([sys.executable, "-m", "ledger", "serve", directory, "--create", "--slots", "1024",
                               "--snapshot-every-s", "0.2"], stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    try:
        assert "serving" in writer.stderr.readline()
        with connect(directory) as client:
            assert client.create_account(1, min_balance=ledger.BALANCE_MIN) == ledger.AccountResult.OK
            assert client.create_account(2) == ledger.AccountResult.OK
            assert not client.transfers(transfer_batch(list(range(1, 101)))).any()
            snapshots = os.path.join(directory, "snapshots")
            deadline = time.monotonic() + HANG_GUARD_S
            while not (os.path.isdir(snapshots) and any(name.endswith(".snapshot") for name in os.listdir(snapshots))):
                assert time.monotonic() < deadline, f"no snapshot within {HANG_GUARD_S} s"
                time.sleep(0.05)
            assert client.transfer(200, 1, 2, 7) == ledger.TransferResult.OK
    finally:
        stop(writer)
    assert writer.returncode == 0
    with ledger.open(directory, readonly=True) as handle:
        assert handle.recovered_from is not None and handle.recovered_from.position > 1
        assert handle.balance(2) == 100 * 5 + 7
        assert handle.verify().ok


def test_a_failed_periodic_snapshot_is_reported_and_serving_goes_on(tmp_path):
    import threading
    server = small_server(tmp_path)
    server.snapshot_every_s = 0.1
    server._snapshot_due = 0.0

    def failing_snapshot(wait=True):
        raise OSError(28, "No space left on device (injected)")

    server.ledger.snapshot = failing_snapshot
    thread = threading.Thread(target=server.serve_forever)
    with pytest.warns(RuntimeWarning, match="snapshot failed"):
        thread.start()
        try:
            with connect(server.directory) as client:
                assert client.transfer(300, 1, 2, 5) == ledger.TransferResult.OK
                deadline = time.monotonic() + HANG_GUARD_S
                while server.snapshot_failures < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert client.transfer(301, 1, 2, 5) == ledger.TransferResult.OK
        finally:
            server.stop()
            thread.join()
    assert server.snapshot_failures >= 2


def test_snapshot_interval_is_checked(tmp_path):
    with pytest.raises(ValueError, match="snapshot_every_s"):
        Server(str(tmp_path / "data"), snapshot_every_s=0.01)
    with pytest.raises(TypeError, match="snapshot_every_s"):
        Server(str(tmp_path / "data"), snapshot_every_s="60")


class RecordingRing:
    """The client's real ring, recording the timeouts each call passes to it."""

    def __init__(self, ring):
        self.ring, self.timeouts = ring, []

    def submit(self, kind, rows, busy_timeout_ms, *rest):
        self.timeouts.append(("submit", busy_timeout_ms))
        return self.ring.submit(kind, rows, busy_timeout_ms, *rest)

    def wait_results(self, first, count, codes, statuses, timeout_ms, *rest):
        self.timeouts.append(("wait_results", timeout_ms))
        return self.ring.wait_results(first, count, codes, statuses, timeout_ms, *rest)

    def writer_alive(self, writer_timeout_ms):
        return self.ring.writer_alive(writer_timeout_ms)


def test_a_call_that_waited_behind_another_gets_only_the_rest_of_its_timeout(tmp_path):
    """timeout_ms bounds the whole call: time spent waiting for the client (another call in progress) is taken
    from what the call may then wait for ring space and for its results (it used to get the full timeout again)."""
    import threading
    server = small_server(tmp_path)
    try:
        client = connect(server.directory, timeout_ms=600, busy_timeout_ms=5000)
        recording = client._ring = RecordingRing(client._ring)
        client._lock.acquire()                                          # another call in progress for 300 ms
        releaser = threading.Timer(0.3, client._lock.release)
        releaser.start()
        with pytest.raises(ledger.LedgerTimeoutError):                  # nobody drains: no result comes
            client.transfer(50, 1, 2, 5)
        releaser.join()
        (_, busy_ms), (_, wait_ms) = recording.timeouts
        assert busy_ms <= 300 and wait_ms <= 300, recording.timeouts   # at most 600 - 300, not 5,000 and 600
        client._ring = recording.ring
        client.close()
    finally:
        server.close()


@pytest.mark.parametrize("call, arguments, keywords", [
    ("transfer", (1, 1, 2, 1.5), {}),
    ("transfer", (1.0, 1, 2, 5), {}),
    ("transfer", (__import__("decimal").Decimal("3.99"), 1, 2, 5), {}),
    ("transfer", (2**64, 1, 2, 5), {}),
    ("transfer", (-1, 1, 2, 5), {}),
    ("transfer", (1, 1, 2, -2**63 - 1), {}),
    ("transfer", (1, 1, 2, 5), {"code": 70_000}),
    ("transfer", (1, 1, 2, 5), {"ledger": 2**32}),
    ("transfer", (1, 1, 2, 5), {"timeout": 0.5}),
    ("transfer", (1, 1, 2, 5), {"flags": 1 << 16}),
    ("create_account", (9,), {"min_balance": 1.5}),
    ("create_account", (9,), {"max_balance": 2**63}),
    ("create_account", (9.0,), {}),
    ("account", (1.0,), {}),
])
def test_client_single_calls_check_arguments_as_ledger_does(tmp_path, call, arguments, keywords):
    """A float, Decimal or out-of-range argument raises what Ledger raises (TypeError or ValueError naming the
    argument), instead of numpy truncating 1.5 to 1."""
    server = small_server(tmp_path)
    try:
        with pytest.raises((TypeError, ValueError)) as expected:
            getattr(server.ledger, call)(*arguments, **keywords)
        with connect(server.directory, timeout_ms=200) as client:
            with pytest.raises(expected.type) as raised:
                getattr(client, call)(*arguments, **keywords)
        assert str(raised.value) == str(expected.value)
        assert server.ring.claim_sequence == 0, "nothing was sent"
    finally:
        server.close()


def test_client_single_calls_take_numpy_integers_and_flags(tmp_path):
    import threading
    server = small_server(tmp_path)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with connect(server.directory) as client:
            assert client.create_account(np.uint64(3), ledger=np.uint32(1)) == ledger.AccountResult.OK
            assert client.transfer(np.int64(400), 1, 3, np.int64(9), flags=ledger.TransferFlags.NONE) == 0
            assert client.balance(np.uint64(3)) == 9
    finally:
        server.stop()
        thread.join()


batch_layouts = st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(0, 15), st.integers(0, 3),
                                   slot_bytes), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(batches=batch_layouts)
# A published batch whose last slot claims one more slot, followed by a dead producer's slot: no slot ever ends the
# batch, so a writer that trusted each slot's own fields waited for it forever.
@example(batches=[(2, 1, 0, 2, bytes(104)), (1, 1, 1, 0, bytes(104))])
def test_multi_slot_batches_with_holes_and_lies_never_stall_or_overrun_the_writer(fuzzed_server, batches):
    """Producer batches of 1-4 slots, some slots never published (dead producers), some with batch fields that
    disagree with their batch (hostile): the writer answers or gives up every slot, never moves past
    claim_sequence, never waits forever, and the ledger stays consistent."""
    server = fuzzed_server
    ring = server.ring
    total = sum(size for size, *_ in batches)
    first = ring.claim_without_publishing(total)
    sequence = first
    published = []
    for size, kind, holes, lie, raw in batches:
        for index in range(size):
            data = bytearray(raw)
            data[4:6] = (kind or _ring.SLOT_KIND_TRANSFER).to_bytes(2, "little")
            batch_first, batch_count = sequence, size
            if lie and index == size - 1:                          # the last slot disagrees with its batch
                batch_first, batch_count = (batch_first + lie, batch_count) if lie == 1 else \
                    (batch_first, batch_count + lie - 1)
            data[8:16] = batch_first.to_bytes(8, "little")
            data[16:20] = batch_count.to_bytes(4, "little")
            data[24 + 8:24 + 24] = (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
            if not holes >> index & 1:
                ring.publish_raw(sequence + index, bytes(data))
                published.append(sequence + index)
        sequence += size
    deadline = time.monotonic() + HANG_GUARD_S
    while ring.consume_sequence < first + total:
        assert time.monotonic() < deadline, f"the writer stalled at {ring.consume_sequence} of {first + total}"
        if not server.drain_once():
            time.sleep(0.002)
        assert ring.consume_sequence <= ring.claim_sequence
    assert ring.consume_sequence == first + total
    for answered in published:                                      # every published slot was answered
        offset = _ring.HEADER_SIZE + (answered % 64) * _ring.SLOT_SIZE + 8
        assert int.from_bytes(server._memory[offset:offset + 8], "little") >> 16 == answered + 1
    assert server.ledger.verify().ok


# ---- a malformed slot inside an honest call: the call is refused whole --------------------------------------

# Slot fields (docs/RING.md "Layout"): byte offsets within a 128-byte slot.
SLOT_PUBLISHED_OFFSET, SLOT_KIND_OFFSET, SLOT_BATCH_FIRST_OFFSET, SLOT_BATCH_COUNT_OFFSET = 0, 28, 32, 40


def slot_offset(ring, sequence):
    return _ring.HEADER_SIZE + (sequence & (ring.slot_count - 1)) * _ring.SLOT_SIZE


def call_in_thread(client, ids):
    """client.transfers(ids) in a thread (it blocks until answered); returns (thread, outcome list)."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_raised(client.transfers, transfer_batch(ids))))
    thread.start()
    return thread, outcome


def wait_published(memory, ring, first, count):
    """Until the producer has published slots [first, first + count) (as the writer sees them)."""
    deadline = time.monotonic() + 10
    for sequence in range(first, first + count):
        offset = slot_offset(ring, sequence) + SLOT_PUBLISHED_OFFSET
        while int.from_bytes(memory[offset:offset + 8], "little") != sequence + 1:
            assert time.monotonic() < deadline, f"slot {sequence} was never published"
            time.sleep(0.001)


def damage_slot(memory, ring, sequence, field):
    """Rewrite one field of a published slot through a producer's own mapping, with the ring's layout."""
    base = slot_offset(ring, sequence)
    if field == "unknown kind":
        memory[base + SLOT_KIND_OFFSET:base + SLOT_KIND_OFFSET + 2] = (0x7777).to_bytes(2, "little")
    elif field == "another kind":
        memory[base + SLOT_KIND_OFFSET:base + SLOT_KIND_OFFSET + 2] = _ring.SLOT_KIND_ACCOUNT.to_bytes(2, "little")
    elif field == "batch of one":  # on the first slot: a complete batch of its own, which the next slot contradicts
        memory[base + SLOT_BATCH_COUNT_OFFSET:base + SLOT_BATCH_COUNT_OFFSET + 4] = (1).to_bytes(4, "little")
    elif field in ("batch count + 1", "batch count - 1"):
        offset = base + SLOT_BATCH_COUNT_OFFSET
        count = int.from_bytes(memory[offset:offset + 4], "little") + (1 if field.endswith("+ 1") else -1)
        memory[offset:offset + 4] = count.to_bytes(4, "little")
    else:
        assert field == "batch first + 1"
        offset = base + SLOT_BATCH_FIRST_OFFSET
        memory[offset:offset + 8] = (int.from_bytes(memory[offset:offset + 8], "little") + 1).to_bytes(8, "little")


@pytest.mark.parametrize("field", ["unknown kind", "another kind", "batch count + 1", "batch count - 1",
                                   "batch first + 1", "batch of one"])
@pytest.mark.parametrize("row", [0, 1, 3, 7])
def test_one_malformed_slot_refuses_the_whole_call_and_the_client_is_told(tmp_path, row, field):
    """An honest client's call of 8 rows, one of whose published slots is rewritten before the writer drains it:
    none of the 8 rows is applied (3 of 8 were), and the client gets LedgerRejectedError saying so (it got a
    plain LedgerError). A retry with the same ids then applies them once."""
    server = small_server(tmp_path, slot_count=64)
    try:
        client = connect(server.directory, timeout_ms=10_000)
        ids = list(range(500, 508))
        thread, outcome = call_in_thread(client, ids)
        wait_published(client._memory, server.ring, 0, 8)
        damage_slot(client._memory, server.ring, row, field)
        drain_until(server, 8, seconds=5)
        thread.join(timeout=10)
        error = outcome[0]
        assert isinstance(error, ledger.LedgerRejectedError), repr(error)
        # A first slot whose fields still look well-formed is seen at the next one, which contradicts it (the
        # writer cannot tell which of them lies).
        named = "row 1" if row == 0 and field not in ("unknown kind", "batch first + 1", "batch count + 1") \
            else f"row {row}"
        assert "nothing of it was applied" in str(error) and named in str(error), str(error)
        found = server.ledger.lookup_transfers(np.array(ids, np.uint64))["state"]
        assert (found == ledger.TransferState.NOT_FOUND).all(), found
        assert server.ledger.balance(2) == 0
        thread, outcome = call_in_thread(client, ids)
        drain_until(server, 16, seconds=5)
        thread.join(timeout=10)
        assert outcome == [None] and server.ledger.balance(2) == 8 * 5
        client.close()
    finally:
        server.close()


@pytest.mark.parametrize("damaged", ["last slot of the call before", "first slot of the call after"])
def test_a_malformed_slot_of_a_neighbouring_call_does_not_touch_this_one(tmp_path, damaged):
    """Two honest calls drained together (4 rows, then 8): damaging a slot of one refuses that call whole and
    applies the other whole."""
    server = small_server(tmp_path, slot_count=64)
    try:
        before, after = connect(server.directory, timeout_ms=10_000), connect(server.directory, timeout_ms=10_000)
        first_ids, second_ids = list(range(600, 604)), list(range(700, 708))
        first_thread, first_outcome = call_in_thread(before, first_ids)
        wait_published(before._memory, server.ring, 0, 4)
        second_thread, second_outcome = call_in_thread(after, second_ids)
        wait_published(after._memory, server.ring, 4, 8)
        damage_slot(before._memory, server.ring, 3 if damaged.startswith("last") else 4, "unknown kind")
        drain_until(server, 12, seconds=5)
        first_thread.join(timeout=10)
        second_thread.join(timeout=10)
        refused, applied = (first_ids, second_ids) if damaged.startswith("last") else (second_ids, first_ids)
        refused_outcome, applied_outcome = (first_outcome, second_outcome) if damaged.startswith("last") \
            else (second_outcome, first_outcome)
        assert isinstance(refused_outcome[0], ledger.LedgerRejectedError) and applied_outcome == [None]
        states = server.ledger.lookup_transfers(np.array(refused + applied, np.uint64))["state"].tolist()
        assert states == [ledger.TransferState.NOT_FOUND] * len(refused) + [ledger.TransferState.POSTED] * len(applied)
        before.close()
        after.close()
    finally:
        server.close()


def test_serve_whose_snapshots_cannot_fit_leaves_nothing_behind_backs_off_and_keeps_serving(tiny_filesystem):
    """`serve` on a real full-ish disk (768 KiB tmpfs) with a snapshot every 0.1 s that cannot fit: every
    attempt fails and is reported, none leaves a file behind (each used to leave its partial .tmp, at a new
    position each time, until the journal's next segment found no room), attempts back off (the interval
    doubles after each failure in a row), and the journal goes on into a new segment."""
    import math
    import warnings
    directory = str(tiny_filesystem("768k") / "data")
    server = Server(directory, durability="fsync", slot_count=1024, snapshot_every_s=0.1, segment_records_log2=12,
                    transfers_capacity=1 << 16)
    server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
    server.ledger.create_account(2)
    thread = threading.Thread(target=server.serve_forever)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.monotonic()
        thread.start()
        try:
            with connect(directory) as client:
                next_id = 1
                while not os.path.exists(os.path.join(directory, "journal", "00000001.segment")) \
                        or time.monotonic() - started < 2.0:
                    assert time.monotonic() - started < 30, "the journal never reached its second segment"
                    assert not client.transfers(transfer_batch(list(range(next_id, next_id + 200)), amount=1)).any()
                    next_id += 200
                    time.sleep(0.05)
        finally:
            server.stop()
            thread.join()
        elapsed = time.monotonic() - started
    failures = server.snapshot_failures
    reports = [str(warning.message) for warning in caught if "snapshot failed" in str(warning.message)]
    assert failures >= 2 and len(reports) == failures, reports
    # Attempts at 0.1, 0.3, 0.7, 1.5, ... s after the first: at most log2(elapsed / 0.1 + 1) + 1 of them.
    assert failures <= math.log2(elapsed / 0.1 + 1) + 1, (failures, elapsed)
    folder = os.path.join(directory, "snapshots")
    assert not os.path.isdir(folder) or os.listdir(folder) == []
    with ledger.open(directory, readonly=True) as handle:
        assert handle.balance(2) == next_id - 1 and handle.verify().ok


def test_a_call_the_writer_could_only_apply_in_part_names_the_rows_applied(tmp_path):
    """The one split the writer cannot see: the first slot's count is lowered to 1 and that slot is drained (a
    complete batch of its own) before the call's next slot is published. Row 0 is applied, the rest refused, and
    the client is told exactly that (a LedgerError with `applied` and `codes`), not a bare error."""
    server = small_server(tmp_path, slot_count=64)
    try:
        client = connect(server.directory, timeout_ms=10_000)
        ids = list(range(800, 808))

        def before_taking(sequence):
            if sequence == 1:  # slot 0 is published: damage it, and let the writer drain it alone
                client._ring.set_stall_hook(None)
                damage_slot(client._memory, server.ring, 0, "batch of one")
                assert server.drain_once() and server.ring.consume_sequence == 1

        client._ring.set_stall_hook(before_taking)
        thread, outcome = call_in_thread(client, ids)
        wait_published(client._memory, server.ring, 0, 8)
        drain_until(server, 8, seconds=5)
        thread.join(timeout=10)
        error = outcome[0]
        assert type(error) is ledger.LedgerError and "applied only part of this call" in str(error), repr(error)
        assert "row 0 of 8" in str(error)
        assert error.applied.tolist() == [True] + [False] * 7 and error.codes[0] == ledger.TransferResult.OK
        states = server.ledger.lookup_transfers(np.array(ids, np.uint64))["state"].tolist()
        assert states == [ledger.TransferState.POSTED] + [ledger.TransferState.NOT_FOUND] * 7
        client.close()
    finally:
        server.close()
