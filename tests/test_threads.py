"""One handle shared by several threads: calls are serialised (the core runs without the GIL, so two threads could
otherwise be inside the engine at once), and Ctrl-C during a call or a long replay leaves the handle usable or
released. Each test checks the outcome, not only that nothing crashed: every transfer applied exactly once, money
conserved, verify() clean."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import ledger
from ledger import store as store_module

THREADS = 4
ROWS = 50
SETTLEMENT = 1
FIRST_ACCOUNT = 100
ACCOUNTS = 16


def _setup(handle) -> None:
    rows = ledger.accounts_batch(ACCOUNTS + 1)
    rows["id"] = [SETTLEMENT] + [FIRST_ACCOUNT + index for index in range(ACCOUNTS)]
    rows["min_balance"][0] = -(2**62)
    assert (handle.create_accounts(rows) == 0).all()


def _rows(first_id: int, count: int = ROWS) -> np.ndarray:
    """`count` transfers with ids first_id.., all from the settlement account: none can fail."""
    rows = ledger.transfers_batch(count)
    ids = np.arange(first_id, first_id + count, dtype=np.uint64)
    rows["id"] = ids
    rows["debit_account"] = SETTLEMENT
    rows["credit_account"] = FIRST_ACCOUNT + ids % ACCOUNTS
    rows["amount"] = 1 + ids % 7
    return rows


def _expected_total(count: int) -> int:
    ids = np.arange(1, count + 1, dtype=np.uint64)
    return int((1 + ids % 7).sum())


def _run_threads(target, count: int = THREADS) -> None:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def _check_all_applied(handle, calls_per_thread: int) -> None:
    count = THREADS * calls_per_thread * ROWS
    assert handle.stats()["transfers"] == count
    found = handle.lookup_transfers(np.arange(1, count + 1, dtype=np.uint64))
    assert (found["state"] != 0).all()
    assert handle.balance(SETTLEMENT) == -_expected_total(count)
    assert sum(handle.balance(FIRST_ACCOUNT + index) for index in range(ACCOUNTS)) == _expected_total(count)
    report = handle.verify()
    assert report.ok, report


def _hammer_transfers(handle, calls_per_thread: int) -> None:
    def work(index: int) -> None:
        for call in range(calls_per_thread):
            first = 1 + (call * THREADS + index) * ROWS
            codes = handle.transfers(_rows(first))
            assert (codes == 0).all(), codes

    _run_threads(work)


@pytest.mark.parametrize("durability", ["os", "fsync", "memory"])
def test_four_threads_share_one_handle(tmp_path, durability):
    """The issue's reproduction: 4 threads x transfers() of 50 rows on one handle (it crashed in "os" mode and
    failed an invariant in "fsync" mode). Small segments so that the journal grows (maps new segments) under load."""
    calls = {"os": 1500, "fsync": 150, "memory": 1500}[durability]
    if durability == "memory":
        handle = ledger.open(None, segment_records_log2=12)
    else:
        handle = ledger.open(str(tmp_path / "data"), create=True, durability=durability, segment_records_log2=12)
    with handle:
        _setup(handle)
        _hammer_transfers(handle, calls)
        _check_all_applied(handle, calls)
    if durability != "memory":
        with ledger.open(str(tmp_path / "data")) as reopened:
            _check_all_applied(reopened, calls)


def test_reads_race_writes(tmp_path):
    """Readers of every kind beside two writers: each read sees a whole batch or none (conservation holds in
    every accounts() copy) and nothing crashes."""
    calls = 600
    handle = ledger.open(str(tmp_path / "data"), create=True, durability="os", segment_records_log2=12)
    stop = threading.Event()
    with handle:
        _setup(handle)

        def write(index: int) -> None:
            for call in range(calls):
                first = 1 + (call * THREADS + index) * ROWS
                assert (handle.transfers(_rows(first)) == 0).all()

        def read(index: int) -> None:
            rounds = 0
            while not stop.is_set() or rounds < 5:
                rounds += 1
                state = handle.accounts()
                assert int(state["credits_posted"].sum()) == int(state["debits_posted"].sum())
                handle.balance(SETTLEMENT)
                handle.account(FIRST_ACCOUNT + rounds % ACCOUNTS)
                handle.lookup_transfers(np.arange(1, 200, dtype=np.uint64))
                handle.stats()
                history = handle.history(FIRST_ACCOUNT + index, limit=20)
                assert history.shape[0] <= 20
                if index == 0 and rounds % 20 == 0:
                    assert handle.verify().ok

        def work(index: int) -> None:
            if index < 2:
                try:
                    write(index)
                    write(index + 2)  # the two writers cover all THREADS id ranges between them
                finally:
                    stop.set()
            else:
                read(index - 2)

        _run_threads(work)
        _check_all_applied(handle, calls)


def test_single_transfer_from_threads():
    """The single-call fast path (transfer()) is serialised as well; in memory and with the core's growth of its
    tables happening under load."""
    handle = ledger.open(None, segment_records_log2=10)
    calls = 3000
    _setup(handle)

    def work(index: int) -> None:
        for call in range(calls):
            transfer_id = 1 + call * THREADS + index
            assert handle.transfer(transfer_id, SETTLEMENT, FIRST_ACCOUNT + transfer_id % ACCOUNTS,
                                   1 + transfer_id % 7) == 0

    _run_threads(work)
    count = THREADS * calls
    assert handle.stats()["transfers"] == count
    assert handle.balance(SETTLEMENT) == -_expected_total(count)
    assert handle.verify().ok
    handle.close()


def test_close_from_another_thread_while_calls_run(tmp_path):
    """close() waits for the call in progress; later calls raise LedgerClosedError, never crash."""
    handle = ledger.open(str(tmp_path / "data"), create=True, durability="os", segment_records_log2=12)
    _setup(handle)
    outcomes: list[str] = []

    def work(index: int) -> None:
        if index == 0:
            time.sleep(0.05)
            handle.close()
            return
        for call in range(100_000):
            try:
                handle.transfers(_rows(1 + (call * THREADS + index) * ROWS))
            except ledger.LedgerClosedError:
                outcomes.append("closed")
                return
        outcomes.append("finished")

    _run_threads(work)
    assert outcomes == ["closed"] * (THREADS - 1)
    with ledger.open(str(tmp_path / "data")) as reopened:
        assert reopened.verify().ok
        assert reopened.stats()["transfers"] % ROWS == 0  # whole batches only
        total = sum(reopened.balance(FIRST_ACCOUNT + index) for index in range(ACCOUNTS))
        assert total == -reopened.balance(SETTLEMENT) > 0


# ---- Ctrl-C ----------------------------------------------------------------------------------------------------

def _interrupt_at(operation: str, how: str):
    """A fault injector that, once armed, interrupts the first `operation` of the journal: "signal" sends a real
    SIGINT to this (main) thread, whose handler raises KeyboardInterrupt at the next Python line inside the
    journal's write or sync; "raise" raises KeyboardInterrupt itself."""
    state = {"armed": False, "fired": 0}

    def injector(name: str) -> None:
        if state["armed"] and name == operation and not state["fired"]:
            state["fired"] += 1
            if how == "signal":
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            else:
                raise KeyboardInterrupt

    return state, injector


@pytest.mark.parametrize("operation,how,rows", [
    ("sync", "raise", ROWS),
    ("write", "signal", ROWS),
    ("sync", "signal", ROWS),
    ("write", "signal", 40_000),   # a batch large enough to be written ahead in chunks: the first write is ahead
])
def test_ctrl_c_during_a_durable_batch_keeps_the_handle(tmp_path, operation, how, rows):
    """Ctrl-C while a durable batch is written or synced: the batch is finished and made durable, then the
    KeyboardInterrupt says so; the handle is not poisoned (it was, with "poisoned by a failed journal sync")."""
    state, injector = _interrupt_at(operation, how)
    directory = str(tmp_path / "data")
    handle = ledger.api.open_with_hooks(directory, create=True, fault_injector=injector)
    _setup(handle)
    state["armed"] = True
    with pytest.raises(KeyboardInterrupt, match="applied and is durable"):
        handle.transfers(_rows(1, rows))
    assert state["fired"] == 1
    assert not handle._engine.poisoned
    assert (handle.lookup_transfers(np.arange(1, rows + 1, dtype=np.uint64))["state"] != 0).all()
    assert (handle.transfers(_rows(rows + 1, ROWS)) == 0).all()  # still usable
    handle.close()
    with ledger.open(directory) as reopened:
        assert reopened.stats()["transfers"] == rows + ROWS
        assert reopened.balance(SETTLEMENT) == -int((1 + np.arange(1, rows + ROWS + 1) % 7).sum())
        assert reopened.verify().ok


def test_ctrl_c_during_a_single_durable_transfer(tmp_path):
    state, injector = _interrupt_at("sync", "signal")
    directory = str(tmp_path / "data")
    with ledger.api.open_with_hooks(directory, create=True, fault_injector=injector) as handle:
        _setup(handle)
        state["armed"] = True
        with pytest.raises(KeyboardInterrupt, match="applied and is durable"):
            handle.transfer(7, SETTLEMENT, FIRST_ACCOUNT, 5)
        assert handle.balance(FIRST_ACCOUNT) == 5
        assert handle.transfer(7, SETTLEMENT, FIRST_ACCOUNT, 5) == ledger.TransferResult.EXISTS
    with ledger.open(directory) as reopened:
        assert reopened.balance(FIRST_ACCOUNT) == 5


def test_a_failed_sync_still_poisons(tmp_path):
    """Only Ctrl-C is held back: a real failure of the sync poisons the handle as before."""
    armed = []

    def injector(name: str) -> None:
        if armed and name == "sync":
            raise OSError(5, "injected EIO")

    with ledger.api.open_with_hooks(str(tmp_path / "data"), create=True, fault_injector=injector) as handle:
        _setup(handle)
        armed.append(True)
        with pytest.raises(OSError, match="injected EIO"):
            handle.transfers(_rows(1))
        with pytest.raises(ledger.LedgerPoisonedError):
            handle.transfers(_rows(100))


def test_ctrl_c_stops_a_long_replay_at_open(tmp_path, monkeypatch):
    """A SIGINT while open() replays the journal stops the replay between batches (not after the whole of it)
    and releases the half-opened handle: the directory's writer lock is free, and the next open is whole."""
    directory = str(tmp_path / "data")
    batches, rows = 300, 4096
    with ledger.open(directory, create=True, durability="os") as handle:
        _setup(handle)
        for batch in range(batches):
            handle.transfers(_rows(1 + batch * rows, rows))
        end = handle.stats()["journal_position"]
    seen: dict[str, int] = {}
    real_replay = store_module.replay

    def replay_with_an_interrupt(engine, end_bound):
        start = engine.write_position

        def interrupt() -> None:
            deadline = time.monotonic() + 30
            while engine.write_position == start and time.monotonic() < deadline:
                time.sleep(0.0005)  # the replay runs without the GIL between batches: this thread gets turns
            seen["sent_at"] = engine.write_position
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        def handler(signum, frame):
            seen["stopped_at"] = engine.write_position
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, handler)
        thread = threading.Thread(target=interrupt)
        thread.start()
        try:
            return real_replay(engine, end_bound)
        finally:
            thread.join()
            signal.signal(signal.SIGINT, previous)

    monkeypatch.setattr(store_module, "replay", replay_with_an_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ledger.open(directory)
    assert 1 < seen["sent_at"] <= seen["stopped_at"] < end, seen  # stopped inside the replay
    monkeypatch.undo()
    with ledger.open(directory) as reopened:  # the lock was released; nothing was lost
        assert reopened.stats()["transfers"] == batches * rows
        assert reopened.verify().ok


# ---- the ring Client -------------------------------------------------------------------------------------------

def test_ring_client_shared_by_threads(tmp_path):
    """One Client, 4 threads: each call is answered with its own results; close() from another thread afterwards."""
    from test_ring import setup_accounts, start_writer, stop
    from support.ring_processes import transfer_rows

    directory = str(tmp_path / "data")
    writer = start_writer(directory)
    try:
        setup_accounts(directory)
        client = ledger.connect(directory, timeout_ms=60_000)
        calls = 60

        def work(index: int) -> None:
            for call in range(calls):
                first = 1 + (call * THREADS + index) * ROWS
                codes = client.transfers(transfer_rows(np.arange(first, first + ROWS, dtype=np.uint64)))
                assert (codes == 0).all(), codes
                if call % 10 == 0:
                    client.balance(FIRST_ACCOUNT)

        _run_threads(work)
        count = THREADS * calls * ROWS
        expected = transfer_rows(np.arange(1, count + 1, dtype=np.uint64))
        assert client.balance(1) == -int(expected["amount"].sum())
        closer = threading.Thread(target=client.close)
        closer.start()
        closer.join(timeout=60)
        with pytest.raises(ledger.LedgerClosedError):
            client.balance(1)
    finally:
        stop(writer)
    with ledger.open(directory) as reopened:
        assert reopened.stats()["transfers"] == count
        assert reopened.verify().ok


def test_ring_call_while_serve_restarts_waits_for_the_writer(tmp_path):
    """A client whose writer stopped calls while the next `serve` is starting: the call waits for the new writer
    (within its timeout) and is applied once, instead of failing with "writer stopped ... may or may not be
    applied" (which it did even for balance())."""
    from test_ring import setup_accounts, start_writer, stop
    from support.ring_processes import transfer_rows

    directory = str(tmp_path / "data")
    writer = start_writer(directory)
    setup_accounts(directory)
    client = ledger.connect(directory, timeout_ms=30_000, writer_timeout_ms=1_000)
    assert (client.transfers(transfer_rows(np.arange(1, 11, dtype=np.uint64))) == 0).all()
    stop(writer)
    answers: dict[str, object] = {}

    def call() -> None:
        answers["balance"] = client.balance(SETTLEMENT)
        answers["codes"] = client.transfers(transfer_rows(np.arange(11, 21, dtype=np.uint64)))

    caller = threading.Thread(target=lambda: _run_threads(lambda index: call(), 1))
    caller.start()
    time.sleep(0.3)  # the call is waiting: no writer runs
    assert caller.is_alive()
    writer = start_writer(directory)
    try:
        caller.join(timeout=60)
        assert not caller.is_alive()
        assert answers["balance"] == -int(transfer_rows(np.arange(1, 11, dtype=np.uint64))["amount"].sum())
        assert (answers["codes"] == 0).all()
        assert client.balance(SETTLEMENT) == -int(transfer_rows(np.arange(1, 21, dtype=np.uint64))["amount"].sum())
        client.close()
    finally:
        stop(writer)


def test_ring_call_with_no_writer_says_nothing_was_sent(tmp_path):
    from test_ring import setup_accounts, start_writer, stop

    directory = str(tmp_path / "data")
    writer = start_writer(directory)
    setup_accounts(directory)
    client = ledger.connect(directory, timeout_ms=300, writer_timeout_ms=1_000)
    stop(writer)
    with pytest.raises(ledger.LedgerUnavailableError, match="nothing of this call was sent"):
        client.balance(SETTLEMENT)
    client.close()


def test_tailer_shared_by_threads(tmp_path):
    """4 threads iterate one Tailer: every event goes to exactly one of them (no batch read twice or skipped)."""
    from ledger.tail import Tailer

    directory = str(tmp_path / "data")
    calls = 200
    with ledger.open(directory, create=True, durability="os", segment_records_log2=12) as handle:
        _setup(handle)
        for call in range(calls):
            handle.transfers(_rows(1 + call * ROWS))
    seen: list[np.ndarray] = []
    tailer = Tailer(directory, follow=False, max_events=ROWS)

    def work(index: int) -> None:
        for events in tailer:
            seen.append(events["position"].copy())

    _run_threads(work)
    tailer.close()
    positions = np.sort(np.concatenate(seen))
    assert positions.size == np.unique(positions).size  # nothing twice
    assert positions.size == ACCOUNTS + 1 + calls * ROWS  # nothing missed: every account and transfer event


def test_ctrl_c_during_flush_keeps_the_handle(tmp_path):
    """durability "os": flush() interrupted by Ctrl-C raises KeyboardInterrupt and poisons nothing."""
    armed = []

    def injector(name: str) -> None:  # only the caller's flush, not the flusher thread's
        if armed and name == "sync" and threading.current_thread() is threading.main_thread():
            armed.clear()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    directory = str(tmp_path / "data")
    with ledger.api.open_with_hooks(directory, create=True, durability="os", flush_interval_ms=60_000,
                                    fault_injector=injector) as handle:
        _setup(handle)
        handle.transfers(_rows(1))
        armed.append(True)
        with pytest.raises(KeyboardInterrupt):
            handle.flush()
        assert not handle._engine.poisoned
        assert (handle.transfers(_rows(1 + ROWS)) == 0).all()
        handle.flush()
    with ledger.open(directory) as reopened:
        assert reopened.stats()["transfers"] == 2 * ROWS


def test_ctrl_c_interrupts_a_call_waiting_for_the_handle():
    """A call waiting (without the GIL) for another thread's call can be Ctrl-C'd; the handle works afterwards."""
    handle = ledger.open(None)
    _setup(handle)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with handle._engine:  # as a long call would
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            handle.balance(SETTLEMENT)
    finally:
        timer.join()
        release.set()
        holder.join(timeout=30)
    assert handle.transfer(1, SETTLEMENT, FIRST_ACCOUNT, 3) == 0
    assert handle.balance(FIRST_ACCOUNT) == 3
    handle.close()
