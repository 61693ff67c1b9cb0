"""PostgreSQL through psycopg 3 over TCP on 127.0.0.1, a plpgsql transfer function, synchronous_commit on.

Per transfer: one `SELECT transfer(...)` in autocommit mode, so each transfer is a transaction whose commit waits
for the WAL flush. Per batch: one `SELECT transfer_batch(...)` with the batch as four arrays, one round trip and
one transaction (one WAL flush) per batch: the fastest shape a client can give PostgreSQL, transfers still applied
one by one in order inside the function. Each row gets a fresh database on the same server."""
from __future__ import annotations

import itertools
from pathlib import Path


from ledger.bench_peers.servers import LOOPBACK, POSTGRES_USER
from ledger.bench_peers.workload import PeerState, Workload, sql_state

SCHEMA = """
CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE transfers (id bigint PRIMARY KEY, debit_account bigint NOT NULL, credit_account bigint NOT NULL,
                        amount bigint NOT NULL);

-- The overdraft check is the UPDATE's WHERE clause; the row lock it takes serialises concurrent debits.
CREATE FUNCTION transfer(transfer_id bigint, debit bigint, credit bigint, transfer_amount bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET balance = balance - transfer_amount WHERE id = debit AND balance >= transfer_amount;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE accounts SET balance = balance + transfer_amount WHERE id = credit;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credit account % not found', credit;
    END IF;
    INSERT INTO transfers VALUES (transfer_id, debit, credit, transfer_amount);
    RETURN true;
END $$;

-- The same steps inlined (a plpgsql call per row costs as much as the row), the rows read with unnest (a
-- subscript of an array parameter detoasts the whole array each time: quadratic), results written in place
-- (accepted[i] := ... edits the array; accepted := accepted || x would copy it every row).
CREATE FUNCTION transfer_batch(ids bigint[], debits bigint[], credits bigint[], amounts bigint[])
RETURNS boolean[] LANGUAGE plpgsql AS $$
DECLARE
    accepted boolean[] := array_fill(false, ARRAY[coalesce(array_length(ids, 1), 0)]);
    item record;
BEGIN
    FOR item IN SELECT * FROM unnest(ids, debits, credits, amounts) WITH ORDINALITY
                AS batch(id, debit, credit, amount, row_index) LOOP
        UPDATE accounts SET balance = balance - item.amount WHERE id = item.debit AND balance >= item.amount;
        IF FOUND THEN
            UPDATE accounts SET balance = balance + item.amount WHERE id = item.credit;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'credit account % not found', item.credit;
            END IF;
            INSERT INTO transfers VALUES (item.id, item.debit, item.credit, item.amount);
            accepted[item.row_index] := true;
        END IF;
    END LOOP;
    RETURN accepted;
END $$;
"""
_database_numbers = itertools.count(1)


class PostgresPeer:
    group = "postgres"

    def __init__(self, port: int, version: str, batch_size: int | None) -> None:
        assert batch_size is None or batch_size >= 1
        self.port = port
        self.batch_size = batch_size
        self.per_commit = batch_size is None
        self.commit_unit = "transfer" if batch_size is None else "batch"
        self.durable = True  # synchronous_commit=on
        self.step_size = 64 if batch_size is None else batch_size
        unit = "transfer" if batch_size is None else f"batch of {batch_size:,} (plpgsql)"
        self.label = f"PostgreSQL {version}, commit per {unit}, synchronous_commit=on"
        self.connection = None

    def _connect(self, database: str):
        import psycopg  # imported here: the suite checks it is installed before building this peer
        return psycopg.connect(host=LOOPBACK, port=self.port, user=POSTGRES_USER, dbname=database, autocommit=True)

    def open(self, workload: Workload, directory: Path) -> None:
        self.workload = workload
        database = f"bench_{next(_database_numbers)}"
        with self._connect("postgres") as administration:
            administration.execute(f"CREATE DATABASE {database}")
        self.connection = self._connect(database)
        self.connection.execute(SCHEMA)
        with self.connection.cursor() as cursor:
            with cursor.copy("COPY accounts (id, balance) FROM STDIN") as copy:
                for row in zip(workload.all_account_ids().tolist(), workload.opening_balances().tolist()):
                    copy.write_row(row)
            cursor.execute("VACUUM ANALYZE accounts")

    def apply(self, start: int, stop: int) -> None:
        columns = self.workload.columns(start, stop)
        with self.connection.cursor() as cursor:
            if self.per_commit:
                for row in zip(*columns):
                    cursor.execute("SELECT transfer(%s, %s, %s, %s)", row, prepare=True)
                    cursor.fetchone()
            else:
                cursor.execute("SELECT transfer_batch(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])",
                               columns, prepare=True)
                accepted = cursor.fetchone()[0]
                assert len(accepted) == stop - start

    def state(self) -> PeerState:
        return sql_state(self.connection, self.workload)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
