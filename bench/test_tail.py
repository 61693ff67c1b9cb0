"""The read side: how fast a tailer reads a journal, how far behind a full-speed writer it stays, and how fast the
SQLite projection folds events.

Run: pytest bench/test_tail.py --benchmark-only   (not part of the CI test run). Figures go to extra_info."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from workload import TransferStream, funded_ledger

from ledger.project import project_sqlite
from ledger.tail import Tailer

ACCOUNTS = 100_000
JOURNAL_EVENTS = 5_000_000
SINGLE_BATCHES = 200_000          # journal of one-transfer batches: the per-batch cost
PROJECTION_EVENTS = 1_000_000
LAG_SECONDS = 4
BENCH_DIRECTORY = os.path.dirname(os.path.abspath(__file__))

# A writer at full speed: transfers with fresh ids, batch after batch, for a fixed time; prints the events it wrote.
WRITER = r'''
import json, sys, time
import numpy as np
options = json.loads(sys.argv[1])
sys.path.insert(0, options["bench_directory"])
from workload import TransferStream, funded_ledger
handle = funded_ledger(options["accounts"], options["directory"], durability=options["durability"])
template = TransferStream(options["accounts"], max(options["batch_size"], 4096)).batch()
print("ready", flush=True)
sys.stdin.readline()                              # the tailer is following: go
next_id, written, deadline = 1 << 40, 0, time.monotonic() + options["seconds"]
if options["batch_size"] == 1:
    debit, credit, amount = (template[name].tolist() for name in ("debit_account", "credit_account", "amount"))
    transfer, rows = handle.transfer, len(debit)
    while time.monotonic() < deadline:
        for row in range(1024):
            transfer(next_id, debit[row % rows], credit[row % rows], amount[row % rows])
            next_id += 1
        written += 1024
else:
    batch = template[: options["batch_size"]].copy()
    while time.monotonic() < deadline:
        batch["id"] = np.arange(next_id, next_id + batch.size, dtype=np.uint64)
        next_id += batch.size
        handle.transfers(batch)
        written += batch.size
handle.close()
print(written, flush=True)
'''


def build_journal(directory: str, events: int, batch_size: int) -> int:
    """A journal of funded accounts and transfer batches of `batch_size` up to about `events` records."""
    handle = funded_ledger(ACCOUNTS, directory, durability="os", transfers_capacity=events)
    stream = TransferStream(ACCOUNTS, max(batch_size, 8_192))
    if batch_size == 1:
        rows = stream.batch()
        for row in range(events // 2):
            handle.transfer(1 << 40 | row, int(rows["debit_account"][row % rows.size]),
                            int(rows["credit_account"][row % rows.size]), 1)
    else:
        while handle.stats()["journal_position"] < events:
            handle.transfers(stream.batch())
    end = handle.stats()["journal_position"]
    handle.close()
    return end


@pytest.fixture(scope="module")
def journal_5m(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tail") / "data")
    return directory, build_journal(directory, JOURNAL_EVENTS, 8_192)


@pytest.fixture(scope="module")
def journal_single(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tail-single") / "data")
    return directory, build_journal(directory, 2 * SINGLE_BATCHES, 1)


def read_all(directory: str) -> tuple[int, int]:
    with Tailer(directory, follow=False) as tailer:
        for _ in tailer:
            pass
        return tailer.events_read, tailer.batches_read


def test_tailer_throughput(benchmark, journal_5m):
    """Read ~5M committed events (8k batches) from the files: verify checksums and chain, decode to numpy."""
    directory, end = journal_5m
    events, batches = benchmark.pedantic(read_all, args=(directory,), rounds=3, iterations=1, warmup_rounds=1)
    assert events + batches == end - 1
    benchmark.extra_info.update(events=events, batches=batches,
                                events_per_second=round(events / benchmark.stats.stats.median),
                                megabytes_per_second=round(end * 64 / benchmark.stats.stats.median / 1e6))


def test_tailer_throughput_single_transfer_batches(benchmark, journal_single):
    """The per-batch cost: a journal of 200k one-event batches."""
    directory, end = journal_single
    events, batches = benchmark.pedantic(read_all, args=(directory,), rounds=3, iterations=1, warmup_rounds=1)
    assert events + batches == end - 1
    benchmark.extra_info.update(events=events, batches=batches,
                                batches_per_second=round(batches / benchmark.stats.stats.median))


def follow_writer(directory: str, durability: str, batch_size: int) -> dict:
    """Start a full-speed writer, follow it, and measure per event: now - event timestamp when yielded."""
    options = {"directory": directory, "durability": durability, "batch_size": batch_size, "seconds": LAG_SECONDS,
               "accounts": 10_000, "bench_directory": BENCH_DIRECTORY}
    process = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(options)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    lags_ms = []
    with Tailer(directory, follow=True, interval_ms=1) as tailer:
        while tailer.poll().size or tailer.lag_records():          # catch up with the funding first
            pass
        process.stdin.write("go\n")
        process.stdin.flush()
        started = last = time.perf_counter()
        # Poll by hand rather than with an idle timeout: the writer may pause (segment creation) for a while.
        while True:
            events = tailer.poll()
            if events.size:
                now = time.time_ns()
                lags_ms.append(((now - events["timestamp"].astype(np.int64)) / 1e6).astype(np.float32))
                last = time.perf_counter()
            elif process.poll() is not None and tailer.lag_records() == 0:
                break
            else:
                time.sleep(0.0002)
        seconds = last - started
        read_events = tailer.events_read
        batches = tailer.batches_read
    written = int(process.stdout.readline())
    process.wait()
    lags = np.concatenate(lags_ms)
    assert lags.size == written, (lags.size, written)
    return {"events": written, "batches": batches, "read_events": read_events,
            "written_events_per_second": round(written / LAG_SECONDS),
            "read_events_per_second": round(written / seconds),
            "lag_p50_ms": round(float(np.percentile(lags, 50)), 3),
            "lag_p99_ms": round(float(np.percentile(lags, 99)), 3),
            "lag_max_ms": round(float(lags.max()), 3)}


@pytest.mark.parametrize("batch_size", [1, 8_192])
@pytest.mark.parametrize("durability", ["os", "fsync"])
def test_tailer_lag_behind_full_speed_writer(benchmark, tmp_path, durability, batch_size):
    """A writer process at full speed for a few seconds; the tailer follows. Lag = the moment an event is yielded
    minus its timestamp (which the writer takes when the batch starts), over every event."""
    directory = str(tmp_path / "data")
    figures = benchmark.pedantic(follow_writer, args=(directory, durability, batch_size), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)


def test_projection_rate(benchmark, tmp_path_factory):
    """Fold ~1M events (100k accounts, 8k batches) into a fresh SQLite read model: events/s."""
    directory = str(tmp_path_factory.mktemp("projection") / "data")
    end = build_journal(directory, PROJECTION_EVENTS, 8_192)
    databases = iter(str(tmp_path_factory.mktemp("projection-db") / f"read{k}.db") for k in range(10))

    def project(database):
        return project_sqlite(directory, database)

    report = benchmark.pedantic(project, setup=lambda: ((next(databases),), {}), rounds=2, iterations=1)
    assert report.position == end
    benchmark.extra_info.update(events=report.events,
                                events_per_second=round(report.events / benchmark.stats.stats.median))
