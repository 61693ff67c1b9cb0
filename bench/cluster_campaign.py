"""Cluster failover campaign (issue 14): SIGKILL the primary node of a shard at random moments N times (default
200) while two client processes send transfers through ledger.connect("nats://..."), restarting each killed node
(it rejoins as a standby). At the end every node's directory is checked: every acknowledged transfer is there, no
request (batch) is half there, each balance is that of exactly the transfers held (money conserved), verify
passes and every node holds the same journal bytes. Reports the failover time of each kill (SIGKILL to the first
acknowledgement after it: min/median/max) and the longest gap between acknowledgements; exits 1 on any
violation. CI runs 10 kills and a kill of the stream's Raft leader (tests/test_cluster_campaign.py).

    python bench/cluster_campaign.py --kills 200 [--seed S] [--nodes 3] [--clients 2]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import warnings

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)

from support import cluster_campaign  # noqa: E402


def main() -> None:
    # A restarted primary drops the batch it journaled but never had acknowledged and says so: expected here.
    warnings.simplefilter("ignore", RuntimeWarning)
    # SIGTERM (and SIGINT, ignored in a background job otherwise) end the run through its cleanup: the node,
    # client and nats-server children are stopped, the scratch directory removed.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda signum, _frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=3, help="node processes of the shard (2 to 5)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (1 to 4)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON too")
    arguments = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ledger-cluster-campaign-") as scratch:
        summary = cluster_campaign.run(arguments.kills, arguments.seed, scratch, arguments.nodes,
                                       arguments.clients)
    print(cluster_campaign.summary_text(summary))
    if arguments.json:
        print(json.dumps(summary))
    print(f"{time.monotonic() - started:.0f} s in all")
    if summary["violations"]:
        raise SystemExit(1)
    print("cluster campaign OK")


if __name__ == "__main__":
    main()
