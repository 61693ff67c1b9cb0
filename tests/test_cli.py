"""The command line through subprocesses: exit codes, --json output, one-line errors."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import ledger


def run(*arguments, expect=0):
    completed = subprocess.run([sys.executable, "-m", "ledger", *map(str, arguments)], capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == expect, (arguments, completed.stdout, completed.stderr)
    return completed


def run_json(*arguments, expect=0):
    return json.loads(run(*arguments, "--json", expect=expect).stdout)


def test_cli_round_trip(tmp_path):
    data = tmp_path / "data"
    assert run_json("init", data)["created"] == str(data)
    run("init", data, expect=2)  # already there
    assert run_json("account", "create", data, 1, "--min-balance", -10**9)["result"] == "OK"
    assert run_json("account", "create", data, 2)["result"] == "OK"
    assert run_json("account", "create", data, 2)["result"] == "EXISTS"
    assert run_json("transfer", data, 10, 1, 2, 500)["result"] == "OK"
    assert run_json("transfer", data, 10, 1, 2, 500)["result"] == "EXISTS"
    refused = run_json("transfer", data, 11, 2, 1, 10**6, expect=2)
    assert refused["result"] == "INSUFFICIENT_FUNDS"
    assert run_json("transfer", data, 12, 1, 2, 70, "--flag", "pending", "--timeout", 60)["result"] == "OK"
    assert run_json("transfer", data, 13, 0, 0, 0, "--flag", "void_pending", "--pending-id", 12)["result"] == "OK"
    balance = run_json("balance", data, 2)
    assert balance["balance"] == 500 and balance["credits_pending"] == 0
    stats = run_json("stats", data)
    assert stats["accounts"] == 2 and stats["transfers"] == 3
    snapshot = run_json("snapshot", data)
    assert os.path.exists(snapshot["path"]) and snapshot["position"] == stats["journal_position"]
    assert run_json("transfer", data, 14, 1, 2, 5)["result"] == "OK"
    verify = run_json("verify", data)
    assert verify["ok"] and verify["problems"] == []
    restored = run_json("restore", data, tmp_path / "restored", "--until", snapshot["position"] - 1)
    assert restored["verified"] and restored["cut_position"] == snapshot["position"]
    assert run_json("balance", tmp_path / "restored", 2)["balance"] == 500
    assert run_json("balance", data, 2)["balance"] == 505
    assert run_json("balance", data, 2, "--at", snapshot["position"] - 1)["balance"] == 500
    history = run_json("history", data, 2)
    assert len(history["events"] if isinstance(history, dict) else history) >= 4
    explanation = run_json("explain", data, 2)
    assert explanation["ok"]


def test_cli_errors_are_one_line(tmp_path):
    missing = run("stats", tmp_path / "missing", expect=2)
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    data = tmp_path / "data"
    run("init", data)
    with ledger.open(str(data)):  # held by this process: the CLI cannot take the writer lock
        locked = run("transfer", data, 1, 1, 2, 3, expect=3)
        assert "open for writing by another process" in locked.stderr and "Traceback" not in locked.stderr
    unknown = run("balance", data, 99, expect=2)
    assert "not found" in unknown.stderr


def test_cli_corrupt_journal_exit_code(tmp_path):
    data = tmp_path / "data"
    run("init", data)
    run("account", "create", data, 1, "--min-balance", -100)
    run("account", "create", data, 2)
    for identifier in range(10, 14):
        run("transfer", data, identifier, 1, 2, 1)
    segment = data / "journal" / "00000000.segment"
    raw = bytearray(segment.read_bytes())
    raw[4096 + 64 * 2 + 3] ^= 0x40  # inside the first batch's events: corruption before the tail
    segment.write_bytes(bytes(raw))
    failed = run("verify", data, expect=3)
    assert "journal corrupt" in failed.stderr


def test_cli_demo_small(tmp_path):
    completed = run("demo", "--dir", tmp_path / "demo", "--accounts", 2000, "--transfers", 20000,
                    "--batch-size", 1000)
    assert "demo OK" in completed.stdout
    assert "verify OK" in completed.stdout


@pytest.mark.parametrize("command", ["verify", "stats"])
def test_cli_readonly_commands_work_beside_a_writer(tmp_path, command):
    data = tmp_path / "data"
    run("init", data)
    with ledger.open(str(data)) as handle:
        handle.create_account(5)
        run(command, data, "--json")


def test_cli_overflowing_id_is_a_usage_error(tmp_path):
    data = tmp_path / "data"
    run("init", data)
    for arguments in (("balance", data, 2**64), ("transfer", data, 30, 2, 3, 10**20)):
        failed = run(*arguments, expect=2)
        assert "outside" in failed.stderr and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr


@pytest.fixture
def small_ledger(tmp_path):
    data = str(tmp_path / "data")
    with ledger.open(data, create=True) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        handle.transfer(10, 1, 2, 5)
    return data


def main_in_process(capsys, arguments):
    from ledger import cli
    code = cli.main([str(argument) for argument in arguments])
    error = capsys.readouterr().err
    assert error.startswith("ledger: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return code, error


@pytest.mark.parametrize("arguments, expected", [
    (("balance", "{data}", -1), "account id range"),
    (("balance", "{data}", 2**64), "account id range"),
    (("balance", "{data}", 0), "account id range"),
    (("transfer", "{data}", 30, 2, 3, 10**20), "int64 range"),
    (("transfer", "{data}", 2**64, 2, 3, 1), "uint64 range"),
    (("transfer", "{data}", 30, 2, 3, 1, "--code", 70000), "uint16 range"),
    (("transfer", "{data}", 30, 2, 3, "ten"), "not an integer"),
    (("restore", "{data}", "{data}"), "exists"),
    (("restore", "{data}", "{data}-restored", "--until", -5), "journal position range"),
    (("snapshot", "{data}", "--keep", 0), "keep range"),
    (("balance", "{data}"), "required"),
    (("stats", "{data}-missing"), "no ledger here"),
])
def test_cli_input_errors_are_one_line_exit_2(small_ledger, capsys, arguments, expected):
    arguments = [str(argument).format(data=small_ledger) for argument in arguments]
    code, error = main_in_process(capsys, arguments)
    assert code == 2 and expected in error
    assert not os.path.exists(small_ledger + "-restored")


def without_root_privileges():
    """A command prefix under which permission bits apply: root (the tests' user here) bypasses them through
    CAP_DAC_OVERRIDE, so drop it (and its kin) from the capability bounding set of the child."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_cli_permission_denied_is_exit_3(small_ledger):
    """A real permission denial (the journal's segment file made unreadable): one line naming the file, exit 3."""
    segment = os.path.join(small_ledger, "journal", "00000000.segment")
    os.chmod(segment, 0)
    try:
        completed = subprocess.run([*without_root_privileges(), sys.executable, "-m", "ledger", "balance",
                                    small_ledger, "2"], capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(segment, 0o600)
    assert completed.returncode == 3, completed.stderr
    assert "Permission denied" in completed.stderr and "00000000.segment" in completed.stderr
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr


def test_cli_disk_full_is_exit_3(tiny_filesystem):
    """`init` on a full disk (a 64 MiB segment on a 1 MiB tmpfs): the LedgerFullError, one line, exit 3."""
    failed = run("init", tiny_filesystem("1m") / "data", expect=3)
    assert "cannot allocate journal segment" in failed.stderr and "No space left" in failed.stderr
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr


# An internal error for real: the CLI run with so little stack that its own code raises RecursionError, an
# exception no handler expects (what a bug raises).
SHALLOW_STACK_CLI = """
import sys
from ledger import cli
sys.setrecursionlimit(30)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_cli_internal_error_is_exit_4_and_one_line(small_ledger):
    completed = subprocess.run([sys.executable, "-c", SHALLOW_STACK_CLI, "balance", small_ledger, "2"],
                               capture_output=True, text=True, timeout=300, env=dict(os.environ, LEDGER_TRACEBACK=""))
    assert completed.returncode == 4, completed.stderr
    assert completed.stderr.startswith("ledger: internal error RecursionError")
    assert "LEDGER_TRACEBACK=1" in completed.stderr
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr


def test_cli_ledger_traceback_shows_the_internal_error(small_ledger):
    completed = subprocess.run([sys.executable, "-c", SHALLOW_STACK_CLI, "balance", small_ledger, "2"],
                               capture_output=True, text=True, timeout=300, env=dict(os.environ, LEDGER_TRACEBACK="1"))
    assert completed.returncode == 1, completed.stderr   # the interpreter's exit for an uncaught exception
    assert "Traceback (most recent call last)" in completed.stderr and "RecursionError" in completed.stderr
    assert "ledger/cli.py" in completed.stderr


def test_cli_restore_until_time_from_a_named_snapshot(tmp_path):
    from ledger.moments import format_ns

    data = str(tmp_path / "data")
    with ledger.open(data, create=True) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        handle.transfer(10, 1, 2, 5)
        snapshot = handle.snapshot().path
        for transfer_id in (11, 12, 13):
            handle.transfer(transfer_id, 1, 2, 100)
        moment = format_ns(int(handle.lookup_transfers([12])["timestamp"][0]))  # nanoseconds, UTC
    restored = run_json("restore", snapshot, tmp_path / "restored", "--until-time", moment)
    assert restored["verified"] and restored["snapshot"] == snapshot
    with ledger.open(str(tmp_path / "restored"), readonly=True) as handle:
        assert handle.balance(2) == 205 and handle.recovered_from is not None
    refused = run("restore", snapshot, tmp_path / "early", "--until", 1, expect=2)
    assert "after the cut" in refused.stderr and refused.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "early")


def test_cli_verify_and_explain_fail_on_a_snapshot_that_differs_from_the_journal(tmp_path):
    """Exit 1 (verification failed), naming the snapshot: first one rewritten with valid checksums and a balance
    the journal does not give, then one with a damaged body (skipped at open with a one-line warning)."""
    from ledger.snapshot import read_snapshot, write_snapshot

    data = str(tmp_path / "data")
    with ledger.open(data, create=True) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        handle.transfer(10, 1, 2, 5)
        path = handle.snapshot().path
    scalars, arrays, _ = read_snapshot(path)
    arrays["accounts_hot"]["credits_posted"][1] += 1
    arrays["accounts_hot"]["debits_posted"][0] += 1
    os.unlink(path)
    write_snapshot(data, scalars, arrays, keep=3, stall_seconds=0.0)
    explained = run("explain", data, 2, expect=1)
    assert "FAILED" in explained.stdout and "folding the journal gives" in explained.stdout
    verified = run("verify", data, expect=1)
    assert "verify FAILED" in verified.stdout
    assert f"problem: account 1: debits_posted is 6 in {path}" in verified.stdout  # the first divergence
    with open(path, "r+b") as file:
        file.seek(4096)
        byte = file.read(1)
        file.seek(4096)
        file.write(bytes([byte[0] ^ 0x01]))
    verified = run("verify", data, expect=1)
    assert f"problem: {path}: snapshot body checksum mismatch" in verified.stdout
    assert verified.stderr.count("\n") == 1 and "snapshot skipped" in verified.stderr


def run_bounded(arguments, timeout_s=60, **options):
    """A command that must end on its own (a refused `serve` would otherwise serve forever): TimeoutExpired (the
    process is killed) fails the test instead of hanging it."""
    return subprocess.run([sys.executable, "-m", "ledger", *map(str, arguments)], capture_output=True, text=True,
                          timeout=timeout_s, **options)


def funded(tmp_path):
    data = tmp_path / "data"
    run("init", data)
    run("account", "create", data, 1, "--min-balance", -10**9)
    run("account", "create", data, 2)
    run("transfer", data, 10, 1, 2, 500)
    run("transfer", data, 11, 1, 2, 70)
    return data


def test_cli_balance_at_past_the_end_or_a_bare_timestamp_is_an_error(tmp_path):
    """`--at` with a nanosecond timestamp copied from --json without its `ns` was read as a position past the end
    and printed today's balance with exit 0: now a timestamp-sized bare number is exit 2 suggesting `ns`, a
    position past the end is exit 2 naming the end, and with the suffix the moment is answered."""
    data = funded(tmp_path)
    first = run_json("history", data, 2)[1]  # the creation, then the transfer of 500
    end = run_json("stats", data)["journal_position"]
    bare = run("balance", data, 2, "--at", first["timestamp"], expect=2)
    assert f"{first['timestamp']}ns" in bare.stderr and bare.stderr.count("\n") == 1
    past = run("balance", data, 2, "--at", end + 1, expect=2)
    assert f"journal position {end + 1} is past the journal's end {end}" in past.stderr
    assert past.stderr.count("\n") == 1 and "Traceback" not in past.stderr
    assert run_json("balance", data, 2, "--at", f"{first['timestamp']}ns")["balance"] == 500
    assert run_json("balance", data, 2, "--at", first["position"])["balance"] == 500
    assert run_json("balance", data, 2, "--at", end)["balance"] == 570
    future = run("balance", data, 2, "--at", "2999-01-01", expect=2)
    assert "is in the future" in future.stderr


@pytest.mark.parametrize("accounts", [[], [1], [1, 2]], ids=["empty", "account-1", "accounts-1-2"])
def test_cli_demo_refuses_a_directory_that_holds_a_ledger(tmp_path, accounts):
    """`demo --dir` on an existing ledger failed with an AssertionError (exit 4) or, without account 1, wrote its
    whole workload into the user's ledger. Now: exit 2, and the ledger is untouched."""
    data = tmp_path / "data"
    run("init", data)
    for account in accounts:
        run("account", "create", data, account)
    before = run_json("stats", data)
    refused = run("demo", "--dir", data, "--accounts", 10, "--transfers", 100, "--batch-size", 10, expect=2)
    assert "already holds a ledger" in refused.stderr and refused.stderr.count("\n") == 1
    assert run_json("stats", data) == before
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    refused = run("demo", "--dir", unrelated, "--accounts", 10, "--transfers", 100, "--batch-size", 10, expect=2)
    assert "not empty" in refused.stderr and os.listdir(unrelated) == ["notes.txt"]


def test_cli_demo_says_where_its_data_is_and_removes_it(tmp_path):
    """The demo's temporary directory was left behind (gigabytes at the default size) without a word: it is named,
    and removed at the end unless --keep is given."""
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    small = ("demo", "--accounts", 10, "--transfers", 100, "--batch-size", 10)
    completed = run_bounded(small, timeout_s=300, env=environment)
    assert completed.returncode == 0, completed.stderr
    assert "demo OK" in completed.stdout and f"data in {tmp_path}" in completed.stdout
    assert "removed" in completed.stdout and os.listdir(tmp_path) == []
    kept = run_bounded((*small, "--keep"), timeout_s=300, env=environment)
    assert kept.returncode == 0, kept.stderr
    [directory] = os.listdir(tmp_path)
    assert f"kept {tmp_path / directory}" in kept.stdout
    assert run_json("stats", tmp_path / directory)["accounts"] == 11


def test_cli_typos_do_not_create_ledgers(tmp_path):
    """`serve nodir` created and served a new ledger, `init /nonexistent/x/y` created the parents, `init` took an
    unrelated non-empty directory, `serve --group 99999` was accepted: each is exit 2 now, creating nothing."""
    import grp

    served = run_bounded(("serve", tmp_path / "nodir"))
    assert served.returncode == 2 and "no ledger here" in served.stderr and "--create" in served.stderr
    assert not os.path.exists(tmp_path / "nodir")
    nested = run_bounded(("init", tmp_path / "missing" / "x" / "y"))
    assert nested.returncode == 2 and "does not exist" in nested.stderr and not os.path.exists(tmp_path / "missing")
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    refused = run_bounded(("init", unrelated))
    assert refused.returncode == 2 and "not empty" in refused.stderr and os.listdir(unrelated) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    run("init", empty)  # an existing empty directory is fine
    existing = {group.gr_gid for group in grp.getgrall()}
    missing_gid = next(gid for gid in range(99_999, 2**31) if gid not in existing)
    grouped = run_bounded(("serve", empty, "--group", missing_gid))
    assert grouped.returncode == 2 and f"no group {missing_gid}" in grouped.stderr
    assert grouped.stderr.count("\n") == 1


def test_cli_serve_create_makes_a_new_ledger(tmp_path):
    directory = tmp_path / "new"
    writer = subprocess.Popen([sys.executable, "-m", "ledger", "serve", directory, "--create", "--slots", "1024",
                               "--snapshot-every-s", "0"], stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in writer.stderr.readline()
        with ledger.connect(str(directory)) as client:
            assert client.create_account(7) == ledger.AccountResult.OK
    finally:
        writer.terminate()
        assert writer.wait(timeout=60) == 0
    assert run_json("stats", directory)["accounts"] == 1


def test_cli_stdout_closed_early_is_sigpipe_not_an_error(tmp_path):
    """`ledger stats DIR | head -1` exited 3 ("Broken pipe": the code for an unavailable data directory). Like
    other Unix tools it now stops quietly with 141 (128 + SIGPIPE, what a shell reports for a tool SIGPIPE
    ended): a real pipe whose reader is gone before the command writes."""
    data = funded(tmp_path)
    for command in (("stats", data), ("history", data, 2), ("stats", data, "--json")):
        process = subprocess.Popen([sys.executable, "-m", "ledger", *map(str, command)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        process.stdout.close()  # the reader is gone before the command writes a byte
        _, error = process.communicate(timeout=60)
        assert process.returncode == 141 and error == "", (command, process.returncode, error)


def test_cli_version_and_help_on_every_argument(capsys):
    from ledger import cli

    completed = run("--version")
    assert completed.stdout.strip() == f"ledger {ledger.__version__}"
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, path + [name])
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                missing.append(" ".join(path + [action.dest]))

    walk(cli.parser(), ["ledger"])
    assert missing == []
    assert "journal position" in run("balance", "--help").stdout


def run_on_a_terminal(arguments, timeout_s=120):
    """Run the CLI with stderr on a pseudo-terminal, as a person at a terminal runs it (stdout a pipe): returns
    (exit code, stdout, what the terminal showed)."""
    import select

    main_end, terminal_end = os.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ledger", *map(str, arguments)], stdout=subprocess.PIPE,
                               stderr=terminal_end, text=True)
    os.close(terminal_end)
    shown = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_end], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(main_end, 1 << 16)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            shown.append(chunk)
        output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(main_end)
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, output, b"".join(shown).decode()


def drawn_totals(shown, label):
    """The (done, total) pairs of every redraw of the progress bar `label` on the terminal."""
    return [(int(done.replace(",", "")), int(total.replace(",", "")))
            for done, total in re.findall(rf"{label} \[[#.]+\] ([\d,]+)/([\d,]+)", shown)]


def test_cli_replay_progress_total_is_the_journal_not_its_files(tmp_path):
    """Opening replays the journal with a progress bar on a terminal; its total was the end of the preallocated
    segment files (here 5 segments of 2**20 records for a journal of about 4.3 million), so the bar ended at 80 %
    and jumped. Now the total is where the journal's records end."""
    data = str(tmp_path / "data")
    with ledger.open(data, create=True, transfers_capacity=4_400_000) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        identifier = 1
        for _ in range(5):
            batch = ledger.transfers_batch(860_000)
            batch["id"] = np.arange(identifier, identifier + 860_000, dtype=np.uint64)
            batch["debit_account"], batch["credit_account"], batch["amount"] = 1, 2, 1
            assert not handle.transfers(batch).any()
            identifier += 860_000
        end = handle.stats()["journal_position"]
    assert end > 4 << 20 and os.path.getsize(os.path.join(data, "journal", "00000004.segment")) > 0
    code, output, shown = run_on_a_terminal(("stats", data, "--json"))
    assert code == 0 and json.loads(output)["journal_position"] == end
    totals = drawn_totals(shown, "replay")
    assert totals, shown
    assert {total for _, total in totals} == {end - 1}, totals  # from position 1 (0 is never written) to the end
    assert totals[-1] == (end - 1, end - 1)


def test_cli_snapshot_shows_progress_on_a_terminal_only(tmp_path):
    """`ledger snapshot DIR` wrote for seconds (1.5 GB for 10M accounts) with nothing on the terminal: now a bar of
    the bytes the forked child has written, ending at the file's size; nothing when stderr is not a terminal."""
    data = funded(tmp_path)
    code, output, shown = run_on_a_terminal(("snapshot", data, "--json"))
    assert code == 0, shown
    info = json.loads(output)
    totals = drawn_totals(shown, "snapshot")
    assert totals and totals[-1] == (info["bytes"], info["bytes"]), shown
    assert os.path.getsize(info["path"]) == info["bytes"]
    piped = run("snapshot", data)
    assert piped.stderr == "" and "snapshot at journal position" in piped.stdout
