"""A clustered ledger node as a child process, for the failover tests (tests/test_cluster_node.py): one that can be
SIGKILLed or SIGSTOPped.

    python tests/support/cluster_processes.py writer DIR URL SHARD NODE ACK_LOG

opens DIR as node NODE of shard SHARD (creating it), and once it is the primary creates the accounts and prints
"ready"; then it sends transfers (ids from FIRST_ID up, SETTLEMENT to a wallet, amount 1) while it is the primary,
one call at a time, and appends a line per outcome to ACK_LOG: `ok ID MONOTONIC_NS` for each acknowledged
transfer (the time its call STARTED: a process stopped between the ack and the log line would otherwise log an
ack from before a SIGSTOP with a time after its SIGCONT), `refused CLASS MONOTONIC_NS` for each call that raised.
Role changes print `role ROLE EPOCH`. SIGTERM closes the ledger and exits 0.

    python tests/support/cluster_processes.py client URL SHARD FIRST_ID ACK_LOG SEED

sends transfer requests through ledger.connect (tests/support/cluster_campaign.py says what it logs).
SIGTERM ends it after the call in progress."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import ledger

SETTLEMENT = 1
WALLETS = list(range(2, 10))
FIRST_ID = 1_000_000
PAUSE_S = 0.02          # a standby's look whether it became the primary, and a pause after a refused call


def create_accounts(handle: ledger.Ledger) -> None:
    """The settlement account (which may go negative) and the wallets."""
    accounts = ledger.accounts_batch(len(WALLETS) + 1)
    accounts["id"] = [SETTLEMENT] + WALLETS
    accounts["ledger"] = 1
    accounts["min_balance"][0] = ledger.BALANCE_MIN
    accounts["max_balance"] = ledger.BALANCE_MAX
    handle.create_accounts(accounts)


def writer(directory: str, url: str, shard: str, node: str, ack_log: str) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    handle = ledger.open(directory, create=True, cluster=url, shard=shard, node=node)
    assert handle.cluster_node is not None
    handle.cluster_node.on_role(lambda role, epoch: print(f"role {role} {epoch}", flush=True))
    if not handle.cluster_node.wait_role("primary", 10.0):
        raise SystemExit(f"node {node} did not become the primary")
    create_accounts(handle)
    print("ready", flush=True)
    next_id = FIRST_ID
    with open(ack_log, "a", buffering=1) as log:
        while not stopping.is_set():
            if handle.role != "primary":
                stopping.wait(PAUSE_S)
                continue
            started_ns = time.monotonic_ns()
            try:
                code = handle.transfer(next_id, SETTLEMENT, WALLETS[next_id % len(WALLETS)], 1)
            except ledger.LedgerError as error:
                log.write(f"refused {type(error).__name__} {time.monotonic_ns()}\n")
                stopping.wait(PAUSE_S)
                continue
            if code == ledger.TransferResult.OK:
                log.write(f"ok {next_id} {started_ns}\n")
            next_id += 1
    handle.close()


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(*sys.argv[2:7])
    elif sys.argv[1] == "client":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from support import cluster_campaign
        cluster_campaign.client(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    else:
        raise SystemExit(__doc__)
