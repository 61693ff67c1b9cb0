"""The `ledger` command line: `python -m ledger demo | verify DIR | stats DIR | balance DIR ID`.

Exit codes: 0 success, 1 verification failed, 2 usage or input error, 3 the data directory is locked or corrupt."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import ledger

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
        outcome = ", ".join(f"{ledger.TransferResult(code).name}={int(n):,}" for code, n in enumerate(codes) if n)
        print(f"  {applied:,} transfers, durable (fdatasync per batch): {_rate(applied, durable_seconds)}  [{outcome}]")

        single = min(20_000, transfers)
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
        stats = handle.stats()
        memory = sum(value for key, value in stats.items() if key.startswith("memory_"))
        print(f"  state memory: {memory / 2**20:,.0f} MiB for {stats['accounts']:,} accounts and "
              f"{stats['transfers']:,} remembered transfers; journal position {stats['journal_position']:,}")
        print("  snapshot: not built yet (snapshots arrive with issue 5); recovery replays the journal:")
        ok = report.ok
    began = time.perf_counter()
    with ledger.open(directory) as reopened:
        seconds = time.perf_counter() - began
        print(f"  reopened in {seconds:.2f} s (replayed {reopened.stats()['journal_position']:,} journal records); "
              f"settlement balance {reopened.balance(settlement):,}")
        ok = ok and reopened.verify().ok
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


def bench(arguments: argparse.Namespace) -> int:
    from ledger.bench_command import main as bench_main  # the peer comparison (bench/peers); see its --help
    return bench_main(arguments.options)


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
    command = commands.add_parser("balance", help="one account's balance")
    command.add_argument("dir")
    command.add_argument("id", type=int)
    command.add_argument("--json", action="store_true")
    command.set_defaults(handler=balance)
    return root


def main(argv: list[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    try:
        return arguments.handler(arguments)
    except (ledger.LedgerLockedError, ledger.LedgerCorruptError) as error:
        print(f"ledger: {error}", file=sys.stderr)
        return EXIT_DATA
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"ledger: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
