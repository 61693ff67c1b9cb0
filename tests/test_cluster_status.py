"""`ledger cluster status` (ledger.cluster.status) on a real three-node LocalCluster: a shard whose stream holds
real ledger batches (published by StreamPublisher, R3) and whose lease and node keys are put in the real
LEDGER_CLUSTER bucket in the exact JSON a node writes (docs/CLUSTER.md: that format is the contract), re-put
every quarter second as nodes do (the bucket's TTL expires a key not put again), and a shard that has node keys
only. Checked: primary, epoch, standbys, each node's lag, the stream's counts and replicas, the JSON document,
the table, --shard, and the exit codes (2 usage, 3 no server answers)."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import nats.errors
import nats.js.api
import nats.js.errors
import pytest

import ledger
from ledger import cli
from ledger.api import open_with_hooks
from ledger.bench_peers import cluster as cluster_bench
from ledger.cluster import names, status, stream
from ledger.cluster.servers import LocalCluster

SHARD = "eu-1"
NODES_ONLY_SHARD = "ap"
EPOCH = 3
REPORT_INTERVAL_S = 0.25          # faster than a node's NODE_REPORT_INTERVAL_S: the keys never lapse mid-test
STOP_TIMEOUT_S = 5.0
BUCKET_TIMEOUT_S = 30.0


def node_report(node: str, role: str, position: int, sequence: int, error: str | None = None) -> bytes:
    return json.dumps({"node": node, "role": role, "epoch": EPOCH, "position": position, "sequence": sequence,
                       "error": error, "updated_ns": time.time_ns()}).encode()


def publish_batches(cluster: LocalCluster, path: str) -> tuple[int, list[tuple[int, int]]]:
    """A real ledger publishing real batches to the shard's R3 stream: (its end position, per message (end
    position, sequence))."""
    ends = []
    # A new R3 stream elects its leader first: publishing before that finds no responder.
    cluster_bench.prepare_stream(cluster.url, SHARD)
    with stream.StreamPublisher(cluster.url, SHARD, replicas=3) as publisher:
        handle = open_with_hooks(path, create=True, publish=publisher, durability="fsync")
        publisher.attach(handle.store)
        for account in (1, 2, 3):
            handle.create_account(account, min_balance=ledger.BALANCE_MIN if account == 1 else 0)
            ends.append((handle.stats()["journal_position"], publisher.last_sequence))
        handle.transfer(100, 1, 2, 50)
        ends.append((handle.stats()["journal_position"], publisher.last_sequence))
        handle.close()
    return ends[-1][0], ends


class Reporter:
    """Puts the lease and node keys every REPORT_INTERVAL_S on a LoopThread, as the nodes would."""

    def __init__(self, url: str, keys: dict[str, bytes | None]) -> None:
        self.keys = keys
        self.loop = stream.LoopThread(url, None)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _bucket(self):
        """The bucket as the lease module makes it (TTL the lease's, R3); its creation, like a new stream's, may
        time out or answer 503 while the cluster is busy placing it: retried within BUCKET_TIMEOUT_S."""
        config = nats.js.api.KeyValueConfig(bucket=names.BUCKET, ttl=names.LEASE_TTL_S, history=1, replicas=3)
        deadline = time.monotonic() + BUCKET_TIMEOUT_S
        while True:
            try:
                return await self.loop.js.create_key_value(config)
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _put(self) -> None:
        bucket = await self.loop.js.key_value(names.BUCKET)
        for key, value in list(self.keys.items()):
            if value is not None:
                await bucket.put(key, value)

    def start(self) -> None:
        self.loop.start()
        self.loop.run(self._bucket(), BUCKET_TIMEOUT_S + names.REQUEST_TIMEOUT_S)
        self.loop.run(self._put(), names.REQUEST_TIMEOUT_S)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(REPORT_INTERVAL_S):
            self.loop.run(self._put(), names.REQUEST_TIMEOUT_S)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(STOP_TIMEOUT_S)
        self.loop.stop()


@pytest.fixture(scope="module")
def shard_cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=3, port=0) as cluster:
        end, ends = publish_batches(cluster, str(tmp_path_factory.mktemp("primary") / "data"))
        behind_position, behind_sequence = ends[-2]
        lease = {"node": "a", "epoch": EPOCH, "request_subject": names.request_subject(SHARD),
                 "renewed_ns": 1_700_000_000_000_000_000}
        keys = {names.lease_key(SHARD): json.dumps(lease).encode(),
                names.node_key(SHARD, "a"): node_report("a", "primary", end, ends[-1][1]),
                names.node_key(SHARD, "b"): node_report("b", "standby", behind_position, behind_sequence),
                names.node_key(SHARD, "c"): node_report("c", "stopped", 1, 0, error="disk full"),
                names.node_key(NODES_ONLY_SHARD, "x"): node_report("x", "standby", 1, 0)}
        reporter = Reporter(cluster.url, keys)
        reporter.start()
        try:
            yield cluster, end, ends
        finally:
            reporter.stop()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["cluster", "status", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_names_the_primary_the_standbys_and_each_nodes_lag(shard_cluster, capsys):
    cluster, end, ends = shard_cluster
    code, out, err = run_cli(capsys, cluster.url, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["format"] == status.FORMAT and document["url"] == cluster.url
    shards = {shard["shard"]: shard for shard in document["shards"]}
    assert set(shards) == {SHARD, NODES_ONLY_SHARD}
    shard = shards[SHARD]
    assert (shard["primary"], shard["epoch"], shard["standbys"]) == ("a", EPOCH, ["b"])
    assert shard["request_subject"] == names.request_subject(SHARD) and shard["lease_error"] is None
    last_sequence = ends[-1][1]
    the_stream = shard["stream"]
    assert the_stream["name"] == names.stream_name(SHARD)
    assert (the_stream["messages"], the_stream["first_sequence"], the_stream["last_sequence"]) == (
        last_sequence, 1, last_sequence)
    assert the_stream["end_position"] == end and the_stream["bytes"] > 0
    replicas = the_stream["replicas"]
    assert len(replicas) == 3 and [replica["leader"] for replica in replicas].count(True) == 1
    assert the_stream["leader"] == next(replica["server"] for replica in replicas if replica["leader"])
    nodes = {node["node"]: node for node in shard["nodes"]}
    assert (nodes["a"]["role"], nodes["a"]["lag_sequences"], nodes["a"]["lag_positions"]) == ("primary", 0, 0)
    assert nodes["b"]["lag_sequences"] == 1 and nodes["b"]["lag_positions"] == end - ends[-2][0] > 0
    assert nodes["c"]["role"] == "stopped" and nodes["c"]["error"] == "disk full"
    assert nodes["c"]["lag_sequences"] == last_sequence and 0 <= nodes["a"]["age_s"] < names.LEASE_TTL_S
    other = shards[NODES_ONLY_SHARD]
    assert other["primary"] is None and other["stream"] is None and other["standbys"] == ["x"]
    assert other["nodes"][0]["lag_sequences"] is None


def test_the_table_and_one_shard(shard_cluster, capsys):
    cluster, end, _ = shard_cluster
    code, out, err = run_cli(capsys, cluster.url)
    assert code == 0, err
    assert f"shard {SHARD}: primary a (epoch {EPOCH}); standbys: b" in out
    assert f"shard {NODES_ONLY_SHARD}: no primary; standbys: x" in out
    assert f"ends at journal position {end:,}" in out and "disk full" in out
    code, out, err = run_cli(capsys, cluster.url, "--shard", NODES_ONLY_SHARD, "--json")
    assert code == 0, err
    assert [shard["shard"] for shard in json.loads(out)["shards"]] == [NODES_ONLY_SHARD]


def test_a_shard_nobody_knows_shows_no_primary_and_no_stream(shard_cluster, capsys):
    cluster, _, _ = shard_cluster
    code, out, _ = run_cli(capsys, cluster.url, "--shard", "nobody")
    assert code == 0
    assert "shard nobody: no primary" in out and "stream: none" in out and "nodes: none reporting" in out


def test_a_report_that_is_not_json_is_shown_not_raised():
    node = status.node_status("z", b"{oops", None, 0)
    assert node.role == "unreadable" and "not JSON" in node.error


def test_no_server_is_exit_3_on_one_line(capsys):
    with socket.socket() as probe:       # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = run_cli(capsys, f"nats://127.0.0.1:{port}")
    assert code == cli.EXIT_DATA and out == ""
    assert err.count("\n") == 1 and f"cannot connect to NATS at nats://127.0.0.1:{port}" in err


def test_usage_errors_are_exit_2(capsys):
    assert run_cli(capsys, "nats://127.0.0.1:4222", "--shard", "a.b")[0] == cli.EXIT_USAGE
    assert run_cli(capsys, "http://127.0.0.1:4222")[0] == cli.EXIT_USAGE
    assert run_cli(capsys)[0] == cli.EXIT_USAGE
