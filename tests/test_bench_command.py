"""`ledger bench` end to end on a tiny workload, with the peers every CI machine has (no PostgreSQL or Redis):
it runs, every row did work, and every row's balances and accepted transfers agree with ledger's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
PEERS = ("sqlite", "python", "ledger")
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
    return completed, json.loads((out / "results.json").read_text())


def test_every_selected_peer_has_rows_with_a_positive_rate(bench_run):
    _, results = bench_run
    groups = {row["group"] for row in results["rows"]}
    assert groups == set(PEERS)
    assert not results["skipped"] and not results["errors"]
    for row in results["rows"]:
        assert row["transfers"] > 0 and row["transfers_per_second"] > 0, row
    assert results["ledger_durable_transfers_per_second"] > 0


def test_balances_and_accepted_sets_agree_with_ledger(bench_run):
    completed, results = bench_run
    assert results["cross_check_passed"] is True
    assert all(row["check"] == "ok" for row in results["rows"])
    # The workload must exercise the overdraft check: some transfers are rejected.
    assert all(row["rejected"] > 0 for row in results["rows"] if row["transfers"] == 2000)
    assert "cross-check: every row agrees with ledger" in completed.stdout


def test_latency_percentiles_are_reported(bench_run):
    _, results = bench_run
    batch_sizes = {entry["batch_size"] for entry in results["latency"]}
    assert {0, 1, 10, 100} <= batch_sizes
    for entry in results["latency"]:
        assert 0 < entry["p50_us"] <= entry["p99_us"] <= entry["p999_us"], entry
