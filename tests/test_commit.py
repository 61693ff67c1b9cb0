"""The commit pipeline's publish hook (ledger/commit.py), in both modes: every committed batch's range is
published exactly once, in journal order, after it is durable and before the call returns (per call) or the ring
answers (grouped); a hook that raises poisons the handle and nothing of that batch is acknowledged. With a
pipelined hook (send -> Future, the real StreamPublisher), the ring syncs and sends the next group before the
previous one's acks arrived, answers in order, and a fence failure answers no group."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import ledger
from ledger import _ring
from ledger.api import open_with_hooks
from ledger.ring import Server
from support.producers import producer

WRITE_AHEAD_ROWS = 20_000   # past the core's WRITE_AHEAD_BATCH_MIN_ROWS (16,384): the written-ahead path


class Recorder:
    """A publish hook and fault injector in one: the journal operations and the publishes, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.failing = False
        self.lock = threading.Lock()

    def inject(self, operation: str) -> None:
        with self.lock:
            self.events.append((operation,))

    def publish(self, start: int, end: int) -> None:
        if self.failing:
            raise ConnectionError("the stream refused the batch (injected)")
        with self.lock:
            self.events.append(("publish", start, end))

    @property
    def published(self) -> list[tuple[int, int]]:
        return [event[1:] for event in self.events if event[0] == "publish"]


def check_published(recorder: Recorder, first: int, end: int) -> None:
    """The published ranges tile [first, end) in order, and each follows a sync that returned."""
    published = recorder.published
    assert published, "nothing was published"
    assert published[0][0] == first and published[-1][1] == end
    for (_, previous_end), (start, _) in zip(published, published[1:]):
        assert start == previous_end, f"a gap or an overlap: {published}"
    synced = False
    for event in recorder.events:
        if event[0] == "synced":
            synced = True
        elif event[0] in ("write", "write-header"):
            synced = False
        elif event[0] == "publish":
            assert synced, f"published before its sync returned: {recorder.events}"


def transfers(ids: np.ndarray) -> np.ndarray:
    rows = ledger.transfers_batch(ids.shape[0])
    rows["id"], rows["debit_account"], rows["credit_account"], rows["amount"] = ids, 1, 2, 1
    return rows


@pytest.mark.parametrize("durability", ["fsync", "os", "memory"])
def test_per_call_publishes_each_batch_once_in_order_before_the_call_returns(tmp_path, durability):
    recorder = Recorder()
    path = None if durability == "memory" else str(tmp_path / "data")
    options = {} if durability == "memory" else {"durability": durability, "fault_injector": recorder.inject}
    with open_with_hooks(path, create=True, publish=recorder.publish, **options) as handle:
        first = handle.stats()["journal_position"]
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        for batch, rows in enumerate((transfers(np.arange(1, 4)), transfers(np.arange(10, 10 + WRITE_AHEAD_ROWS)))):
            before = handle.stats()["journal_position"]
            assert not handle.transfers(rows).any()
            assert recorder.published[-1] == (before, handle.stats()["journal_position"]), "not before it returned"
        assert handle.transfer(5, 1, 2, 1) == ledger.TransferResult.OK
        assert handle.transfer(5, 1, 2, 1) == ledger.TransferResult.EXISTS   # commits nothing: nothing published
        end = handle.stats()["journal_position"]
        assert len(recorder.published) == 5
        if durability == "fsync":
            check_published(recorder, first, end)
        else:
            assert recorder.published[0][0] == first and recorder.published[-1][1] == end


def test_per_call_a_failing_publish_poisons_the_handle_and_the_call_fails(tmp_path):
    recorder = Recorder()
    handle = open_with_hooks(str(tmp_path / "data"), create=True, publish=recorder.publish)
    handle.create_account(1, min_balance=ledger.BALANCE_MIN)
    handle.create_account(2)
    recorder.failing = True
    with pytest.raises(ConnectionError, match="injected"):
        handle.transfer(7, 1, 2, 1)
    with pytest.raises(ledger.LedgerPoisonedError):
        handle.transfer(8, 1, 2, 1)
    assert len(recorder.published) == 2
    handle.close()




def grouped_server(tmp_path, recorder: Recorder, **options) -> Server:
    server = Server(str(tmp_path / "data"), durability="fsync", slot_count=64, fault_injector=recorder.inject,
                    publish=recorder.publish, **options)
    server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)   # per call, outside any group
    server.ledger.create_account(2)
    return server


@pytest.mark.parametrize("overlap_rows_min", [2, 32769])   # on the sync thread; never
def test_grouped_publishes_every_batch_once_in_order_before_the_ring_answers(tmp_path, overlap_rows_min):
    """Several core calls in one drained group (transfers, accounts, transfers), then more groups; with
    overlap_rows_min=2 each group is synced, published and answered on the sync thread."""
    recorder = Recorder()
    server = grouped_server(tmp_path, recorder, overlap_rows_min=overlap_rows_min)
    try:
        first = 1
        ring = producer(server)
        accounts = ledger.accounts_batch(1)
        accounts["id"] = 3
        codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
        for group in range(3):
            ids = 100 + 10 * group
            firsts = [ring.submit(_ring.SLOT_KIND_TRANSFER, transfers(np.array([ids, ids + 1])), 500),
                      ring.submit(_ring.SLOT_KIND_ACCOUNT, accounts, 500),
                      ring.submit(_ring.SLOT_KIND_TRANSFER, transfers(np.array([ids + 2])), 500)]
            assert server.drain_once()
            ring.wait_results(firsts[0], 2, codes, statuses, 5000, 5000)
            assert codes.tolist() == [0, 0]
            # Answered, so published through this group's last batch.
            assert recorder.published[-1][1] == server.ledger.stats()["journal_position"]
            ring.wait_results(firsts[1], 1, codes[:1], statuses[:1], 5000, 5000)
            ring.wait_results(firsts[2], 1, codes[:1], statuses[:1], 5000, 5000)
        server.settle()
        # 2 accounts per call, then 3 groups: 3 batches in the first (the account), 2 in each later one (EXISTS).
        assert len(recorder.published) == 2 + 3 + 2 + 2
        check_published(recorder, first, server.ledger.stats()["journal_position"])
    finally:
        server.close()


def test_grouped_a_failing_publish_poisons_the_writer_and_answers_nothing(tmp_path):
    recorder = Recorder()
    server = grouped_server(tmp_path, recorder)
    try:
        ring = producer(server)
        recorder.failing = True
        first = ring.submit(_ring.SLOT_KIND_TRANSFER, transfers(np.array([95, 96])), 500)
        with pytest.raises(ConnectionError, match="injected"):
            server.drain_once()
        assert server.ledger.store.engine.poisoned
        codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
        with pytest.raises(_ring.RingTimeoutError):                    # never answered
            ring.wait_results(first, 2, codes, statuses, 50, 1000)
        assert len(recorder.published) == 2                             # the accounts only
    finally:
        server.close()


# -- a pipelined hook (send -> Future): the real StreamPublisher on a one-server LocalCluster --

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ledger.cluster.servers import LocalCluster
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=1, port=0) as running:
        yield running


class GatedHook:
    """A pipelined hook over a StreamPublisher whose Futures resolve only once `gate` is set (the real ack has
    arrived by then too): what happens while acks are outstanding. `events` logs sends and answers."""

    def __init__(self, publisher) -> None:
        self.publisher = publisher
        self.gate = threading.Event()
        self.events: list[tuple[str, int]] = []

    def send(self, start: int, end: int):
        import concurrent.futures
        self.events.append(("send", end))
        acknowledged, gated = self.publisher.send(start, end), concurrent.futures.Future()

        def release() -> None:
            self.gate.wait(10)
            error = acknowledged.exception(10)
            gated.set_exception(error) if error is not None else gated.set_result(acknowledged.result())
        threading.Thread(target=release, daemon=True).start()
        return gated


def append_unfenced(url: str, shard: str, data: bytes) -> None:
    """Publish `data` on the shard's subject as another writer would, without the fence."""
    import asyncio

    import nats

    from ledger.cluster import stream

    async def main() -> None:
        connection = await nats.connect(url)
        try:
            await connection.jetstream().publish(stream.subject(shard), data, stream=stream.stream_name(shard))
        finally:
            await connection.close()
    asyncio.run(main())


def pipelined_server(tmp_path, hook, publisher) -> Server:
    server = Server(str(tmp_path / "data"), durability="fsync", slot_count=64, publish=hook, overlap_rows_min=2)
    publisher.attach(server.store)
    answer = server._answer

    def logged(first, *arguments) -> None:
        hook.events.append(("answer", first))
        answer(first, *arguments)
    server._answer = logged
    hook.gate.set()
    server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)   # per call: acknowledged when it returns
    server.ledger.create_account(2)
    hook.gate.clear()
    hook.events.clear()
    return server


def test_grouped_pipelined_the_next_group_is_synced_and_sent_before_the_previous_is_answered(cluster, tmp_path):
    from ledger.cluster import stream
    with stream.StreamPublisher(cluster.url, "grouped", replicas=1) as publisher:
        hook = GatedHook(publisher)
        server = pipelined_server(tmp_path, hook, publisher)
        try:
            ring = producer(server)
            firsts = []
            for group in range(2):
                firsts.append(ring.submit(_ring.SLOT_KIND_TRANSFER, transfers(np.array([100 + 2 * group,
                                                                                        101 + 2 * group])), 500))
                assert server.drain_once()
            for _ in range(200):
                if len(hook.events) == 2:
                    break
                threading.Event().wait(0.01)
            assert [kind for kind, _ in hook.events] == ["send", "send"]   # group 2 sent, group 1 not answered
            hook.gate.set()
            codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
            for first in firsts:
                ring.wait_results(first, 2, codes, statuses, 5000, 5000)
                assert codes.tolist() == [0, 0]
            server.settle()
            assert [event for event in hook.events if event[0] == "answer"] == [("answer", first)
                                                                                for first in firsts]  # in order
            assert publisher.end_position == server.ledger.stats()["journal_position"]
        finally:
            server.close()


def test_grouped_pipelined_a_fence_failure_poisons_and_answers_no_later_group(cluster, tmp_path):
    from ledger.cluster import stream
    with stream.StreamPublisher(cluster.url, "grouped-fence", replicas=1) as publisher:
        hook = GatedHook(publisher)
        server = pipelined_server(tmp_path, hook, publisher)
        try:
            ring = producer(server)
            append_unfenced(cluster.url, "grouped-fence", b"another writer")   # the stream moves on without it
            firsts = []
            for group in range(2):
                firsts.append(ring.submit(_ring.SLOT_KIND_TRANSFER, transfers(np.array([200 + 2 * group,
                                                                                        201 + 2 * group])), 500))
                server.drain_once()
            hook.gate.set()
            with pytest.raises(ledger.LedgerNotPrimaryError, match="another publisher|earlier one failed"):
                server.settle()
            assert server.ledger.store.engine.poisoned
            codes, statuses = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
            for first in firsts:
                with pytest.raises(_ring.RingTimeoutError):                 # neither group answered
                    ring.wait_results(first, 2, codes, statuses, 50, 1000)
            assert not [event for event in hook.events if event[0] == "answer"]
        finally:
            server.close()


def test_per_call_pipelined_the_local_sync_runs_beside_the_round_trip_and_the_call_waits_for_both(cluster,
                                                                                                   tmp_path):
    """Per call with a pipelined hook, a batch is sent before its local fdatasync (the sync overlaps the stream's
    round trip instead of adding to it), and the call still returns only once the ack came as well."""
    from ledger.cluster import stream
    with stream.StreamPublisher(cluster.url, "per-call-overlap", replicas=1) as publisher:
        hook = GatedHook(publisher)
        handle = open_with_hooks(str(tmp_path / "data"), create=True, publish=hook)
        try:
            publisher.attach(handle.store)
            journal = handle.store.journal
            sync = journal.sync

            def logged_sync(start: int, end: int) -> None:
                sync(start, end)
                hook.events.append(("synced", end))
            journal.sync = logged_sync
            hook.gate.set()
            handle.create_account(1, min_balance=ledger.BALANCE_MIN)
            handle.create_account(2)
            hook.gate.clear()
            hook.events.clear()
            results: list[object] = []
            caller = threading.Thread(target=lambda: results.append(handle.transfer(10, 1, 2, 5)))
            caller.start()
            for _ in range(500):                                     # a liveness bound (5 s), not a speed
                if len(hook.events) >= 2:
                    break
                threading.Event().wait(0.01)
            assert [kind for kind, _ in hook.events] == ["send", "synced"]   # sent first, synced with the ack out
            assert hook.events[0][1] == hook.events[1][1] == handle.store.engine.write_position
            caller.join(0.2)
            assert caller.is_alive() and not results                # not answered before its ack
            hook.gate.set()
            caller.join(10)
            assert results == [ledger.TransferResult.OK]
        finally:
            handle.close()
