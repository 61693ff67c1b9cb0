"""Replicated throughput and latency (issue 14) on a local three-node JetStream cluster (sync_interval always,
R3): a raw JetStream probe publishing the bytes a ledger would (16k-transfer batches: 16,385 x 64 bytes; single
transfers: 2 x 64 bytes) with 1, 2 (the ledger's producers) and PUBLISH_IN_FLIGHT_MAX in flight and no ledger, then the ledger itself with
two producer threads (16k batches, single calls); the ledger's ratio to the probe with the same number in flight.

Run: python -m pytest bench/test_cluster.py --benchmark-only

The code is ledger/bench_peers/cluster.py (shared with `ledger bench --cluster`): the ledger is
`ledger.open(DIR, cluster=URL, shard=NAME)` with its pipelined publisher."""
from __future__ import annotations

import pytest

from ledger.bench_peers import cluster as cluster_bench
from ledger.cluster import names
from ledger.cluster.servers import LocalCluster

BATCH_MESSAGES = 60          # 16k-transfer batches per probe round and ledger round (~1 M transfers)
SINGLE_MESSAGES = 3_000
IN_FLIGHT = sorted({1, cluster_bench.LEDGER_IN_FLIGHT, names.PUBLISH_IN_FLIGHT_MAX})
MEASURED: dict[tuple[str, int], cluster_bench.Rate] = {}   # the probe rows, for the ledger rows' ratios


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=3, port=0) as running:
        yield running


def record(benchmark, row: cluster_bench.Rate, **extra: float) -> None:
    benchmark.extra_info.update(label=row.label, count=row.count, per_second=round(row.per_second, 1),
                                p50_us=row.p50_us, p99_us=row.p99_us, **extra)


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
@pytest.mark.parametrize("kind", ["batch", "single"])
def test_jetstream_probe(benchmark, cluster, kind, in_flight):
    transfers = cluster_bench.BATCH_TRANSFERS if kind == "batch" else 1
    messages = BATCH_MESSAGES if kind == "batch" else SINGLE_MESSAGES
    rows = []

    def run():
        rows.append(cluster_bench.probe(cluster.url, f"probe-{kind}-{in_flight}",
                                        cluster_bench.batch_message_bytes(transfers), messages, in_flight))
    benchmark.pedantic(run, rounds=1, iterations=1)
    MEASURED[(kind, in_flight)] = rows[-1]
    record(benchmark, rows[-1], transfers_per_second=round(rows[-1].per_second * transfers))


def test_ledger_replicated(benchmark, cluster, tmp_path):
    rows = []

    def run():
        rows.append(cluster_bench.run_ledger(str(tmp_path / "ledger"), cluster.url, "bench", BATCH_MESSAGES,
                                             SINGLE_MESSAGES))
    benchmark.pedantic(run, rounds=1, iterations=1)
    batch_row, call_row = rows[-1]
    extra = {}
    reference = cluster_bench.LEDGER_IN_FLIGHT
    if ("batch", reference) in MEASURED and ("single", reference) in MEASURED:
        extra["batch_ratio_to_probe"] = round(batch_row.per_second / (
            MEASURED[("batch", reference)].per_second * cluster_bench.BATCH_TRANSFERS), 3)
        extra["single_ratio_to_probe"] = round(call_row.per_second / MEASURED[("single", reference)].per_second, 3)
    benchmark.extra_info.update(
        batch_transfers_per_second=round(batch_row.per_second), batch_p50_us=batch_row.p50_us,
        batch_p99_us=batch_row.p99_us, single_calls_per_second=round(call_row.per_second, 1),
        single_p50_us=call_row.p50_us, single_p99_us=call_row.p99_us, ledger_in_flight=reference, **extra)
    print(f"\n{batch_row}\n{call_row}\n{extra}")
