"""Fuzz campaign for the ring's slot decoder: publish random bytes into ring slots (as a hostile producer would)
and let the writer drain them. Every slot must get an answer, the writer must never crash, and the ledger must
verify at the end. CI runs a short hypothesis version (tests/test_ring.py); this runs 10**6 slots by default.

    python bench/ring_fuzz.py --slots 1000000
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import ledger
from ledger.ring import Server


def campaign(total_slots: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="ledger-ring-fuzz-") as directory:
        os.chmod(directory, 0o700)
        server = Server(os.path.join(directory, "data"), durability="os", slot_count=4096)
        try:
            server.ledger.create_account(1, min_balance=ledger.BALANCE_MIN)
            server.ledger.create_account(2)
            ring = server.ring
            done = 0
            started = time.monotonic()
            while done < total_slots:
                count = min(1024, total_slots - done)
                raw = rng.integers(0, 256, (count, 104), dtype=np.uint8)
                # Make part of them well-formed enough to reach the core: kind, batch of one, real accounts.
                shaped = rng.random(count) < 0.5
                first = ring.claim_without_publishing(count)
                sequences = first + np.arange(count, dtype=np.uint64)
                raw[shaped, 4] = rng.integers(1, 4, int(shaped.sum()))
                raw[shaped, 5] = 0
                raw[shaped, 8:16] = sequences[shaped, None].view(np.uint8).reshape(-1, 8)
                raw[shaped, 16:20] = np.array([1, 0, 0, 0], np.uint8)
                accounts = rng.random(count) < 0.5
                raw[shaped & accounts, 32:40] = np.array([1, 0, 0, 0, 0, 0, 0, 0], np.uint8)
                raw[shaped & accounts, 40:48] = np.array([2, 0, 0, 0, 0, 0, 0, 0], np.uint8)
                # ... and of those, half a plausible transfer: small amount, ledger 1, no pending id, few flags.
                plausible = shaped & accounts & (rng.random(count) < 0.5)
                raw[plausible, 48:56] = 0
                raw[plausible, 48] = rng.integers(1, 256, int(plausible.sum()))
                raw[plausible, 56:64] = 0
                raw[plausible, 72:80] = np.array([1, 0, 0, 0, 0, 0, 0, 0], np.uint8)
                raw[plausible, 82] = rng.integers(0, 16, int(plausible.sum()))  # flags (payload offset 58)
                raw[plausible, 83] = 0
                for index in range(count):
                    ring.publish_raw(first + index, raw[index].tobytes())
                while ring.consume_sequence < first + count:
                    assert server.drain_once(), "the writer stopped answering"
                done += count
                if done % 100_000 < 1024:
                    print(f"{done:,} slots fuzzed, {time.monotonic() - started:.0f} s", flush=True)
            report = server.ledger.verify()
            assert report.ok, report
            print(f"ring fuzz OK: {total_slots:,} slots, {report.events:,} events applied and verified")
        finally:
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()
    campaign(arguments.slots, arguments.seed)


if __name__ == "__main__":
    main()
