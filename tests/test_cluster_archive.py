"""Rejoin and retention (ledger.cluster.archive, docs/CLUSTER.md "Rejoin and retention") on a real single-node
LocalCluster: a primary uploads its snapshot to the shard's object store bucket; a node with an empty data
directory rejoins from that snapshot plus the stream after it and ends as the primary, byte for byte after the
snapshot, `verify` passing; a read before the snapshot says why it cannot be answered; trimming the stream below
the oldest snapshot kept still lets a node rejoin; a damaged object is skipped."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import nats
import numpy as np
import pytest

import ledger
from ledger.api import open_with_hooks
from ledger.cluster import archive, stream
from ledger.cluster.names import snapshot_bucket
from ledger.cluster.servers import LocalCluster
from support.clock import Clock

SEGMENT_RECORDS_LOG2 = 10        # 1024 records a segment: the snapshot's position is several segments in
FOLLOW_TIMEOUT_S = 15.0
WALLETS = list(range(2, 10))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=1, port=0) as running:
        yield running


def open_primary(path: str, publisher: stream.StreamPublisher) -> ledger.Ledger:
    handle = open_with_hooks(path, create=True, publish=publisher, clock=Clock(), durability="fsync",
                             segment_records_log2=SEGMENT_RECORDS_LOG2)
    publisher.attach(handle.store)
    return handle


def accounts_and_transfers(handle: ledger.Ledger, first_id: int, count: int) -> None:
    """The accounts if missing (one batch), then `count` single transfers (a pending one among them)."""
    if handle.account(1) is None:
        accounts = ledger.accounts_batch(len(WALLETS) + 1)
        accounts["id"] = [1] + WALLETS
        accounts["ledger"] = 1
        accounts["min_balance"][0] = ledger.BALANCE_MIN
        accounts["max_balance"] = ledger.BALANCE_MAX
        assert not handle.create_accounts(accounts).any()
    for index in range(count):
        handle.transfer(first_id + index, 1, WALLETS[index % len(WALLETS)], 1 + index % 5)


def rejoin_and_follow(cluster: LocalCluster, shard: str, path: str, end: int) -> tuple[ledger.Ledger, int]:
    """Rejoin `path` from the bucket and follow the stream to journal position `end`: (handle, snapshot P)."""
    result = archive.rejoin(path, cluster.url, shard)
    assert result.built and result.replaced is None
    handle = ledger.open(path, durability="fsync")
    assert handle.stats()["journal_position"] == result.position
    handle.store.follow()
    follower = stream.StreamFollower(cluster.url, shard, handle.store)
    try:
        follower.follow_until(position=end, timeout_s=FOLLOW_TIMEOUT_S)
    finally:
        follower.stop()
    return handle, result.position


def test_a_node_with_an_empty_directory_rejoins_from_the_bucket_and_the_stream(cluster, tmp_path):
    primary_path, node_path = str(tmp_path / "primary"), str(tmp_path / "node")
    with stream.StreamPublisher(cluster.url, "rejoin", replicas=1) as publisher:
        primary = open_primary(primary_path, publisher)
        accounts_and_transfers(primary, 1000, 1200)
        snapshot = primary.snapshot()
        assert archive.upload_snapshot(cluster.url, "rejoin", snapshot.path, replicas=1)
        assert not archive.upload_snapshot(cluster.url, "rejoin", snapshot.path, replicas=1)   # a no-op
        accounts_and_transfers(primary, 5000, 700)
        end = primary.stats()["journal_position"]
        os.makedirs(node_path)   # an empty directory (its contents deleted) rejoins like a missing one
        node, position = rejoin_and_follow(cluster, "rejoin", node_path, end)
        try:
            assert position == snapshot.position
            assert np.array_equal(node.accounts(), primary.accounts())
            assert node.store.batch_bytes(position, end) == primary.store.batch_bytes(position, end)
            assert node.verify().ok
            with pytest.raises(ledger.LedgerHistoryUnavailableError, match=f"position {position}.*rejoined"):
                node.history(WALLETS[0])
        finally:
            node.close()
        primary.close()
    verified = subprocess.run([sys.executable, "-m", "ledger", "verify", node_path], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert archive.rejoin(node_path, cluster.url, "rejoin").built is False   # it can follow on: kept


def test_pruning_keeps_the_newest_snapshots_and_trims_the_stream_below_the_oldest_kept(cluster, tmp_path):
    primary_path, old_path, node_path = (str(tmp_path / name) for name in ("primary", "old", "node"))
    with stream.StreamPublisher(cluster.url, "trim", replicas=1) as publisher:
        primary = open_primary(primary_path, publisher)
        accounts_and_transfers(primary, 1000, 300)
        first = primary.snapshot()
        archive.upload_snapshot(cluster.url, "trim", first.path, replicas=1)
        old = ledger.open(old_path, create=True, durability="fsync", segment_records_log2=SEGMENT_RECORDS_LOG2)
        old.store.follow()
        follower = stream.StreamFollower(cluster.url, "trim", old.store)
        try:
            follower.follow_until(position=first.position, timeout_s=FOLLOW_TIMEOUT_S)
        finally:
            follower.stop()
            old.close()
        accounts_and_transfers(primary, 2000, 300)
        second = primary.snapshot()
        archive.upload_snapshot(cluster.url, "trim", second.path, replicas=1)
        accounts_and_transfers(primary, 3000, 100)
        end = primary.stats()["journal_position"]

        assert archive.prune(cluster.url, "trim", kept=1) == [os.path.basename(first.path)]
        assert [position for position, _ in archive.list_uploaded(cluster.url, "trim")] == [second.position]
        first_sequence = first_sequence_of(cluster, "trim")
        assert first_sequence > 1   # trimmed, and exactly to the message starting at the oldest snapshot kept
        assert start_of(cluster, "trim", first_sequence) == second.position
        assert archive.trim_stream(cluster.url, "trim") == first_sequence   # never past it

        node, position = rejoin_and_follow(cluster, "trim", node_path, end)
        try:
            assert position == second.position
            assert np.array_equal(node.accounts(), primary.accounts())
            assert node.verify().ok
        finally:
            node.close()
        # A node behind what the trimmed stream holds is moved aside (kept) and rebuilt.
        with pytest.warns(RuntimeWarning, match="cannot catch up"):
            result = archive.rejoin(old_path, cluster.url, "trim")
        assert result.built and result.position == second.position and os.path.isdir(result.replaced)
        primary.close()


def test_a_damaged_snapshot_in_the_bucket_is_skipped(cluster, tmp_path):
    with stream.StreamPublisher(cluster.url, "damaged", replicas=1) as publisher:
        primary = open_primary(str(tmp_path / "primary"), publisher)
        accounts_and_transfers(primary, 1000, 50)
        good = primary.snapshot()
        archive.upload_snapshot(cluster.url, "damaged", good.path, replicas=1)
        with open(good.path, "rb") as file:
            data = bytearray(file.read())
        data[-1] ^= 0xFF   # a flipped bit in the body: the object's digest is of these bytes, the snapshot's not
        put_object(cluster, "damaged", f"snapshot-{good.position + 100:016d}.snapshot", bytes(data))
        primary.close()
    damaged = tmp_path / f"snapshot-{good.position + 100:016d}.snapshot"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ledger.LedgerCorruptError):   # and the uploader never puts a damaged one
        archive.upload_snapshot(cluster.url, "damaged", str(damaged))
    damaged.unlink()
    with pytest.warns(RuntimeWarning, match="skipped"):
        found = archive.download_newest(cluster.url, "damaged", str(tmp_path))
    assert found is not None and found[0] == good.position
    assert sorted(os.listdir(tmp_path)) == sorted(["primary", os.path.basename(found[1])])


def run(cluster: LocalCluster, work) -> object:
    async def main() -> object:
        connection = await nats.connect(cluster.url)
        try:
            return await work(connection.jetstream())
        finally:
            await connection.close()
    return asyncio.run(main())


def first_sequence_of(cluster: LocalCluster, shard: str) -> int:
    """The first sequence of the shard's stream."""
    async def work(js):
        return (await js.stream_info(stream.stream_name(shard))).state.first_seq
    return run(cluster, work)


def start_of(cluster: LocalCluster, shard: str, sequence: int) -> int:
    async def work(js):
        return int((await js.get_msg(stream.stream_name(shard), sequence)).headers["Nats-Msg-Id"])
    return run(cluster, work)


def put_object(cluster: LocalCluster, shard: str, name: str, data: bytes) -> None:
    async def work(js):
        await (await js.object_store(snapshot_bucket(shard))).put(name, data)
    run(cluster, work)
