"""The `ledger` command line: `python -m ledger demo | verify DIR | stats DIR | balance DIR ID [--at X] |
history DIR ID | explain DIR ID [--vs OTHER_ID]`. A moment X is a journal position (`12345`; a bare number too
large for a position is an error, not a guess), an ISO-8601 time (`2024-05-01T12:00:00.123456789Z`; without an
offset it is UTC) or nanoseconds since the epoch with the suffix ns (`1714564800000000000ns`). `--at` past the
journal's end (or in the future) is an error.

Also: init, account create, transfer, snapshot, restore, serve (the ring server; with --cluster URL --shard NAME a
node of a shard answering over NATS), project, bench, scrub DIR (re-check every
journal batch's checksum and hash chain; exit 3 when one is damaged), cluster nats DIR (a local NATS JetStream
cluster in the foreground: prints its client URL, stops on SIGTERM or Ctrl-C), cluster status URL (each shard's
primary, nodes, positions and lag; exit 3 when no server answers), cluster shards URL [--set MAP] (the shard map:
account id ranges -> shard; a change that would move existing accounts is refused, exit 1).

Exit codes: 0 success, 1 verification failed, 2 usage or input error (a bad argument, a path that does not exist or
already exists, a transfer or account that was not applied), 3 the data directory is locked, corrupt or
unavailable (also: permission denied, an I/O error, disk full), 4 an unexpected internal error (a bug;
LEDGER_TRACEBACK=1 shows its traceback), 130 interrupted (Ctrl-C), 141 stdout's reader went away (`| head`:
quietly, as a tool SIGPIPE ends). Every error is one line on stderr."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import TYPE_CHECKING, Callable

import numpy as np

import ledger
from ledger.format import POSITION_MAX
from ledger.moments import At
from ledger.progress import Progress
from ledger.snapshot import SnapshotInfo

# By name from the module: `ledger.history` the attribute may be the package's export rather than the module.
from ledger.history import account_at, row_to_dict, rows_to_text
from ledger.history import explain as explain_account
from ledger.history import explain_difference
from ledger.history import history as account_history

if TYPE_CHECKING:
    from ledger.cluster.servers import LocalCluster

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout's reader went away (`| head`)

UINT16_MAX = 2**16 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ACCOUNT_ID_MAX = 2**64 - 2          # 0 and 2**64 - 1 are never account ids
SNAPSHOTS_KEPT_MAX = 1000           # Ledger.snapshot(keep=) accepts 1 .. 1000
# A path the user typed that is missing, or in the way: an input error (2); any other OSError is the data directory
# being unavailable (3).
PATH_INPUT_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class UsageError(Exception):
    """A command line that does not parse: reported as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse prints the usage block and exits from inside parse_args; raise instead, so that main() reports
    every error the same way (one line) and tests can call main() in-process."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see: {self.prog} --help)")


def integer_in(kind: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a base-10 integer in [low, high] (`kind` names the range in messages). Checked here so
    that a value the engine cannot hold (an id of 2**64, an amount past int64) is a one-line usage error, not an
    OverflowError from deep inside."""
    assert low <= high

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside the {kind} range [{low}, {high}]")
        return value

    parse.__name__ = kind
    return parse


ACCOUNT_ID = integer_in("account id", 1, ACCOUNT_ID_MAX)
UINT16 = integer_in("uint16", 0, UINT16_MAX)
UINT32 = integer_in("uint32", 0, UINT32_MAX)
UINT64 = integer_in("uint64", 0, UINT64_MAX)
INT64 = integer_in("int64", INT64_MIN, INT64_MAX)


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "inf/s"


def check_new_ledger_directory(path: str) -> None:
    """`init` and `demo --dir` make a new ledger: in a directory that does not exist yet, whose parent does (a typo
    in the parent is not created), or in an empty one. A ledger, or anything else, already there is refused: the
    demo would write its workload into the user's append-only journal, and init would claim a stranger's files."""
    if os.path.isdir(os.path.join(path, "journal")):
        raise UsageError(f"{path} already holds a ledger")
    if os.path.isdir(path):
        if os.listdir(path):
            raise UsageError(f"{path} is not empty: a new ledger goes into a new or an empty directory")
        return
    if os.path.lexists(path):
        raise UsageError(f"{path} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent} does not exist: create it first (only the ledger's own directory is created)")


def demo(arguments: argparse.Namespace) -> int:
    """Create a durable ledger, fund accounts, move money in batches and one by one, use two-phase transfers,
    then verify by replay, reopen (recovery) and print the figures. Without --dir the data goes into a new
    temporary directory, named at the start and removed at the end unless --keep is given (or the demo failed:
    then it is kept to look at); a --dir is always kept."""
    if arguments.dir is not None:
        check_new_ledger_directory(arguments.dir)
        return _demo(arguments, arguments.dir)
    directory = tempfile.mkdtemp(prefix="ledger-demo-")
    code = EXIT_INTERNAL
    try:
        code = _demo(arguments, directory)
    finally:
        if arguments.keep or code != EXIT_OK:
            print(f"  kept {directory} (delete it when done)")
        else:
            shutil.rmtree(directory)
            print(f"  removed {directory}")
    return code


DEMO_SETTLEMENT = 1          # the account that funds the others (its min_balance lets it go negative)
DEMO_FIRST_ACCOUNT = 1_000   # the funded accounts are DEMO_FIRST_ACCOUNT, DEMO_FIRST_ACCOUNT + 1, ...
DEMO_SEED = 2026             # the same workload on every run
DEMO_TAIL_TRANSFERS = 1_000  # applied while the snapshot's child writes


def _demo(arguments: argparse.Namespace, directory: str) -> int:
    """The demo's steps, in order, each printing its figures; the exit code says whether every check held."""
    accounts, transfers, batch_size = arguments.accounts, arguments.transfers, arguments.batch_size
    print(f"ledger demo: {accounts:,} accounts, {transfers:,} transfers in batches of {batch_size:,}, "
          f"durability=fsync, data in {directory}", flush=True)
    ids = ledger.IdGenerator()
    rng = np.random.default_rng(DEMO_SEED)
    # Room for everything the demo writes, allocated at open, as a service that knows its size would do.
    with ledger.open(directory, create=True, durability="fsync", accounts_capacity=accounts + 1,
                     transfers_capacity=accounts + transfers + 30_000,
                     journal_records_reserved=2 * accounts + transfers + 30_000 + 2 * (transfers // batch_size + 1000),
                     ) as handle:
        _demo_create_and_fund(handle, ids, accounts)
        _demo_batches(handle, ids, rng, accounts, transfers, batch_size)
        _demo_single_transfers(handle, ids, rng, accounts, transfers)
        _demo_two_phase(handle, ids)
        ok = _demo_verify_and_explain(handle)
        _demo_snapshot_while_writing(handle, ids, rng, accounts)
        _demo_print_memory(handle)
        expected = handle.accounts()
    ok = _demo_reopen(directory, expected, ok)
    print("demo OK" if ok else "demo FAILED")
    return EXIT_OK if ok else EXIT_VERIFY_FAILED


def _demo_random_accounts(rng: np.random.Generator, accounts: int, count: int) -> np.ndarray:
    """`count` ids drawn from the demo's funded accounts."""
    return DEMO_FIRST_ACCOUNT + rng.integers(0, accounts, count)


def _demo_create_and_fund(handle: ledger.Ledger, ids: ledger.IdGenerator, accounts: int) -> None:
    started = time.perf_counter()
    assert handle.create_account(DEMO_SETTLEMENT, min_balance=ledger.BALANCE_MIN) == ledger.AccountResult.OK
    batch = ledger.accounts_batch(accounts)
    batch["id"] = np.arange(DEMO_FIRST_ACCOUNT, DEMO_FIRST_ACCOUNT + accounts, dtype=np.uint64)
    assert not handle.create_accounts(batch).any()
    funding = ledger.transfers_batch(accounts)
    funding["id"] = ids.batch(accounts)
    funding["debit_account"] = DEMO_SETTLEMENT
    funding["credit_account"] = batch["id"]
    funding["amount"] = 1_000_000
    assert not handle.transfers(funding).any()
    print(f"  created and funded {accounts:,} accounts in {time.perf_counter() - started:.2f} s")


def _demo_batches(handle: ledger.Ledger, ids: ledger.IdGenerator, rng: np.random.Generator, accounts: int,
                  transfers: int, batch_size: int) -> None:
    """Random transfers in durable batches (one fdatasync each), with a progress bar and the result codes."""
    codes = np.zeros(len(ledger.TransferResult), np.int64)
    applied = 0
    durable_seconds = 0.0
    progress = Progress(transfers, "  transfers", "transfers")
    for start in range(0, transfers, batch_size):
        count = min(batch_size, transfers - start)
        rows = ledger.transfers_batch(count)
        rows["id"] = ids.batch(count)
        rows["debit_account"] = _demo_random_accounts(rng, accounts, count)
        rows["credit_account"] = _demo_random_accounts(rng, accounts, count)
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


def _demo_single_transfers(handle: ledger.Ledger, ids: ledger.IdGenerator, rng: np.random.Generator,
                           accounts: int, transfers: int) -> None:
    single = min(20_000, max(1, transfers // 50))
    debit = _demo_random_accounts(rng, accounts, single).tolist()
    credit = _demo_random_accounts(rng, accounts, single).tolist()
    began = time.perf_counter()
    for index in range(single):
        handle.transfer(ids(), debit[index], credit[index], 1)
    seconds = time.perf_counter() - began
    print(f"  {single:,} single transfer() calls, each durable: {_rate(single, seconds)}")


def _demo_two_phase(handle: ledger.Ledger, ids: ledger.IdGenerator) -> None:
    pending_id = ids()
    a, b = DEMO_FIRST_ACCOUNT, DEMO_FIRST_ACCOUNT + 1
    before = handle.balance(b)
    handle.transfer(pending_id, a, b, 500, flags=ledger.TransferFlags.PENDING, timeout=60)
    held = handle.available(a)
    result = handle.transfer(ids(), 0, 0, 300, flags=ledger.TransferFlags.POST_PENDING, pending_id=pending_id)
    print(f"  two-phase: reserved 500 (available of {a} now {held:,}), posted 300 -> {result.name}, "
          f"balance of {b} {before:,} -> {handle.balance(b):,}")


def _demo_verify_and_explain(handle: ledger.Ledger) -> bool:
    """Verify by replay and explain the two-phase transfer's credit account: True if both add up."""
    report = handle.verify()
    print(f"  {report}")
    b = DEMO_FIRST_ACCOUNT + 1
    explanation = handle.explain(b)
    print(f"  explain account {b}: {len(explanation.rows)} events, opening {explanation.opening_balance:,} -> "
          f"closing {explanation.closing_balance:,}, adds up: {explanation.ok}")
    return report.ok and explanation.ok


def _demo_snapshot_while_writing(handle: ledger.Ledger, ids: ledger.IdGenerator, rng: np.random.Generator,
                                 accounts: int) -> None:
    job = handle.snapshot(wait=False)  # the writer goes on while a forked child writes the file
    tail = ledger.transfers_batch(DEMO_TAIL_TRANSFERS)
    tail["id"] = ids.batch(DEMO_TAIL_TRANSFERS)
    tail["debit_account"] = _demo_random_accounts(rng, accounts, DEMO_TAIL_TRANSFERS)
    tail["credit_account"] = _demo_random_accounts(rng, accounts, DEMO_TAIL_TRANSFERS)
    tail["amount"] = 1
    handle.transfers(tail)
    info = job.wait()
    print(f"  snapshot at journal position {info.position:,}: {info.bytes / 2**20:,.1f} MiB written and fsynced "
          f"by a forked child in {info.write_seconds:.2f} s; the writer was held {info.stall_seconds * 1000:.1f} "
          f"ms (the fork) and applied {DEMO_TAIL_TRANSFERS:,} more transfers meanwhile")


def _demo_print_memory(handle: ledger.Ledger) -> None:
    stats = handle.stats()
    memory = sum(value for key, value in stats.items() if key.startswith("memory_"))
    print(f"  state memory: {memory / 2**20:,.0f} MiB for {stats['accounts']:,} accounts and "
          f"{stats['transfers']:,} remembered transfers; journal position {stats['journal_position']:,}")


def _demo_reopen(directory: str, expected: np.ndarray, ok: bool) -> bool:
    """Reopen (recovery from the snapshot plus the journal tail) and compare with the state before closing:
    `ok` and the recovered state is the same and verifies (the verify is skipped once a check has failed)."""
    began = time.perf_counter()
    with ledger.open(directory) as reopened:
        seconds = time.perf_counter() - began
        source = reopened.recovered_from
        print(f"  reopened in {seconds:.2f} s from the snapshot at {source.position:,} plus the journal tail "
              f"to {reopened.stats()['journal_position']:,}; settlement balance {reopened.balance(DEMO_SETTLEMENT):,}")
        same = all((reopened.accounts()[name] == expected[name]).all()
                   for name in ("debits_posted", "credits_posted", "debits_pending", "credits_pending"))
        print(f"  recovered state equals the state before closing: {same}")
        return ok and same and reopened.verify().ok


def verify(arguments: argparse.Namespace) -> int:
    with ledger.open(arguments.dir, readonly=True) as handle:
        report = handle.verify()
    if arguments.json:
        print(json.dumps({"ok": report.ok, "batches": report.batches, "events": report.events,
                          "accounts": report.accounts, "transfers": report.transfers, "seconds": report.seconds,
                          "snapshots": report.snapshots, "problems": report.problems}))
    else:
        print(report)
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED


def scrub_command(arguments: argparse.Namespace) -> int:
    """`scrub DIR`: re-check every committed batch (read-only: safe beside a live writer). One line per damaged
    batch naming its file, byte offset and journal position; exit 3 if any, 0 if none. Damage in the journal
    after the newest snapshot already stops the open: reported the same way, as the one damaged batch."""
    try:
        with ledger.open(arguments.dir, readonly=True) as handle:
            report = handle.scrub()
    except ledger.LedgerCorruptError as error:
        if arguments.json:
            print(json.dumps({"ok": False, "damaged": [{"error": _one_line(error)}]}))
        else:
            print(f"damaged: {_one_line(error)}")
        return EXIT_DATA
    if arguments.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report)
    return EXIT_OK if report.ok else EXIT_DATA


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
    """`explain DIR ID`: opening balance, the events, closing balance, and whether it all adds up (exit 1 if not).
    With `--vs OTHER_ID`: why the two balances differ (history.explain_difference)."""
    if arguments.vs is not None:
        return explain_versus(arguments)
    if arguments.vs_until is not None:
        raise UsageError("--vs-until needs --vs OTHER_ID")
    since, until = _moment(arguments.since), _moment(arguments.until)
    with ledger.open(arguments.dir, readonly=True) as handle:
        try:
            explanation = explain_account(handle, arguments.id, since=since, until=until)
        except KeyError as error:
            return _account_error(error)
    print(json.dumps(explanation.to_dict()) if arguments.json else explanation.to_text())
    return EXIT_OK if explanation.ok else EXIT_VERIFY_FAILED


def explain_versus(arguments: argparse.Namespace) -> int:
    """`explain DIR ID --vs OTHER_ID [--until X] [--vs-until Y]`: account ID at X against account OTHER_ID at Y
    (default: the same moment; both default to now), each explained by its events from its creation; the
    difference is balance(ID) - balance(OTHER_ID). Exit 1 if either explanation does not add up."""
    if arguments.since is not None:
        raise UsageError("--since does not combine with --vs: each account is explained from its creation")
    until = _moment(arguments.until)
    other_until = until if arguments.vs_until is None else _moment(arguments.vs_until)
    with ledger.open(arguments.dir, readonly=True) as handle:
        try:
            difference = explain_difference(handle, arguments.id, arguments.vs, at_a=until, at_b=other_until)
        except KeyError as error:
            return _account_error(error)
    print(json.dumps(difference.to_dict()) if arguments.json else difference.to_text())
    return EXIT_OK if difference.ok else EXIT_VERIFY_FAILED


def bench(arguments: argparse.Namespace) -> int:
    from ledger.bench_command import main as bench_main  # the peer comparison (ledger/bench_peers); see its --help
    return bench_main(arguments.options)


def _print(arguments: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload) if getattr(arguments, "json", False) else text)


def init(arguments: argparse.Namespace) -> int:
    check_new_ledger_directory(arguments.dir)
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


SNAPSHOT_PROGRESS_POLL_S = 0.05  # how often the bar looks at the child's file (the bar redraws every 0.1 s)


def _snapshot_with_progress(handle: ledger.Ledger, keep: int) -> SnapshotInfo:
    """On a terminal, a bar of the bytes the forked child has written (a snapshot of 10M accounts is 1.5 GB:
    seconds to minutes of disk time); elsewhere simply the snapshot."""
    if not sys.stderr.isatty():
        return handle.snapshot(keep=keep)
    job = handle.snapshot(keep=keep, wait=False)
    progress = Progress(job.bytes_total, "snapshot", "bytes")
    while not job.done():
        progress.update(job.bytes_written())
        time.sleep(SNAPSHOT_PROGRESS_POLL_S)
    try:
        info = job.wait()
    except BaseException:
        print(file=sys.stderr)  # the error's line after the bar's, not on it
        raise
    progress.close()
    return info


def snapshot(arguments: argparse.Namespace) -> int:
    with ledger.open(arguments.dir) as handle:
        info = _snapshot_with_progress(handle, arguments.keep)
    _print(arguments, {"path": info.path, "position": info.position, "bytes": info.bytes,
                       "stall_seconds": info.stall_seconds, "write_seconds": info.write_seconds},
           f"snapshot at journal position {info.position:,}: {info.path} ({info.bytes / 2**20:,.1f} MiB, "
           f"written and fsynced in {info.write_seconds:.2f} s by a forked child; the writer itself was held "
           f"{info.stall_seconds * 1000:.1f} ms for the fork)")
    return EXIT_OK


def restore_command(arguments: argparse.Namespace) -> int:
    from ledger.restore import parse_time, print_progress, restore
    until_time = parse_time(arguments.until_time) if arguments.until_time is not None else None
    result = restore(arguments.source, arguments.destination, until_position=arguments.until,
                     until_time=until_time, progress=print_progress, journal=arguments.journal)
    _print(arguments, {"destination": result.destination, "cut_position": result.cut_position,
                       "last_timestamp": result.last_timestamp, "snapshot": result.snapshot,
                       "verified": result.verified},
           f"restored {result.destination} up to journal position {result.cut_position:,} "
           f"(from {'snapshot ' + result.snapshot if result.snapshot else 'genesis'}); "
           f"verify {'OK' if result.verified else 'FAILED'}")
    return EXIT_OK if result.verified else EXIT_VERIFY_FAILED


def group_id(text: str) -> int:
    """An argparse type for `serve --group`: a group name or gid that exists here (root could chown the ring to
    any number, which would share it with nobody, or with whoever gets that gid later)."""
    import grp
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        pass
    try:
        gid = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None
    try:
        grp.getgrgid(gid)
    except (KeyError, OverflowError):
        raise argparse.ArgumentTypeError(f"no group {gid} on this machine") from None
    return gid


RING_ONLY_OPTIONS = ("slots", "group", "abandon_after_ms", "spin_count", "idle_wait_ms", "overlap_rows_min")


def serve_command(arguments: argparse.Namespace) -> int:
    """`serve DIR`: the ring server (ledger.ring.serve) for processes of this machine; with `--cluster URL --shard
    NAME`: one node of a shard, answering over NATS (ledger.cluster.serving)."""
    if not os.path.isdir(os.path.join(arguments.dir, "journal")):
        if not arguments.create:
            # A typo must not start serving a new, empty ledger that clients then write into.
            raise UsageError(f"no ledger here: {arguments.dir} (ledger init DIR makes one, or serve --create)")
        check_new_ledger_directory(arguments.dir)
    if arguments.cluster is not None or arguments.shard is not None or arguments.node is not None:
        return serve_cluster_command(arguments)
    if arguments.durability == "replicated":
        raise UsageError("--durability replicated needs --cluster URL --shard NAME (a ledger of this machine alone "
                         "is fsync or os)")
    from ledger import ring as ring_module
    from ledger.ring import serve
    durability = arguments.durability or "fsync"
    return serve(arguments.dir, create=arguments.create, durability=durability,
                 slot_count=_or(arguments.slots, 1 << 16), group=arguments.group,
                 abandon_after_ms=_or(arguments.abandon_after_ms, ring_module.ABANDON_AFTER_MS_DEFAULT),
                 spin_count=_or(arguments.spin_count, ring_module.SPIN_COUNT_DEFAULT),
                 idle_wait_ms=_or(arguments.idle_wait_ms, ring_module.IDLE_WAIT_MS_DEFAULT),
                 snapshot_every_s=arguments.snapshot_every_s or None,
                 overlap_rows_min=_or(arguments.overlap_rows_min, ring_module.OVERLAP_ROWS_MIN_DEFAULT),
                 accounts_capacity=arguments.accounts_capacity, transfers_capacity=arguments.transfers_capacity,
                 ready=lambda: print(f"ledger: serving {arguments.dir} (durability={durability}); "
                                     f"Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True))


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def serve_cluster_command(arguments: argparse.Namespace) -> int:
    """`serve DIR --cluster URL --shard NAME [--node NAME]`: run the node in the foreground, one stderr line per
    role change, until SIGTERM or SIGHUP (exit 0) or Ctrl-C (130); then stop answering, close the node and
    release its lease, so a standby takes over at once."""
    from ledger.cluster import connection, serving
    from ledger.cluster.names import check_name, check_shard
    if arguments.cluster is None or arguments.shard is None:
        raise UsageError("a node of a shard needs both --cluster URL and --shard NAME")
    if arguments.durability == "os":
        raise UsageError("--durability os does not combine with --cluster: a node's durability is replicated (a "
                         "batch is answered once the stream's replicas and this node's fsynced journal hold it)")
    given = [f"--{name.replace('_', '-')}" for name in RING_ONLY_OPTIONS if getattr(arguments, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: options of the ring server, which serve --cluster does not run "
                         f"(its requests come over NATS)")
    if arguments.snapshot_every_s < 0:
        raise UsageError(f"--snapshot-every-s must be 0 (never) or more, got {arguments.snapshot_every_s}")
    check_shard(arguments.shard)
    if arguments.node is not None:
        check_name("node", arguments.node)
    options = connection.options_from_arguments(arguments)
    connection.connect_arguments(arguments.cluster, options)   # a bad URL or option: usage, before any connection
    create = not os.path.isdir(os.path.join(arguments.dir, "journal"))
    # The node's own warnings (a step-down and why, batches dropped, NATS lost) as one stderr line each, as ours.
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="ledger: %(name)s: %(message)s")
    with StopSignals() as stop:
        serving.serve_shard(arguments.dir, arguments.cluster, arguments.shard, arguments.node, stop.event,
                            create=create, options=options, announce=_announce_line,
                            snapshot_every_s=arguments.snapshot_every_s or None,
                            open_options={"accounts_capacity": arguments.accounts_capacity,
                                          "transfers_capacity": arguments.transfers_capacity})
    if stop.number == signal.SIGINT:
        print("ledger: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _announce_line(line: str) -> None:
    print(f"ledger: {line}", file=sys.stderr, flush=True)


CLUSTER_POLL_S = 0.2  # how often `cluster nats` looks whether its servers still run (and for a stop signal)


def check_cluster_directory(path: str) -> str:
    """`cluster nats DIR`: DIR is created if missing (its parent must exist), must be a directory this user can
    write, and must not hold a ledger (the servers' stores go into a directory of their own)."""
    if os.path.isdir(os.path.join(path, "journal")):
        raise UsageError(f"{path} holds a ledger: give the NATS servers a directory of their own")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{path} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise UsageError(f"{parent} is not a directory")
    if not os.path.isdir(parent):
        raise UsageError(f"{parent} does not exist: create it first (only the cluster's own directory is created)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".writable-"):
            pass
    except OSError as error:
        raise UsageError(f"{path} is not writable: {error.strerror or error}") from None
    return path


class StopSignals:
    """While entered: SIGTERM, SIGHUP and SIGINT only set `event` (and `number`, the first one received), so that a
    signal never lands between starting a server and recording its process; the handlers before are restored
    on leaving. Main thread only (Python runs signal handlers there)."""

    NUMBERS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.number: int | None = None
        self._previous: dict[int, object] = {}

    def _received(self, number: int, frame: object) -> None:
        if self.number is None:
            self.number = number
        self.event.set()

    def __enter__(self) -> StopSignals:
        self._previous = {number: signal.signal(number, self._received) for number in self.NUMBERS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]


def cluster_nats_command(arguments: argparse.Namespace) -> int:
    """`cluster nats DIR [--nodes N] [--port BASE]`: start a local JetStream cluster (ledger.cluster.servers), print
    its client URL on stdout and a line per server on stderr, and run until SIGTERM (exit 0) or Ctrl-C (130);
    the servers are stopped either way. Exit 3 when a server does not start, or when every one has exited."""
    from ledger.cluster import servers
    servers.check_cluster_arguments(arguments.nodes, arguments.port)
    directory = check_cluster_directory(arguments.dir)
    cluster = servers.LocalCluster(directory, nodes=arguments.nodes, port=arguments.port)
    with StopSignals() as stop:
        try:
            cluster.open()
            if not stop.event.is_set():
                _announce_cluster(cluster)
                if not _run_until_stopped(cluster, stop.event):
                    raise servers.ClusterError("every nats-server has exited; see the server.log files in "
                                               f"{cluster.directory}")
        finally:
            cluster.close()
    if stop.number == signal.SIGINT:
        print("ledger: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("ledger: stopped the NATS servers", file=sys.stderr)
    return EXIT_OK


def cluster_status_command(arguments: argparse.Namespace) -> int:
    """`cluster status URL [--shard NAME] [--json]`: each shard's primary, nodes and lag (ledger.cluster.status);
    exit 3 (one line) when no server answers."""
    from ledger.cluster import connection, status
    report = status.read_status(arguments.url, connection.options_from_arguments(arguments), arguments.shard)
    print(json.dumps(report.to_dict(), indent=2) if arguments.json else status.status_text(report))
    return EXIT_OK


def cluster_shards_command(arguments: argparse.Namespace) -> int:
    """`cluster shards URL [--json] [--set MAP [--expect-version N]]`: print the shard map, or set it
    (ledger.cluster.shards); exit 1 with the reason when a change is refused (accounts would move, an owner did
    not answer, the map changed meanwhile), 2 for a map that does not parse."""
    from ledger.cluster import connection, shards
    options = connection.options_from_arguments(arguments)
    if arguments.set is None:
        if arguments.expect_version is not None:
            raise UsageError("--expect-version goes with --set")
        current = shards.read_shard_map(arguments.url, options)
        print(json.dumps(current.as_json(), indent=2) if arguments.json else "\n".join(shards.map_lines(current)))
        return EXIT_OK
    new = shards.parse(arguments.set)   # ValueError naming the entry: a usage error, before any connection
    try:
        stored, changed = shards.set_shard_map(arguments.url, new, options, arguments.expect_version)
    except shards.ShardMapError as error:
        print(f"ledger: {_one_line(error)}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    if arguments.json:
        print(json.dumps({**stored.as_json(), "changed": changed}, indent=2))
    else:
        print(f"shard map {'set' if changed else 'unchanged'}: version {stored.version}: {stored.text()}")
    return EXIT_OK


def _announce_cluster(cluster: LocalCluster) -> None:
    print(cluster.url, flush=True)
    for spec in cluster.servers:
        print(f"ledger: nats-server {spec.name} (pid {cluster.pid(spec.index)}): clients {spec.client_url}, "
              f"routes {spec.route_url}, monitoring {spec.monitor_url}, files {spec.directory}", file=sys.stderr)
    print(f"ledger: JetStream ready on {cluster.nodes} server(s), file storage synced at every write; Ctrl-C or "
          f"SIGTERM stops", file=sys.stderr, flush=True)


def _run_until_stopped(cluster: LocalCluster, stop: threading.Event) -> bool:
    """Wait for a stop signal, saying on stderr when a server exits on its own (killed from outside: the others go
    on). False when none is left."""
    exited: set[int] = set()
    while not stop.wait(CLUSTER_POLL_S):
        for spec in cluster.servers:
            if spec.index not in exited and not cluster.running(spec.index):
                exited.add(spec.index)
                print(f"ledger: nats-server {spec.name} exited ({spec.log_path}); the others go on", file=sys.stderr,
                      flush=True)
        if len(exited) == cluster.nodes:
            return False
    return True


DIR_HELP = "the ledger's data directory"
JSON_HELP = "print the answer as JSON"
MOMENT_HELP = ("X: a journal position (0 .. stats' journal_position), an ISO-8601 time (UTC without an offset), or "
               "nanoseconds since the epoch with the suffix ns (1714564800000000000ns)")


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand each, added in the order `ledger --help` lists them."""
    root = Parser(prog="ledger", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--version", action="version", version=f"ledger {ledger.__version__}",
                      help="print the version and exit")
    commands = root.add_subparsers(dest="command", required=True)
    _demo_arguments(commands.add_parser("demo", help="run the demo workload and print figures"))
    for name, handler, text in (("verify", verify, "replay the journal and check every balance"),
                                ("stats", stats, "counts, sizes and positions"),
                                ("scrub", scrub_command, "re-check every journal batch's checksum and chain")):
        command = commands.add_parser(name, help=text)
        command.add_argument("dir", help=DIR_HELP)
        command.add_argument("--json", action="store_true", help=JSON_HELP)
        command.set_defaults(handler=handler)
    command = commands.add_parser("bench", help="compare against SQLite, PostgreSQL, Redis and plain Python",
                                  add_help=False)
    command.add_argument("options", nargs=argparse.REMAINDER, help="see: ledger bench --help")
    command.set_defaults(handler=bench)
    _balance_arguments(commands.add_parser("balance", help="one account's balance, now or at a past moment"))
    _history_arguments(commands.add_parser("history", help="an account's events with running balances"))
    _explain_arguments(commands.add_parser(
        "explain", help="opening balance, events, closing balance, checked to add up"))
    _init_arguments(commands.add_parser("init", help="create an empty ledger directory"))
    account = commands.add_parser("account", help="account commands").add_subparsers(dest="action", required=True)
    _account_create_arguments(account.add_parser("create", help="create one account"))
    _transfer_arguments(commands.add_parser("transfer", help="one transfer"))
    _snapshot_arguments(commands.add_parser("snapshot", help="write a snapshot of the whole state"))
    _restore_arguments(commands.add_parser("restore", help="point-in-time restore into a new directory"))
    _serve_arguments(commands.add_parser("serve", help="run the writer for other processes (ledger.connect)"))
    from ledger import project as project_module
    command = commands.add_parser("project", help="keep a read model (SQLite) up to date from the journal")
    project_module.add_arguments(command)
    command.set_defaults(handler=project_module.run)
    _cluster_arguments(commands.add_parser("cluster", help="replication on NATS JetStream: a local cluster"))
    return root


def _demo_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--dir", help="a new (or empty) data directory, kept afterwards (default: a new temporary "
                                       "directory, removed at the end)")
    command.add_argument("--keep", action="store_true",
                         help="keep the temporary data directory (its path is printed)")
    command.add_argument("--accounts", type=integer_in("accounts", 2, 10**9), default=100_000,
                         help="accounts to create and fund (default 100,000)")
    command.add_argument("--transfers", type=integer_in("transfers", 1, 10**12), default=1_000_000,
                         help="transfers to move in batches (default 1,000,000)")
    command.add_argument("--batch-size", type=integer_in("batch size", 1, ledger.BATCH_SIZE_MAX), default=8_192,
                         help="transfers per durable batch (default 8,192)")
    command.set_defaults(handler=demo)


def _balance_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("dir", help=DIR_HELP)
    command.add_argument("id", type=ACCOUNT_ID, help="the account id")
    command.add_argument("--at", metavar="X", help=f"as of {MOMENT_HELP}; not past the journal's end")
    command.add_argument("--json", action="store_true", help=JSON_HELP)
    command.set_defaults(handler=balance)


def _account_window_arguments(command: argparse.ArgumentParser) -> None:
    """What `history` and `explain` share: the directory, the account and the window [--since, --until]."""
    command.add_argument("dir", help=DIR_HELP)
    command.add_argument("id", type=ACCOUNT_ID, help="the account id")
    command.add_argument("--since", metavar="X", help=f"from {MOMENT_HELP} (inclusive)")
    command.add_argument("--until", metavar="X", help=f"through {MOMENT_HELP} (inclusive)")


def _history_arguments(command: argparse.ArgumentParser) -> None:
    _account_window_arguments(command)
    command.add_argument("--limit", type=integer_in("limit", 0, POSITION_MAX), metavar="N",
                         help="only the newest N events of the range")
    command.add_argument("--json", action="store_true", help=JSON_HELP)
    command.set_defaults(handler=history)


def _explain_arguments(command: argparse.ArgumentParser) -> None:
    _account_window_arguments(command)
    command.add_argument("--vs", type=ACCOUNT_ID, metavar="OTHER_ID",
                         help="why this account's balance (at --until) differs from OTHER_ID's")
    command.add_argument("--vs-until", metavar="Y", help="OTHER_ID's moment (default: the same as --until)")
    command.add_argument("--json", action="store_true", help=JSON_HELP)
    command.set_defaults(handler=explain)


def _init_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("dir", help="a new directory (its parent must exist) or an empty one")
    command.add_argument("--segment-records-log2", type=integer_in("segment records log2", 10, 24), default=20,
                         help="journal segment files of 2**N records of 64 bytes (10..24, default 20: 64 MiB)")
    command.add_argument("--json", action="store_true", help=JSON_HELP)
    command.set_defaults(handler=init)


def _account_create_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("dir", help=DIR_HELP)
    command.add_argument("id", type=UINT64, help="the new account's id (1 .. 2**64 - 2)")
    command.add_argument("--ledger", type=UINT32, default=1, help="asset or currency (default 1)")
    command.add_argument("--min-balance", type=INT64, default=0,
                         help="lowest available balance (default 0: no overdraft)")
    command.add_argument("--max-balance", type=INT64, default=ledger.BALANCE_MAX,
                         help="highest balance, pending credits included (default: no cap)")
    command.add_argument("--user-data", type=UINT64, default=0, help="a number of yours (default 0)")
    command.add_argument("--json", action="store_true", help=JSON_HELP)
    command.set_defaults(handler=account_create)


def _transfer_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("dir", help=DIR_HELP)
    # Ranges of the fields (TRANSFER_DTYPE); values in range that break a rule get a result code, as in the API.
    for name, text in (("id", "the transfer id: the idempotency key (a retry with it answers EXISTS)"),
                       ("debit", "the account money leaves (0 to post or void a pending transfer)"),
                       ("credit", "the account money enters (0 to post or void a pending transfer)")):
        command.add_argument(name, type=UINT64, help=text)
    command.add_argument("amount", type=INT64, help="how much (> 0; posting a pending transfer: 0 = all of it)")
    command.add_argument("--ledger", type=UINT32, default=1, help="asset or currency of both accounts (default 1)")
    command.add_argument("--code", type=UINT16, default=0, help="a number of yours, e.g. the reason (default 0)")
    command.add_argument("--flag", action="append", choices=["linked", "pending", "post_pending", "void_pending"],
                         help="a transfer flag (repeat for several)")
    command.add_argument("--pending-id", type=UINT64, default=0,
                         help="the pending transfer to post or void")
    command.add_argument("--timeout", type=UINT32, default=0, help="seconds (pending transfers)")
    command.add_argument("--user-data", type=UINT64, default=0, help="a number of yours (default 0)")
    command.add_argument("--json", action="store_true", help=JSON_HELP)
    command.set_defaults(handler=transfer)


def _snapshot_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("dir", help=DIR_HELP)
    command.add_argument("--keep", type=integer_in("keep", 1, SNAPSHOTS_KEPT_MAX), default=3,
                         help=f"keep the newest N snapshot files (1..{SNAPSHOTS_KEPT_MAX}, default 3)")
    command.add_argument("--json", action="store_true", help=JSON_HELP)
    command.set_defaults(handler=snapshot)


def _restore_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", help="a data directory, or a snapshot file to start from")
    command.add_argument("destination", help="the new data directory (must not exist)")
    group = command.add_mutually_exclusive_group()
    group.add_argument("--until", type=integer_in("journal position", 0, POSITION_MAX), metavar="SEQ",
                       help="last journal position to include")
    group.add_argument("--until-time", metavar="ISO8601",
                       help="last moment to include (up to 9 fractional digits; no offset means UTC; or 123ns)")
    command.add_argument("--journal", metavar="DIR",
                         help="the data directory whose journal to use (default: the snapshot's own)")
    command.add_argument("--json", action="store_true", help=JSON_HELP)
    command.set_defaults(handler=restore_command)


def _serve_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("dir", help="the data directory (an existing ledger, unless --create)")
    command.add_argument("--create", action="store_true",
                         help="make a new ledger if DIR holds none (a new directory or an empty one)")
    command.add_argument("--durability", choices=["fsync", "os", "replicated"],
                         help="fsync: answered means on disk (default); os: in the page cache, synced within ms; "
                              "with --cluster always replicated: on the stream's replicas and fsynced here")
    from ledger import ring as ring_module
    # The ring server's own options default to None here, so that --cluster can refuse them when given.
    command.add_argument("--slots", type=int, help="ring slots, a power of two (default 65,536; docs/RING.md)")
    command.add_argument("--group", type=group_id, metavar="GROUP",
                         help="a group (name or gid) allowed to submit commands (the ring files become 0660)")
    command.add_argument("--accounts-capacity", type=int, default=0, help="room to allocate up front")
    command.add_argument("--transfers-capacity", type=int, default=0, help="room to allocate up front")
    command.add_argument("--abandon-after-ms", type=int,
                         help=f"give up a claimed batch left unpublished this long (its producer died or hangs; "
                              f"default {ring_module.ABANDON_AFTER_MS_DEFAULT})")
    command.add_argument("--spin-count", type=int,
                         help=f"pause instructions spun for new work before sleeping (0..{ring_module.SPIN_COUNT_MAX}, "
                              f"default {ring_module.SPIN_COUNT_DEFAULT})")
    command.add_argument("--idle-wait-ms", type=int,
                         help=f"longest idle sleep (1..{ring_module.IDLE_WAIT_MS_MAX}, default "
                              f"{ring_module.IDLE_WAIT_MS_DEFAULT}); a publish wakes it at once")
    command.add_argument("--snapshot-every-s", type=float, default=ring_module.SNAPSHOT_EVERY_S_DEFAULT,
                         help="snapshot this often when the journal moved, so a restart replays little (0: never)")
    command.add_argument("--overlap-rows-min", type=int,
                         help=f"a drained group this large is synced while the next is applied "
                              f"(1..{ring_module.GROUP_ROWS_MAX + 1}; the maximum: never; default "
                              f"{ring_module.OVERLAP_ROWS_MIN_DEFAULT})")
    cluster = command.add_argument_group("a node of a shard (docs/CLUSTER.md, \"Serving a shard\"): requests over "
                                         "NATS instead of the ring")
    cluster.add_argument("--cluster", metavar="URL",
                         help="the NATS servers (nats://host:port, several separated by commas)")
    cluster.add_argument("--shard", help="the shard this node serves (1 to 64 of A-Z a-z 0-9 _ -)")
    cluster.add_argument("--node", help="this node's name (default: the host name and a digest of DIR)")
    from ledger.cluster import connection
    connection.add_arguments(command)
    command.set_defaults(handler=serve_command)


def _cluster_arguments(command: argparse.ArgumentParser) -> None:
    from ledger.cluster import servers
    actions = command.add_subparsers(dest="action", required=True)
    nats = actions.add_parser("nats", help="run a local NATS JetStream cluster in the foreground (tests, the demo)",
                              description=servers.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    nats.add_argument("dir", help="the servers' configs and JetStream files (created if missing)")
    nats.add_argument("--nodes", type=integer_in("nodes", 1, servers.NODES_MAX), default=servers.NODES_DEFAULT,
                      help=f"servers (1..{servers.NODES_MAX}, default {servers.NODES_DEFAULT}; 1: JetStream without "
                           f"clustering, for fast tests)")
    nats.add_argument("--port", type=integer_in("port", 0, servers.PORT_MAX), default=servers.PORT_DEFAULT,
                      help=f"base port: clients from it, routes +{servers.ROUTE_PORT_OFFSET}, monitoring "
                           f"+{servers.MONITOR_PORT_OFFSET} (default {servers.PORT_DEFAULT}; 0: free ports)")
    nats.set_defaults(handler=cluster_nats_command)
    from ledger.cluster import connection, status
    command = actions.add_parser("status", help="each shard's primary, epoch, nodes, positions and lag",
                                 description=status.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("url", help="the NATS servers: nats://host:port, several separated by commas")
    command.add_argument("--shard", help="only this shard")
    command.add_argument("--json", action="store_true", help=JSON_HELP + " (format: docs/CLUSTER.md, Status)")
    connection.add_arguments(command)
    command.set_defaults(handler=cluster_status_command)
    from ledger.cluster import shards
    command = actions.add_parser("shards", help="show or set the shard map (account id ranges -> shard)",
                                 description=shards.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("url", help="the NATS servers: nats://host:port, several separated by commas")
    command.add_argument("--set", metavar="MAP", help="the new map, e.g. s0=1-4999999,s1=5000000-9999999")
    command.add_argument("--expect-version", type=integer_in("version", 0, UINT64_MAX), metavar="N",
                         help="with --set: only if the stored map is at version N (0: none stored)")
    command.add_argument("--json", action="store_true", help=JSON_HELP + " (docs/CLUSTER.md, Shard map)")
    connection.add_arguments(command)
    command.set_defaults(handler=cluster_shards_command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # argparse's REMAINDER drops options that start with "--"; bench and project parse their own arguments.
        from ledger.bench_command import main as bench_main
        return bench_main(argv[1:])
    with warnings.catch_warnings():  # restores the warning printer when main() returns (tests call it in-process)
        warnings.showwarning = _warning_on_one_line
        try:
            arguments = parser().parse_args(argv)
            code = arguments.handler(arguments)
            sys.stdout.flush()  # here, not at exit: a reader gone away must end in the except below
            return code
        except BrokenPipeError:
            return _stdout_closed()
        except Exception as error:  # noqa: BLE001 - every error becomes one line and an exit code
            return _report(error)
        except KeyboardInterrupt:
            print("ledger: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def _stdout_closed() -> int:
    """The reader of stdout went away (`ledger history DIR ID | head -1`): stop quietly, as a Unix tool that
    SIGPIPE ends does, with the status a shell reports for it. stdout is pointed at /dev/null first, so that
    Python's own flush at exit does not fail on the pipe again and print a second complaint."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (tests that replace it): nothing to redirect
        pass
    return EXIT_BROKEN_PIPE


def _report(error: Exception) -> int:
    """Print `error` as one line on stderr and return its exit code (see the module docstring)."""
    if isinstance(error, ledger.LedgerError):
        code = EXIT_DATA
    elif isinstance(error, (UsageError, ValueError, TypeError, OverflowError) + PATH_INPUT_ERRORS):
        code = EXIT_USAGE
    elif isinstance(error, OSError):
        code = EXIT_DATA
    else:
        if os.environ.get("LEDGER_TRACEBACK"):
            raise error
        print(f"ledger: internal error {type(error).__name__}: {error} (a bug: please report it; "
              f"LEDGER_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    print(f"ledger: {_one_line(error)}", file=sys.stderr)
    return code


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"  # not "[Errno 2] ...: 'path'"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _warning_on_one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                         file: object = None, line: str | None = None) -> None:
    """The CLI's warnings (a damaged snapshot skipped at open) as one line, without the source line."""
    text = " ".join(str(message).split())
    print(text if text.startswith("ledger: ") else f"ledger: warning: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
