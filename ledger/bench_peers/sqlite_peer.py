"""SQLite (Python's sqlite3) in WAL mode with synchronous=FULL: every COMMIT syncs the WAL, so a committed
transfer survives a power loss. The overdraft check is the UPDATE's WHERE clause; the transfers table (primary
key = transfer id) is the durable record of every accepted transfer.

Three shapes: a transaction per transfer; a transaction per batch with three statements per transfer issued from
Python; and a transaction per batch handed to executemany as one INSERT per transfer, with triggers doing the
overdraft check and the two balance updates inside SQLite (no Python between the rows: SQLite's fastest shape
from Python)."""
from __future__ import annotations

import sqlite3
from pathlib import Path


from ledger.bench_peers.workload import PeerState, Workload, sql_state

SCHEMA = """
CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE transfers (id INTEGER PRIMARY KEY, debit_account INTEGER NOT NULL, credit_account INTEGER NOT NULL,
                        amount INTEGER NOT NULL);
"""
DEBIT = "UPDATE accounts SET balance = balance - ? WHERE id = ? AND balance >= ?"
CREDIT = "UPDATE accounts SET balance = balance + ? WHERE id = ?"
RECORD = "INSERT INTO transfers VALUES (?, ?, ?, ?)"
# RAISE(IGNORE) drops the row being inserted (and its AFTER trigger): a rejected transfer leaves no trace, as in the
# other shapes. OR IGNORE keeps a duplicate transfer id from applying twice (idempotency), as the other peers do.
TRIGGERS = """
CREATE TRIGGER overdraft BEFORE INSERT ON transfers
WHEN (SELECT balance FROM accounts WHERE id = NEW.debit_account) < NEW.amount
BEGIN
    SELECT RAISE(IGNORE);
END;
CREATE TRIGGER apply_transfer AFTER INSERT ON transfers
BEGIN
    UPDATE accounts SET balance = balance - NEW.amount WHERE id = NEW.debit_account;
    UPDATE accounts SET balance = balance + NEW.amount WHERE id = NEW.credit_account;
END;
"""
RECORD_WITH_TRIGGERS = "INSERT OR IGNORE INTO transfers VALUES (?, ?, ?, ?)"


class SqlitePeer:
    group = "sqlite"
    per_commit: bool

    def __init__(self, batch_size: int | None, triggers: bool = False) -> None:
        """batch_size None: one transaction (and one WAL sync) per transfer; else one per batch. triggers: the
        batch as one executemany, the transfer logic in triggers."""
        assert batch_size is None or batch_size >= 1
        assert not triggers or batch_size is not None
        self.batch_size = batch_size
        self.triggers = triggers
        self.per_commit = batch_size is None
        self.commit_unit = "transfer" if batch_size is None else "batch"
        self.durable = True  # synchronous=FULL: every COMMIT syncs the WAL
        # A per-transfer run still steps in small runs of commits, so the time limit can stop it.
        self.step_size = 256 if batch_size is None else batch_size
        unit = "transfer" if batch_size is None else f"batch of {batch_size:,}"
        shape = ", executemany + triggers" if triggers else ""
        self.label = f"SQLite {sqlite3.sqlite_version}, commit per {unit}{shape} (WAL, synchronous=FULL)"
        self.connection: sqlite3.Connection | None = None

    def open(self, workload: Workload, directory: Path) -> None:
        self.workload = workload
        # isolation_level=None: no implicit transactions; BEGIN/COMMIT below are the only ones.
        self.connection = sqlite3.connect(directory / "bench.sqlite", isolation_level=None)
        connection = self.connection
        assert connection.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA + (TRIGGERS if self.triggers else ""))
        balances = workload.opening_balances().tolist()
        ids = workload.all_account_ids().tolist()
        connection.execute("BEGIN")
        connection.executemany("INSERT INTO accounts VALUES (?, ?)", zip(ids, balances))
        connection.execute("COMMIT")

    def apply(self, start: int, stop: int) -> None:
        if self.per_commit:
            self._apply_each_committed(start, stop)
        elif self.triggers:
            self._apply_with_triggers(start, stop)
        else:
            self._apply_one_transaction(start, stop)

    def _apply_with_triggers(self, start: int, stop: int) -> None:
        execute = self.connection.execute
        execute("BEGIN IMMEDIATE")
        self.connection.executemany(RECORD_WITH_TRIGGERS, zip(*self.workload.columns(start, stop)))
        execute("COMMIT")

    def _apply_one_transaction(self, start: int, stop: int) -> None:
        execute = self.connection.execute
        execute("BEGIN IMMEDIATE")
        for id, debit, credit, amount in zip(*self.workload.columns(start, stop)):
            if execute(DEBIT, (amount, debit, amount)).rowcount == 1:
                execute(CREDIT, (amount, credit))
                execute(RECORD, (id, debit, credit, amount))
        execute("COMMIT")

    def _apply_each_committed(self, start: int, stop: int) -> None:
        execute = self.connection.execute
        for id, debit, credit, amount in zip(*self.workload.columns(start, stop)):
            execute("BEGIN IMMEDIATE")
            if execute(DEBIT, (amount, debit, amount)).rowcount == 1:
                execute(CREDIT, (amount, credit))
                execute(RECORD, (id, debit, credit, amount))
                execute("COMMIT")
            else:
                execute("ROLLBACK")  # nothing changed: no WAL write, no sync

    def state(self) -> PeerState:
        return sql_state(self.connection, self.workload)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
