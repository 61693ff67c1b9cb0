"""The command line through subprocesses: exit codes, --json output, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 1 MiB tmpfs (mounting needs root, which the tests have here; elsewhere the test is skipped)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_cli_disk_full_is_exit_3(tiny_filesystem):
    """`init` on a full disk (a 64 MiB segment on a 1 MiB tmpfs): the LedgerFullError, one line, exit 3."""
    failed = run("init", tiny_filesystem / "data", expect=3)
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
    from ledger.history import format_ns

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
