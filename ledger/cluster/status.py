"""`ledger cluster status URL [--shard NAME] [--json]`: what a cluster's shards look like right now, read from
NATS alone (no node is asked): per shard its primary and epoch (KV key `lease.<shard>`), every node's role,
journal position and stream sequence with its lag behind the stream (keys `node.<shard>.<node>`), and the
stream itself (messages, bytes, first and last sequence, the journal position it ends at, its Raft leader and
each replica's state). A shard is any stream named LEDGER_<shard> on subject ledger.journal.<shard>, or any shard
named by a lease or node key (a shard whose stream is not created yet still shows its nodes).

The JSON form (`--json`, format 1; docs/CLUSTER.md "Status") is stable: fields are only ever added."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors

from ledger.cluster.connection import ConnectionOptions, connect_arguments, redacted
from ledger.cluster.names import (
    BUCKET,
    CONNECT_TIMEOUT_S,
    HEADER_END_POSITION,
    REQUEST_TIMEOUT_S,
    SHARD_PATTERN,
    STATUS_CONNECT_RETRY_WAIT_S,
    STREAM_PREFIX,
    check_shard,
    stream_name,
    subject,
)
from ledger.cluster.servers import ClusterError

FORMAT = 1                 # the --json document's version; bumped only if a field changes meaning
STATUS_TIMEOUT_S = CONNECT_TIMEOUT_S + 4 * REQUEST_TIMEOUT_S   # the whole command, never a hang


class ClusterUnreachableError(ClusterError):
    """No NATS server of the URL answered (refused, timed out, authentication failed): exit 3."""


@dataclasses.dataclass(frozen=True)
class ReplicaStatus:
    """One server holding a copy of the stream: whether it is the Raft leader, current, and how far behind."""
    server: str
    leader: bool
    current: bool
    offline: bool
    lag: int                   # operations behind the leader (0 for the leader)
    active_ms: float | None    # since the leader last heard from it


@dataclasses.dataclass(frozen=True)
class StreamStatus:
    """A shard's stream: its messages, bytes and sequences, the journal position its last message ends at."""
    name: str
    messages: int
    bytes: int
    first_sequence: int
    last_sequence: int
    end_position: int | None   # Ledger-End-Position of the last message (None: empty, or not a ledger message)
    leader: str | None
    replicas: list[ReplicaStatus]


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    """One node's own report (`node.<shard>.<node>`), with its lag behind the stream."""
    node: str
    role: str                  # "primary", "standby" or "stopped" (as the node said), "unreadable" (bad JSON)
    epoch: int | None
    position: int | None
    sequence: int | None
    error: str | None
    updated_ns: int | None
    age_s: float | None        # how old the report is when read
    lag_sequences: int | None  # the stream's last sequence minus the node's (None without a stream)
    lag_positions: int | None  # the stream's end journal position minus the node's


@dataclasses.dataclass(frozen=True)
class ShardStatus:
    """One shard: its primary (from the lease; None: no primary now), the nodes and the stream."""
    shard: str
    primary: str | None
    epoch: int | None
    lease_renewed_ns: int | None
    request_subject: str | None
    lease_error: str | None    # the lease key holds something that is not the lease JSON
    nodes: list[NodeStatus]
    stream: StreamStatus | None

    @property
    def standbys(self) -> list[str]:
        """The nodes that report themselves standby."""
        return [node.node for node in self.nodes if node.role == "standby"]


@dataclasses.dataclass(frozen=True)
class ClusterStatus:
    """Every shard found (or the one asked for), as of `read_ns`."""
    url: str
    read_ns: int
    shards: list[ShardStatus]

    def to_dict(self) -> dict[str, Any]:
        """The --json document (format FORMAT, docs/CLUSTER.md "Status")."""
        shards = []
        for shard in self.shards:
            entry = dataclasses.asdict(shard)
            entry["standbys"] = shard.standbys
            shards.append(entry)
        return {"format": FORMAT, "url": self.url, "read_ns": self.read_ns, "shards": shards}


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json_object(data: bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(data or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def node_status(name: str, data: bytes | None, stream: StreamStatus | None, now_ns: int) -> NodeStatus:
    """A node's report parsed (COMMON format: node, role, epoch, position, sequence, error, updated_ns), its lag
    taken against `stream`. A report that is not that JSON shows as role "unreadable", never as an exception."""
    report = _json_object(data)
    if report is None:
        return NodeStatus(name, "unreadable", None, None, None, f"not JSON: {bytes(data or b'')[:80]!r}", None,
                          None, None, None)
    position, sequence = _integer(report.get("position")), _integer(report.get("sequence"))
    updated_ns = _integer(report.get("updated_ns"))
    role = report.get("role") if isinstance(report.get("role"), str) else "unreadable"
    error = report.get("error")
    lag_sequences = lag_positions = None
    if stream is not None and sequence is not None:
        lag_sequences = stream.last_sequence - sequence
    if stream is not None and stream.end_position is not None and position is not None:
        lag_positions = stream.end_position - position
    return NodeStatus(name, role, _integer(report.get("epoch")), position, sequence,
                      None if error is None else str(error), updated_ns,
                      None if updated_ns is None else round((now_ns - updated_ns) / 1e9, 3),
                      lag_sequences, lag_positions)


def _stream_status(info: Any, end_position: int | None) -> StreamStatus:
    cluster = info.cluster
    leader = cluster.leader if cluster is not None else None
    replicas = []
    if cluster is not None and leader is not None:
        replicas.append(ReplicaStatus(leader, True, True, False, 0, None))
    for peer in (cluster.replicas or []) if cluster is not None else []:
        active_ms = None if peer.active is None else round(peer.active / 1e6, 3)
        replicas.append(ReplicaStatus(peer.name or "?", False, bool(peer.current), bool(peer.offline),
                                      peer.lag or 0, active_ms))
    state = info.state
    return StreamStatus(info.config.name, state.messages, state.bytes, state.first_seq, state.last_seq,
                        end_position, leader, replicas)


async def _streams(js: Any, only: str | None) -> dict[str, StreamStatus]:
    """The ledger streams (LEDGER_<shard> on its own subject), by shard."""
    found = {}
    for info in await js.streams_info():
        shard = info.config.name[len(STREAM_PREFIX):]
        if not info.config.name.startswith(STREAM_PREFIX) or SHARD_PATTERN.fullmatch(shard) is None:
            continue
        if info.config.subjects != [subject(shard)] or (only is not None and shard != only):
            continue
        end_position = None
        if info.state.last_seq and info.state.messages:
            message = await js.get_msg(stream_name(shard), info.state.last_seq)
            value = (message.headers or {}).get(HEADER_END_POSITION)
            end_position = int(value) if value is not None and value.isdigit() else None
        found[shard] = _stream_status(info, end_position)
    return found


async def _keys(js: Any) -> dict[str, bytes]:
    """Every key of the cluster bucket with its value (empty when the bucket does not exist yet)."""
    try:
        bucket = await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return {}
    try:
        names = await bucket.keys()
    except nats.js.errors.NoKeysError:
        return {}
    values = {}
    for name in names:
        try:
            values[name] = (await bucket.get(name)).value or b""
        except nats.js.errors.KeyNotFoundError:
            pass   # expired (its TTL) between listing and reading: the node stopped reporting
    return values


def _shard(shard: str, keys: dict[str, bytes], stream: StreamStatus | None, now_ns: int) -> ShardStatus:
    prefix = f"node.{shard}."
    nodes = [node_status(key[len(prefix):], value, stream, now_ns) for key, value in sorted(keys.items())
             if key.startswith(prefix)]
    lease_data = keys.get(f"lease.{shard}")
    lease = _json_object(lease_data) if lease_data is not None else None
    lease_error = None
    if lease_data is not None and (lease is None or not isinstance(lease.get("node"), str)):
        lease_error, lease = f"lease.{shard} is not the lease JSON: {bytes(lease_data)[:80]!r}", None
    lease = lease or {}
    request_subject = lease.get("request_subject")
    return ShardStatus(shard, lease.get("node"), _integer(lease.get("epoch")), _integer(lease.get("renewed_ns")),
                       request_subject if isinstance(request_subject, str) else None, lease_error, nodes, stream)


def _shards_named(keys: dict[str, bytes]) -> set[str]:
    """The shards named by lease.<shard> and node.<shard>.<node> keys."""
    names = set()
    for key in keys:
        parts = key.split(".")
        if (parts[0] == "lease" and len(parts) == 2) or (parts[0] == "node" and len(parts) == 3):
            names.add(parts[1])
    return names


async def connect_once(url: str, options: ConnectionOptions | None) -> Any:
    """A nats-py connection for one command (`cluster status`, `cluster shards`): each server of the URL tried
    once, no reconnecting; ClusterUnreachableError (one line, the URL redacted) when none answers. ValueError or
    FileNotFoundError for bad options, before any connection is tried."""
    arguments = connect_arguments(url, options)

    async def quiet(error: Exception) -> None:
        """nats-py logs each failed attempt with a traceback; the one line of the outcome says it."""
    try:
        return await nats.connect(**arguments, connect_timeout=CONNECT_TIMEOUT_S, allow_reconnect=False,
                                  max_reconnect_attempts=1, reconnect_time_wait=STATUS_CONNECT_RETRY_WAIT_S,
                                  error_cb=quiet)
    except (nats.errors.Error, OSError, asyncio.TimeoutError) as error:
        raise ClusterUnreachableError(f"cannot connect to NATS at {redacted(url)}: "
                                      f"{str(error) or type(error).__name__}") from None


async def _read(url: str, options: ConnectionOptions | None, only: str | None) -> ClusterStatus:
    connection = await connect_once(url, options)
    try:
        js = connection.jetstream(timeout=REQUEST_TIMEOUT_S)
        streams = await _streams(js, only)
        keys = await _keys(js)
    finally:
        await connection.close()
    now_ns = time.time_ns()
    names = set(streams) | _shards_named(keys)
    if only is not None:
        names = {only}
    shards = [_shard(name, keys, streams.get(name), now_ns) for name in sorted(names)]
    return ClusterStatus(redacted(url), now_ns, shards)


def read_status(url: str, options: ConnectionOptions | None = None, shard: str | None = None) -> ClusterStatus:
    """The status of every shard of the cluster at `url` (or of `shard` alone). Raises ClusterUnreachableError
    when no server answers, LedgerTimeoutError-free: the whole read is bounded by STATUS_TIMEOUT_S."""
    only = None if shard is None else check_shard(shard)
    try:
        return asyncio.run(asyncio.wait_for(_read(url, options, only), STATUS_TIMEOUT_S))
    except (asyncio.TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
        raise ClusterUnreachableError(f"NATS at {redacted(url)} did not answer within {STATUS_TIMEOUT_S:g} s "
                                      f"({type(error).__name__}): is JetStream enabled?") from None


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str) -> list[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return [indent + "  ".join(f"{cell:<{widths[column]}}" for column, cell in enumerate(row)).rstrip()
            for row in [header, *rows]]


def shard_lines(shard: ShardStatus) -> list[str]:
    """One shard as text: a heading line, the stream line, its replicas and its nodes as tables."""
    primary = f"primary {shard.primary} (epoch {_cell(shard.epoch)})" if shard.primary else "no primary"
    lines = [f"shard {shard.shard}: {primary}; standbys: {', '.join(shard.standbys) or 'none'}"]
    if shard.lease_error:
        lines.append(f"  lease: {shard.lease_error}")
    stream = shard.stream
    if stream is None:
        lines.append("  stream: none")
    else:
        lines.append(f"  stream {stream.name}: {stream.messages:,} messages, {stream.bytes:,} bytes, sequences "
                     f"{stream.first_sequence:,}..{stream.last_sequence:,}, ends at journal position "
                     f"{_cell(stream.end_position)}; leader {stream.leader or 'none'}")
        rows = [(replica.server, "leader" if replica.leader else "follower",
                 "offline" if replica.offline else "current" if replica.current else "behind", _cell(replica.lag),
                 _cell(replica.active_ms)) for replica in stream.replicas]
        if rows:
            lines += _table(("replica", "role", "state", "lag", "active ms"), rows, "    ")
    rows = [(node.node, node.role, _cell(node.epoch), _cell(node.position), _cell(node.sequence),
             _cell(node.lag_sequences), _cell(node.lag_positions), _cell(node.age_s), node.error or "")
            for node in shard.nodes]
    if rows:
        lines += _table(("node", "role", "epoch", "position", "sequence", "lag seq", "lag pos", "age s", "error"),
                        rows, "  ")
    else:
        lines.append("  nodes: none reporting")
    return lines


def status_text(status: ClusterStatus) -> str:
    """The human table of `ledger cluster status`."""
    if not status.shards:
        return f"cluster {status.url}: no shards (no LEDGER_* stream, no lease or node key)"
    lines = [f"cluster {status.url}: {len(status.shards)} shard(s)"]
    for shard in status.shards:
        lines += shard_lines(shard)
    return "\n".join(lines)
