"""`ledger bench` end to end on a tiny workload: it runs, every row did work, and every row's balances and
accepted transfers agree with ledger's. PostgreSQL and Redis take part when their servers and drivers are
installed (the README's test command installs them); without them their rows are skipped with a line saying
what to install, which is tested too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.bench_peers.suite import GROUPS

REPOSITORY = Path(__file__).resolve().parent.parent

AVAILABLE = tuple(name for name, group in GROUPS.items() if group.missing() is None)
PEERS = AVAILABLE
TIMEOUT_S = 120  # the run takes a few seconds; the bound only keeps a hang from stalling CI


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench-results")
    command = [sys.executable, "-m", "ledger", "bench", "--quick", "--peers", ",".join(PEERS), "--accounts", "200",
               "--transfers", "2000", "--out", str(out), "--data-dir", str(tmp_path_factory.mktemp("bench-data")),
               # A sync per transfer costs milliseconds on a busy disk: a short prefix keeps the test fast.
               "--per-commit-transfers", "200"]
    completed = subprocess.run(command, check=False, cwd=REPOSITORY, capture_output=True, text=True, timeout=TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
    return completed, json.loads((out / "results.json").read_text()), out


def test_every_selected_peer_has_rows_with_a_positive_rate(bench_run):
    _, results, _ = bench_run
    groups = {row["group"] for row in results["rows"]}
    assert groups == set(PEERS)
    assert not results["skipped"] and not results["errors"]
    for row in results["rows"]:
        assert row["transfers"] > 0 and row["transfers_per_second"] > 0, row
    assert results["ledger_durable_transfers_per_second"] > 0


def test_balances_and_accepted_sets_agree_with_ledger(bench_run):
    completed, results, _ = bench_run
    assert results["cross_check_passed"] is True
    assert all(row["check"] == "ok" for row in results["rows"])
    # The workload must exercise the overdraft check: some transfers are rejected.
    assert all(row["rejected"] > 0 for row in results["rows"] if row["transfers"] == 2000)
    assert "cross-check: every row agrees with ledger" in completed.stdout


def test_disk_limit_is_measured_in_the_same_run(bench_run):
    completed, results, _ = bench_run
    limit = results["disk_limit"]
    assert limit["chunk_records"] == 8_192 and limit["records_per_second"] > 0
    assert "disk limit: pwrite + fdatasync of 8,192-record chunks" in completed.stdout
    assert "ledger durable reaches" in completed.stdout


def test_latency_percentiles_are_reported(bench_run):
    _, results, _ = bench_run
    batch_sizes = {entry["batch_size"] for entry in results["latency"]}
    assert {0, 1, 10, 100} <= batch_sizes
    for entry in results["latency"]:
        assert 0 < entry["p50_us"] <= entry["p99_us"] <= entry["p999_us"], entry


def test_outputs_table_json_and_chart(bench_run):
    completed, results, out = bench_run
    table = (out / "table.md").read_text()
    for row in results["rows"]:
        assert row["label"] in table and row["label"] in completed.stdout
    assert results["rows"][0]["ledger_over_peer"] is not None
    chart = out / "peers_chart.png"
    if results["chart"] is None:  # matplotlib missing: said so, never a fake file
        assert "matplotlib is not installed" in results["chart_note"] and not chart.exists()
    else:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("group", ["postgres", "redis"])
def test_server_peers_ran_against_real_servers(bench_run, group):
    """When the server is installed its rows ran against it (a real server on 127.0.0.1, per-transfer and batch
    shapes) and agree with ledger; when it is not, the reason is in the skip."""
    if group not in AVAILABLE:
        pytest.skip(f"{group}: {GROUPS[group].missing()}")
    _, results, _ = bench_run
    rows = [row for row in results["rows"] if row["group"] == group]
    assert len(rows) >= 2 and all(row["check"] == "ok" and row["transfers"] > 0 for row in rows), rows
    version = rows[0]["label"].split(",")[0]
    assert version.startswith("PostgreSQL 1" if group == "postgres" else "Redis 7"), version


def test_a_missing_server_is_skipped_with_a_clear_line(tmp_path):
    """With no server binaries on PATH (and no Debian PostgreSQL directory to find), their groups say what to
    install and the run still succeeds for the others."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    environment = {**os.environ, "PATH": str(bare), "LEDGER_BENCH_POSTGRES_GLOB": str(tmp_path / "none" / "*")}
    command = [sys.executable, "-m", "ledger", "bench", "--quick", "--peers", "redis,postgres,python", "--accounts",
               "50", "--transfers", "200", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    completed = subprocess.run(command, check=False, cwd=REPOSITORY, capture_output=True, text=True,
                               timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, env=environment)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "redis: skipped: no redis-server binary; apt-get install -y redis-server" in completed.stdout
    assert "postgres: skipped: no PostgreSQL server binaries" in completed.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {entry["group"] for entry in results["skipped"]} == {"redis", "postgres"}
    assert {row["group"] for row in results["rows"]} == {"python"}


LEDGER_BATCH_FSYNC = "ledger transfers(), batch of 8,192, durability=fsync (durable)"
LEDGER_SINGLE_FSYNC = "ledger transfer(), one call per transfer, durability=fsync (durable)"
LEDGER_BATCH_OS = "ledger transfers(), batch of 8,192, durability=os (page cache)"


def test_each_row_is_compared_with_the_ledger_row_of_its_kind(bench_run):
    """The ratio column compared every row with ledger's durable batches, so SQLite committing every transfer was
    "1,800x slower" than batched ledger. Now a row that syncs every transfer is compared with ledger syncing every
    transfer, a batch committed and synced as one with ledger's durable batches, and one not synced at once
    (Redis appendfsync everysec) with ledger's durability=os batches."""
    completed, results, out = bench_run
    rows = {row["label"]: row for row in results["rows"]}
    expected = {}
    for label in rows:
        if "commit per transfer" in label or label == LEDGER_SINGLE_FSYNC:
            expected[label] = LEDGER_SINGLE_FSYNC
        elif "appendfsync everysec" in label or label == LEDGER_BATCH_OS:
            expected[label] = LEDGER_BATCH_OS
        elif label.startswith(("SQLite", "PostgreSQL", "Redis", "Python")) or label == LEDGER_BATCH_FSYNC:
            expected[label] = LEDGER_BATCH_FSYNC
    assert {label: rows[label]["compared_with"] for label in expected} == expected
    assert any("commit per transfer" in label for label in expected)
    for label, reference in expected.items():
        ratio = rows[reference]["transfers_per_second"] / rows[label]["transfers_per_second"]
        assert rows[label]["ledger_over_peer"] == pytest.approx(ratio)
    table = (out / "table.md").read_text()
    assert "ledger ÷ peer (same kind)" in table and "ledger durable ÷ peer" not in table


def test_results_go_to_the_current_directory_not_the_source_tree(tmp_path):
    """Without --out, results went to bench/results/ inside the source checkout (wherever the command ran): now
    to bench-results/<timestamp>/ in the current directory."""
    results_in_checkout = REPOSITORY / "bench" / "results"
    before = sorted(results_in_checkout.iterdir()) if results_in_checkout.exists() else []
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, "-m", "ledger", "bench", "--quick", "--peers", "python", "--accounts", "50",
               "--transfers", "200", "--data-dir", str(tmp_path / "data")]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    completed = subprocess.run(command, check=False, cwd=work, capture_output=True, text=True, timeout=TIMEOUT_S,
                               stdin=subprocess.DEVNULL, env=environment)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    [written] = list((work / "bench-results").glob("*/results.json"))
    assert f"results: {written}" in completed.stdout
    after = sorted(results_in_checkout.iterdir()) if results_in_checkout.exists() else []
    assert after == before
