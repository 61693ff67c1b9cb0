"""Result codes, flags and record dtypes: the public vocabulary of the ledger.

Numbers here are part of the on-disk and wire contract: never renumber, only append.
"""
from __future__ import annotations

import enum

import numpy as np

__all__ = [
    "AccountFlags",
    "AccountResult",
    "TransferFlags",
    "TransferResult",
    "TransferState",
    "ACCOUNT_DTYPE",
    "TRANSFER_DTYPE",
    "TRANSFER_RECORD_DTYPE",
    "ID_INVALID_MAX",
    "AMOUNT_MAX",
    "BALANCE_MIN",
    "BALANCE_MAX",
    "BATCH_SIZE_MAX",
    "EXPIRE_BATCH_MAX",
    "TIMESTAMP_MAX",
]

ID_INVALID_MAX = 2**64 - 1
AMOUNT_MAX = 2**63 - 1
BALANCE_MIN = -(2**63)
BALANCE_MAX = 2**63 - 1
# One batch call is one atomic journal batch; 2**23 rows keeps the 24-bit in-batch offset of the event record
# (docs/FORMAT.md) with room for the expiries that ride in front of the rows.
BATCH_SIZE_MAX = 2**23
EXPIRE_BATCH_MAX = 65536
# The latest event timestamp (ns since the Unix epoch, about the year 2262): timestamps fit int64 (numpy
# datetime64[ns], SQLite INTEGER), and the farthest pending deadline, TIMESTAMP_MAX + (2**32 - 1) s of timeout,
# still fits the engine's uint64. A clock reading past it is refused (LedgerClockError), never wrapped.
TIMESTAMP_MAX = 2**63 - 1


class AccountFlags(enum.IntFlag):
    NONE = 0
    LINKED = 1


class TransferFlags(enum.IntFlag):
    NONE = 0
    LINKED = 1
    PENDING = 2
    POST_PENDING = 4
    VOID_PENDING = 8


class AccountResult(enum.IntEnum):
    OK = 0
    LINKED_EVENT_FAILED = 1
    LINKED_CHAIN_OPEN = 2
    FLAGS_INVALID = 3
    ID_INVALID = 4
    LEDGER_INVALID = 5
    BALANCE_LIMITS_INVALID = 6
    EXISTS_WITH_DIFFERENT_FIELDS = 7
    EXISTS = 8


class TransferResult(enum.IntEnum):
    OK = 0
    LINKED_EVENT_FAILED = 1
    LINKED_CHAIN_OPEN = 2
    FLAGS_INVALID = 3
    ID_INVALID = 4
    PENDING_ID_MUST_BE_ZERO = 5
    PENDING_ID_REQUIRED = 6
    PENDING_ID_INVALID = 7
    PENDING_ID_MUST_BE_DIFFERENT = 8
    TIMEOUT_RESERVED_FOR_PENDING = 9
    EXISTS_WITH_DIFFERENT_FIELDS = 10
    EXISTS = 11
    DEBIT_ACCOUNT_ID_INVALID = 12
    CREDIT_ACCOUNT_ID_INVALID = 13
    ACCOUNTS_MUST_BE_DIFFERENT = 14
    AMOUNT_MUST_BE_POSITIVE = 15
    LEDGER_INVALID = 16
    DEBIT_ACCOUNT_NOT_FOUND = 17
    CREDIT_ACCOUNT_NOT_FOUND = 18
    LEDGER_MISMATCH = 19
    OVERFLOW = 20
    INSUFFICIENT_FUNDS = 21
    EXCEEDS_MAX_BALANCE = 22
    PENDING_NOT_FOUND = 23
    PENDING_TRANSFER_NOT_PENDING = 24
    PENDING_ALREADY_POSTED = 25
    PENDING_ALREADY_VOIDED = 26
    PENDING_EXPIRED = 27
    PENDING_DIFFERENT_DEBIT_ACCOUNT = 28
    PENDING_DIFFERENT_CREDIT_ACCOUNT = 29
    EXCEEDS_PENDING_AMOUNT = 30
    PENDING_DIFFERENT_AMOUNT = 31


class TransferState(enum.IntEnum):
    """What `lookup_transfers` says about an id."""

    NOT_FOUND = 0
    POSTED = 1  # a plain transfer, or a POST_PENDING / VOID_PENDING transfer itself
    PENDING = 2  # reserved, not resolved yet
    PENDING_POSTED = 3
    PENDING_VOIDED = 4
    PENDING_EXPIRED = 5


# align=True: C struct layout, so the core reads rows in place (no copy, no Python object per row).
ACCOUNT_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("user_data", "<u8"),
        ("min_balance", "<i8"),
        ("max_balance", "<i8"),
        ("ledger", "<u4"),
        ("flags", "<u2"),
    ],
    align=True,
)

TRANSFER_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("debit_account", "<u8"),
        ("credit_account", "<u8"),
        ("amount", "<i8"),
        ("pending_id", "<u8"),
        ("user_data", "<u8"),
        ("ledger", "<u4"),
        ("timeout", "<u4"),
        ("code", "<u2"),
        ("flags", "<u2"),
    ],
    align=True,
)

# What lookup_transfers returns: the transfer as applied, plus what the engine assigned.
TRANSFER_RECORD_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("debit_account", "<u8"),
        ("credit_account", "<u8"),
        ("amount", "<i8"),
        ("pending_id", "<u8"),
        ("user_data", "<u8"),
        ("timestamp", "<u8"),
        ("sequence", "<u8"),
        ("ledger", "<u4"),
        ("timeout", "<u4"),
        ("code", "<u2"),
        ("flags", "<u2"),
        ("state", "u1"),
    ],
    align=True,
)

assert ACCOUNT_DTYPE.itemsize == 40
assert TRANSFER_DTYPE.itemsize == 64
