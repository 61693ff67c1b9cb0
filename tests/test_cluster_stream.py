"""A primary's committed batches published to its shard's JetStream stream and a standby following that stream
(ledger.cluster.stream), on a real single-node LocalCluster (R1): the standby ends as the primary, byte for byte;
forged messages are refused with the standby unchanged; the single-writer fence poisons a stale publisher's
handle; a store behind its stream may not publish."""
from __future__ import annotations

import asyncio
import glob
import os
import shutil
import threading
import time

import nats
import numpy as np
import pytest

import ledger
from ledger.api import open_with_hooks
from ledger.cluster import stream
from ledger.cluster.servers import LocalCluster
from ledger.format import SEGMENT_HEADER_BYTES
from support.clock import Clock

SEGMENT_RECORDS_LOG2 = 10        # 1024 records a segment: the workload crosses segment boundaries
FOLLOW_TIMEOUT_S = 15.0
WALLETS = list(range(2, 10))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=1, port=0) as running:
        yield running


def open_primary(path: str, publisher: stream.StreamPublisher, create: bool = True) -> ledger.Ledger:
    handle = open_with_hooks(path, create=create, publish=publisher, clock=Clock(), durability="fsync",
                             segment_records_log2=SEGMENT_RECORDS_LOG2)
    publisher.attach(handle.store)
    return handle


def workload(handle: ledger.Ledger, first_id: int = 1000) -> list[int]:
    """Accounts (a batch), funding (a batch), single transfers and a batch large enough to cross segments."""
    accounts = ledger.accounts_batch(len(WALLETS) + 1)
    accounts["id"] = [1] + WALLETS
    accounts["ledger"] = 1
    accounts["min_balance"][0] = ledger.BALANCE_MIN
    accounts["max_balance"] = ledger.BALANCE_MAX
    assert not handle.create_accounts(accounts).any()
    ids = list(range(first_id, first_id + 1600))
    batch = ledger.transfers_batch(1500)
    for index, id_ in enumerate(ids[:1500]):
        batch[index] = (id_, 1, WALLETS[index % len(WALLETS)], 5, 0, 0, 1, 0, 7, 0)
    assert not handle.transfers(batch).any()
    for index, id_ in enumerate(ids[1500:]):
        handle.transfer(id_, WALLETS[index % len(WALLETS)], WALLETS[(index + 1) % len(WALLETS)], 1)
    return ids


def journal_records(path: str) -> bytes:
    """Every segment's records (its header, which holds the file's creation time, left out), zeros trimmed."""
    records = b""
    for name in sorted(glob.glob(os.path.join(path, "journal", "*.segment"))):
        with open(name, "rb") as file:
            records += file.read()[SEGMENT_HEADER_BYTES:]
    return records.rstrip(b"\0")


def publish_raw(cluster: LocalCluster, shard: str, data: bytes, headers: dict[str, str] | None = None) -> None:
    """Publish `data` on the shard's subject as a forger would (no fence), creating the stream if needed."""
    async def main() -> None:
        connection = await nats.connect(cluster.url)
        try:
            js = connection.jetstream()
            await stream.ensure_stream(js, shard, replicas=1)
            await js.publish(stream.subject(shard), data, stream=stream.stream_name(shard), headers=headers)
        finally:
            await connection.close()
    asyncio.run(main())


def test_shard_names_are_checked():
    assert stream.stream_name("eu-1_a") == "LEDGER_eu-1_a"
    assert stream.subject("eu-1_a") == "ledger.journal.eu-1_a"
    for bad in ("", "a.b", "a*", "a>", "a b", "x" * 65):
        with pytest.raises(ValueError, match="shard name"):
            stream.stream_name(bad)


def test_a_standby_follows_the_stream_to_the_primary_and_refuses_forged_messages(cluster, tmp_path):
    primary_path, standby_path = str(tmp_path / "primary"), str(tmp_path / "standby")
    with stream.StreamPublisher(cluster.url, "follow", replicas=1) as publisher:
        primary = open_primary(primary_path, publisher)
        ids = workload(primary)
        position = primary.stats()["journal_position"]
    standby = ledger.open(standby_path, create=True, durability="fsync", segment_records_log2=SEGMENT_RECORDS_LOG2)
    standby.store.follow()
    follower = stream.StreamFollower(cluster.url, "follow", standby.store)
    try:
        follower.follow_until(position=position, timeout_s=FOLLOW_TIMEOUT_S)
        assert standby.stats()["journal_position"] == position
        assert np.array_equal(standby.accounts(), primary.accounts())
        assert np.array_equal(standby.lookup_transfers(ids), primary.lookup_transfers(ids))
        assert standby.verify().ok and primary.verify().ok
        assert journal_records(standby_path) == journal_records(primary_path)
        assert follower.positions[position] == publisher.last_sequence
        accounts = standby.accounts().copy()

        publish_raw(cluster, "follow", b"garbage, not a batch")
        with pytest.raises(ledger.LedgerReplicationError, match="message"):
            follower.follow_until(sequence=publisher.last_sequence + 1, timeout_s=FOLLOW_TIMEOUT_S)
        assert isinstance(follower.error, ledger.LedgerReplicationError)
        assert standby.stats()["journal_position"] == position
        assert np.array_equal(standby.accounts(), accounts)
    finally:
        follower.stop()
    primary.close()
    assert standby.verify().ok
    standby.close()


def test_a_forged_batch_with_a_flipped_bit_is_refused_and_applies_nothing(cluster, tmp_path):
    with stream.StreamPublisher(cluster.url, "flip-source", replicas=1) as publisher:
        primary = open_primary(str(tmp_path / "primary"), publisher)
        primary.create_account(5)
        middle = primary.stats()["journal_position"]
        primary.create_account(6)
        end = primary.stats()["journal_position"]
        first, second = primary.store.batch_bytes(1, middle), primary.store.batch_bytes(middle, end)
    primary.close()
    flipped = bytearray(second)
    flipped[-3] ^= 0x10                         # a bit of the event, not of the header
    publish_raw(cluster, "flip", first, {stream.HEADER_MESSAGE_ID: "1", stream.HEADER_END_POSITION: str(middle)})
    publish_raw(cluster, "flip", bytes(flipped),
                {stream.HEADER_MESSAGE_ID: str(middle), stream.HEADER_END_POSITION: str(end)})
    standby = ledger.open(str(tmp_path / "standby"), create=True, durability="fsync")
    standby.store.follow()
    follower = stream.StreamFollower(cluster.url, "flip", standby.store)
    try:
        with pytest.raises(ledger.LedgerReplicationError, match="message 2 refused"):
            follower.follow_until(position=end, timeout_s=FOLLOW_TIMEOUT_S)
        assert follower.sequence == 1 and follower.positions == {middle: 1}
    finally:
        follower.stop()
    assert standby.stats()["journal_position"] == middle
    assert standby.verify().ok
    assert standby.store.append_replicated(second) == end   # the standby stays usable for the true batch
    standby.close()


def test_the_fence_poisons_a_stale_publisher_and_a_store_behind_its_stream_may_not_publish(cluster, tmp_path):
    first_path, second_path = str(tmp_path / "first"), str(tmp_path / "second")
    with stream.StreamPublisher(cluster.url, "fence", replicas=1) as publisher:
        first = open_primary(first_path, publisher)
        first.create_account(1)
        first.close()
    shutil.copytree(first_path, second_path)   # a second node with the same history
    with stream.StreamPublisher(cluster.url, "fence", replicas=1) as stale:
        first = open_primary(first_path, stale, create=False)
        with stream.StreamPublisher(cluster.url, "fence", replicas=1) as winner:
            second = open_primary(second_path, winner, create=False)
            second.create_account(2)
            second.close()
        with pytest.raises(ledger.LedgerNotPrimaryError, match="LEDGER_fence.*sequence 1"):
            first.create_account(3)
        with pytest.raises(ledger.LedgerPoisonedError):
            first.create_account(4)   # poisoned: the refused batch was never acknowledged
        first.close()
    with stream.StreamPublisher(cluster.url, "fence", replicas=1) as publisher:
        empty = open_with_hooks(str(tmp_path / "empty"), create=True, publish=publisher, clock=Clock())
        with pytest.raises(ledger.LedgerNotPrimaryError, match="behind"):
            publisher.attach(empty.store)
        empty.close()
        # The stale store journaled account 3 before its publish was refused: it diverged from the stream.
        diverged = open_with_hooks(first_path, publish=publisher, clock=Clock(), durability="fsync")
        with pytest.raises(ledger.LedgerNotPrimaryError, match="LEDGER_fence"):
            publisher.attach(diverged.store)
        diverged.close()


def test_a_publish_without_an_ack_in_time_poisons_the_handle(tmp_path):
    with LocalCluster(tmp_path / "nats", nodes=1, port=0) as alone:
        with stream.StreamPublisher(alone.url, "lost", replicas=1, ack_timeout_s=1.0) as publisher:
            handle = open_primary(str(tmp_path / "primary"), publisher)
            handle.create_account(1)
            alone.kill(0)
            with pytest.raises(ledger.LedgerTimeoutError, match="in doubt"):
                handle.create_account(2)
            with pytest.raises(ledger.LedgerPoisonedError):
                handle.create_account(3)
            handle.close()


# -- pipelining and splitting (issue 14: several batches in flight, batches larger than one message) --

def batch_ranges(handle: ledger.Ledger) -> list[tuple[int, int]]:
    """The [start, end) of every committed batch of `handle`'s journal."""
    with handle.store.engine:
        return [(header, header + 1 + count) for header, _, count in handle.store.engine.batch_headers()]


def accounts_one_batch_each(handle: ledger.Ledger, count: int) -> None:
    """The settlement account 1 and accounts 2 .. count + 1, one batch each."""
    handle.create_account(1, min_balance=ledger.BALANCE_MIN)
    for id_ in range(2, count + 1):
        handle.create_account(id_)


def follow_to_the_end(cluster_url: str, shard: str, path: str, primary: ledger.Ledger,
                      sequence: int) -> stream.StreamFollower:
    """A standby at `path` following shard `shard` to its message `sequence`, the primary's position: equal
    journals, byte for byte."""
    position = primary.stats()["journal_position"]
    standby = ledger.open(path, create=True, durability="fsync", segment_records_log2=SEGMENT_RECORDS_LOG2)
    standby.store.follow()
    follower = stream.StreamFollower(cluster_url, shard, standby.store)
    try:
        follower.follow_until(sequence=sequence, timeout_s=FOLLOW_TIMEOUT_S)
        assert standby.stats()["journal_position"] == position
        assert standby.store.batch_bytes(1, position) == primary.store.batch_bytes(1, position)
        assert journal_records(path) == journal_records(primary.path)
        assert standby.verify().ok
    finally:
        follower.stop()
        standby.close()
    return follower


def test_sends_are_in_flight_together_in_order_and_the_standby_ends_equal(cluster, tmp_path):
    primary = open_with_hooks(str(tmp_path / "primary"), create=True, clock=Clock(), durability="fsync",
                              segment_records_log2=SEGMENT_RECORDS_LOG2)    # no hook: published by hand below
    with stream.StreamPublisher(cluster.url, "inflight", replicas=1) as publisher:
        publisher.attach(primary.store)                  # both empty
        accounts_one_batch_each(primary, 100)
        ranges = batch_ranges(primary)
        futures = [publisher.send(start, end) for start, end in ranges]
        acks = [future.result(FOLLOW_TIMEOUT_S) for future in futures]
        assert [ack.seq for ack in acks] == list(range(1, len(ranges) + 1))   # in order, none lost or repeated
        assert 1 < publisher.in_flight_max_seen <= stream.PUBLISH_IN_FLIGHT_MAX
        assert publisher.last_sequence == len(ranges) and publisher.end_position == ranges[-1][1]
    follower = follow_to_the_end(cluster.url, "inflight", str(tmp_path / "standby"), primary, len(ranges))
    assert follower.positions[ranges[-1][1]] == len(ranges)
    primary.close()


def test_a_fence_failure_in_flight_fails_every_later_send_and_poisons(cluster, tmp_path):
    with stream.StreamPublisher(cluster.url, "fence-flight", replicas=1) as publisher:
        primary = open_primary(str(tmp_path / "primary"), publisher)
        accounts_one_batch_each(primary, 3)
        sequence = publisher.last_sequence
        publish_raw(cluster, "fence-flight", b"another writer")    # the stream moves on without this publisher
        errors: list[BaseException] = []

        def call(id_: int) -> None:
            try:
                primary.create_account(id_)
            except ledger.LedgerError as error:
                errors.append(error)
        threads = [threading.Thread(target=call, args=(id_,)) for id_ in range(10, 18)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(FOLLOW_TIMEOUT_S)
        assert len(errors) == 8 and all(isinstance(error, ledger.LedgerError) for error in errors)
        assert any(isinstance(error, ledger.LedgerNotPrimaryError) and "another publisher" in str(error)
                   for error in errors)
        assert primary.store.engine.poisoned
        assert publisher.last_sequence == sequence             # nothing acknowledged after the forger
        with pytest.raises(ledger.LedgerNotPrimaryError, match="earlier one failed"):
            publisher.send(primary.stats()["journal_position"], primary.stats()["journal_position"] + 2).result(1)
        primary.close()


def test_concurrent_callers_overlap_their_round_trips(cluster, tmp_path):
    with stream.StreamPublisher(cluster.url, "callers", replicas=1) as publisher:
        primary = open_primary(str(tmp_path / "primary"), publisher)
        accounts_one_batch_each(primary, 9)

        def pay(thread: int) -> None:
            for index in range(40):
                assert primary.transfer(10_000 + thread * 100 + index, 1, 2 + thread, 1) == 0
                # returned: acknowledged through its own batch at least
                assert publisher.end_position > 1
        threads = [threading.Thread(target=pay, args=(thread,)) for thread in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(FOLLOW_TIMEOUT_S * 2)
        assert publisher.in_flight_max_seen > 1                # several callers' batches were in flight at once
        assert publisher.end_position == primary.stats()["journal_position"]
        follow_to_the_end(cluster.url, "callers", str(tmp_path / "standby"), primary, publisher.last_sequence)
        primary.close()


def test_large_batches_are_split_into_messages_and_parts_and_joined_again(cluster, tmp_path):
    primary = open_with_hooks(str(tmp_path / "primary"), create=True, clock=Clock(), durability="fsync")
    with stream.StreamPublisher(cluster.url, "large", replicas=1) as publisher:
        publisher.attach(primary.store)                  # both empty; the journal is sent below as ONE range
        accounts_one_batch_each(primary, 2)
        for first, count in ((300_000, 50_000), (400_000, 50_000), (100, 140_000)):
            batch = ledger.transfers_batch(count)
            batch["id"] = np.arange(first, first + count)
            batch["debit_account"], batch["credit_account"], batch["amount"], batch["ledger"] = 1, 2, 1, 1
            assert not primary.transfers(batch).any()       # 140,000 transfers: about 9 MB, two parts
        ranges = batch_ranges(primary)
        end = ranges[-1][1]
        messages = publisher.messages(1, end, primary.store.batch_bytes(1, end))
        # The accounts and the two 3.2 MB batches together; the 140,000-transfer batch in two parts.
        last = ranges[-1][0]
        assert [(message.headers[stream.HEADER_MESSAGE_ID], message.headers[stream.HEADER_END_POSITION],
                 message.headers.get(stream.HEADER_PART)) for message in messages] == [
            ("1", str(last), None), (f"{last}.1.{publisher._instance}", str(end), "1/2"),
            (f"{last}.2.{publisher._instance}", str(end), "2/2")]
        assert all(len(message.data) <= stream.MESSAGE_BYTES_MAX for message in messages)
        assert publisher.send(1, end).result(FOLLOW_TIMEOUT_S).seq == 3
    with stream.StreamPublisher(cluster.url, "large", replicas=1) as again:   # a stream ending in a split batch
        again.attach(primary.store)
        assert (again.last_sequence, again.end_position) == (3, end)
    follower = follow_to_the_end(cluster.url, "large", str(tmp_path / "standby"), primary, 3)
    assert follower.positions == {last: 1, end: 3}
    # The same journal brought into an empty stream by attach(publish_journal=True): split the same way.
    with stream.StreamPublisher(cluster.url, "large-existing", replicas=1) as existing:
        existing.attach(primary.store, publish_journal=True)
        assert (existing.last_sequence, existing.end_position) == (3, end)
    follower = follow_to_the_end(cluster.url, "large-existing", str(tmp_path / "standby-existing"), primary, 3)
    assert follower.positions == {last: 1, end: 3}
    primary.close()


@pytest.mark.parametrize("case", ["out of order", "missing", "mixed", "dropped at a marker"])
def test_parts_out_of_order_missing_or_mixed_are_refused(cluster, tmp_path, case):
    source = ledger.open(None)
    source.create_account(1)
    source.create_account(2)
    middle, end = batch_ranges(source)[1]
    first, second = source.store.batch_bytes(1, middle), source.store.batch_bytes(middle, end)
    source.close()
    shard = "parts-" + case.replace(" ", "-")
    half = len(second) // 2

    def part(index: int, data: bytes, start: int = middle, stop: int = end) -> None:
        publish_raw(cluster, shard, data, {stream.HEADER_MESSAGE_ID: f"{start}.{index}.forged",
                                           stream.HEADER_END_POSITION: str(stop), stream.HEADER_PART: f"{index}/2"})
    publish_raw(cluster, shard, first, {stream.HEADER_MESSAGE_ID: "1", stream.HEADER_END_POSITION: str(middle)})
    if case == "out of order":
        part(2, second[half:])
        part(1, second[:half])
    elif case == "missing":
        part(1, second[:half])
        # (a Nats-Msg-Id of its own: the server would drop a second message with part 1's as a duplicate)
        publish_raw(cluster, shard, second, {stream.HEADER_MESSAGE_ID: f"{middle}-whole",
                                             stream.HEADER_END_POSITION: str(end)})
    elif case == "mixed":
        part(1, second[:half])
        part(2, first[len(first) // 2:], start=1, stop=middle)
    else:   # a primary died between parts; the new one's marker, then its own batch there
        part(1, second[:half])
        publish_raw(cluster, shard, b"", {stream.HEADER_MESSAGE_ID: "epoch-2", stream.HEADER_END_POSITION: str(middle)})
        publish_raw(cluster, shard, second, {stream.HEADER_MESSAGE_ID: str(middle), stream.HEADER_EPOCH: "2",
                                             stream.HEADER_END_POSITION: str(end)})
    standby = ledger.open(str(tmp_path / "standby"), create=True, durability="fsync")
    standby.store.follow()
    follower = stream.StreamFollower(cluster.url, shard, standby.store)
    try:
        if case == "dropped at a marker":
            follower.follow_until(sequence=4, timeout_s=FOLLOW_TIMEOUT_S)
            assert follower.positions == {middle: 1, end: 4}
            assert standby.stats()["journal_position"] == end
        else:
            with pytest.raises(ledger.LedgerReplicationError, match=r"message [23] refused.*parts"):
                follower.follow_until(sequence=3, timeout_s=FOLLOW_TIMEOUT_S)
            assert follower.sequence == 1
            assert standby.stats()["journal_position"] == middle   # the first batch only: nothing of the parts
    finally:
        follower.stop()
    standby.close()


def test_r3_pipelined_publishing_beats_one_round_trip_per_batch(tmp_path, capsys):
    """1,000 small batches on a three-server cluster (R3, sync always): sent with up to PUBLISH_IN_FLIGHT_MAX in
    flight, then one at a time (send and wait); prints both rates. The standby of the first ends equal."""
    primary = ledger.open(None)
    rates = {}
    with LocalCluster(tmp_path / "nats", nodes=3, port=0) as three, \
            stream.StreamPublisher(three.url, "pipelined", replicas=3) as pipelined, \
            stream.StreamPublisher(three.url, "one-at-a-time", replicas=3) as one_at_a_time:
        pipelined.attach(primary.store)       # both empty: the batches below are published by hand
        one_at_a_time.attach(primary.store)
        accounts_one_batch_each(primary, 1000)
        ranges = batch_ranges(primary)
        assert len(ranges) == 1000
        for publisher in (pipelined, one_at_a_time):
            began = time.perf_counter()
            if publisher is pipelined:
                futures = [publisher.send(start, end) for start, end in ranges]
                assert futures[-1].result(FOLLOW_TIMEOUT_S * 2).seq == len(ranges)
                assert publisher.in_flight_max_seen == stream.PUBLISH_IN_FLIGHT_MAX
            else:
                for start, end in ranges:
                    publisher(start, end)
                assert publisher.in_flight_max_seen == 1
            rates[publisher.shard] = len(ranges) / (time.perf_counter() - began)
            assert publisher.last_sequence == len(ranges)
        standby = ledger.open(None)
        standby.store.follow()
        follower = stream.StreamFollower(three.url, "pipelined", standby.store)
        try:
            follower.follow_until(sequence=len(ranges), timeout_s=FOLLOW_TIMEOUT_S)
        finally:
            follower.stop()
        end = ranges[-1][1]
        assert standby.store.batch_bytes(1, end) == primary.store.batch_bytes(1, end)
    with capsys.disabled():
        print(f"\nR3 publishing of 1,000 small batches: {rates['pipelined']:.0f} batches/s with up to "
              f"{stream.PUBLISH_IN_FLIGHT_MAX} in flight, {rates['one-at-a-time']:.0f} batches/s one at a time")
    assert rates["pipelined"] > rates["one-at-a-time"]



FRESH_STREAM_ROUNDS = 8
RECREATE_AFTER_S = 0.3          # the stream missing this long under a live publisher: well within its ack timeout


def test_a_fresh_r3_stream_is_published_to_at_once_without_no_responders(tmp_path):
    """A new R3 stream is created through one server and published to at once through another, many times: the
    publisher waits in __enter__ until the stream answers through its own connection (ready_stream), and a publish
    that still meets "no responders" (here: the stream deleted under a live publisher, made again 0.3 s later) is
    sent again within its ack timeout instead of poisoning the publisher."""
    resent = 0

    async def create(url: str, shard: str) -> None:
        connection = await nats.connect(url)
        try:
            await connection.jetstream().add_stream(name=stream.stream_name(shard), subjects=[stream.subject(shard)],
                                                    num_replicas=3, storage=nats.js.api.StorageType.FILE)
        finally:
            await connection.close()

    async def delete(url: str, shard: str) -> None:
        connection = await nats.connect(url)
        try:
            await connection.jetstream().delete_stream(stream.stream_name(shard))
        finally:
            await connection.close()
    with LocalCluster(tmp_path / "nats", nodes=3, port=0) as three:
        for round_ in range(FRESH_STREAM_ROUNDS):
            shard = f"fresh-{round_}"
            asyncio.run(create(three.urls[0], shard))
            with stream.StreamPublisher(three.urls[-1], shard, replicas=3) as publisher:
                primary = ledger.open(None)
                publisher.attach(primary.store)      # empty, as the stream: its batches are published by hand
                accounts_one_batch_each(primary, 2)
                (first_start, first_end), (second_start, second_end) = batch_ranges(primary)
                assert publisher.send(first_start, first_end).result(FOLLOW_TIMEOUT_S).seq == 1
                asyncio.run(delete(three.urls[0], shard))      # nobody takes the subject for a while
                publisher.last_sequence = publisher._sent_sequence = 0   # as a publisher of the new stream
                later = threading.Timer(RECREATE_AFTER_S, lambda: asyncio.run(create(three.urls[0], shard)))
                later.start()
                try:
                    assert publisher.send(second_start, second_end).result(FOLLOW_TIMEOUT_S).seq == 1
                finally:
                    later.join()
                resent += getattr(publisher, "resent", 0)
    assert resent >= FRESH_STREAM_ROUNDS    # at least once per round: while the stream was missing
    print(f"{FRESH_STREAM_ROUNDS} fresh R3 streams published to at once; {resent} writes sent again after "
          f"no responders")


def test_batches_carry_their_primary_s_epoch_and_a_batch_below_the_last_marker_is_refused(cluster, tmp_path):
    """Every batch message says which primary published it (Ledger-Epoch, Ledger-Node of its marker); a follower
    refuses a batch whose epoch is below the last marker's, naming the epoch check, and applies nothing of it,
    while a batch of the marker's epoch is applied."""
    shard = "epochs"
    source = ledger.open(None)
    with stream.StreamPublisher(cluster.url, shard, replicas=1) as publisher:
        publisher.attach(source.store)
        assert publisher.publish_marker(3, "a") == 1
        source.create_account(1)
        source.create_account(2)
        (first_start, first_end), (second_start, second_end) = batch_ranges(source)
        publisher(first_start, first_end)

    async def headers_of(sequence: int) -> dict:
        connection = await nats.connect(cluster.url)
        try:
            return (await connection.jetstream().get_msg(stream.stream_name(shard), sequence)).headers
        finally:
            await connection.close()
    headers = asyncio.run(headers_of(2))
    assert headers[stream.HEADER_EPOCH] == "3" and headers[stream.HEADER_NODE] == "a"
    # A forger's copy of the next batch with every header right but an older epoch's.
    publish_raw(cluster, shard, source.store.batch_bytes(second_start, second_end),
                {stream.HEADER_MESSAGE_ID: str(second_start), stream.HEADER_END_POSITION: str(second_end),
                 stream.HEADER_EPOCH: "2", stream.HEADER_NODE: "old"})
    standby = ledger.open(None)
    standby.store.follow()
    follower = stream.StreamFollower(cluster.url, shard, standby.store)
    try:
        with pytest.raises(ledger.LedgerReplicationError, match=r"message 3 refused by the epoch check: a batch "
                                                                  r"of epoch 2 \(node old\) after the marker of "
                                                                  r"epoch 3 \(node a\)"):
            follower.follow_until(sequence=3, timeout_s=FOLLOW_TIMEOUT_S)
        assert follower.sequence == 2 and follower.epoch == 3
        assert standby.stats()["journal_position"] == first_end
    finally:
        follower.stop()


class SlowStore:
    """A store whose append_replicated returns a moment after it applied (its write position moved): what a
    busy follower thread looks like to a waiter."""

    def __init__(self, store, pause_s: float) -> None:
        self.store, self.pause_s, self.engine = store, pause_s, store.engine

    def append_replicated(self, data: bytes) -> int:
        end = self.store.append_replicated(data)
        time.sleep(self.pause_s)
        return end


def test_follow_until_a_position_returns_once_the_follower_says_it_applied_it(cluster, tmp_path):
    """follow_until(position=...) waits on the follower's own counters: when it returns, `positions` and
    `sequence` already name the message that reached the position (the store's write position moves first)."""
    source = ledger.open(None)
    with stream.StreamPublisher(cluster.url, "until", replicas=1) as publisher:
        publisher.attach(source.store)
        source.create_account(1)
        start, end = batch_ranges(source)[0]
        publisher(start, end)
    standby = ledger.open(None)
    standby.store.follow()
    follower = stream.StreamFollower(cluster.url, "until", SlowStore(standby.store, 0.5))
    try:
        follower.start()
        deadline = time.monotonic() + FOLLOW_TIMEOUT_S
        while standby.store.engine.write_position < end and time.monotonic() < deadline:
            time.sleep(0.005)
        follower.follow_until(position=end, timeout_s=FOLLOW_TIMEOUT_S)    # called inside the window
        assert follower.positions == {end: 1} and follower.sequence == 1 and follower.position == end
    finally:
        follower.stop()
