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
