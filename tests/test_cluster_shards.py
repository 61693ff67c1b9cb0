"""The shard map (ledger.cluster.shards, `ledger cluster shards`): its text form and validation without a server;
then on a real three-node LocalCluster (one for the module): set, read and the compare-and-set conflict, the
command's output and exit codes, and the refusals: a live one-node shard (ledger.open(..., cluster=URL), served
by a ShardServer as `ledger serve --cluster` does) holding an account in a range a change would take from it,
and a shard nobody serves."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import nats
import pytest

from ledger.cluster import names, shards
from ledger.cluster.connection import connect_arguments
from ledger.cluster.servers import LocalCluster
from ledger.cluster.serving import ShardServer
from tests.support.waiting import open_node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMARY_WAIT_S = 30.0
SHORT_ANSWER_S = 0.5      # a shard nobody serves: refused once this bound passes
COMMAND_TIMEOUT_S = 60.0


# -- text form and validation --

def test_the_text_form_round_trips_and_finds_each_ids_shard():
    shard_map = shards.parse(" s1=5000000-9999999 , s0=1-4999999")
    assert shard_map.ranges == ((1, 4_999_999, "s0"), (5_000_000, 9_999_999, "s1"))
    assert shard_map.text() == "s0=1-4999999,s1=5000000-9999999"
    assert shards.parse(shard_map.text()) == shard_map and shard_map.version == 0
    assert shard_map.shards == ["s0", "s1"] and dict(shard_map.numbers) == {"s0": 0, "s1": 1}
    assert [shard_map.shard_of(i) for i in (0, 1, 4_999_999, 5_000_000, 9_999_999, 10_000_000)] == [
        None, "s0", "s0", "s1", "s1", None]
    assert shards.ShardMap.from_json(shard_map.as_json(), 7) == shards.ShardMap(
        shard_map.ranges, shard_map.numbers, 7)


def test_a_shard_may_own_several_ranges_and_adjacent_ones_join():
    shard_map = shards.parse("s0=1-10,s1=11-19,s0=20-30,s0=31-40,s2=100-200")
    assert shard_map.text() == "s0=1-10,s1=11-19,s0=20-40,s2=100-200"
    assert [shard_map.shard_of(i) for i in (10, 11, 25, 41, 150)] == ["s0", "s1", "s0", None, "s2"]


@pytest.mark.parametrize("text, words", [
    ("s0=1-10,s1=5-20", ["'s0=1-10'", "'s1=5-20'", "overlap", "ids 5-10"]),
    ("s0=10-5", ["'s0=10-5'", "empty range"]),
    ("s0=0-5", ["'s0=0-5'", "id 0"]),
    (f"s0=1-{2**63}", ["2**63", "cluster's own"]),
    ("bad.name=1-5", ["'bad.name=1-5'", "shard name"]),
    ("s0=1-x", ["'s0=1-x'", "'x'"]),
    ("s0=5", ["'s0=5'", "NAME=FIRST-LAST"]),
    ("s0=1-5,,s1=6-7", ["empty entry"]),
    ("", ["empty shard map"]),
])
def test_a_bad_map_is_refused_naming_the_part(text, words):
    with pytest.raises(ValueError) as raised:
        shards.parse(text)
    for word in words:
        assert word in str(raised.value)


def test_numbers_are_kept_across_versions_and_never_reused():
    first = shards.parse("a=1-10,b=11-20")
    second = shards.parse("c=1-10,b=11-20").renumbered(first)
    assert dict(second.numbers) == {"a": 0, "b": 1, "c": 2} and second.shards == ["b", "c"]
    third = shards.parse("a=1-20").renumbered(second)
    assert third.number_of("a") == 0 and third.number_of("c") == 2


def test_moves_are_the_ids_whose_owner_changes_or_goes():
    old = shards.parse("a=1-100,b=200-300")
    moves = old.moves(shards.parse("a=1-10,c=11-50,b=60-250,d=400-500"))
    assert [(m.first, m.last, m.owner, m.to) for m in moves] == [
        (11, 50, "a", "c"), (51, 59, "a", None), (60, 100, "a", "b"), (251, 300, "b", None)]
    assert old.moves(shards.parse("a=1-100,b=101-300")) == []   # only unmapped ids given: nothing to ask


# -- on a real cluster --

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=3, port=0) as running:
        yield running


@pytest.fixture(scope="module")
def live_shard(cluster, tmp_path_factory):
    """A one-node shard `live` serving requests, holding account 42."""
    handle = open_node(cluster.url, tmp_path_factory.mktemp("live") / "data", "live", "n1", PRIMARY_WAIT_S,
                       primary=True)
    server = ShardServer(handle, cluster.url, "live")
    server.start()
    try:
        assert server.service is not None, server.error
        handle.create_account(42)
        yield handle
    finally:
        server.stop()
        handle.close()


def run(cluster, work):
    async def body():
        connection = await nats.connect(**connect_arguments(cluster.url))
        try:
            return await work(connection)
        finally:
            await connection.close()
    return asyncio.run(body())


def reset(cluster) -> None:
    """No map stored (the key deleted): each test starts from version 0."""
    async def delete(connection):
        bucket = await shards.ensure_map_bucket(connection.jetstream(), 3)
        await bucket.delete(names.SHARD_MAP_KEY)
    run(cluster, delete)


def command(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledger", "cluster", "shards", *argv], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_set_read_and_a_stale_version_conflicts(cluster):
    reset(cluster)
    assert shards.read_shard_map(cluster.url).ranges == ()
    stored, changed = shards.set_shard_map(cluster.url, "s0=1-99,s1=100-199")
    assert changed and stored.version > 0
    assert shards.read_shard_map(cluster.url) == stored
    again, changed = shards.set_shard_map(cluster.url, "s1=100-199,s0=1-99")
    assert not changed and again.version == stored.version   # the same ranges: nothing written
    with pytest.raises(shards.ShardMapConflictError, match="changed meanwhile"):
        run(cluster, lambda connection: shards.write_map(connection.jetstream(), shards.parse("s2=1-5"), 0, 3))
    assert shards.read_shard_map(cluster.url) == stored
    grown, _ = shards.set_shard_map(cluster.url, "s0=1-99,s1=100-199,s2=200-299", expected_version=stored.version)
    assert grown.version > stored.version and grown.number_of("s2") == 2
    info = run(cluster, lambda connection: connection.jetstream().stream_info(f"KV_{names.SHARD_MAP_BUCKET}"))
    assert info.config.num_replicas == 3 and info.config.max_msgs_per_subject == names.SHARD_MAP_HISTORY


def test_the_command_shows_sets_and_refuses(cluster):
    reset(cluster)
    shown = command(cluster.url)
    assert shown.returncode == 0 and "no shard map" in shown.stdout, shown.stderr
    done = command(cluster.url, "--set", "s0=1-4999999,s1=5000000-9999999")
    assert done.returncode == 0, done.stderr
    version = shards.read_shard_map(cluster.url).version
    assert f"version {version}" in done.stdout
    document = json.loads(command(cluster.url, "--json").stdout)
    assert (document["version"], document["text"]) == (version, "s0=1-4999999,s1=5000000-9999999")
    assert document["numbers"] == {"s0": 0, "s1": 1} and document["ranges"][1]["first"] == 5_000_000
    table = command(cluster.url).stdout
    assert f"version {version}" in table and "5,000,000" in table
    bad = command(cluster.url, "--set", "s0=1-10,s1=x-20")
    assert bad.returncode == 2 and "'s1=x-20'" in bad.stderr
    stale = command(cluster.url, "--set", "s0=1-10", "--expect-version", str(version - 1))
    assert stale.returncode == 1 and "changed meanwhile" in stale.stderr
    assert shards.read_shard_map(cluster.url).version == version


def test_a_change_taking_an_account_from_a_live_shard_is_refused(cluster, live_shard):
    reset(cluster)
    stored, _ = shards.set_shard_map(cluster.url, "live=1-1000")   # unmapped ids: nobody to ask
    with pytest.raises(shards.ShardMapRefusedError) as refused:
        shards.set_shard_map(cluster.url, "live=1-10,other=11-1000")
    assert "shard live holds 1 account(s) in ids 11-1000" in str(refused.value)
    moved = command(cluster.url, "--set", "live=1-41")
    assert moved.returncode == 1 and "shard live holds 1 account(s) in ids 42-1000" in moved.stderr
    assert "no shard" in moved.stderr and shards.read_shard_map(cluster.url) == stored
    emptied, changed = shards.set_shard_map(cluster.url, "live=1-500,other=501-1000")   # 501-1000: no account
    assert changed and emptied.shard_of(700) == "other"
    shrunk, changed = shards.set_shard_map(cluster.url, "live=1-100,other=501-1000")    # 101-500 unmapped
    assert changed and shrunk.shard_of(200) is None


def test_a_change_taking_ids_from_a_shard_nobody_serves_is_refused(cluster):
    reset(cluster)
    stored, _ = shards.set_shard_map(cluster.url, "ghost=2000-3000")
    with pytest.raises(shards.ShardMapRefusedError) as refused:
        shards.set_shard_map(cluster.url, "other=2000-3000", timeout_s=SHORT_ANSWER_S)
    assert "shard ghost did not answer" in str(refused.value) and "ids 2000-3000" in str(refused.value)
    assert shards.read_shard_map(cluster.url) == stored
