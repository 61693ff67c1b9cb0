"""Read models kept up to date from the journal (the CQRS read side): `ledger project sqlite DIR OUT.db`.

    python -m ledger.project sqlite DIR OUT.db [--follow] [--interval-ms N] [--idle-timeout-ms N]

reads the committed events of the ledger in DIR with `ledger.tail` (another process may be writing it) and folds
them into the SQLite database OUT.db. Without --follow it stops at the committed end; with --follow it keeps
following until SIGINT or SIGTERM (the transaction in progress is finished first).

Tables:
- `transfers`: one row per event that moves money (kinds `transfer`, `pending`, `post`, `void`, `expire`):
  position (PRIMARY KEY, the event's journal position), timestamp (ns), kind, transfer_id, debit_account,
  credit_account, amount, pending_id (POST/VOID/EXPIRE: the pending transfer they resolve; else 0), timeout
  (PENDING: seconds; else 0), code, user_data, linked. For EXPIRE, transfer_id is the pending transfer's id (an
  expiry has no id of its own). Indexed by (debit_account, timestamp), (credit_account, timestamp), timestamp and
  transfer_id. Account creations are not rows here: they are the rows of `balances`.
- `balances`: one row per account: id (PRIMARY KEY), ledger, debits_posted, credits_posted, debits_pending,
  credits_pending, then flags, min_balance, max_balance, user_data, timestamp and position of its creation.
  ACCOUNT events insert rows; TRANSFER adds to the posted counters, PENDING to the pending ones; POST, VOID and
  EXPIRE release the *pending* amount (the amount of the `pending` row whose transfer_id is their pending_id, found
  in this database's own `transfers`), and POST then adds its own amount to the posted counters.
- `position`: one row: next_position (the journal position of the next batch header to read), last_checksum (the
  checksum of the last batch projected: resuming checks it, so a different or restored journal is refused),
  last_timestamp (of the last event projected), events (projected so far), updated_ns.

Exactly once: every array of whole batches is applied in ONE SQLite transaction together with the `position` row
that says where it ends. A crash anywhere (kill -9 included) leaves either all of it or none of it, and a restart
resumes from the stored position, so nothing is counted twice or skipped. The database uses WAL with
synchronous=NORMAL: a crash of the process loses nothing committed; a crash of the machine may lose the last
transactions, but never half of one, so the projection resumes consistently from what survived. If another
projector advanced the same database meanwhile, the transaction is refused (ProjectionError).

Integers: SQLite integers are signed 64-bit. uint64 values (ids, user_data) of 2**63 and above are stored as the
signed integer with the same 64 bits (value - 2**64); `to_sqlite(value)` / `from_sqlite(value)` convert. Ids from
`ledger.IdGenerator` and most application ids are below 2**63 and are stored unchanged.

Progress lines (one per `--progress-interval-ms`, and at the end) report the events projected, the rate, the
position, and the lag: `lag_events`, the journal records written but not yet projected (events and their batch
headers, so an upper bound on the events), and `lag_ms`, now minus the timestamp of the last projected event while
anything is left to project (0 once caught up: an idle writer is not a lagging projection)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from ledger import _core
from ledger.errors import LedgerCorruptError
from ledger.format import EVENT_KIND_NAMES, KIND_ACCOUNT, KIND_EXPIRE, KIND_PENDING, KIND_POST, KIND_TRANSFER
from ledger.tail import IDLE_TIMEOUT_MS_MAX, INTERVAL_MS_DEFAULT, INTERVAL_MS_MAX, MAX_EVENTS_LIMIT, Tailer

__all__ = [
    "BALANCES_DTYPE",
    "ProjectionError",
    "ProjectionReport",
    "SqliteProjection",
    "add_arguments",
    "from_sqlite",
    "main",
    "project_sqlite",
    "run",
    "to_sqlite",
]

SCHEMA_VERSION = 1
KIND_NAMES = np.array(["", *(EVENT_KIND_NAMES[kind] for kind in range(KIND_ACCOUNT, KIND_EXPIRE + 1))], dtype=object)
MAX_EVENTS_DEFAULT = 1 << 16        # events per SQLite transaction (whole batches: one batch may be larger)
PROGRESS_INTERVAL_MS_DEFAULT = 1000
PROGRESS_INTERVAL_MS_MAX = 3_600_000
SQL_VARIABLES_MAX = 500             # ids per IN (...) lookup, well under SQLite's variable limit
CACHE_KIB = 256 * 1024              # page cache for the index b-trees: inserts stay in memory
WAL_CHECKPOINT_PAGES = 16384

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA = 3

SCHEMA = """
CREATE TABLE transfers (
    position INTEGER PRIMARY KEY,
    timestamp INTEGER NOT NULL,
    kind TEXT NOT NULL,
    transfer_id INTEGER NOT NULL,
    debit_account INTEGER NOT NULL,
    credit_account INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    pending_id INTEGER NOT NULL,
    timeout INTEGER NOT NULL,
    code INTEGER NOT NULL,
    user_data INTEGER NOT NULL,
    linked INTEGER NOT NULL
);
CREATE INDEX transfers_debit_account_timestamp ON transfers (debit_account, timestamp);
CREATE INDEX transfers_credit_account_timestamp ON transfers (credit_account, timestamp);
CREATE INDEX transfers_timestamp ON transfers (timestamp);
CREATE INDEX transfers_transfer_id ON transfers (transfer_id);
CREATE TABLE balances (
    id INTEGER PRIMARY KEY,
    ledger INTEGER NOT NULL,
    debits_posted INTEGER NOT NULL,
    credits_posted INTEGER NOT NULL,
    debits_pending INTEGER NOT NULL,
    credits_pending INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    min_balance INTEGER NOT NULL,
    max_balance INTEGER NOT NULL,
    user_data INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    position INTEGER NOT NULL
);
CREATE TABLE position (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 0),
    next_position INTEGER NOT NULL,
    last_checksum INTEGER NOT NULL,
    last_timestamp INTEGER NOT NULL,
    events INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
);
INSERT INTO position VALUES (0, 1, 0, 0, 0, 0);
"""

INSERT_TRANSFER = "INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
INSERT_ACCOUNT = "INSERT INTO balances VALUES (?, ?, 0, 0, 0, 0, ?, ?, ?, ?, ?, ?)"
UPDATE_BALANCE = ("UPDATE balances SET debits_posted = debits_posted + ?, credits_posted = credits_posted + ?, "
                  "debits_pending = debits_pending + ?, credits_pending = credits_pending + ? WHERE id = ?")
UPDATE_POSITION = ("UPDATE position SET next_position = ?, last_checksum = ?, last_timestamp = ?, "
                   "events = events + ?, updated_ns = ? WHERE singleton = 0")


class ProjectionError(Exception):
    """The read model and the journal disagree (a pending transfer or an account the events need is missing,
    or another projector advanced the database): the database was not built from this journal alone."""


def to_sqlite(value: int) -> int:
    """A uint64 (id, user_data) as the signed 64-bit integer SQLite stores (same bits)."""
    assert 0 <= value < 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def from_sqlite(value: int) -> int:
    """The uint64 a stored signed integer stands for."""
    assert -(1 << 63) <= value < 1 << 63
    return value + (1 << 64) if value < 0 else value


def _signed(column: np.ndarray) -> list[int]:
    """uint64 values as the signed integers with the same bits, as Python ints for sqlite3."""
    return column.astype(np.uint64, copy=False).view(np.int64).tolist()


class SqliteProjection:
    """The SQLite read model in one file. `apply()` folds one array of whole batches in one transaction."""

    def __init__(self, database_path: str | os.PathLike[str]) -> None:
        self.database_path = os.fspath(database_path)
        self.connection = sqlite3.connect(self.database_path, isolation_level=None, check_same_thread=True)
        try:
            self._prepare()
            self.next_position, self.last_checksum, self.last_timestamp, self.events = self._stored_position()
        except BaseException:
            self.connection.close()
            raise

    def _prepare(self) -> None:
        connection = self.connection
        connection.execute("PRAGMA journal_mode = WAL")
        # With WAL, NORMAL keeps every transaction atomic across any crash; only the newest may be lost to a
        # power cut, and the stored position goes back with it.
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        # Checkpoint the WAL less often (every WAL_CHECKPOINT_PAGES pages, 64 MiB at 4 KiB): +20% projection rate.
        connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        connection.execute("PRAGMA temp_store = MEMORY")
        connection.execute("PRAGMA busy_timeout = 10000")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            connection.execute("BEGIN IMMEDIATE")
            try:
                if connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise ProjectionError(f"{self.database_path} is a database this projection did not create")
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        elif version != SCHEMA_VERSION:
            raise ProjectionError(f"{self.database_path}: schema version {version}, this projection writes "
                                  f"{SCHEMA_VERSION}")

    def _stored_position(self) -> tuple[int, int, int, int]:
        row = self.connection.execute(
            "SELECT next_position, last_checksum, last_timestamp, events FROM position WHERE singleton = 0").fetchone()
        if row is None:
            raise ProjectionError(f"{self.database_path}: the position row is missing")
        return row

    # -- one transaction per array of whole batches --

    def apply(self, events: np.ndarray, next_position: int, checksum: int) -> None:
        """Fold `events` (whole batches starting at the stored next_position) and store `next_position` and
        `checksum` (the tailer's, after reading them) in the same transaction."""
        assert events.dtype == _core.EVENT_DTYPE and events.size > 0
        assert int(events["position"][0]) == self.next_position + 1, "events must start at the stored position"
        assert int(events["position"][-1]) + 1 == next_position, "events must end at next_position"
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            if self._stored_position()[0] != self.next_position:
                raise ProjectionError(f"{self.database_path}: another projector advanced the position")
            kinds = events["kind"]
            self._insert_accounts(events[kinds == KIND_ACCOUNT])
            money = events[kinds != KIND_ACCOUNT]
            if money.size:
                self._insert_transfers(money)
                self._update_balances(money, self._pending_amounts(money))
            last_timestamp = int(events["timestamp"][-1])
            connection.execute(UPDATE_POSITION, (next_position, checksum, last_timestamp, int(events.size),
                                                 time.time_ns()))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        self.next_position, self.last_checksum, self.last_timestamp = next_position, checksum, last_timestamp
        self.events += int(events.size)

    def _insert_accounts(self, accounts: np.ndarray) -> None:
        if not accounts.size:
            return
        # An ACCOUNT record keeps the ledger and flags in debit_account, min_balance in amount, max_balance in aux.
        packed = accounts["debit_account"]
        rows = zip(_signed(accounts["id"]), (packed & np.uint64(0xFFFFFFFF)).tolist(),
                   ((packed >> np.uint64(32)) & np.uint64(0xFFFF)).tolist(), accounts["amount"].tolist(),
                   _signed(accounts["aux"]), _signed(accounts["user_data"]), accounts["timestamp"].tolist(),
                   accounts["position"].tolist())
        try:
            self.connection.executemany(INSERT_ACCOUNT, rows)
        except sqlite3.IntegrityError as error:
            raise ProjectionError(f"{self.database_path}: an account created at positions "
                                  f"{int(accounts['position'][0])}.. already exists ({error})") from None

    def _insert_transfers(self, money: np.ndarray) -> None:
        kinds = money["kind"]
        resolves = kinds >= KIND_POST
        rows = zip(money["position"].tolist(), money["timestamp"].tolist(), KIND_NAMES[kinds].tolist(),
                   _signed(money["id"]), _signed(money["debit_account"]), _signed(money["credit_account"]),
                   money["amount"].tolist(), _signed(np.where(resolves, money["aux"], np.uint64(0))),
                   np.where(kinds == KIND_PENDING, money["aux"], np.uint64(0)).tolist(),
                   money["code"].tolist(), _signed(money["user_data"]), money["linked"].tolist())
        try:
            self.connection.executemany(INSERT_TRANSFER, rows)
        except sqlite3.IntegrityError as error:   # a position projected twice: never, unless the file was edited
            raise ProjectionError(f"{self.database_path}: events at positions {int(money['position'][0])}.. are "
                                  f"already projected ({error})") from None

    def _pending_amounts(self, money: np.ndarray) -> np.ndarray:
        """For each POST/VOID/EXPIRE event, the amount of the PENDING transfer it resolves (0 for other kinds),
        looked up in our own transfers table (the rows just inserted included: a pending and its post may share
        a batch)."""
        resolves = money["kind"] >= KIND_POST
        amounts = np.zeros(money.size, np.int64)
        if not resolves.any():
            return amounts
        pending_ids = money["aux"][resolves]
        wanted = _signed(np.unique(pending_ids))
        found: dict[int, int] = {}
        for start in range(0, len(wanted), SQL_VARIABLES_MAX):
            chunk = wanted[start:start + SQL_VARIABLES_MAX]
            query = (f"SELECT transfer_id, amount FROM transfers WHERE kind = 'pending' AND transfer_id IN "
                     f"({', '.join('?' * len(chunk))})")
            found.update(self.connection.execute(query, chunk).fetchall())
        signed_ids = _signed(pending_ids)
        missing = [pending_id for pending_id in signed_ids if pending_id not in found]
        if missing:
            raise ProjectionError(f"{self.database_path}: pending transfer {from_sqlite(missing[0])} is resolved "
                                  f"by the events but is not in this read model")
        amounts[resolves] = [found[pending_id] for pending_id in signed_ids]
        return amounts

    def _update_balances(self, money: np.ndarray, pending_amounts: np.ndarray) -> None:
        kinds = money["kind"]
        amount = money["amount"]
        posted = np.where((kinds == KIND_TRANSFER) | (kinds == KIND_POST), amount, 0)
        pending = np.where(kinds == KIND_PENDING, amount, 0) - pending_amounts
        zero = np.zeros(money.size, np.int64)
        accounts = np.concatenate([money["debit_account"], money["credit_account"]])
        # Columns: debits_posted, credits_posted, debits_pending, credits_pending; debit rows first, then credit.
        deltas = np.stack([np.concatenate([posted, zero]), np.concatenate([zero, posted]),
                           np.concatenate([pending, zero]), np.concatenate([zero, pending])], axis=1)
        unique, inverse = np.unique(accounts, return_inverse=True)
        sums = np.zeros((unique.size, 4), np.int64)
        np.add.at(sums, inverse, deltas)
        rows = zip(*(sums[:, column].tolist() for column in range(4)), _signed(unique))
        cursor = self.connection.executemany(UPDATE_BALANCE, rows)
        if cursor.rowcount != unique.size:
            raise ProjectionError(f"{self.database_path}: events at positions {int(money['position'][0])}.. move "
                                  f"money of accounts this read model does not have")

    # -- reading it back --

    def balances(self) -> np.ndarray:
        """The balances table as an array (ids as uint64), ordered by creation position."""
        rows = self.connection.execute(
            "SELECT id, ledger, debits_posted, credits_posted, debits_pending, credits_pending, flags, min_balance, "
            "max_balance, user_data, timestamp FROM balances ORDER BY position").fetchall()
        out = np.zeros(len(rows), BALANCES_DTYPE)
        if rows:
            columns = list(zip(*rows))
            for index, name in enumerate(BALANCES_DTYPE.names):
                values = np.array(columns[index], np.int64)
                out[name] = values.view(np.uint64) if name in ("id", "user_data") else values
        return out

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> SqliteProjection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


BALANCES_DTYPE = np.dtype([
    ("id", "<u8"), ("ledger", "<u4"), ("debits_posted", "<i8"), ("credits_posted", "<i8"),
    ("debits_pending", "<i8"), ("credits_pending", "<i8"), ("flags", "<u2"), ("min_balance", "<i8"),
    ("max_balance", "<i8"), ("user_data", "<u8"), ("timestamp", "<u8"),
])


@dataclasses.dataclass
class ProjectionReport:
    events: int              # projected by this run
    batches: int
    position: int            # next journal position to project
    seconds: float
    lag_events: int          # journal records written but not projected (events and their headers)
    lag_ms: float            # now - timestamp of the last projected event, while anything is left (else 0)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"projected {self.events:,} events in {self.batches:,} batches ({self.events_per_second:,.0f} "
                f"events/s); position {self.position:,}; lag {self.lag_events:,} events, {self.lag_ms:,.0f} ms")


def _report(tailer: Tailer, projection: SqliteProjection, events: int, started: float) -> ProjectionReport:
    lag_events = tailer.lag_records()
    lag_ms = max(0.0, (time.time_ns() - projection.last_timestamp) / 1e6) \
        if lag_events and projection.last_timestamp else 0.0
    return ProjectionReport(events, tailer.batches_read, projection.next_position, time.perf_counter() - started,
                            lag_events, lag_ms)


def _resume(directory: str | os.PathLike[str], projection: SqliteProjection, **options) -> Tailer:
    """A tailer from the read model's stored position, checked against the journal."""
    try:
        return Tailer(directory, projection.next_position, previous_checksum=projection.last_checksum, **options)
    except ValueError as error:
        if projection.next_position <= 1:
            raise   # a bad option, not a bad position
        # The stored position is past the journal's end or not a batch boundary of it: the read model is ahead
        # of this journal (another ledger, or a journal that lost its tail to a machine crash).
        raise ProjectionError(f"{projection.database_path} was projected up to position {projection.next_position}, "
                              f"which does not match the journal in {os.fspath(directory)}: {error}; rebuild the "
                              f"read model") from None


def project_sqlite(directory: str | os.PathLike[str], database_path: str | os.PathLike[str], *,
                   follow: bool = False, interval_ms: int = INTERVAL_MS_DEFAULT, idle_timeout_ms: int | None = None,
                   max_events: int = MAX_EVENTS_DEFAULT, stop: threading.Event | None = None,
                   progress: Callable[[ProjectionReport], object] | None = None,
                   progress_interval_ms: int = PROGRESS_INTERVAL_MS_DEFAULT) -> ProjectionReport:
    """Bring the SQLite read model at `database_path` up to date with the ledger in `directory`, resuming where
    it stopped. follow=False: up to the committed end; True: until `stop` is set or `idle_timeout_ms` passes
    without new events. `progress(report)` is called at most every `progress_interval_ms`, and at the end."""
    if not 0 <= progress_interval_ms <= PROGRESS_INTERVAL_MS_MAX:
        raise ValueError(f"progress_interval_ms must be in [0, {PROGRESS_INTERVAL_MS_MAX}], got {progress_interval_ms}")
    with SqliteProjection(database_path) as projection:
        tailer = _resume(directory, projection, follow=follow, interval_ms=interval_ms,
                         idle_timeout_ms=idle_timeout_ms, max_events=max_events, stop=stop)
        with tailer:
            started = time.perf_counter()
            reported = started
            projected = 0
            for events in tailer:
                projection.apply(events, tailer.position, tailer.checksum)
                projected += int(events.size)
                if progress is not None and (time.perf_counter() - reported) * 1000 >= progress_interval_ms:
                    progress(_report(tailer, projection, projected, started))
                    reported = time.perf_counter()
            report = _report(tailer, projection, projected, started)
    if progress is not None:
        progress(report)
    return report


# -- command line --

def add_arguments(command: argparse.ArgumentParser) -> None:
    """The arguments of `project` (its targets: `sqlite`), added to `command`: used by `ledger project` in
    ledger/cli.py and by `python -m ledger.project`."""
    targets = command.add_subparsers(dest="target", required=True)
    sqlite = targets.add_parser("sqlite", help="a SQLite read model: transfers, balances, position")
    sqlite.add_argument("dir", help="the ledger's data directory")
    sqlite.add_argument("database", metavar="OUT.db", help="the SQLite file (created on first use)")
    sqlite.add_argument("--follow", action="store_true", help="keep following new events until SIGINT/SIGTERM")
    sqlite.add_argument("--interval-ms", type=int, default=INTERVAL_MS_DEFAULT, metavar="N",
                        help=f"poll interval while there is nothing new (1..{INTERVAL_MS_MAX}, "
                             f"default {INTERVAL_MS_DEFAULT})")
    sqlite.add_argument("--idle-timeout-ms", type=int, default=None, metavar="N",
                        help="with --follow: stop after N ms without new events")
    sqlite.add_argument("--max-events", type=int, default=MAX_EVENTS_DEFAULT, metavar="N",
                        help=f"events per transaction (whole batches; 1..{MAX_EVENTS_LIMIT}, "
                             f"default {MAX_EVENTS_DEFAULT})")
    sqlite.add_argument("--progress-interval-ms", type=int, default=PROGRESS_INTERVAL_MS_DEFAULT, metavar="N",
                        help=f"at most one progress line per N ms (default {PROGRESS_INTERVAL_MS_DEFAULT})")
    sqlite.add_argument("--quiet", action="store_true", help="no progress lines, only errors")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ledger project", description=__doc__.split("\n\n")[0])
    add_arguments(root)
    return root


def _stop_on_signals() -> threading.Event:
    """SIGINT and SIGTERM end the run after the transaction in progress (not in the middle of it)."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda *_: stop.set())
    return stop


def run(arguments: argparse.Namespace) -> int:
    """Run a parsed `project` command line; returns the exit code (0 done, 2 usage, 3 journal or read model
    inconsistent or corrupt)."""
    if arguments.idle_timeout_ms is not None and not 0 <= arguments.idle_timeout_ms <= IDLE_TIMEOUT_MS_MAX:
        print(f"ledger project: --idle-timeout-ms must be in [0, {IDLE_TIMEOUT_MS_MAX}]", file=sys.stderr)
        return EXIT_USAGE

    def show(report: ProjectionReport) -> None:
        print(report.line(), flush=True)

    try:
        project_sqlite(arguments.dir, arguments.database, follow=arguments.follow,
                       interval_ms=arguments.interval_ms, idle_timeout_ms=arguments.idle_timeout_ms,
                       max_events=arguments.max_events, stop=_stop_on_signals() if arguments.follow else None,
                       progress=None if arguments.quiet else show,
                       progress_interval_ms=arguments.progress_interval_ms)
    except (LedgerCorruptError, ProjectionError, sqlite3.DatabaseError) as error:
        print(f"ledger project: {error}", file=sys.stderr)
        return EXIT_DATA
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"ledger project: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
