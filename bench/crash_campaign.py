"""Crash campaign: SIGKILL a writer at random moments N times (default 1000) per durability mode, reopening and
checking after each kill that nothing acknowledged was lost, no batch is half-applied and every balance equals
the reference model. CI runs 50 kills, and 20 more with snapshots (tests/test_journal.py); this is the long run.

    python bench/crash_campaign.py --kills 1000 [--snapshot-every N]

With --snapshot-every the writer also snapshots (forked children, wait=False) as it goes: kills then land while
children write, orphan them, and the reopen loads the newest snapshot that passes its checks.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import warnings

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)

from support.crash_workload import Model, kill_once  # noqa: E402
from test_journal import check_recovered  # noqa: E402


def campaign(kills: int, durability: str, seed: int, snapshot_every: int = 0) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="ledger-crash-") as scratch:
        directory = os.path.join(scratch, "data")
        ack_log = os.path.join(scratch, "acks")
        model = Model()
        checked = 0
        started = time.monotonic()
        for kill in range(1, kills + 1):
            kill_once(directory, durability, ack_log, rng, kill, snapshot_every)
            checked = check_recovered(directory, model, ack_log, checked)
            if kill % 50 == 0 or kill == kills:
                print(f"{durability}: {kill}/{kills} kills, {checked} batches survived and checked, "
                      f"{time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    # Every reopen after a kill may zero a torn tail and say so: expected here, and thousands of lines.
    warnings.simplefilter("ignore", RuntimeWarning)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--durability", choices=["fsync", "os", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="the writer also starts a snapshot after every N-th batch (0: never)")
    arguments = parser.parse_args()
    modes = ["fsync", "os"] if arguments.durability == "both" else [arguments.durability]
    for mode in modes:
        campaign(arguments.kills, mode, arguments.seed, arguments.snapshot_every)
    print("crash campaign OK")


if __name__ == "__main__":
    main()
