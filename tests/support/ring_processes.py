"""Subprocess entry points for the ring tests: a writer and a producer.

    python tests/support/ring_processes.py serve DIR DURABILITY ABANDON_AFTER_MS [OVERLAP_ROWS_MIN]
    python tests/support/ring_processes.py produce DIR SEED ROUNDS LOG
"""
from __future__ import annotations

import sys

import numpy as np

import ledger
from ledger.ring import Server, connect

SETTLEMENT = 1
ACCOUNTS = 20
FIRST_ACCOUNT = 100
IDS = 3000  # producers share this id space: overlapping ids, identical fields per id


def transfer_rows(ids: np.ndarray) -> np.ndarray:
    """The fields of transfer `id` are a pure function of the id, so every producer sends the same for it."""
    rows = ledger.transfers_batch(ids.size)
    rows["id"] = ids
    rows["debit_account"] = SETTLEMENT
    rows["credit_account"] = FIRST_ACCOUNT + (ids * 7919) % ACCOUNTS
    rows["amount"] = 1 + (ids * 104729) % 1000
    return rows


def serve(directory: str, durability: str, abandon_after_ms: int, overlap_rows_min: int) -> None:
    import signal
    server = Server(directory, durability=durability, slot_count=1024, abandon_after_ms=abandon_after_ms,
                    overlap_rows_min=overlap_rows_min)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print("ready", flush=True)
    server.serve_forever()


def produce(directory: str, seed: int, rounds: int, log_path: str) -> None:
    """Send random batches of shared ids; log 'id code' for every answer received."""
    rng = np.random.default_rng(seed)
    client = connect(directory, timeout_ms=20_000, writer_timeout_ms=2_000)
    with open(log_path, "a", buffering=1) as log:
        for _ in range(rounds):
            size = int(rng.choice([1, 5, 50, 300]))
            ids = rng.choice(np.arange(1, IDS + 1, dtype=np.uint64), size, replace=False)
            codes = client.transfers(transfer_rows(ids))
            log.write("".join(f"{int(i)} {int(c)}\n" for i, c in zip(ids, codes)))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 1024)
    else:
        produce(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
