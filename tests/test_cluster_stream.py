"""A primary's committed batches published to its shard's JetStream stream and a standby following that stream
(ledger.cluster.stream), on a real single-node LocalCluster (R1): the standby ends as the primary, byte for byte;
forged messages are refused with the standby unchanged; the single-writer fence poisons a stale publisher's
handle; a store behind its stream may not publish."""
from __future__ import annotations

import asyncio
import glob
import os
import shutil

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
