"""`ledger bench`: the same deterministic transfer workload against SQLite, PostgreSQL, Redis, a plain-Python
engine and `ledger` itself, every peer's final balances and accepted transfers checked against `ledger`'s.

Prints a table of transfers/s with each row's ratio to the `ledger` row of the same kind (like with like: a
commit per transfer against `ledger` syncing every transfer() call, a batch committed and synced as one against
`ledger` transfers() batches with durability=fsync, a batch not synced before the answer against durability=os),
per-call latencies of `ledger` single calls and small batches, and writes results.json, table.md and
peers_chart.png (if matplotlib is installed) to the results directory (default: bench-results/<timestamp>/ in the
current directory, never the source checkout). PostgreSQL and Redis are started on 127.0.0.1 in a temporary
directory and always stopped.

`ledger bench --cluster` instead runs a replicated ledger against a raw JetStream probe (the same bytes, R3,
sync_interval always, the same number in flight) on a local three-node cluster it starts in the data directory
and always stops, and prints the ratio ledger/probe and the p50/p99 (ledger/bench_peers/cluster.py).

The peers live in ledger/bench_peers/ (part of the installed package: `pip install ".[bench]"` has all it needs).

Exit codes: 0 every row agrees with ledger, 1 a cross-check failed or a peer group failed to run, 2 usage,
130 interrupted."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ledger.bench_peers import cluster as cluster_bench
from ledger.bench_peers import suite as peer_suite
from ledger.bench_peers.ledger_peer import measure_latency
from ledger.bench_peers.runner import RunLimits, run_peer
from ledger.bench_peers.workload import make_workload, reference_state

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FULL = {"accounts": 100_000, "transfers": 1_000_000, "per_commit_transfers": 20_000, "time_limit_s": 120.0,
        "latency_calls": 20_000, "latency_seconds": 5.0}
QUICK = {"accounts": 10_000, "transfers": 100_000, "per_commit_transfers": 1_000, "time_limit_s": 15.0,
         "latency_calls": 2_000, "latency_seconds": 0.5}
DEFAULT_PEERS = "sqlite,postgres,redis,python,ledger"
LATENCY_CASES = ((0, "os"), (0, "fsync"), (1, "fsync"), (10, "fsync"), (100, "fsync"), (1, "os"), (10, "os"),
                 (100, "os"))  # (batch size, durability); batch size 0 = single transfer() calls
PLAIN_PROGRESS_INTERVAL_S = 2.0
RESULTS_DIRECTORY_NAME = "bench-results"  # under the current directory, unless --out says where
# The ledger row each kind of row is compared with, keyed by (commit unit, durable), and its short name in tables.
REFERENCE_NAMES = {("batch", True): "ledger batch, fsync", ("transfer", True): "ledger per call, fsync",
                   ("batch", False): "ledger batch, os", ("transfer", False): "ledger per call, os"}
LOAD_WARNING = 0.5  # a 1-minute load average above this means someone else shares the CPUs or the disk


def parser(group_names: tuple[str, ...]) -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(prog="ledger bench", description=__doc__.split("\n\n")[0],
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("--quick", action="store_true",
                         help=f"small run ({QUICK['accounts']:,} accounts, {QUICK['transfers']:,} transfers)")
    command.add_argument("--accounts", type=int, help=f"accounts (default {FULL['accounts']:,})")
    command.add_argument("--transfers", type=int, help=f"transfers (default {FULL['transfers']:,})")
    command.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma-separated subset of {','.join(group_names)}")
    command.add_argument("--out", type=Path,
                         help=f"results directory (default {RESULTS_DIRECTORY_NAME}/<timestamp>/ in the current "
                              f"directory)")
    command.add_argument("--batch-size", type=int, default=8_192, help="transfers per batch commit (default 8192)")
    command.add_argument("--per-commit-transfers", type=int,
                         help="transfers run by rows that commit every transfer (default "
                              f"{FULL['per_commit_transfers']:,}, quick {QUICK['per_commit_transfers']:,})")
    command.add_argument("--time-limit-s", type=float, help="timed seconds after which a row stops at its next "
                         f"commit (default {FULL['time_limit_s']:.0f}, quick {QUICK['time_limit_s']:.0f})")
    command.add_argument("--seed", type=int, default=2026, help="workload seed (default 2026)")
    command.add_argument("--data-dir", type=Path, help="where the temporary data directory goes (default: the "
                         "system temporary directory; put it on the disk you want to measure)")
    command.add_argument("--keep-data", action="store_true", help="keep the temporary data directory")
    command.add_argument("--cluster", action="store_true",
                         help="instead of the peers: a replicated ledger against a raw JetStream probe on a local "
                              "3-node cluster started in the data directory (docs/CLUSTER.md)")
    command.add_argument("--cluster-batches", type=int, help="--cluster: 16k-transfer batches (default "
                         f"{cluster_bench.FULL_COUNTS.batches}, quick {cluster_bench.QUICK_COUNTS.batches})")
    command.add_argument("--cluster-calls", type=int, help="--cluster: single transfer() calls (default "
                         f"{cluster_bench.FULL_COUNTS.calls:,}, quick {cluster_bench.QUICK_COUNTS.calls})")
    return command


def parse_arguments(argv: list[str], group_names: tuple[str, ...]) -> argparse.Namespace:
    command = parser(group_names)
    arguments = command.parse_args(argv)
    defaults = QUICK if arguments.quick else FULL
    for name in ("accounts", "transfers", "per_commit_transfers", "time_limit_s"):
        if getattr(arguments, name) is None:
            setattr(arguments, name, defaults[name])
    arguments.latency_calls = defaults["latency_calls"]
    arguments.latency_seconds = defaults["latency_seconds"]
    arguments.peer_names = [name.strip() for name in arguments.peers.split(",") if name.strip()]
    unknown = sorted(set(arguments.peer_names) - set(group_names))
    if unknown or not arguments.peer_names:
        command.error(f"--peers: unknown {unknown}; choose from {','.join(group_names)}")
    if arguments.accounts < 2 or arguments.transfers < 1:
        command.error("--accounts must be >= 2 and --transfers >= 1")
    if not 1 <= arguments.batch_size <= 2**23 or arguments.per_commit_transfers < 1 or arguments.time_limit_s <= 0:
        command.error("--batch-size must be in [1, 2**23], --per-commit-transfers >= 1, --time-limit-s > 0")
    counts = cluster_bench.QUICK_COUNTS if arguments.quick else cluster_bench.FULL_COUNTS
    arguments.cluster_batches = arguments.cluster_batches or counts.batches
    arguments.cluster_calls = arguments.cluster_calls or counts.calls
    if arguments.cluster_batches < 2 or arguments.cluster_calls < 2:
        command.error("--cluster-batches and --cluster-calls must be >= 2 (one per producer thread)")
    if arguments.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        arguments.out = Path.cwd() / RESULTS_DIRECTORY_NAME / stamp
    return arguments


# -- progress --

class ProgressDisplay:
    """A progress bar per row: tqdm when installed, a plain line every few seconds otherwise, nothing when the
    standard error is not a terminal (logs and CI stay clean)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.tqdm = None
        if self.enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm
            self.tqdm = tqdm

    @contextlib.contextmanager
    def row(self, label: str) -> Iterator[Callable[[int, int], None] | None]:
        if not self.enabled:
            yield None
            return
        state: dict[str, Any] = {"bar": None, "printed_at": time.monotonic()}

        def update(done: int, target: int) -> None:
            if self.tqdm is not None:
                if state["bar"] is None:
                    state["bar"] = self.tqdm(total=target, desc=_shorten(label, 60), unit=" transfers",
                                             unit_scale=True, leave=False, file=sys.stderr)
                state["bar"].update(done - state["bar"].n)
            elif time.monotonic() - state["printed_at"] >= PLAIN_PROGRESS_INTERVAL_S or done == target:
                state["printed_at"] = time.monotonic()
                print(f"    {done:,} / {target:,} transfers ({100 * done // target}%)", file=sys.stderr)

        try:
            yield update
        finally:
            if state["bar"] is not None:
                state["bar"].close()


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


# -- machine --

def machine_description(directory: Path) -> dict[str, Any]:
    """What the figures depend on: CPU, cores, memory, the file system under the data and its sync latency."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device, filesystem = _mount_of(directory)
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory_bytes / 2**30, 1),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2),
            "data_directory": str(directory), "device": device, "filesystem": filesystem,
            "fdatasync_64_bytes_p50_us": _fdatasync_latency_us(directory), "kernel": platform.release(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version}


def _mount_of(directory: Path) -> tuple[str, str]:
    best = ("unknown", "unknown", "")
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            device, mount_point, filesystem = line.split()[:3]
            inside = str(directory).startswith(mount_point.rstrip("/") + "/") or str(directory) == mount_point
            if inside and len(mount_point) >= len(best[2]):
                best = (device, filesystem, mount_point)
    return best[0], best[1]


def _fdatasync_latency_us(directory: Path, samples: int = 200) -> float:
    """Median of write(64 bytes) + fdatasync: the floor under every durable commit on this disk."""
    path = directory / "fdatasync-probe"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    timings = []
    try:
        for _ in range(samples):
            began = time.perf_counter()
            os.write(descriptor, b"\0" * 64)
            os.fdatasync(descriptor)
            timings.append(time.perf_counter() - began)
    finally:
        os.close(descriptor)
        path.unlink()
    return round(sorted(timings)[samples // 2] * 1e6, 1)


RECORD_BYTES = 64


def disk_limit(directory: Path, chunk_records: int, total_bytes: int) -> dict[str, float]:
    """What the disk itself allows a group commit: sequential pwrite of `chunk_records` 64-byte records, fdatasync
    after each, into a preallocated, zero-filled file (as the journal's reserved room is), in records/s."""
    chunk_bytes = chunk_records * RECORD_BYTES
    total_bytes = max(total_bytes // chunk_bytes, 8) * chunk_bytes
    path = directory / "disk-limit-probe"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(descriptor, 0, total_bytes)
        zeros = bytes(4 << 20)
        for offset in range(0, total_bytes, len(zeros)):
            os.pwrite(descriptor, zeros[:total_bytes - offset], offset)
        os.fsync(descriptor)
        data = os.urandom(chunk_bytes)
        began = time.perf_counter()
        for offset in range(0, total_bytes, chunk_bytes):
            os.pwrite(descriptor, data, offset)
            os.fdatasync(descriptor)
        seconds = time.perf_counter() - began
    finally:
        os.close(descriptor)
        path.unlink()
    return {"chunk_records": chunk_records, "bytes": total_bytes,
            "records_per_second": round(total_bytes / RECORD_BYTES / seconds)}


def disk_limit_line(report: dict[str, Any]) -> str | None:
    limit = report.get("disk_limit")
    durable = ledger_durable_rate(report["rows"])
    if not limit:
        return None
    line = (f"disk limit: pwrite + fdatasync of {limit['chunk_records']:,}-record chunks into a zero-filled file: "
            f"{limit['records_per_second']:,} records/s")
    if durable:
        line += f"; ledger durable reaches {durable / limit['records_per_second']:.0%} of it"
    return line


# -- running --

@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM becomes an exception, so servers and files are cleaned up as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signal_number: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal_number}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_groups(suite: Any, arguments: argparse.Namespace, workload: Any, work_directory: Path,
               report: dict[str, Any]) -> None:
    """Run every selected group's rows in turn; a group's server lives only while its rows run."""
    limits = RunLimits(per_commit_transfers=arguments.per_commit_transfers, time_limit_s=arguments.time_limit_s)
    display = ProgressDisplay()
    for name in arguments.peer_names:
        group = suite.GROUPS[name]
        reason = group.missing()
        if reason:
            print(f"  {name}: skipped: {reason}")
            report["skipped"].append({"group": name, "reason": reason})
            continue
        try:
            with group.rows(work_directory / name / "server", arguments.batch_size) as rows:
                for number, peer in enumerate(rows):
                    print(f"  {peer.label} ...", flush=True)
                    with display.row(peer.label) as progress:
                        result = run_peer(peer, workload, work_directory / name / f"row-{number}", limits, progress)
                    report["rows"].append(result)
                    print(f"    {_row_line(result)}", flush=True)
        except Exception as error:  # noqa: BLE001 - reported and counted as a failure, never swallowed
            # One peer's failure (a server that will not start, a driver error) must not hide the others;
            # Ctrl-C and SIGTERM (KeyboardInterrupt) are not an Exception and still stop the whole run.
            message = f"{type(error).__name__}: {error}"
            print(f"  {name}: FAILED: {message}")
            report["errors"].append({"group": name, "error": message})


def _row_line(result: Any) -> str:
    cut = f", stopped by the {result.stopped_by}" if result.stopped_by else ""
    return (f"{result.transfers:,} transfers in {result.seconds:.2f} s = {result.transfers_per_second:,.0f}/s "
            f"({result.accepted:,} accepted, {result.rejected:,} rejected{cut}); cross-check: {result.check}")


def run_latency(arguments: argparse.Namespace, workload: Any, work_directory: Path) -> list[Any]:
    results = []
    for number, (batch_size, durability) in enumerate(LATENCY_CASES):
        result = measure_latency(workload, work_directory / "latency" / str(number), batch_size, durability,
                                 arguments.latency_calls, arguments.latency_seconds)
        print(f"  {result.label}: {result.calls:,} calls, p50 {result.p50_us:,.1f} us, p99 {result.p99_us:,.1f} "
              f"us, p99.9 {result.p999_us:,.1f} us", flush=True)
        results.append(result)
    return results


# -- output --

def ledger_durable_rate(rows: list[Any]) -> float | None:
    """The rate every ratio is taken against: ledger, batches, durability=fsync."""
    for row in rows:
        if row.group == "ledger" and "transfers()" in row.label and "fsync" in row.label:
            return row.transfers_per_second
    return None


def reference_row(row: Any, rows: list[Any]) -> Any | None:
    """The ledger row of the same kind as `row` (commit unit and durability): what its ratio is taken against, so
    that a per-transfer commit is never set against a batched one. None when ledger did not run."""
    for candidate in rows:
        if candidate.group == "ledger" and (candidate.commit_unit, candidate.durable) == (row.commit_unit,
                                                                                           row.durable):
            return candidate
    return None


def like_ratio(row: Any, rows: list[Any]) -> float | None:
    """The same-kind ledger row's transfers/s over this row's (None without one, or for a row that did nothing)."""
    reference = reference_row(row, rows)
    if reference is None or not row.seconds or not row.transfers_per_second:
        return None
    return reference.transfers_per_second / row.transfers_per_second


def table_lines(rows: list[Any], markdown: bool) -> list[str]:
    header = ("peer", "transfers", "seconds", "transfers/s", "ledger ÷ peer (same kind)", "compared with",
              "cross-check")
    body = []
    for row in rows:
        ratio = like_ratio(row, rows)
        count = f"{row.transfers:,}" + (" (time limit)" if row.stopped_by else "")
        body.append((row.label, count, f"{row.seconds:.2f}", f"{row.transfers_per_second:,.0f}",
                     "n/a" if ratio is None else f"{ratio:,.1f}×", REFERENCE_NAMES[(row.commit_unit, row.durable)],
                     row.check))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        return lines + ["| " + " | ".join(cells) + " |" for cells in body]
    widths = [max(len(cells[column]) for cells in [header, *body]) for column in range(len(header))]
    align = ["<", ">", ">", ">", ">", "<", "<"]
    return ["  ".join(f"{cell:{align[column]}{widths[column]}}" for column, cell in enumerate(cells))
            for cells in [header, *body]]


def latency_lines(latency: list[Any], markdown: bool) -> list[str]:
    header = ("call", "calls", "p50 µs", "p99 µs", "p99.9 µs", "transfers/s")
    body = [(result.label, f"{result.calls:,}", f"{result.p50_us:,.1f}", f"{result.p99_us:,.1f}",
             f"{result.p999_us:,.1f}", f"{result.transfers_per_second:,.0f}") for result in latency]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        return lines + ["| " + " | ".join(cells) + " |" for cells in body]
    widths = [max(len(cells[column]) for cells in [header, *body]) for column in range(len(header))]
    return ["  ".join(f"{cell:{'<' if column == 0 else '>'}{widths[column]}}" for column, cell in enumerate(cells))
            for cells in [header, *body]]


def write_chart(rows: list[Any], title: str, path: Path) -> str | None:
    """A horizontal bar chart of transfers/s (log scale); returns why not, when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install matplotlib): no chart written"
    if not rows:
        return "no rows to chart"
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot
    colors = {"ledger": "#1b7837", "python": "#762a83", "sqlite": "#2166ac", "postgres": "#4393c3",
              "redis": "#d6604d"}
    figure, axes = pyplot.subplots(figsize=(11, 0.42 * len(rows) + 1.6), dpi=90)
    positions = range(len(rows))[::-1]
    rates = [max(row.transfers_per_second, 1.0) for row in rows]
    axes.barh(list(positions), rates, color=[colors.get(row.group, "grey") for row in rows])
    axes.set_yticks(list(positions), [_shorten(row.label, 78) for row in rows], fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("transfers per second (log scale)")
    axes.set_title(title, fontsize=9)
    for position, rate, row in zip(positions, rates, rows):
        like = like_ratio(row, rows)
        ratio = (f"  ({REFERENCE_NAMES[(row.commit_unit, row.durable)]} is {like:,.1f}×)"
                 if like is not None else "")
        axes.text(rate, position, f" {rate:,.0f}/s{ratio}", va="center", fontsize=7)
    axes.set_xlim(right=max(rates) * 60)  # room for the labels right of the longest bar
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return None


def write_outputs(arguments: argparse.Namespace, report: dict[str, Any]) -> None:
    out = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    rows, latency = report["rows"], report["latency"]
    reference_rate = ledger_durable_rate(rows)
    title = (f"ledger bench: {arguments.accounts:,} accounts, {arguments.transfers:,} transfers, "
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores")
    chart_problem = write_chart(rows, title, out / "peers_chart.png")
    if chart_problem:
        print(f"chart: {chart_problem}")
    markdown = table_lines(rows, markdown=True)
    if disk_limit_line(report):
        markdown += ["", disk_limit_line(report)]
    if latency:
        markdown += ["", *latency_lines(latency, markdown=True)]
    (out / "table.md").write_text("\n".join(markdown) + "\n")
    document = {**report, "rows": [_row_json(row, rows) for row in rows],
                "latency": [result.as_json() for result in latency],
                "ledger_durable_transfers_per_second": reference_rate,
                "chart": None if chart_problem else str(out / "peers_chart.png"), "chart_note": chart_problem}
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {out / 'results.json'}, {out / 'table.md'}" + ("" if chart_problem else
                                                                       f", {out / 'peers_chart.png'}"))


def _row_json(row: Any, rows: list[Any]) -> dict[str, Any]:
    reference = reference_row(row, rows)
    return {**row.as_json(), "compared_with": None if reference is None else reference.label,
            "ledger_over_peer": like_ratio(row, rows)}


def _print_summary(report: dict[str, Any]) -> None:
    rows = report["rows"]
    print()
    print("\n".join(table_lines(rows, markdown=False)))
    if any(row.stopped_by for row in rows):
        print("(time limit): the row stopped at a commit boundary after --time-limit-s; its check covers that prefix")
    if disk_limit_line(report):
        print(disk_limit_line(report))
    if report["latency"]:
        print()
        print("\n".join(latency_lines(report["latency"], markdown=False)))


def run(arguments: argparse.Namespace, suite: Any, work_directory: Path) -> dict[str, Any]:
    machine = machine_description(work_directory)
    print(f"ledger bench: {arguments.accounts:,} accounts, {arguments.transfers:,} transfers, batches of "
          f"{arguments.batch_size:,}, per-transfer-commit rows run {arguments.per_commit_transfers:,}; "
          f"peers {','.join(arguments.peer_names)}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, data on "
          f"{machine['device']} ({machine['filesystem']}), fdatasync of 64 bytes p50 "
          f"{machine['fdatasync_64_bytes_p50_us']} us")
    if machine["load_average_1m_at_start"] > LOAD_WARNING:
        print(f"warning: load average {machine['load_average_1m_at_start']} at start: other processes are running, "
              f"so the figures (the durable ones above all) understate what this machine can do")
    workload = make_workload(arguments.accounts, arguments.transfers, arguments.seed)
    reference = reference_state(workload, workload.transfer_count)  # computed once, outside every timing
    rejected = workload.transfer_count - reference.accepted_ids.size
    print(f"workload: {reference.accepted_ids.size:,} transfers accepted, {rejected:,} rejected for insufficient "
          f"funds (the reference every peer must match)")
    report: dict[str, Any] = {
        "command": "ledger bench " + " ".join(arguments.argv), "machine": machine,
        "parameters": {name: getattr(arguments, name) for name in (
            "accounts", "transfers", "batch_size", "per_commit_transfers", "time_limit_s", "seed", "quick",
            "latency_calls", "latency_seconds")} | {"peers": arguments.peer_names},
        "rows": [], "skipped": [], "errors": [], "latency": []}
    run_groups(suite, arguments, workload, work_directory, report)
    if "ledger" in arguments.peer_names:
        # Right after the ledger rows, on the same disk: the durable rate's ceiling, measured in the same run.
        report["disk_limit"] = disk_limit(work_directory, arguments.batch_size,
                                          (32 << 20) if arguments.quick else (256 << 20))
        print(f"  {disk_limit_line(report)}", flush=True)
        print("  latency per call (ledger):")
        report["latency"] = run_latency(arguments, workload, work_directory)
    report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["cross_check_passed"] = (bool(report["rows"]) and not report["errors"]
                                    and all(row.check == "ok" for row in report["rows"]))
    return report


def run_cluster(arguments: argparse.Namespace, work_directory: Path) -> int:
    """`ledger bench --cluster`: a local 3-node cluster in the work directory, the JetStream probe and the ledger
    side by side (ledger.bench_peers.cluster), the ratio printed and results.json written; servers always stopped."""
    from ledger.cluster.servers import LocalCluster
    machine = machine_description(work_directory)
    print(f"ledger bench --cluster: 3 nats-servers (sync_interval always), R3; {arguments.cluster_batches} batches "
          f"of {cluster_bench.BATCH_TRANSFERS:,}, {arguments.cluster_calls:,} single calls, "
          f"{cluster_bench.PRODUCERS} producers")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, data on {machine['device']} "
          f"({machine['filesystem']}), fdatasync of 64 bytes p50 {machine['fdatasync_64_bytes_p50_us']} us")
    counts = cluster_bench.Counts(arguments.cluster_batches, arguments.cluster_calls)
    with LocalCluster(work_directory / "nats", nodes=3, port=0) as cluster:
        report = cluster_bench.side_by_side(cluster.url, str(work_directory), counts)
    print("\n".join(cluster_bench.report_lines(report)), flush=True)
    arguments.out.mkdir(parents=True, exist_ok=True)
    document = {"command": "ledger bench " + " ".join(arguments.argv), "machine": machine, **report}
    (arguments.out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {arguments.out / 'results.json'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `ledger bench -- --quick`: the separator the top-level parser lets through
        argv = argv[1:]
    arguments = parse_arguments(argv, peer_suite.GROUP_NAMES)
    arguments.argv = argv
    if arguments.data_dir is not None:
        arguments.data_dir.mkdir(parents=True, exist_ok=True)
    work_directory = Path(tempfile.mkdtemp(prefix="ledger-bench-", dir=arguments.data_dir))
    # The postgres user (PostgreSQL refuses to run as root) must be able to reach its data directory inside.
    work_directory.chmod(0o711)
    try:
        with stop_on_sigterm():
            if arguments.cluster:
                return run_cluster(arguments, work_directory)
            report = run(arguments, peer_suite, work_directory)
    except KeyboardInterrupt:
        print("ledger bench: interrupted; servers stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if arguments.keep_data:
            print(f"data kept in {work_directory}")
        else:
            shutil.rmtree(work_directory, ignore_errors=True)
    _print_summary(report)
    write_outputs(arguments, report)
    passed = report["cross_check_passed"]
    print("cross-check: every row agrees with ledger" if passed else "cross-check: FAILED (see above)")
    return EXIT_OK if passed else EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
