"""`ledger bench --cluster` end to end with small counts: it starts a local three-node cluster, runs the raw
JetStream probe and the replicated ledger side by side, prints the ratios, writes results.json and stops every
server it started (no server.pid left in the kept data directory)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60   # the run takes a few seconds; the bound only keeps a hang from stalling CI


def test_bench_cluster_runs_the_probe_and_the_ledger_side_by_side(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    command = [sys.executable, "-m", "ledger", "bench", "--cluster", "--quick", "--cluster-batches", "2",
               "--cluster-calls", "40", "--out", str(out), "--data-dir", str(data), "--keep-data"]
    completed = subprocess.run(command, check=False, cwd=REPOSITORY, capture_output=True, text=True,
                               timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
    assert "ledger/probe (2 in flight" in completed.stdout
    results = json.loads((out / "results.json").read_text())
    labels = [row["label"] for row in results["rows"]]
    assert sum(label.startswith("JetStream probe R3") for label in labels) == 6   # 1, 2 and 16 in flight
    assert sum(label.startswith("ledger R3") for label in labels) == 2
    for row in results["rows"]:
        assert row["count"] > 0 and row["per_second"] > 0 and 0 < row["p50_us"] <= row["p99_us"], row
    assert results["batch_ratio"] > 0 and results["single_ratio"] > 0
    assert results["machine"]["cores"] >= 1
    assert not list(data.glob("*/nats/n*/server.pid")), "a nats-server was left running"
    assert list(data.glob("*/nats/n*/server.conf")), "the cluster was not started in the data directory"


def test_bench_cluster_counts_are_checked(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "ledger", "bench", "--cluster", "--cluster-batches", "1",
                                "--out", str(tmp_path)], check=False, cwd=REPOSITORY, capture_output=True,
                               text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert completed.returncode == 2 and "--cluster-batches" in completed.stderr
