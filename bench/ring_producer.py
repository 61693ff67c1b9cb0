"""A producer process for bench/test_ring.py: sends batches (or single transfers) through the ring, prints its
rate and per-call latencies (ns) as JSON on stdout.

    python bench/ring_producer.py DIR SEED CALLS BATCH_SIZE FIRST_ID

LEDGER_BENCH_SPIN_COUNT sets the client's spin_count (compare wait strategies side by side).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import ledger
from workload import FIRST_ACCOUNT_ID


def main() -> None:
    directory, seed, calls, batch_size, first_id = sys.argv[1], *map(int, sys.argv[2:6])
    accounts = int(sys.argv[6]) if len(sys.argv) > 6 else 10_000
    rng = np.random.default_rng(seed)
    # LEDGER_BENCH_SPIN_COUNT: the client's spin_count, to compare wait strategies (default: the library's).
    spin_count = os.environ.get("LEDGER_BENCH_SPIN_COUNT")
    client = ledger.connect(directory, **({"spin_count": int(spin_count)} if spin_count else {}))
    latencies = np.empty(calls, np.int64)
    next_id = first_id
    started = time.perf_counter()
    for call in range(calls):
        if batch_size == 1:
            debit, credit = FIRST_ACCOUNT_ID + rng.integers(0, accounts, 2)
            began = time.perf_counter_ns()
            client.transfer(next_id, int(debit), int(credit) if credit != debit else int(debit) + 1, 1)
        else:
            rows = ledger.transfers_batch(batch_size)
            rows["id"] = np.arange(next_id, next_id + batch_size, dtype=np.uint64)
            debit = FIRST_ACCOUNT_ID + rng.integers(0, accounts, batch_size)
            rows["debit_account"] = debit
            rows["credit_account"] = FIRST_ACCOUNT_ID + (debit - FIRST_ACCOUNT_ID + 1) % accounts
            rows["amount"] = 1
            began = time.perf_counter_ns()
            client.transfers(rows)
        latencies[call] = time.perf_counter_ns() - began
        next_id += batch_size
    seconds = time.perf_counter() - started
    print(json.dumps({"transfers": calls * batch_size, "seconds": seconds,
                      "latencies_ns": latencies.tolist()}))


if __name__ == "__main__":
    main()
