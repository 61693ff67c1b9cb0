"""Throughput and acknowledgement latency through the command ring with 1 and 2 producer processes, batched
and single commands, against one `ledger serve` writer (durability fsync: one sync per drained group).

Run: pytest bench/test_ring.py --benchmark-only   (not part of the CI test run)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ledger
from workload import SETTLEMENT_ID, funded_ledger

HERE = os.path.dirname(os.path.abspath(__file__))
ACCOUNTS = 10_000


def fsync_seconds(directory: str) -> tuple[float, float]:
    """Median and 99th percentile time of one 64 KiB pwrite + fdatasync here: the floor of an acknowledged durable
    call (a single transfer's sync writes one 4 KiB page; a 16k batch, 1 MiB)."""
    path = os.path.join(directory, "probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 64 << 20)
        samples = []
        data = os.urandom(64 << 10)
        for index in range(200):
            began = time.perf_counter()
            os.pwrite(fd, data, index * len(data))
            os.fdatasync(fd)
            samples.append(time.perf_counter() - began)
        return float(np.median(samples)), float(np.percentile(samples, 99))
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.parametrize("batch_size", [1, 1_000, 16_000], ids=["single", "batch1000", "batch16000"])
@pytest.mark.parametrize("producers", [1, 2])
def test_ring_throughput(benchmark, tmp_path, producers, batch_size):
    directory = str(tmp_path / "data")
    funded_ledger(ACCOUNTS, path=directory).close()
    os.chmod(directory, 0o700)
    # LEDGER_BENCH_SERVE_ARGS: more `ledger serve` options, to compare settings (e.g. --overlap-rows-min 1).
    writer = subprocess.Popen([sys.executable, "-m", "ledger", "serve", directory, "--transfers-capacity",
                               str(8_000_000), *os.environ.get("LEDGER_BENCH_SERVE_ARGS", "").split()],
                              stderr=subprocess.PIPE, text=True)
    assert "serving" in writer.stderr.readline()
    calls = 2_000 if batch_size == 1 else max(20, 300_000 // batch_size)
    environment = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    outputs = []

    def run():
        children = [subprocess.Popen([sys.executable, os.path.join(HERE, "ring_producer.py"), directory,
                                      str(index), str(calls), str(batch_size),
                                      str((len(outputs) * producers + index + 1) << 32), str(ACCOUNTS)],
                                     stdout=subprocess.PIPE, env=environment) for index in range(producers)]
        results = []
        for child in children:
            out, _ = child.communicate()
            assert child.returncode == 0, f"a producer failed (exit {child.returncode}): see its stderr above"
            results.append(json.loads(out))
        outputs.append(results)
        return results

    try:
        benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait()
    last = outputs[-1]
    transfers = sum(result["transfers"] for result in last)
    seconds = max(result["seconds"] for result in last)
    latencies = np.concatenate([np.array(result["latencies_ns"]) for result in last]) / 1e6
    floor, floor_p99 = (seconds * 1e3 for seconds in fsync_seconds(str(tmp_path)))
    benchmark.extra_info.update(
        transfers_per_second=round(transfers / seconds),
        ack_latency_ms_p50=round(float(np.percentile(latencies, 50)), 3),
        ack_latency_ms_p99=round(float(np.percentile(latencies, 99)), 3),
        ack_latency_ms_p999=round(float(np.percentile(latencies, 99.9)), 3),
        fsync_ms_median=round(floor, 3),
        fsync_ms_p99=round(floor_p99, 3),
        p99_over_fsync=round(float(np.percentile(latencies, 99)) / floor, 2),
        p99_over_fsync_p99=round(float(np.percentile(latencies, 99)) / floor_p99, 2),
    )
    with ledger.open(directory, readonly=True) as handle:
        assert handle.account(SETTLEMENT_ID) is not None
        # Every transfer of every round was applied (the producers check their codes; this checks the ledger).
        sent = sum(result["transfers"] for round_results in outputs for result in round_results)
        assert handle.stats()["transfers"] == ACCOUNTS + sent, (handle.stats()["transfers"], sent)   # + funding


@pytest.mark.parametrize("producers, writers", [(1, 1), (2, 1), (2, 2)])
def test_group_commit_floor(benchmark, tmp_path, producers, writers):
    """The same acknowledgement latency with no ledger, ring or Python in the way (bench/group_commit_floor.c):
    threads that each keep one request in flight and writer threads that pwrite 192 bytes per request and
    fdatasync. Two writers: a second group is written and synced while the first one's sync runs. Read next to
    test_ring_throughput's single-call rows: what this machine's disk allows a group commit at all."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    program = str(tmp_path / "group_commit_floor")
    subprocess.run([compiler, "-O2", "-pthread", os.path.join(HERE, "group_commit_floor.c"), "-o", program],
                   check=True)
    outputs = []

    def run():
        probe = str(tmp_path / f"floor-{len(outputs)}")
        completed = subprocess.run([program, str(producers), str(writers), "3000", probe], check=True,
                                   capture_output=True, text=True)
        outputs.append(json.loads(completed.stdout))

    benchmark.pedantic(run, rounds=3, iterations=1)
    ratios = [output["ack_us_p99"] / output["fsync_us_median"] for output in outputs]
    last = outputs[-1]
    benchmark.extra_info.update(
        ack_latency_ms_p50=round(last["ack_us_p50"] / 1e3, 3),
        ack_latency_ms_p99=round(last["ack_us_p99"] / 1e3, 3),
        ack_latency_ms_p999=round(last["ack_us_p999"] / 1e3, 3),
        fsync_ms_median=round(last["fsync_us_median"] / 1e3, 3),
        fsync_ms_p99=round(last["fsync_us_p99"] / 1e3, 3),
        p99_over_fsync=round(ratios[-1], 2),
        p99_over_fsync_rounds=[round(ratio, 2) for ratio in ratios],
    )
