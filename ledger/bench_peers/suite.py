"""Which peers exist on this machine and the rows each runs. A group whose server binary or Python driver is
missing is skipped with one line saying what to install; nothing is ever simulated in its place."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from ledger.bench_peers import servers
from ledger.bench_peers.ledger_peer import LedgerBatchPeer, LedgerSinglePeer
from ledger.bench_peers.python_peer import PythonPeer
from ledger.bench_peers.runner import Peer
from ledger.bench_peers.sqlite_peer import SqlitePeer

GROUP_NAMES = ("sqlite", "postgres", "redis", "python", "ledger")


@dataclasses.dataclass(frozen=True)
class PeerGroup:
    name: str
    missing: Callable[[], str | None]  # why it cannot run here, or None
    # Starts what the group needs (a server) under the directory and yields the group's rows.
    rows: Callable[[Path, int], AbstractContextManager[list[Peer]]]


def _driver_missing(module: str, install: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"Python driver {module!r} is not installed; pip install {install}"
    return None


@contextlib.contextmanager
def _sqlite_rows(directory: Path, batch_size: int) -> Iterator[list[Peer]]:
    yield [SqlitePeer(None), SqlitePeer(batch_size), SqlitePeer(batch_size, triggers=True)]


@contextlib.contextmanager
def _python_rows(directory: Path, batch_size: int) -> Iterator[list[Peer]]:
    yield [PythonPeer(batch_size)]


@contextlib.contextmanager
def _ledger_rows(directory: Path, batch_size: int) -> Iterator[list[Peer]]:
    # The durable batch row first: every ratio in the table is relative to it.
    yield [LedgerBatchPeer(batch_size, "fsync"), LedgerBatchPeer(batch_size, "os"), LedgerSinglePeer("os"),
           LedgerSinglePeer("fsync")]


@contextlib.contextmanager
def _postgres_rows(directory: Path, batch_size: int) -> Iterator[list[Peer]]:
    from ledger.bench_peers.postgres_peer import PostgresPeer
    with servers.postgres_server(directory) as server:
        version = server.version()
        yield [PostgresPeer(server.port, version, None), PostgresPeer(server.port, version, batch_size)]


@contextlib.contextmanager
def _redis_rows(directory: Path, batch_size: int) -> Iterator[list[Peer]]:
    import redis

    from ledger.bench_peers.redis_peer import RedisPeer
    with servers.redis_server(directory) as port:
        with redis.Redis(host=servers.LOOPBACK, port=port) as client:
            version = client.info("server")["redis_version"]
        yield [RedisPeer(port, version, batch_size, mode, per_batch)
               for per_batch in (False, True) for mode in ("always", "everysec")]


GROUPS = {
    "sqlite": PeerGroup("sqlite", lambda: None, _sqlite_rows),
    "postgres": PeerGroup("postgres", lambda: servers.postgres_missing()
                          or _driver_missing("psycopg", "'psycopg[binary]'"), _postgres_rows),
    "redis": PeerGroup("redis", lambda: servers.redis_missing() or _driver_missing("redis", "redis"), _redis_rows),
    "python": PeerGroup("python", lambda: None, _python_rows),
    "ledger": PeerGroup("ledger", lambda: None, _ledger_rows),
}
assert tuple(GROUPS) == GROUP_NAMES
