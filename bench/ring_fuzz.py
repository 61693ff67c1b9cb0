"""Fuzz campaign for the ring's slot decoder: publish random bytes into ring slots (as a hostile producer would)
and let the writer drain them. Slots come in producer batches of 1-4 slots; some are never published (a producer
that died after claiming) and some carry batch fields that disagree with their batch (a hostile producer). Every
slot must be answered or given up, the writer must never crash, stall or move past claim_sequence, and the ledger
must verify at the end. CI runs short hypothesis versions (tests/test_ring.py); this runs 10**6 slots by default.

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
        server = Server(os.path.join(directory, "data"), durability="os", slot_count=4096, abandon_after_ms=1)
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
                raw[shaped, 4] = rng.integers(1, 4, int(shaped.sum()))
                raw[shaped, 5] = 0
                # Producer batches of 1-4 slots: each slot names its batch's first sequence and size.
                sizes = rng.integers(1, 5, count)
                starts = np.cumsum(np.concatenate([[0], sizes]))
                starts = starts[starts < count]
                batch_index = np.searchsorted(starts, np.arange(count), side="right") - 1
                batch_first = (first + starts[batch_index]).astype(np.uint64)
                batch_count = (np.minimum(starts[batch_index] + sizes[:starts.size][batch_index], count)
                               - starts[batch_index]).astype(np.uint32)
                lies = shaped & (rng.random(count) < 0.05)  # disagree with their batch
                batch_first[lies] += rng.integers(0, 2, int(lies.sum())).astype(np.uint64)
                batch_count[lies] += rng.integers(0, 2, int(lies.sum())).astype(np.uint32)
                raw[shaped, 8:16] = batch_first[shaped, None].view(np.uint8).reshape(-1, 8)
                raw[shaped, 16:20] = batch_count[shaped, None].view(np.uint8).reshape(-1, 4)
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
                holes = rng.random(count) < 0.03  # claimed, never published: the writer must give them up
                for index in np.flatnonzero(~holes).tolist():
                    ring.publish_raw(first + index, raw[index].tobytes())
                deadline = time.monotonic() + 30
                while ring.consume_sequence < first + count:
                    assert time.monotonic() < deadline, f"the writer stalled at {ring.consume_sequence}"
                    if not server.drain_once():
                        time.sleep(0.001)  # an unpublished head: given up after abandon_after_ms
                    assert ring.consume_sequence <= ring.claim_sequence
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
