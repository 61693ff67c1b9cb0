"""The `ledger` command line: `python -m ledger demo | verify DIR | stats DIR | balance DIR ID [--at X] |
history DIR ID | explain DIR ID`. A moment X is a journal position (`12345`), an ISO-8601 time
(`2024-05-01T12:00:00.123456789Z`; without an offset it is UTC) or nanoseconds since the epoch
(`1714564800000000000ns`).

Also: init, account create, transfer, snapshot, restore, serve, project, bench.

Exit codes: 0 success, 1 verification failed, 2 usage or input error (also a transfer or account that was not
applied), 3 the data directory is locked, corrupt or unavailable."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import ledger
from ledger.progress import Progress

# By name from the module: `ledger.history` the attribute may be the package's export rather than the module.
from ledger.history import At, account_at, row_to_dict, rows_to_text
from ledger.history import explain as explain_account
from ledger.history import history as account_history

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_DATA = 3


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "inf/s"


def demo(arguments: argparse.Namespace) -> int:
    """Create a durable ledger, fund accounts, move money in batches and one by one, use two-phase transfers,
    then verify by replay, reopen (recovery) and print the figures."""
    accounts = arguments.accounts
    transfers = arguments.transfers
    batch_size = arguments.batch_size
    directory = arguments.dir or tempfile.mkdtemp(prefix="ledger-demo-")
    print(f"ledger demo: {accounts:,} accounts, {transfers:,} transfers in batches of {batch_size:,}, "
          f"durability=fsync, data in {directory}")
    ids = ledger.IdGenerator()
    rng = np.random.default_rng(2026)
    settlement = 1
    first = 1_000
    with ledger.open(directory, create=True, durability="fsync", accounts_capacity=accounts + 1,
                     transfers_capacity=accounts + transfers + 10_000) as handle:
        started = time.perf_counter()
        assert handle.create_account(settlement, min_balance=ledger.BALANCE_MIN) == ledger.AccountResult.OK
        batch = ledger.accounts_batch(accounts)
        batch["id"] = np.arange(first, first + accounts, dtype=np.uint64)
        assert not handle.create_accounts(batch).any()
        funding = ledger.transfers_batch(accounts)
        funding["id"] = ids.batch(accounts)
        funding["debit_account"] = settlement
        funding["credit_account"] = batch["id"]
        funding["amount"] = 1_000_000
        assert not handle.transfers(funding).any()
        print(f"  created and funded {accounts:,} accounts in {time.perf_counter() - started:.2f} s")

        codes = np.zeros(len(ledger.TransferResult), np.int64)
        applied = 0
        durable_seconds = 0.0
        progress = Progress(transfers, "  transfers", "transfers")
        for start in range(0, transfers, batch_size):
            count = min(batch_size, transfers - start)
            rows = ledger.transfers_batch(count)
            rows["id"] = ids.batch(count)
            rows["debit_account"] = first + rng.integers(0, accounts, count)
            rows["credit_account"] = first + rng.integers(0, accounts, count)
            rows["amount"] = rng.integers(1, 200_000, count)
            began = time.perf_counter()
            results = handle.transfers(rows)
            durable_seconds += time.perf_counter() - began
            codes += np.bincount(results, minlength=codes.size)
            applied += count
            progress.update(applied)
        progress.close()
        outcome = ", ".join(f"{ledger.TransferResult(code).name}={int(n):,}" for code, n in enumerate(codes) if n)
        print(f"  {applied:,} transfers, durable (fdatasync per batch): {_rate(applied, durable_seconds)}  [{outcome}]")

        single = min(20_000, max(1, transfers // 50))
        debit = (first + rng.integers(0, accounts, single)).tolist()
        credit = (first + rng.integers(0, accounts, single)).tolist()
        began = time.perf_counter()
        for index in range(single):
            handle.transfer(ids(), debit[index], credit[index], 1)
        seconds = time.perf_counter() - began
        print(f"  {single:,} single transfer() calls, each durable: {_rate(single, seconds)}")

        pending_id = ids()
        a, b = first, first + 1
        before = handle.balance(b)
        handle.transfer(pending_id, a, b, 500, flags=ledger.TransferFlags.PENDING, timeout=60)
        held = handle.available(a)
        result = handle.transfer(ids(), 0, 0, 300, flags=ledger.TransferFlags.POST_PENDING, pending_id=pending_id)
        print(f"  two-phase: reserved 500 (available of {a} now {held:,}), posted 300 -> {result.name}, "
              f"balance of {b} {before:,} -> {handle.balance(b):,}")

        report = handle.verify()
        print(f"  {report}")
        explanation = handle.explain(b)
        print(f"  explain account {b}: {len(explanation.rows)} events, opening {explanation.opening_balance:,} -> "
              f"closing {explanation.closing_balance:,}, adds up: {explanation.ok}")
        info = handle.snapshot()
        print(f"  snapshot at journal position {info.position:,}: {info.bytes / 2**20:,.1f} MiB, writer held "
              f"{info.stall_seconds * 1000:.1f} ms (fork), written and fsynced in {info.write_seconds:.2f} s")
        tail = ledger.transfers_batch(1000)
        tail["id"] = ids.batch(1000)
        tail["debit_account"] = first + rng.integers(0, accounts, 1000)
        tail["credit_account"] = first + rng.integers(0, accounts, 1000)
        tail["amount"] = 1
        handle.transfers(tail)
        stats = handle.stats()
        memory = sum(value for key, value in stats.items() if key.startswith("memory_"))
        print(f"  state memory: {memory / 2**20:,.0f} MiB for {stats['accounts']:,} accounts and "
              f"{stats['transfers']:,} remembered transfers; journal position {stats['journal_position']:,}")
        expected = handle.accounts()
        ok = report.ok and explanation.ok
    began = time.perf_counter()
    with ledger.open(directory) as reopened:
        seconds = time.perf_counter() - began
        source = reopened.recovered_from
        print(f"  reopened in {seconds:.2f} s from the snapshot at {source.position:,} plus the journal tail "
              f"to {reopened.stats()['journal_position']:,}; settlement balance {reopened.balance(settlement):,}")
        same = all((reopened.accounts()[name] == expected[name]).all()
                   for name in ("debits_posted", "credits_posted", "debits_pending", "credits_pending"))
        print(f"  recovered state equals the state before closing: {same}")
        ok = ok and same and reopened.verify().ok
    print("demo OK" if ok else "demo FAILED")
    return EXIT_OK if ok else EXIT_VERIFY_FAILED


def verify(arguments: argparse.Namespace) -> int:
    with ledger.open(arguments.dir, readonly=True) as handle:
        report = handle.verify()
    if arguments.json:
        print(json.dumps({"ok": report.ok, "batches": report.batches, "events": report.events,
                          "accounts": report.accounts, "transfers": report.transfers, "seconds": report.seconds,
                          "problems": report.problems}))
    else:
        print(report)
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED


def stats(arguments: argparse.Namespace) -> int:
    with ledger.open(arguments.dir, readonly=True) as handle:
        figures = handle.stats()
    if arguments.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key}: {value:,}")
    return EXIT_OK


def balance(arguments: argparse.Namespace) -> int:
    if arguments.at is not None:
        return balance_at(arguments)
    with ledger.open(arguments.dir, readonly=True) as handle:
        account = handle.account(arguments.id)
    if account is None:
        print(f"ledger: account {arguments.id} not found", file=sys.stderr)
        return EXIT_USAGE
    if arguments.json:
        print(json.dumps({**account._asdict(), "balance": account.balance, "available": account.available}))
    else:
        print(f"account {account.id}: balance {account.balance:,}, available {account.available:,} "
              f"(debits {account.debits_posted:,} + pending {account.debits_pending:,}, "
              f"credits {account.credits_posted:,} + pending {account.credits_pending:,})")
    return EXIT_OK


def _moment(text: str | None) -> At | None:
    """Moments are parsed in the handlers, not by argparse, so a bad one is a one-line error like any other."""
    return None if text is None else At.parse(text)


def _account_error(error: KeyError) -> int:
    """A missing account (or one that did not exist yet at the moment asked) is an input error: one line."""
    print(f"ledger: {error.args[0] if error.args else error}", file=sys.stderr)
    return EXIT_USAGE


def balance_at(arguments: argparse.Namespace) -> int:
    """`balance DIR ID --at X`: the account's counters after every event at or before X."""
    at = _moment(arguments.at)
    with ledger.open(arguments.dir, readonly=True) as handle:
        try:
            account = account_at(handle, arguments.id, at)
        except KeyError as error:
            return _account_error(error)
    if arguments.json:
        print(json.dumps({**account._asdict(), "balance": account.balance, "available": account.available,
                          "at": str(at)}))
    else:
        print(f"account {account.id} at {at}: balance {account.balance:,}, available "
              f"{account.available:,} (debits {account.debits_posted:,} + pending {account.debits_pending:,}, "
              f"credits {account.credits_posted:,} + pending {account.credits_pending:,})")
    return EXIT_OK


def history(arguments: argparse.Namespace) -> int:
    """`history DIR ID`: the account's events, oldest first, with running balances."""
    if arguments.limit is not None and arguments.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {arguments.limit}")
    since, until = _moment(arguments.since), _moment(arguments.until)
    with ledger.open(arguments.dir, readonly=True) as handle:
        try:
            rows = account_history(handle, arguments.id, since=since, until=until, limit=arguments.limit)
        except KeyError as error:
            return _account_error(error)
    if arguments.json:
        print(json.dumps([row_to_dict(row) for row in rows]))
    else:
        print(rows_to_text(rows))
    return EXIT_OK


def explain(arguments: argparse.Namespace) -> int:
    """`explain DIR ID`: opening balance, the events, closing balance, and whether it all adds up (exit 1 if not)."""
    since, until = _moment(arguments.since), _moment(arguments.until)
    with ledger.open(arguments.dir, readonly=True) as handle:
        try:
            explanation = explain_account(handle, arguments.id, since=since, until=until)
        except KeyError as error:
            return _account_error(error)
    print(json.dumps(explanation.to_dict()) if arguments.json else explanation.to_text())
    return EXIT_OK if explanation.ok else EXIT_VERIFY_FAILED


def bench(arguments: argparse.Namespace) -> int:
    from ledger.bench_command import main as bench_main  # the peer comparison (bench/peers); see its --help
    return bench_main(arguments.options)


def _print(arguments: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload) if getattr(arguments, "json", False) else text)


def init(arguments: argparse.Namespace) -> int:
    if os.path.isdir(os.path.join(arguments.dir, "journal")):
        print(f"ledger: {arguments.dir} already holds a ledger", file=sys.stderr)
        return EXIT_USAGE
    with ledger.open(arguments.dir, create=True, segment_records_log2=arguments.segment_records_log2):
        pass
    _print(arguments, {"created": arguments.dir}, f"created an empty ledger in {arguments.dir}")
    return EXIT_OK


def account_create(arguments: argparse.Namespace) -> int:
    with ledger.open(arguments.dir) as handle:
        result = handle.create_account(arguments.id, arguments.ledger, min_balance=arguments.min_balance,
                                       max_balance=arguments.max_balance, user_data=arguments.user_data)
    _print(arguments, {"result": result.name, "code": int(result)}, result.name)
    return EXIT_OK if result in (ledger.AccountResult.OK, ledger.AccountResult.EXISTS) else EXIT_USAGE


def transfer(arguments: argparse.Namespace) -> int:
    flags = 0
    for name in arguments.flag or []:
        flags |= ledger.TransferFlags[name.upper()]
    with ledger.open(arguments.dir) as handle:
        result = handle.transfer(arguments.id, arguments.debit, arguments.credit, arguments.amount,
                                 ledger=arguments.ledger, code=arguments.code, flags=flags,
                                 pending_id=arguments.pending_id, timeout=arguments.timeout,
                                 user_data=arguments.user_data)
    _print(arguments, {"result": result.name, "code": int(result)}, result.name)
    return EXIT_OK if result in (ledger.TransferResult.OK, ledger.TransferResult.EXISTS) else EXIT_USAGE


def snapshot(arguments: argparse.Namespace) -> int:
    with ledger.open(arguments.dir) as handle:
        info = handle.snapshot(keep=arguments.keep)
    _print(arguments, {"path": info.path, "position": info.position, "bytes": info.bytes,
                       "stall_seconds": info.stall_seconds, "write_seconds": info.write_seconds},
           f"snapshot at journal position {info.position:,}: {info.path} ({info.bytes / 2**20:,.1f} MiB, "
           f"writer held {info.stall_seconds * 1000:.1f} ms, written in {info.write_seconds:.2f} s)")
    return EXIT_OK


def restore_command(arguments: argparse.Namespace) -> int:
    from ledger.restore import parse_time, print_progress, restore
    until_time = parse_time(arguments.until_time) if arguments.until_time else None
    result = restore(arguments.source, arguments.destination, until_position=arguments.until,
                     until_time=until_time, progress=print_progress)
    _print(arguments, {"destination": result.destination, "cut_position": result.cut_position,
                       "last_timestamp": result.last_timestamp, "snapshot": result.snapshot,
                       "verified": result.verified},
           f"restored {result.destination} up to journal position {result.cut_position:,} "
           f"(from {'snapshot ' + result.snapshot if result.snapshot else 'genesis'}); "
           f"verify {'OK' if result.verified else 'FAILED'}")
    return EXIT_OK if result.verified else EXIT_VERIFY_FAILED


def serve_command(arguments: argparse.Namespace) -> int:
    from ledger.ring import serve
    return serve(arguments.dir, durability=arguments.durability, slot_count=arguments.slots, group=arguments.group,
                 abandon_after_ms=arguments.abandon_after_ms, spin_count=arguments.spin_count,
                 idle_wait_ms=arguments.idle_wait_ms, snapshot_every_s=arguments.snapshot_every_s or None,
                 accounts_capacity=arguments.accounts_capacity, transfers_capacity=arguments.transfers_capacity,
                 ready=lambda: print(f"ledger: serving {arguments.dir} (durability={arguments.durability}); "
                                     f"Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ledger", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="run the demo workload and print figures")
    run.add_argument("--dir", help="data directory (default: a new temporary directory)")
    run.add_argument("--accounts", type=int, default=100_000)
    run.add_argument("--transfers", type=int, default=1_000_000)
    run.add_argument("--batch-size", type=int, default=8_192)
    run.set_defaults(handler=demo)
    for name, handler, text in (("verify", verify, "replay the journal and check every balance"),
                                ("stats", stats, "counts, sizes and positions")):
        command = commands.add_parser(name, help=text)
        command.add_argument("dir")
        command.add_argument("--json", action="store_true")
        command.set_defaults(handler=handler)
    command = commands.add_parser("bench", help="compare against SQLite, PostgreSQL, Redis and plain Python",
                                  add_help=False)
    command.add_argument("options", nargs=argparse.REMAINDER)
    command.set_defaults(handler=bench)
    command = commands.add_parser("balance", help="one account's balance, now or at a past moment")
    command.add_argument("dir")
    command.add_argument("id", type=int)
    command.add_argument("--at", metavar="X",
                         help="as of a journal position or a time (ISO-8601, or nanoseconds as 123ns)")
    command.add_argument("--json", action="store_true")
    command.set_defaults(handler=balance)
    for name, handler, text in (("history", history, "an account's events with running balances"),
                                ("explain", explain, "opening balance, events, closing balance, checked to add up")):
        command = commands.add_parser(name, help=text)
        command.add_argument("dir")
        command.add_argument("id", type=int)
        command.add_argument("--since", metavar="X", help="from this position or time (inclusive)")
        command.add_argument("--until", metavar="X", help="through this position or time (inclusive)")
        if name == "history":
            command.add_argument("--limit", type=int, metavar="N", help="only the newest N events of the range")
        command.add_argument("--json", action="store_true")
        command.set_defaults(handler=handler)
    command = commands.add_parser("init", help="create an empty ledger directory")
    command.add_argument("dir")
    command.add_argument("--segment-records-log2", type=int, default=20)
    command.add_argument("--json", action="store_true")
    command.set_defaults(handler=init)
    account = commands.add_parser("account", help="account commands").add_subparsers(dest="action", required=True)
    command = account.add_parser("create", help="create one account")
    command.add_argument("dir")
    command.add_argument("id", type=int)
    command.add_argument("--ledger", type=int, default=1)
    command.add_argument("--min-balance", type=int, default=0)
    command.add_argument("--max-balance", type=int, default=ledger.BALANCE_MAX)
    command.add_argument("--user-data", type=int, default=0)
    command.add_argument("--json", action="store_true")
    command.set_defaults(handler=account_create)
    command = commands.add_parser("transfer", help="one transfer")
    command.add_argument("dir")
    for name in ("id", "debit", "credit", "amount"):
        command.add_argument(name, type=int)
    command.add_argument("--ledger", type=int, default=1)
    command.add_argument("--code", type=int, default=0)
    command.add_argument("--flag", action="append", choices=["linked", "pending", "post_pending", "void_pending"])
    command.add_argument("--pending-id", type=int, default=0)
    command.add_argument("--timeout", type=int, default=0, help="seconds (pending transfers)")
    command.add_argument("--user-data", type=int, default=0)
    command.add_argument("--json", action="store_true")
    command.set_defaults(handler=transfer)
    command = commands.add_parser("snapshot", help="write a snapshot of the whole state")
    command.add_argument("dir")
    command.add_argument("--keep", type=int, default=3)
    command.add_argument("--json", action="store_true")
    command.set_defaults(handler=snapshot)
    command = commands.add_parser("restore", help="point-in-time restore into a new directory")
    command.add_argument("source", help="a data directory or one of its snapshot files")
    command.add_argument("destination")
    group = command.add_mutually_exclusive_group()
    group.add_argument("--until", type=int, metavar="SEQ", help="last journal position to include")
    group.add_argument("--until-time", metavar="ISO8601", help="last moment to include")
    command.add_argument("--json", action="store_true")
    command.set_defaults(handler=restore_command)
    command = commands.add_parser("serve", help="run the writer for other processes (ledger.connect)")
    command.add_argument("dir")
    command.add_argument("--durability", choices=["fsync", "os"], default="fsync")
    command.add_argument("--slots", type=int, default=1 << 16)
    command.add_argument("--group", type=int, help="gid allowed to submit commands (files become 0660)")
    command.add_argument("--accounts-capacity", type=int, default=0, help="room to allocate up front")
    command.add_argument("--transfers-capacity", type=int, default=0, help="room to allocate up front")
    from ledger import ring as ring_module
    command.add_argument("--abandon-after-ms", type=int, default=ring_module.ABANDON_AFTER_MS_DEFAULT,
                         help="give up a claimed batch left unpublished this long (its producer died or hangs)")
    command.add_argument("--spin-count", type=int, default=ring_module.SPIN_COUNT_DEFAULT,
                         help=f"pause instructions spun for new work before sleeping (0..{ring_module.SPIN_COUNT_MAX})")
    command.add_argument("--idle-wait-ms", type=int, default=ring_module.IDLE_WAIT_MS_DEFAULT,
                         help=f"longest idle sleep (1..{ring_module.IDLE_WAIT_MS_MAX}); a publish wakes it at once")
    command.add_argument("--snapshot-every-s", type=float, default=ring_module.SNAPSHOT_EVERY_S_DEFAULT,
                         help="snapshot this often when the journal moved, so a restart replays little (0: never)")
    command.set_defaults(handler=serve_command)
    from ledger import project as project_module
    command = commands.add_parser("project", help="keep a read model (SQLite) up to date from the journal")
    project_module.add_arguments(command)
    command.set_defaults(handler=project_module.run)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # argparse's REMAINDER drops options that start with "--"; bench and project parse their own arguments.
        from ledger.bench_command import main as bench_main
        return bench_main(argv[1:])
    arguments = parser().parse_args(argv)
    try:
        return arguments.handler(arguments)
    except ledger.LedgerError as error:
        print(f"ledger: {error}", file=sys.stderr)
        return EXIT_DATA
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"ledger: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
