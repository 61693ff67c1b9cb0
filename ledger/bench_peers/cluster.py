"""The cluster benchmark (issue 14), shared by `ledger bench --cluster` and bench/test_cluster.py: a replicated
ledger against a raw JetStream probe on the same servers in the same run.

- `probe`: publish, with no ledger, the bytes a ledger would (a batch of N transfers is one message of (N + 1) x
  64 bytes: its header record and its events; a single transfer 2 x 64), with the ledger's headers and fence, to
  an R3 stream with `in_flight` publishes awaiting their ack at once: messages/s and the round trip p50/p99.
- `run_ledger`: a ledger that publishes every committed batch to its shard's stream, driven by two producer
  threads: 16k-transfer batches (throughput) and single transfer() calls (throughput and per-call p50/p99).

The ledger is `ledger.open(DIR, cluster=URL, shard=NAME)` (durability "replicated", a one-node shard: its
primary), its publisher pipelined: each producer's call waits for its own batch's ack, outside the engine's lock,
so two producers have at most two batches in flight, and the ledger is set against the probe with that many in
flight (LEDGER_IN_FLIGHT = PRODUCERS). `open_with_publisher` (open_with_hooks + a StreamPublisher) is kept for a
comparison without the node (lease, reports)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import nats
import numpy as np

import ledger
from ledger.api import open_with_hooks
from ledger.cluster import names, stream
from ledger.cluster.connection import connect_arguments, parse_urls

RECORD_BYTES = 64
BATCH_TRANSFERS = 16_384          # the batch the issue names: one message of 16,385 records (1 MiB + 64 bytes)
PRODUCERS = 2                     # producer threads on the ledger side
ACCOUNTS = 1_000
SETTLEMENT = 1                    # funds every transfer (no limit), so none is rejected and every row is work
FIRST_ACCOUNT = 2
REPLICAS = 3
PROBE_TIME_LIMIT_S = 60.0         # a probe stops after this much even if messages remain (a slow disk)


@dataclasses.dataclass(frozen=True)
class Rate:
    """One measured row: `count` units (messages or transfers) in `seconds`, and per-operation latencies."""
    label: str
    count: int
    seconds: float
    p50_us: float | None = None
    p99_us: float | None = None

    @property
    def per_second(self) -> float:
        """Units per second."""
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        """The row for results.json."""
        return {**dataclasses.asdict(self), "per_second": self.per_second}


def percentiles_us(seconds: list[float]) -> tuple[float | None, float | None]:
    """p50 and p99 of `seconds`, in microseconds (None, None for no samples)."""
    if not seconds:
        return None, None
    values = np.array(seconds) * 1e6
    return round(float(np.percentile(values, 50)), 1), round(float(np.percentile(values, 99)), 1)


# -- the raw JetStream probe --

def prepare_stream(url: str, shard: str) -> None:
    """Create shard `shard`'s R3 stream and wait until every server of `url` routes a publish to it
    (ledger.cluster.stream.ready_stream through a connection to each): a new stream's leader is elected and its
    subject learned by the other servers a moment after it is created, and a publish before that finds no
    responder."""
    async def main(server: str) -> None:
        connection = await nats.connect(**connect_arguments(server), connect_timeout=names.CONNECT_TIMEOUT_S)
        try:
            await stream.ready_stream(connection.jetstream(timeout=names.REQUEST_TIMEOUT_S), shard, REPLICAS)
        finally:
            await connection.close()
    for server in parse_urls(url):
        asyncio.run(main(server.url))


async def _probe(url: str, shard: str, message_bytes: int, messages: int, in_flight: int,
                 time_limit_s: float) -> Rate:
    connection = await nats.connect(**connect_arguments(url), connect_timeout=names.CONNECT_TIMEOUT_S)
    try:
        js = connection.jetstream(timeout=names.REQUEST_TIMEOUT_S)
        info = await stream.ready_stream(js, shard, REPLICAS)
        data = os.urandom(message_bytes)
        last_sequence, position, began = info.state.last_seq, 1, time.perf_counter()
        latencies: list[float] = []
        window: set[asyncio.Task] = set()

        async def publish(headers: dict[str, str]) -> None:
            sent = time.perf_counter()
            await js.publish(stream.subject(shard), data, timeout=names.ACK_TIMEOUT_S, stream=stream.stream_name(shard),
                             headers=headers)
            latencies.append(time.perf_counter() - sent)
        for _ in range(messages):
            if time.perf_counter() - began > time_limit_s:
                break
            end = position + message_bytes // RECORD_BYTES
            # An id unique in the stream (a rerun on it must not be deduplicated), as a position is.
            headers = {names.HEADER_MESSAGE_ID: f"probe-{last_sequence + 1}", names.HEADER_END_POSITION: str(end),
                       names.HEADER_EXPECTED_LAST_SEQUENCE: str(last_sequence), names.HEADER_EPOCH: "1",
                       names.HEADER_NODE: "probe"}
            window.add(asyncio.ensure_future(publish(headers)))
            await asyncio.sleep(0)     # let the task send now: the fence needs the publishes in order
            last_sequence, position = last_sequence + 1, end
            if len(window) >= in_flight:
                done, window = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        for task in asyncio.as_completed(list(window)):
            await task
        seconds = time.perf_counter() - began
    finally:
        await connection.close()
    p50, p99 = percentiles_us(latencies)
    return Rate(f"JetStream probe R{REPLICAS}, {message_bytes:,}-byte messages, {in_flight} in flight",
                len(latencies), seconds, p50, p99)


def probe(url: str, shard: str, message_bytes: int, messages: int, in_flight: int,
          time_limit_s: float = PROBE_TIME_LIMIT_S) -> Rate:
    """Publish `messages` messages of `message_bytes` to shard `shard`'s stream (R3, created if missing) with
    `in_flight` unacknowledged at most, fenced as the ledger's publisher is; messages/s and ack round trip."""
    assert message_bytes % RECORD_BYTES == 0 and messages >= 1 and 1 <= in_flight <= names.PUBLISH_IN_FLIGHT_MAX
    prepare_stream(url, shard)
    return asyncio.run(_probe(url, shard, message_bytes, messages, in_flight, time_limit_s))


def batch_message_bytes(transfers: int) -> int:
    """The bytes of a committed batch of `transfers` transfers: its header record and one record per event."""
    return (transfers + 1) * RECORD_BYTES


# -- the ledger --

@contextlib.contextmanager
def open_with_publisher(directory: str, url: str, shard: str, **options: Any) -> Iterator[ledger.Ledger]:
    """Today's replicated primary: open_with_hooks with a StreamPublisher (R3), attached after the open."""
    with stream.StreamPublisher(url, shard, replicas=REPLICAS) as publisher:
        handle = open_with_hooks(directory, create=True, publish=publisher, durability="fsync", **options)
        try:
            publisher.attach(handle.store)
            yield handle
        finally:
            handle.close()


@contextlib.contextmanager
def open_with_cluster(directory: str, url: str, shard: str, **options: Any) -> Iterator[ledger.Ledger]:
    """The replicated open of issue 14: `ledger.open(DIR, cluster=URL, shard=NAME)`, the node's primary."""
    handle = ledger.open(directory, create=True, cluster=url, shard=shard, **options)
    try:
        yield handle
    finally:
        handle.close()


OPEN_REPLICATED: Callable[..., contextlib.AbstractContextManager[ledger.Ledger]] = open_with_cluster
LEDGER_IN_FLIGHT = PRODUCERS   # each producer's call waits for its own ack: this many batches in flight at most


def _fund(handle: ledger.Ledger) -> None:
    accounts = ledger.accounts_batch(ACCOUNTS + 1)
    accounts["id"] = [SETTLEMENT] + list(range(FIRST_ACCOUNT, FIRST_ACCOUNT + ACCOUNTS))
    accounts["ledger"] = 1
    accounts["min_balance"][0] = ledger.BALANCE_MIN
    accounts["max_balance"] = ledger.BALANCE_MAX
    assert not handle.create_accounts(accounts).any()


def _batch(first_id: int, size: int, rng: np.random.Generator) -> np.ndarray:
    batch = ledger.transfers_batch(size)
    batch["id"] = np.arange(first_id, first_id + size, dtype=np.uint64)
    batch["debit_account"] = SETTLEMENT
    batch["credit_account"] = rng.integers(FIRST_ACCOUNT, FIRST_ACCOUNT + ACCOUNTS, size)
    batch["amount"] = 1
    batch["ledger"] = 1
    return batch


def _producers(work: Callable[[int], list[float]]) -> tuple[float, list[float]]:
    """Run work(producer) on PRODUCERS threads at once: the wall time and every producer's latencies."""
    results: list[list[float]] = [[] for _ in range(PRODUCERS)]
    errors: list[BaseException] = []

    def run(producer: int) -> None:
        try:
            results[producer] = work(producer)
        except BaseException as error:   # noqa: BLE001 - re-raised in the caller's thread below
            errors.append(error)
    threads = [threading.Thread(target=run, args=(producer,)) for producer in range(PRODUCERS)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - began, [latency for result in results for latency in result]


def run_ledger(directory: str, url: str, shard: str, batches: int, calls: int,
               batch_transfers: int = BATCH_TRANSFERS) -> tuple[Rate, Rate]:
    """A replicated ledger on shard `shard`: `batches` batches of `batch_transfers` and then `calls` single
    transfer() calls, each split over PRODUCERS threads; (batch row, single-call row), in transfers."""
    assert batches >= PRODUCERS and calls >= PRODUCERS, "every producer needs work"
    transfers = batches * batch_transfers + calls
    options = {"accounts_capacity": ACCOUNTS + 1, "transfers_capacity": transfers,
               "journal_records_reserved": transfers + 2 * ACCOUNTS + (1 << 16)}
    rng = np.random.default_rng(14)
    prepared = [_batch(1 + index * batch_transfers, batch_transfers, rng) for index in range(batches)]
    first_call_id = 1 + batches * batch_transfers
    prepare_stream(url, shard)
    with OPEN_REPLICATED(directory, url, shard, **options) as handle:
        _fund(handle)

        def batch_work(producer: int) -> list[float]:
            timings = []
            for batch in prepared[producer::PRODUCERS]:
                began = time.perf_counter()
                assert not handle.transfers(batch).any()
                timings.append(time.perf_counter() - began)
            return timings

        def call_work(producer: int) -> list[float]:
            timings = []
            for number in range(producer, calls, PRODUCERS):
                credit = FIRST_ACCOUNT + number % ACCOUNTS
                began = time.perf_counter()
                result = handle.transfer(first_call_id + number, SETTLEMENT, credit, 1)
                timings.append(time.perf_counter() - began)
                assert result == ledger.TransferResult.OK, result
            return timings
        batch_seconds, batch_latencies = _producers(batch_work)
        call_seconds, call_latencies = _producers(call_work)
    batch_row = Rate(f"ledger R{REPLICAS}, {batch_transfers:,}-transfer batches, {PRODUCERS} producers",
                     batches * batch_transfers, batch_seconds, *percentiles_us(batch_latencies))
    call_row = Rate(f"ledger R{REPLICAS}, single transfer() calls, {PRODUCERS} producers", calls, call_seconds,
                    *percentiles_us(call_latencies))
    return batch_row, call_row


# -- `ledger bench --cluster`: the probe and the ledger side by side on one local cluster --

@dataclasses.dataclass(frozen=True)
class Counts:
    """How much each row of the side-by-side run does."""
    batches: int            # ledger 16k batches (and the batch probe's messages, per in-flight setting)
    calls: int              # ledger single calls (and the single probe's messages)


QUICK_COUNTS = Counts(batches=8, calls=400)
FULL_COUNTS = Counts(batches=60, calls=4_000)
TARGET_RATIO = 0.8          # the target: the ledger at least 0.8x the probe with the same in flight


def side_by_side(url: str, directory: str, counts: Counts, batch_transfers: int = BATCH_TRANSFERS) -> dict[str, Any]:
    """The probe (1, LEDGER_IN_FLIGHT and PUBLISH_IN_FLIGHT_MAX in flight, batch and single-transfer messages) and the ledger on
    the cluster at `url`; the rows and the ratios ledger/probe (against the probe with LEDGER_IN_FLIGHT)."""
    batch_bytes, single_bytes = batch_message_bytes(batch_transfers), batch_message_bytes(1)
    probes = {}
    for kind, message_bytes, messages in (("batch", batch_bytes, counts.batches), ("single", single_bytes,
                                                                                   counts.calls)):
        for in_flight in sorted({1, LEDGER_IN_FLIGHT, names.PUBLISH_IN_FLIGHT_MAX}):
            probes[(kind, in_flight)] = probe(url, f"probe-{kind}-{in_flight}", message_bytes,
                                              messages * (1 if in_flight == 1 else 2), in_flight)
    batch_row, call_row = run_ledger(os.path.join(directory, "ledger"), url, "bench", counts.batches, counts.calls,
                                     batch_transfers)
    reference_batch, reference_single = probes[("batch", LEDGER_IN_FLIGHT)], probes[("single", LEDGER_IN_FLIGHT)]
    return {"rows": [row.as_json() for row in [*probes.values(), batch_row, call_row]],
            "ledger_in_flight": LEDGER_IN_FLIGHT, "batch_transfers": batch_transfers,
            "batch_ratio": batch_row.per_second / (reference_batch.per_second * batch_transfers),
            "single_ratio": call_row.per_second / reference_single.per_second,
            "batch_ratio_to_pipelined_probe": batch_row.per_second / (
                probes[("batch", names.PUBLISH_IN_FLIGHT_MAX)].per_second * batch_transfers),
            "target_ratio": TARGET_RATIO}


def report_lines(report: dict[str, Any]) -> list[str]:
    """The side-by-side run as text: a row per probe and ledger setting, then the ratios."""
    lines = []
    for row in report["rows"]:
        unit = "transfers/s" if row["label"].startswith("ledger") else "messages/s"
        latency = (f", p50 {row['p50_us'] / 1000:,.2f} ms, p99 {row['p99_us'] / 1000:,.2f} ms"
                   if row["p50_us"] is not None else "")
        lines.append(f"  {row['label']}: {row['count']:,} in {row['seconds']:.2f} s = {row['per_second']:,.1f} "
                     f"{unit}{latency}")
    in_flight = report["ledger_in_flight"]
    verdict = "meets" if min(report["batch_ratio"], report["single_ratio"]) >= report["target_ratio"] else "misses"
    lines += [f"ledger/probe ({in_flight} in flight, as the ledger's producers): {report['batch_ratio']:.2f}x for "
              f"{report['batch_transfers']:,}-transfer batches, {report['single_ratio']:.2f}x for single calls "
              f"({verdict} the {report['target_ratio']}x target)",
              f"ledger batches / probe with {names.PUBLISH_IN_FLIGHT_MAX} in flight (the publisher's bound): "
              f"{report['batch_ratio_to_pipelined_probe']:.2f}x"]
    return lines
