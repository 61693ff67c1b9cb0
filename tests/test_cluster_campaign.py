"""The cluster failover campaign in CI (issue 14; tests/support/cluster_campaign.py, bench/cluster_campaign.py
runs 200 kills): SIGKILL of the primary node at random moments under load from two client processes loses no
acknowledged transfer, leaves no request half applied and conserves money on every node; SIGKILL of the
nats-server leading the stream's Raft group loses nothing acknowledged and the clients go on once JetStream has
elected another leader, the killed server restarting and catching up. Every wait is bounded."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

import ledger
from ledger.cluster import names
from ledger.cluster.servers import LocalCluster
from ledger.cluster.status import read_status
from support import cluster_campaign

CI_KILLS = 10
CI_SEED = 14
TIME_BUDGET_S = 90.0          # what the 10 kills should take on the 2-core machine (printed, not asserted:
                              # a loaded machine is slower, and the campaign's own waits bound it)
PAUSE_S = (0.1, 0.5)          # between a failover and the next kill (bench/cluster_campaign.py: 0.5 to 2 s); the
                              # kill lands at a random point of the clients' ms-scale calls either way
LOAD_BEFORE_KILL_S = 1.0      # the clients' load before the stream leader's server is killed
ACKNOWLEDGE_AFTER_RESTART_S = 10.0   # bound on the wait for an acknowledgement once the killed server is back
# SIGKILL of the stream's leader to the next acknowledgement: JetStream's election (~5-6 s here) and a takeover.
# Before TAKEOVER_REQUEST_TIMEOUT_S a would-be primary waited REQUEST_TIMEOUT_S for the leaderless stream,
# holding the lease: 11 s and more.
SERVER_FAILOVER_BOUND_S = names.REQUEST_TIMEOUT_S + names.LEASE_TTL_S


def test_sigkills_of_the_primary_under_load_lose_no_acknowledged_transfer(tmp_path):
    started = time.monotonic()
    summary = cluster_campaign.run(CI_KILLS, CI_SEED, str(tmp_path), pause_s=PAUSE_S, standbys_min=1)
    elapsed_s = time.monotonic() - started
    print(f"\n{cluster_campaign.summary_text(summary)}\n{elapsed_s:.0f} s in all (budget {TIME_BUDGET_S:g} s)")
    assert summary["violations"] == []
    assert summary["faults"] == CI_KILLS and len(summary["failovers_s"]) == CI_KILLS
    assert 0 < summary["acknowledged_transfers"] <= summary["transfers_held"]


def test_sigkill_of_the_stream_leaders_server_loses_nothing_and_the_clients_go_on(tmp_path):
    with LocalCluster(tmp_path / "nats", nodes=3, port=0) as cluster:
        campaign = cluster_campaign.Campaign(cluster, str(tmp_path), nodes=2, clients=2)
        try:
            campaign.start()
            time.sleep(LOAD_BEFORE_KILL_S)
            leader = campaign.kill_stream_leader_once()
            assert campaign.violations == []
            assert cluster_campaign.wait_for(campaign.stream_current, cluster_campaign.CONVERGE_WAIT_S), \
                f"nats-server {leader} did not catch up with the stream"
            before = sum(len(reader.update().acknowledged) for reader in campaign.readers)
            # A bounded wait for the next acknowledgement rather than a fixed second of load: it ends at the
            # first one, and fails as the fixed look did when the clients acknowledge nothing once it is back.
            assert cluster_campaign.wait_for(
                lambda: sum(len(reader.update().acknowledged) for reader in campaign.readers) > before,
                ACKNOWLEDGE_AFTER_RESTART_S), "the clients acknowledge nothing once the server is back"
            summary = campaign.finish()
        finally:
            campaign.kill_all()
    print(f"\nkilled nats-server {leader}, the stream's leader: {cluster_campaign.summary_text(summary)}")
    assert summary["violations"] == [] and summary["faults"] == 1
    assert summary["failover_s_max"] < SERVER_FAILOVER_BOUND_S


def test_a_takeover_gives_up_quickly_on_a_stream_without_a_leader(tmp_path):
    """A would-be primary's look at the stream's end (ClusterNode._last_sequence) and a standby's at the lease
    (ClusterNode._poll) on streams with no Raft leader (two of three servers killed) fail within
    TAKEOVER_REQUEST_TIMEOUT_S, so the takeover lets the lease go (the poll tries again) and the next attempt
    finds the new leader; each waited the 10 s REQUEST_TIMEOUT_S before."""
    with LocalCluster(tmp_path / "nats", nodes=3, port=0) as cluster:
        handle = ledger.open(str(tmp_path / "node"), create=True, cluster=cluster.url, shard="leaderless",
                             node="a")
        try:
            node = handle.cluster_node
            assert node.wait_role("primary", cluster_campaign.START_WAIT_S), node.error
            assert node._loop.run(node._last_sequence(), names.REQUEST_TIMEOUT_S) >= 1   # the epoch marker
            leader = read_status(cluster.url, shard="leaderless").shards[0].stream.leader
            names_of_servers = [spec.name for spec in cluster.servers]
            killed = names_of_servers.index(leader)
            cluster.kill(killed)                          # the stream's leader and one more: the one left is a
            cluster.kill((killed + 1) % 3)                # follower without quorum, which answers nothing
            # Liveness, not speed: before the fix each look waited out REQUEST_TIMEOUT_S (10 s); now it ends on its
            # own TAKEOVER_REQUEST_TIMEOUT_S (1 s) bound. A wait of half REQUEST_TIMEOUT_S tells the two apart.
            look = asyncio.run_coroutine_threadsafe(node._last_sequence(), node._loop.loop)
            with pytest.raises(Exception):
                look.result(names.REQUEST_TIMEOUT_S / 2)
            assert look.done(), "the takeover's look at a leaderless stream is still waiting"

            def poll() -> None:
                with node._changing, contextlib.suppress(Exception):   # a standby's look at the lease (its KV)
                    node._poll()
            poller = threading.Thread(target=poll)
            poller.start()
            poller.join(names.REQUEST_TIMEOUT_S / 2)
            assert not poller.is_alive(), "a standby's look at the lease is still waiting on a leaderless KV stream"
            cluster.start(killed)     # a quorum again: the node closes without waiting out its requests
        finally:
            handle.close()
