"""ledger: an in-process, event-sourced wallet ledger with a Cython core.

    import ledger
    with ledger.open(None) as lg:                 # in memory; ledger.open("data", create=True) on disk
        lg.create_account(1, min_balance=ledger.BALANCE_MIN)   # a settlement account may go negative
        lg.create_account(2)
        assert lg.transfer(ledger.IdGenerator()(), 1, 2, 100) == ledger.TransferResult.OK
"""
from ledger.api import ACCOUNT_STATE_DTYPE, Account, Ledger, accounts_batch, open, transfers_batch
from ledger.enums import (
    ACCOUNT_DTYPE,
    AMOUNT_MAX,
    BALANCE_MAX,
    BALANCE_MIN,
    BATCH_SIZE_MAX,
    EXPIRE_BATCH_MAX,
    ID_INVALID_MAX,
    TRANSFER_DTYPE,
    TRANSFER_RECORD_DTYPE,
    AccountFlags,
    AccountResult,
    TransferFlags,
    TransferResult,
    TransferState,
)
from ledger.errors import (
    LedgerClosedError,
    LedgerCorruptError,
    LedgerError,
    LedgerFullError,
    LedgerLockedError,
    LedgerPoisonedError,
)
from ledger.ids import IdGenerator

__version__ = "0.1.0"

__all__ = [
    "ACCOUNT_DTYPE",
    "ACCOUNT_STATE_DTYPE",
    "AMOUNT_MAX",
    "Account",
    "AccountFlags",
    "AccountResult",
    "BALANCE_MAX",
    "BALANCE_MIN",
    "BATCH_SIZE_MAX",
    "EXPIRE_BATCH_MAX",
    "ID_INVALID_MAX",
    "IdGenerator",
    "Ledger",
    "LedgerClosedError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerFullError",
    "LedgerLockedError",
    "LedgerPoisonedError",
    "TRANSFER_DTYPE",
    "TRANSFER_RECORD_DTYPE",
    "TransferFlags",
    "TransferResult",
    "TransferState",
    "accounts_batch",
    "open",
    "transfers_batch",
]
