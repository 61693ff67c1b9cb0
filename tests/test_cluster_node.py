"""Nodes of a shard on a real three-server LocalCluster (ledger.open(..., cluster=URL, shard=NAME)): the first
node is the primary and a standby refuses writes naming it while its journal follows; SIGKILL of the primary
(a child process) lets the standby take over within the target, with every acknowledged transfer kept; a
SIGSTOPped primary wakes fenced, acknowledges nothing more, steps down and converges to the stream; a forged
message is refused by the standby with a clear error. Every wait is bounded."""
from __future__ import annotations

import asyncio
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import nats
import numpy as np
import pytest

import ledger
from ledger.cluster import names, stream
from ledger.cluster.servers import LocalCluster
from support import cluster_processes, waiting

SUPPORT = os.path.join(os.path.dirname(__file__), "support", "cluster_processes.py")
FAILOVER_TARGET_S = 5.0      # issue 14: SIGKILL of the primary to the first acknowledged transfer on the new one
WAIT_S = 20.0                # the bound on any wait of these tests (a loaded machine), never reached when well
ACKS_BEFORE_FAULT = 50       # transfers the child primary has acknowledged before it is killed or stopped
STOP_PAST_LEASE_S = names.LEASE_TTL_S + 1.0
B_POLLS_AFTER_S = 0.05       # the caught-up standby's poll after the held-back one's (under TAKEOVER_DEFER_MIN_S)
wait_until = functools.partial(waiting.wait_until, timeout_s=WAIT_S, pause_s=0.02)


def open_node(cluster: LocalCluster, path, shard: str, node: str, primary: bool = False) -> ledger.Ledger:
    """Node `node` of `shard` on the module's cluster (support.waiting.open_node)."""
    return waiting.open_node(cluster.url, path, shard, node, WAIT_S, primary)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=3, port=0) as running:
        yield running


def start_writer(cluster: LocalCluster, tmp_path, shard: str, node: str) -> tuple[subprocess.Popen, str]:
    """The child primary (tests/support/cluster_processes.py), once it printed "ready"; its ack log's path."""
    ack_log = str(tmp_path / f"{node}.acks")
    stderr = open(tmp_path / f"{node}.stderr", "w")
    child = subprocess.Popen([sys.executable, SUPPORT, "writer", str(tmp_path / node), cluster.url, shard, node,
                              ack_log], stdout=subprocess.PIPE, stderr=stderr, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    stderr.close()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([child.stdout], [], [], 0.1)
        if ready and child.stdout.readline().strip() == "ready":
            return child, ack_log
        if child.poll() is not None:
            break
    child.kill()
    pytest.fail(f"the writer {node} did not start: {(tmp_path / f'{node}.stderr').read_text()[-2000:]}")


def acknowledged(ack_log: str) -> list[tuple[int, int]]:
    """(transfer id, monotonic ns its call started) of every complete `ok` line of the child's ack log."""
    if not os.path.exists(ack_log):
        return []
    with open(ack_log) as file:
        lines = [line.split() for line in file.read().split("\n")[:-1]]
    return [(int(fields[1]), int(fields[2])) for fields in lines if len(fields) == 3 and fields[0] == "ok"]


def first_acknowledged_transfer(handle: ledger.Ledger, transfer_id: int) -> float:
    """Send one transfer until the handle acknowledges it (it refuses while a standby); monotonic time then."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            code = handle.transfer(transfer_id, cluster_processes.SETTLEMENT, cluster_processes.WALLETS[0], 1)
        except ledger.LedgerNotPrimaryError:
            time.sleep(0.01)
            continue
        assert code == ledger.TransferResult.OK
        return time.monotonic()
    pytest.fail(f"no transfer acknowledged within {WAIT_S} s (role {handle.role})")


def assert_holds(handle: ledger.Ledger, ids: list[int]) -> None:
    """Every one of `ids` is a posted transfer on `handle`, and money is conserved."""
    records = handle.lookup_transfers(np.array(ids, np.uint64))
    missing = [i for i, state in zip(ids, records["state"]) if state == ledger.TransferState.NOT_FOUND]
    assert not missing, f"{len(missing)} acknowledged transfers lost, the first {missing[:5]}"
    accounts = handle.accounts()
    assert int(accounts["credits_posted"].sum()) == int(accounts["debits_posted"].sum())
    assert handle.verify().ok


def node_report(cluster: LocalCluster, shard: str, node: str) -> dict | None:
    async def main():
        connection = await nats.connect(servers=cluster.url.split(","))
        try:
            kv = await connection.jetstream().key_value(names.BUCKET)
            return json.loads((await kv.get(names.node_key(shard, node))).value)
        except nats.js.errors.KeyNotFoundError:
            return None
        finally:
            await connection.close()
    return asyncio.run(main())


def test_the_first_node_is_primary_and_a_standby_refuses_writes_naming_it(cluster, tmp_path):
    first = open_node(cluster, tmp_path / "a", "two", "a", primary=True)
    second = open_node(cluster, tmp_path / "b", "two", "b")
    try:
        assert (first.role, first.primary, first.durability) == ("primary", "a", "replicated")
        assert (second.role, second.primary) == ("standby", "a")
        cluster_processes.create_accounts(first)
        for transfer_id in range(100, 120):
            assert first.transfer(transfer_id, 1, 2, 3) == ledger.TransferResult.OK
        epoch = first.cluster_node.epoch
        with pytest.raises(ledger.LedgerNotPrimaryError, match=f"the primary is node a \\(epoch {epoch}\\)"):
            second.transfer(500, 1, 2, 3)
        with pytest.raises(ledger.LedgerNotPrimaryError, match="node a"):
            second.create_account(77)
        position = first.stats()["journal_position"]
        wait_until(lambda: second.stats()["journal_position"] == position, "the standby follows")
        assert second.balance(2) == 60 and np.array_equal(second.accounts(), first.accounts())
        assert second.store.batch_bytes(1, position) == first.store.batch_bytes(1, position)
        report = wait_until(lambda: node_report(cluster, "two", "b"), "the standby's report")
        assert report["role"] == "standby" and report["node"] == "b"
    finally:
        first.close()
        second.close()


def test_sigkill_of_the_primary_lets_the_standby_take_over_with_every_acknowledged_transfer(cluster, tmp_path):
    child, ack_log = start_writer(cluster, tmp_path, "kill", "p")
    standby = open_node(cluster, tmp_path / "s", "kill", "s")
    try:
        assert (standby.role, standby.primary) == ("standby", "p")
        wait_until(lambda: len(acknowledged(ack_log)) >= ACKS_BEFORE_FAULT, "the primary acknowledges")
        child.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        child.wait(WAIT_S)
        taken = first_acknowledged_transfer(standby, 1)
        print(f"\nfailover: {taken - killed:.2f} s from SIGKILL of the primary to the first acknowledged "
              f"transfer on the new one (target {FAILOVER_TARGET_S} s)")
        assert standby.role == "primary" and standby.primary == "s"
        ids = [transfer_id for transfer_id, _ in acknowledged(ack_log)]
        assert len(ids) >= ACKS_BEFORE_FAULT
        assert_holds(standby, ids)
        # The 5 s target is a speed, measured by bench/cluster_campaign.py (bench/RESULTS.md), not asserted here:
        # first_acknowledged_transfer's own bound (WAIT_S) is the liveness this test asserts.
    finally:
        standby.close()


def publish_forged(cluster: LocalCluster, shard: str, data: bytes, start: int, end: int, epoch: int) -> None:
    """Publish `data` on the shard's subject as a forger would: the right headers (the primary's epoch), no fence."""
    async def main():
        connection = await nats.connect(servers=cluster.url.split(","))
        try:
            await connection.jetstream().publish(stream.subject(shard), data, stream=stream.stream_name(shard),
                                                 headers={names.HEADER_MESSAGE_ID: str(start),
                                                          names.HEADER_END_POSITION: str(end),
                                                          names.HEADER_EPOCH: str(epoch)})
        finally:
            await connection.close()
    asyncio.run(main())


def test_a_forged_message_with_a_wrong_chain_is_refused_by_the_standby(cluster, tmp_path):
    primary = open_node(cluster, tmp_path / "a", "forged", "a", primary=True)
    standby = open_node(cluster, tmp_path / "b", "forged", "b")
    try:
        primary.create_account(1)
        primary.create_account(2)
        position = primary.stats()["journal_position"]
        wait_until(lambda: standby.stats()["journal_position"] == position, "the standby follows")
        with ledger.open(None) as forger:   # the same positions, another history: its chain differs
            for account in (11, 12, 13):
                forger.create_account(account)
            forged = forger.store.batch_bytes(position, forger.stats()["journal_position"])
        publish_forged(cluster, "forged", forged, position, position + len(forged) // 64,
                       primary.cluster_node.epoch)
        node = standby.cluster_node
        wait_until(lambda: node.error, "the standby refuses the forged message", timeout_s=5.0)
        assert "message 4 refused" in node.error and "hash chain" in node.error, node.error   # 1: the marker
        assert standby.stats()["journal_position"] == position and standby.account(11) is None
        assert standby.verify().ok
        report = wait_until(lambda: (node_report(cluster, "forged", "b") or {}).get("error"), "the report")
        assert "hash chain" in report
    finally:
        primary.close()
        standby.close()


def test_a_primary_stopped_past_its_lease_is_fenced_steps_down_and_converges_to_the_stream(cluster, tmp_path):
    child, ack_log = start_writer(cluster, tmp_path, "stop", "p")
    standby = open_node(cluster, tmp_path / "s", "stop", "s")
    try:
        wait_until(lambda: len(acknowledged(ack_log)) >= ACKS_BEFORE_FAULT, "the primary acknowledges")
        child.send_signal(signal.SIGSTOP)
        assert standby.cluster_node.wait_role("primary", WAIT_S), standby.cluster_node.error
        first_acknowledged_transfer(standby, 1)
        time.sleep(max(0.0, STOP_PAST_LEASE_S - names.LEASE_TTL_S))
        continued_ns = time.monotonic_ns()
        child.send_signal(signal.SIGCONT)
        wait_until(lambda: (node_report(cluster, "stop", "p") or {}).get("role") == "standby", "the step-down")
        for transfer_id in range(2, 40):
            assert standby.transfer(transfer_id, 1, 2, 1) == ledger.TransferResult.OK
        position = standby.stats()["journal_position"]
        wait_until(lambda: (node_report(cluster, "stop", "p") or {}).get("position") == position,
                   "the old primary follows the new one")
        # A call started before the SIGSTOP may return after the SIGCONT: it is acknowledged only if the stream
        # holds it (assert_holds below). A call started after the SIGCONT must never be acknowledged.
        late = [(transfer_id, at) for transfer_id, at in acknowledged(ack_log) if at >= continued_ns]
        assert not late, f"the fenced primary acknowledged {len(late)} transfers called after SIGCONT: {late[:3]}"
        assert_holds(standby, [transfer_id for transfer_id, _ in acknowledged(ack_log)])
        child.send_signal(signal.SIGTERM)
        assert child.wait(WAIT_S) == 0
        with ledger.open(str(tmp_path / "p"), readonly=True) as old:
            assert old.stats()["journal_position"] == position
            assert old.store.batch_bytes(1, position) == standby.store.batch_bytes(1, position)
        print("\n" + (tmp_path / "p.stderr").read_text().strip())
    finally:
        standby.close()


def test_a_batch_journaled_on_a_stale_lease_is_never_acknowledged_and_is_dropped_at_step_down(cluster, tmp_path,
                                                                                               caplog):
    first = open_node(cluster, tmp_path / "a", "stale", "a", primary=True)
    second = open_node(cluster, tmp_path / "b", "stale", "b")
    try:
        cluster_processes.create_accounts(first)
        position = first.stats()["journal_position"]
        first.cluster_node._lease.renewed_monotonic -= names.LEASE_TTL_S   # as if paused since its last renewal
        with caplog.at_level("WARNING", logger="ledger"):
            with pytest.raises(ledger.LedgerNotPrimaryError, match="not acknowledged"):
                first.transfer(10, 1, 2, 5)
            assert first.cluster_node.wait_role("standby", WAIT_S)
            wait_until(lambda: first.primary is not None and first.stats()["journal_position"] >= position,
                       "the old primary follows again")
        assert f"dropped 1 local journal batches from position {position}" in caplog.text, caplog.text
        primary = first if first.role == "primary" else second
        wait_until(lambda: primary.role == "primary", "a primary")
        assert primary.lookup_transfers([10])["state"][0] == ledger.TransferState.NOT_FOUND
        assert primary.transfer(11, 1, 2, 5) == ledger.TransferResult.OK
        end = primary.stats()["journal_position"]
        for handle in (first, second):
            wait_until(lambda: handle.stats()["journal_position"] == end, "every node converges")
            assert handle.store.batch_bytes(1, end) == primary.store.batch_bytes(1, end)
            assert handle.lookup_transfers([10])["state"][0] == ledger.TransferState.NOT_FOUND
    finally:
        first.close()
        second.close()


def test_a_node_restarted_with_batches_the_stream_never_acknowledged_drops_them_and_rejoins(cluster, tmp_path,
                                                                                           caplog):
    first = open_node(cluster, tmp_path / "a", "rejoin", "a", primary=True)
    cluster_processes.create_accounts(first)
    first.transfer(10, 1, 2, 5)
    position = first.stats()["journal_position"]
    first.close()
    with ledger.open(str(tmp_path / "a")) as alone:   # what a primary killed before its ack leaves on disk
        alone.transfer(11, 1, 2, 7)
    second = open_node(cluster, tmp_path / "b", "rejoin", "b", primary=True)
    try:
        second.transfer(12, 1, 3, 9)
        end = second.stats()["journal_position"]
        with caplog.at_level("WARNING", logger="ledger"):
            first = open_node(cluster, tmp_path / "a", "rejoin", "a")
        assert f"dropped 1 local journal batches from position {position}" in caplog.text, caplog.text
        assert first.role == "standby"
        wait_until(lambda: first.stats()["journal_position"] == end, "the restarted node follows")
        assert first.store.batch_bytes(1, end) == second.store.batch_bytes(1, end)
        assert first.lookup_transfers([11])["state"][0] == ledger.TransferState.NOT_FOUND
        assert first.balance(3) == 9 and first.verify().ok
    finally:
        first.close()
        second.close()


def test_a_ledger_made_before_clustering_publishes_its_journal_into_an_empty_stream(cluster, tmp_path):
    """ledger.open(DIR, cluster=..., shard=...) on a ledger with a journal, its shard's stream empty: the node
    publishes the journal as it takes the lease, before serving, so a new standby follows it from position 1 to
    the same bytes; another ledger with its own history on that shard is never made primary and says why."""
    with ledger.open(str(tmp_path / "a"), create=True) as before:
        for account in (1, 2, 3):
            before.create_account(account, min_balance=ledger.BALANCE_MIN if account == 1 else 0)
        for transfer_id in range(100, 110):
            before.transfer(transfer_id, 1, 2 + transfer_id % 2, 5)
        made = before.stats()["journal_position"]
    with ledger.open(str(tmp_path / "c"), create=True) as other:
        other.create_account(7)
    primary = ledger.open(str(tmp_path / "a"), cluster=cluster.url, shard="seeded", node="a")
    standby = other_standby = None
    try:
        assert primary.cluster_node.wait_role("primary", WAIT_S), primary.cluster_node.error
        standby = open_node(cluster, tmp_path / "b", "seeded", "b")
        wait_until(lambda: standby.stats()["journal_position"] == made, "the standby follows from position 1")
        assert standby.store.batch_bytes(1, made) == primary.store.batch_bytes(1, made)
        assert primary.transfer(200, 1, 2, 7) == ledger.TransferResult.OK
        end = primary.stats()["journal_position"]
        wait_until(lambda: standby.stats()["journal_position"] == end, "the standby follows the new batch")
        assert standby.account(2).credits_posted == primary.account(2).credits_posted
        other_standby = ledger.open(str(tmp_path / "c"), cluster=cluster.url, shard="seeded", node="c")
        node = other_standby.cluster_node
        wait_until(lambda: node.error, "the diverged ledger says why it does not follow")
        assert "diverged" in node.error, node.error
        primary.close()                       # the lease released: b takes it, never c
        assert standby.cluster_node.wait_role("primary", WAIT_S), standby.cluster_node.error
        assert node.role == "standby"
    finally:
        for handle in (primary, standby, other_standby):
            if handle is not None:
                handle.close()


def test_the_most_caught_up_standby_takes_the_lapsed_lease(cluster, tmp_path):
    """Three nodes, the standby c held back (its store applies nothing for a while): when the primary a leaves,
    c, even polling first, lets b (further along by the node reports) take the lease, and follows it."""
    primary = open_node(cluster, tmp_path / "a", "caught-up", "a", primary=True)
    ahead = open_node(cluster, tmp_path / "b", "caught-up", "b")
    behind = open_node(cluster, tmp_path / "c", "caught-up", "c")
    gate, b_may_poll = threading.Event(), threading.Event()
    try:
        primary.create_account(1, min_balance=ledger.BALANCE_MIN)
        position = primary.stats()["journal_position"]
        wait_until(lambda: behind.stats()["journal_position"] == position, "c follows")
        store = behind.cluster_node.store
        apply = store.append_replicated
        store.append_replicated = lambda data: gate.wait(WAIT_S) and apply(data)   # c is held back from here
        for account in (2, 3, 4):
            primary.create_account(account)
        end = primary.stats()["journal_position"]
        wait_until(lambda: (node_report(cluster, "caught-up", "b") or {}).get("position") == end, "b reports")
        assert behind.stats()["journal_position"] == position
        node = behind.cluster_node
        b_held = threading.Event()

        def hold_b() -> None:                        # b's control thread polls only once this lets go
            with ahead.cluster_node._changing:
                b_held.set()
                b_may_poll.wait(WAIT_S)
        holder = threading.Thread(target=hold_b)
        holder.start()
        assert b_held.wait(WAIT_S)
        primary.close()                              # releases the lease: nobody holds it
        releasing = threading.Timer(2.0, gate.set)   # without the deferral c would take it and wait on its gate
        releasing.start()

        def c_polls() -> None:
            with node._changing:
                node._poll()
        polling = threading.Thread(target=c_polls)
        polling.start()                              # c polls first, at once; b a moment later
        time.sleep(B_POLLS_AFTER_S)
        b_may_poll.set()
        holder.join()
        polling.join()
        assert ahead.cluster_node.wait_role("primary", WAIT_S), ahead.cluster_node.error
        assert node.role == "standby" and node.primary == "b", (node.role, node.primary)
        gate.set()
        releasing.join()
        assert ahead.transfer(10, 1, 2, 5) == ledger.TransferResult.OK
        final = ahead.stats()["journal_position"]
        wait_until(lambda: behind.stats()["journal_position"] == final, "c follows b")
    finally:
        gate.set()
        b_may_poll.set()
        for handle in (primary, ahead, behind):
            handle.close()
