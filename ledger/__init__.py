"""ledger: an in-process, event-sourced wallet ledger with a Cython core.

    import ledger
    with ledger.open(None) as lg:                 # in memory; ledger.open("data", create=True) on disk
        lg.create_account(1, min_balance=ledger.BALANCE_MIN)   # a settlement account may go negative
        lg.create_account(2)
        assert lg.transfer(ledger.IdGenerator()(), 1, 2, 100) == ledger.TransferResult.OK
"""
from ledger.api import ACCOUNT_STATE_DTYPE, Account, Ledger, accounts_batch, open, transfers_batch
from ledger.audit import VerifyReport
from ledger.enums import (
    ACCOUNT_DTYPE,
    AMOUNT_MAX,
    BALANCE_MAX,
    BALANCE_MIN,
    BATCH_SIZE_MAX,
    EXPIRE_BATCH_MAX,
    ID_INVALID_MAX,
    TIMESTAMP_MAX,
    TRANSFER_DTYPE,
    TRANSFER_RECORD_DTYPE,
    AccountFlags,
    AccountResult,
    TransferFlags,
    TransferResult,
    TransferState,
)
from ledger.errors import (
    LedgerBusyError,
    LedgerRejectedError,
    LedgerClockError,
    LedgerClosedError,
    LedgerCorruptError,
    LedgerError,
    LedgerFullError,
    LedgerLockedError,
    LedgerNotPrimaryError,
    LedgerHistoryUnavailableError,
    LedgerPoisonedError,
    LedgerReplicationError,
    LedgerTimeoutError,
    LedgerUnavailableError,
)
from ledger.history import HISTORY_DTYPE, Counters, Difference, EventKind, Explanation, account_at, balance_at, explain_difference
from ledger.ids import IdGenerator
from ledger.moments import At
from ledger.ring import Client
from ledger.ring import connect as _connect_ring
from ledger.snapshot import SnapshotInfo, SnapshotJob
from ledger._core import EVENT_DTYPE
from ledger.tail import Tailer, tail
from ledger.scrub import ScrubDamage, ScrubReport

__version__ = "0.1.0"

NETWORK_SCHEMES = ("nats://", "tls://")


def connect(directory, **options):
    """A client of a running ledger: `connect(DIR)` (a `ledger serve DIR` on this machine, through its ring:
    options of ledger.ring.connect) or `connect("nats://HOST:PORT[,nats://...]", shard=NAME, timeout_ms=...,
    options=ConnectionOptions(...) or its fields as keywords)` (the shard's primary over NATS: a
    ledger.cluster.client.Client, docs/CLUSTER.md "Clients"). Both have the same calls, results and errors."""
    if isinstance(directory, str) and directory.strip().startswith(NETWORK_SCHEMES):
        from ledger.cluster.client import connect as connect_network   # needs the `cluster` extra (nats-py)
        return connect_network(directory, **options)
    return _connect_ring(directory, **options)

__all__ = [
    "ACCOUNT_DTYPE",
    "ACCOUNT_STATE_DTYPE",
    "At",
    "Counters",
    "Difference",
    "EventKind",
    "Explanation",
    "HISTORY_DTYPE",
    "account_at",
    "balance_at",
    "explain_difference",
    "AMOUNT_MAX",
    "Account",
    "AccountFlags",
    "AccountResult",
    "BALANCE_MAX",
    "BALANCE_MIN",
    "BATCH_SIZE_MAX",
    "EVENT_DTYPE",
    "EXPIRE_BATCH_MAX",
    "ID_INVALID_MAX",
    "IdGenerator",
    "Client",
    "Ledger",
    "LedgerBusyError",
    "LedgerRejectedError",
    "LedgerClockError",
    "LedgerClosedError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerFullError",
    "LedgerLockedError",
    "LedgerNotPrimaryError",
    "LedgerHistoryUnavailableError",
    "LedgerPoisonedError",
    "LedgerReplicationError",
    "LedgerTimeoutError",
    "LedgerUnavailableError",
    "ScrubDamage",
    "ScrubReport",
    "TIMESTAMP_MAX",
    "TRANSFER_DTYPE",
    "TRANSFER_RECORD_DTYPE",
    "TransferFlags",
    "TransferResult",
    "Tailer",
    "TransferState",
    "SnapshotInfo",
    "SnapshotJob",
    "VerifyReport",
    "accounts_batch",
    "connect",
    "open",
    "tail",
    "transfers_batch",
]
