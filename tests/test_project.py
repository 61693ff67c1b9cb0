"""ledger/project.py, the SQLite read model, in process: every public function (to_sqlite/from_sqlite,
SqliteProjection, project_sqlite, ProjectionReport, the command line). The projector as a separate process
following a live writer, killed and restarted, is in test_tail.py."""
from __future__ import annotations

import argparse
import sqlite3

import pytest

import ledger
from ledger.project import (BALANCES_DTYPE, EXIT_DATA, EXIT_OK, EXIT_USAGE, ProjectionError, ProjectionReport,
                            SqliteProjection, add_arguments, from_sqlite, main, parser, project_sqlite, run,
                            to_sqlite)

COUNTERS = ["debits_posted", "credits_posted", "debits_pending", "credits_pending"]
HIGH_USER_DATA = (1 << 63) + 5      # above 2**63: stored as a negative SQLite integer


def small_ledger(directory, clock, batches=3) -> None:
    """Accounts, plain transfers, pendings posted (fully and partly), voided and expired: every event kind."""
    with ledger.open(directory, create=True, clock=clock, segment_records_log2=12) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2, user_data=HIGH_USER_DATA)
        handle.create_account((1 << 64) - 2, ledger=1)
        add_batches(handle, clock, 0, batches)


def add_batches(handle, clock, first, count) -> None:
    pending = ledger.TransferFlags.PENDING
    for k in range(first, first + count):
        base = 100 * (k + 1)
        assert handle.transfer(base, 1, 2, 10 + k, user_data=HIGH_USER_DATA) == ledger.TransferResult.OK
        assert handle.transfer(base + 1, 1, (1 << 64) - 2, 7, flags=pending, timeout=3600) == 0
        assert handle.transfer(base + 2, 1, 2, 5, flags=pending, timeout=3600) == 0
        assert handle.transfer(base + 3, 1, 2, 9, flags=pending, timeout=1) == 0
        assert handle.transfer(base + 4, 0, 0, 3, flags=ledger.TransferFlags.POST_PENDING, pending_id=base + 1) == 0
        assert handle.transfer(base + 5, 0, 0, 0, flags=ledger.TransferFlags.VOID_PENDING, pending_id=base + 2) == 0
        clock.advance(2 * 10**9)                       # base + 3 expires in the next batch
        assert handle.transfer(base + 6, 2, 1, 1) == 0


def assert_balances_equal_the_ledger(directory, database) -> None:
    with ledger.open(directory, readonly=True) as handle:
        accounts = handle.accounts()
        position = handle.stats()["journal_position"]
    with SqliteProjection(database) as projection:
        balances = projection.balances()
        assert projection.next_position == position
    assert balances.dtype == BALANCES_DTYPE and balances.size == accounts.size
    for name in BALANCES_DTYPE.names:
        assert (balances[name] == accounts[name]).all(), name


@pytest.mark.parametrize("value, stored", [(0, 0), (1, 1), ((1 << 63) - 1, (1 << 63) - 1), (1 << 63, -(1 << 63)),
                                           ((1 << 64) - 1, -1)])
def test_uint64_values_round_trip_through_signed_sqlite_integers(value, stored):
    assert to_sqlite(value) == stored
    assert from_sqlite(stored) == value


def test_project_sqlite_equals_the_ledger_and_resumes_where_it_stopped(tmp_path, clock):
    directory, database = str(tmp_path / "data"), str(tmp_path / "read.db")
    small_ledger(directory, clock)
    first = project_sqlite(directory, database)
    assert first.events > 0 and first.batches > 0 and first.lag_events == 0
    assert_balances_equal_the_ledger(directory, database)
    assert project_sqlite(directory, database).events == 0           # nothing new: nothing projected twice
    with ledger.open(directory, clock=clock) as handle:
        add_batches(handle, clock, 3, 2)
    second = project_sqlite(directory, database)
    assert 0 < second.events and second.position > first.position
    assert_balances_equal_the_ledger(directory, database)
    with SqliteProjection(database) as projection:
        kinds = dict(projection.connection.execute("SELECT kind, count(*) FROM transfers GROUP BY kind"))
        assert projection.events == first.events + second.events
        stored = projection.connection.execute("SELECT user_data FROM balances WHERE id = ?", (to_sqlite(2),))
        assert from_sqlite(stored.fetchone()[0]) == HIGH_USER_DATA
    assert kinds == {"transfer": 10, "pending": 15, "post": 5, "void": 5, "expire": 5}


def test_progress_is_reported_and_its_interval_checked(tmp_path, clock):
    directory, database = str(tmp_path / "data"), str(tmp_path / "read.db")
    small_ledger(directory, clock)
    reports: list[ProjectionReport] = []
    final = project_sqlite(directory, database, progress=reports.append, progress_interval_ms=0, max_events=4)
    assert len(reports) >= 2 and reports[-1] is final          # at every transaction (interval 0), and the end
    assert [report.events for report in reports] == sorted(report.events for report in reports)
    for interval in (-1, 3_600_001):
        with pytest.raises(ValueError, match="progress_interval_ms"):
            project_sqlite(directory, database, progress_interval_ms=interval)


def test_report_line_and_rate():
    report = ProjectionReport(events=3000, batches=2, position=3005, seconds=1.5, lag_events=12, lag_ms=250.0)
    assert report.events_per_second == 2000
    assert report.line() == ("projected 3,000 events in 2 batches (2,000 events/s); position 3,005; lag 12 events, "
                             "250 ms")
    assert ProjectionReport(0, 0, 1, 0.0, 0, 0.0).events_per_second == 0.0


def test_a_database_it_did_not_create_is_refused(tmp_path):
    database = tmp_path / "other.db"
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE mine (x)")
    connection.commit()
    connection.close()
    with pytest.raises(ProjectionError, match="did not create"):
        SqliteProjection(database)


def test_another_schema_version_is_refused(tmp_path):
    database = tmp_path / "read.db"
    SqliteProjection(database).close()
    connection = sqlite3.connect(database)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(ProjectionError, match="schema version 99"):
        SqliteProjection(database)


def test_a_fresh_projection_starts_at_the_beginning_and_closes(tmp_path):
    with SqliteProjection(tmp_path / "read.db") as projection:
        assert projection.events == 0 and projection.balances().size == 0
        start = projection.next_position
    assert start <= 1
    with pytest.raises(sqlite3.ProgrammingError):
        projection.connection.execute("SELECT 1")                      # closed by the with block


def test_two_projectors_on_one_database_the_second_is_refused(tmp_path, clock):
    directory, database = str(tmp_path / "data"), str(tmp_path / "read.db")
    small_ledger(directory, clock, batches=1)
    first, second = SqliteProjection(database), SqliteProjection(database)
    try:
        with ledger.Tailer(directory, first.next_position, follow=False) as tailer:
            events = next(iter(tailer))
            position, checksum = tailer.position, tailer.checksum
        first.apply(events, position, checksum)
        with pytest.raises(ProjectionError, match="another projector advanced"):
            second.apply(events, position, checksum)
    finally:
        first.close()
        second.close()
    with SqliteProjection(database) as projection:        # the refused transaction left nothing behind
        assert projection.next_position == position and projection.events == events.size


def test_a_read_model_ahead_of_the_journal_is_refused(tmp_path, clock):
    longer, shorter, database = str(tmp_path / "longer"), str(tmp_path / "shorter"), str(tmp_path / "read.db")
    small_ledger(longer, clock, batches=3)
    small_ledger(shorter, clock, batches=1)
    project_sqlite(longer, database)
    with pytest.raises(ProjectionError, match="does not match the journal"):
        project_sqlite(shorter, database)


def test_the_command_line(tmp_path, clock, capsys):
    directory, database = str(tmp_path / "data"), str(tmp_path / "read.db")
    small_ledger(directory, clock, batches=1)
    assert main(["sqlite", directory, database, "--quiet"]) == EXIT_OK
    assert capsys.readouterr().out == ""
    assert main(["sqlite", directory, database]) == EXIT_OK           # up to date: one line, 0 events
    assert capsys.readouterr().out.startswith("projected 0 events")
    assert main(["sqlite", directory, database, "--follow", "--idle-timeout-ms", "-1"]) == EXIT_USAGE
    assert "--idle-timeout-ms" in capsys.readouterr().err
    assert main(["sqlite", str(tmp_path / "missing"), str(tmp_path / "other.db")]) == EXIT_USAGE
    capsys.readouterr()
    small_ledger(str(tmp_path / "another"), clock, batches=0)
    assert main(["sqlite", str(tmp_path / "another"), database]) == EXIT_DATA   # projected from another journal
    assert "ledger project:" in capsys.readouterr().err


def test_the_parser_and_its_arguments():
    assert parser().prog == "ledger project"
    command = argparse.ArgumentParser()
    add_arguments(command)
    parsed = command.parse_args(["sqlite", "DIR", "OUT.db", "--follow", "--max-events", "7"])
    assert (parsed.target, parsed.dir, parsed.database, parsed.follow, parsed.max_events) == \
        ("sqlite", "DIR", "OUT.db", True, 7)
    assert parsed.idle_timeout_ms is None and not parsed.quiet
    with pytest.raises(SystemExit):
        command.parse_args(["postgres", "DIR", "OUT.db"])
    assert run(parser().parse_args(["sqlite", "DIR", "OUT.db", "--idle-timeout-ms", "-5"])) == EXIT_USAGE


def test_events_of_unknown_accounts_are_refused(tmp_path, clock):
    """Events that move money of an account the read model lacks (here: its row deleted by hand) are refused, and
    the transaction leaves the stored position where it was."""
    directory, database = str(tmp_path / "data"), str(tmp_path / "read.db")
    small_ledger(directory, clock, batches=1)
    with SqliteProjection(database) as projection:
        with ledger.Tailer(directory, projection.next_position, follow=False, max_events=1) as tailer:
            for _ in range(3):                                   # the three account batches
                projection.apply(next(tailer), tailer.position, tailer.checksum)
            events = next(tailer)
        assert set(events["kind"].tolist()) == {2}
        projection.connection.execute("DELETE FROM balances WHERE id = 2")
        before = projection.next_position
        with pytest.raises(ProjectionError, match="accounts this read model does not have"):
            projection.apply(events, tailer.position, tailer.checksum)
        assert projection.connection.execute("SELECT next_position FROM position").fetchone()[0] == before
