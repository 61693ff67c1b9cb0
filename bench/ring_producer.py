"""A producer process for bench/test_ring.py: sends batches (or single transfers) through the ring, prints its
rate and per-call latencies (ns) as JSON on stdout. Every transfer must be applied (result OK): a rejected one
(an unfunded account, a duplicate id) makes it exit non-zero, so no rate is ever reported for rejections.

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
    rejected = 0          # counted outside the timed call; checked at the end
    first_rejection = None
    started = time.perf_counter()
    for call in range(calls):
        if batch_size == 1:
            debit, credit = FIRST_ACCOUNT_ID + rng.integers(0, accounts, 2)
            began = time.perf_counter_ns()
            code = client.transfer(next_id, int(debit), int(credit) if credit != debit else int(debit) + 1, 1)
            latencies[call] = time.perf_counter_ns() - began
            if code != 0:
                rejected += 1
                first_rejection = first_rejection or (next_id, ledger.TransferResult(code).name)
        else:
            rows = ledger.transfers_batch(batch_size)
            rows["id"] = np.arange(next_id, next_id + batch_size, dtype=np.uint64)
            debit = FIRST_ACCOUNT_ID + rng.integers(0, accounts, batch_size)
            rows["debit_account"] = debit
            rows["credit_account"] = FIRST_ACCOUNT_ID + (debit - FIRST_ACCOUNT_ID + 1) % accounts
            rows["amount"] = 1
            began = time.perf_counter_ns()
            codes = client.transfers(rows)
            latencies[call] = time.perf_counter_ns() - began
            failed = np.flatnonzero(codes)
            if failed.size:
                rejected += int(failed.size)
                first_rejection = first_rejection or (int(rows["id"][failed[0]]),
                                                      ledger.TransferResult(int(codes[failed[0]])).name)
        next_id += batch_size
    seconds = time.perf_counter() - started
    if rejected:
        raise SystemExit(f"ring_producer: {rejected} of {calls * batch_size} transfers were rejected (first: id "
                         f"{first_rejection[0]}, {first_rejection[1]}): no rate for a run that did not apply them")
    print(json.dumps({"transfers": calls * batch_size, "seconds": seconds,
                      "latencies_ns": latencies.tolist()}))


if __name__ == "__main__":
    main()
