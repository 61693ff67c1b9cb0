"""Rejoin and retention wired into the cluster node (docs/CLUSTER.md "Rejoin and retention") on a real
three-server LocalCluster: a primary's snapshot is uploaded to the shard's bucket (and the bucket pruned, the
stream trimmed) off its write path; a node whose data directory was deleted rejoins from the object store and the
stream, ends byte for byte with the primary after the snapshot (a transfer pending since before it can be
posted), passes `ledger verify`, and can take over; a standby behind a trimmed stream, at start or while it runs,
is rebuilt from the bucket and catches up; a snapshot of batches the stream never acknowledged is not uploaded.
Every wait is bounded."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import ledger
from ledger.cluster import archive, names
from ledger.cluster.servers import LocalCluster
from support import cluster_processes, waiting

WAIT_S = 20.0
OPEN_OPTIONS = {"segment_records_log2": 10}   # 1024 records a segment: a snapshot lies several segments in
wait_until = functools.partial(waiting.wait_until, timeout_s=WAIT_S, pause_s=0.02)


def open_node(cluster: LocalCluster, path, shard: str, node: str, primary: bool = False) -> ledger.Ledger:
    """Node `node` of `shard` on the module's cluster (support.waiting.open_node)."""
    return waiting.open_node(cluster.url, path, shard, node, WAIT_S, primary, **OPEN_OPTIONS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=3, port=0) as running:
        yield running


def transfers(handle: ledger.Ledger, first_id: int, count: int) -> None:
    for index in range(count):
        wallet = cluster_processes.WALLETS[index % len(cluster_processes.WALLETS)]
        assert handle.transfer(first_id + index, cluster_processes.SETTLEMENT, wallet, 1 + index % 5) \
            == ledger.TransferResult.OK


def pending(handle: ledger.Ledger, transfer_id: int) -> None:
    assert handle.transfer(transfer_id, cluster_processes.SETTLEMENT, cluster_processes.WALLETS[-1], 50,
                           flags=ledger.TransferFlags.PENDING) == ledger.TransferResult.OK


def snapshot_uploaded(handle: ledger.Ledger) -> int:
    """A snapshot on the primary, once its node uploaded it and pruned: its position."""
    info = handle.snapshot()
    assert handle.cluster_node.wait_archived(info.position, WAIT_S), handle.cluster_node.error
    return info.position


def caught_up(standby: ledger.Ledger, primary: ledger.Ledger) -> None:
    position = primary.stats()["journal_position"]
    wait_until(lambda: standby.stats()["journal_position"] == position,
               f"the standby follows to {position} ({standby.cluster_node.error})")
    assert np.array_equal(standby.accounts(), primary.accounts())


def verify_exits_0(path) -> None:
    done = subprocess.run([sys.executable, "-m", "ledger", "verify", str(path)], capture_output=True, text=True,
                          timeout=WAIT_S, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_node_whose_data_directory_was_deleted_rejoins_from_the_object_store_and_the_stream(cluster, tmp_path):
    primary = open_node(cluster, tmp_path / "a", "rejoin1", "a", primary=True)
    standby = open_node(cluster, tmp_path / "b", "rejoin1", "b")
    try:
        cluster_processes.create_accounts(primary)
        pending(primary, 7)   # still pending at the snapshot: its event is written back into the rebuilt journal
        transfers(primary, 1000, 300)
        snapshot = snapshot_uploaded(primary)
        assert archive.list_uploaded(cluster.url, "rejoin1")[0][0] == snapshot
        transfers(primary, 2000, 100)
        caught_up(standby, primary)
        standby.snapshot()   # a standby's own snapshot stays local: the bucket still has the primary's only
        assert [position for position, _ in archive.list_uploaded(cluster.url, "rejoin1")] == [snapshot]
        standby.close()
        shutil.rmtree(tmp_path / "b")
        transfers(primary, 3000, 100)   # while it is away

        standby = open_node(cluster, tmp_path / "b", "rejoin1", "b")
        assert os.path.exists(tmp_path / "b" / "journal-base") and standby.role == "standby"
        caught_up(standby, primary)
        end = primary.stats()["journal_position"]
        assert standby.store.batch_bytes(snapshot, end) == primary.store.batch_bytes(snapshot, end)
        with pytest.raises(ledger.LedgerHistoryUnavailableError):
            standby.history(cluster_processes.WALLETS[0])
        assert primary.transfer(8, 0, 0, 0, flags=ledger.TransferFlags.POST_PENDING, pending_id=7) \
            == ledger.TransferResult.OK   # the rejoined standby applies it: it reads the pending's event
        caught_up(standby, primary)
        standby.close()
        verify_exits_0(tmp_path / "b")

        standby = open_node(cluster, tmp_path / "b", "rejoin1", "b")   # kept as it is: the stream goes on from it
        primary.close()
        assert standby.cluster_node.wait_role("primary", WAIT_S), standby.cluster_node.error
        transfers(standby, 4000, 20)
        assert standby.balance(cluster_processes.WALLETS[0]) > 0
    finally:
        primary.close()
        standby.close()


def test_a_stream_trimmed_after_snapshots_still_lets_a_rejoining_node_catch_up(cluster, tmp_path):
    primary = open_node(cluster, tmp_path / "a", "rejoin2", "a", primary=True)
    behind = open_node(cluster, tmp_path / "b", "rejoin2", "b")     # stopped while the stream is trimmed
    running = open_node(cluster, tmp_path / "c", "rejoin2", "c")    # its follower stopped meanwhile
    handles = [primary, behind, running]
    try:
        cluster_processes.create_accounts(primary)
        transfers(primary, 1000, 50)
        caught_up(behind, primary)
        caught_up(running, primary)
        behind.close()
        node = running.cluster_node
        with node._changing:           # as if its connection were lost until the stream was trimmed
            node._follower.stop()
            node._follower = None
        transfers(primary, 5000, 20)
        pending(primary, 7)   # the stream is kept from its batch on (not from before): rejoined nodes can void it
        for round_number in range(names.SNAPSHOTS_KEPT + 1):
            transfers(primary, 10_000 * (round_number + 1), 60)
            snapshot_uploaded(primary)
        uploaded = archive.list_uploaded(cluster.url, "rejoin2")
        assert len(uploaded) == names.SNAPSHOTS_KEPT
        transfers(primary, 90_000, 30)
        first_sequence = archive.trim_stream(cluster.url, "rejoin2")
        assert first_sequence > 1   # trimmed below the oldest snapshot kept

        with node._changing:           # it follows again: the stream holds no message at its position
            node._start_follower()
        wait_until(lambda: os.path.exists(tmp_path / "c" / "journal-base") and not running.closed,
                   "the running standby rejoins and reopens")   # its handle is closed meanwhile, as at step-down
        caught_up(running, primary)
        assert running.role == "standby" and node.error is None

        behind = handles[1] = open_node(cluster, tmp_path / "b", "rejoin2", "b")
        assert os.path.exists(tmp_path / "b" / "journal-base")
        assert any(name.startswith("b.replaced-") for name in os.listdir(tmp_path))   # moved aside, kept
        caught_up(behind, primary)
        assert primary.transfer(8, 0, 0, 0, flags=ledger.TransferFlags.VOID_PENDING, pending_id=7) \
            == ledger.TransferResult.OK
        caught_up(behind, primary)
        caught_up(running, primary)
        end = primary.stats()["journal_position"]
        base = uploaded[0][0]
        assert behind.store.batch_bytes(base, end) == primary.store.batch_bytes(base, end)
    finally:
        for handle in handles:
            handle.close()


def test_a_snapshot_of_batches_the_stream_never_acknowledged_is_not_uploaded(cluster, tmp_path):
    primary = open_node(cluster, tmp_path / "a", "rejoin3", "a", primary=True)
    try:
        cluster_processes.create_accounts(primary)
        transfers(primary, 1000, 5)
        with ledger.open(str(tmp_path / "other"), create=True, **OPEN_OPTIONS) as other:   # not this stream's
            cluster_processes.create_accounts(other)
            transfers(other, 1000, 6)
            snapshot = other.snapshot()
        with pytest.raises(ValueError, match="never acknowledged"):
            archive.upload_snapshot(cluster.url, "rejoin3", snapshot.path)
        assert archive.list_uploaded(cluster.url, "rejoin3") == []
    finally:
        primary.close()
