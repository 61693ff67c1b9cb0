"""Result codes, flags and record dtypes: the public vocabulary of the ledger.

Numbers here are part of the on-disk and wire contract: never renumber, only append.
"""
from __future__ import annotations

import enum
import inspect
from typing import Callable, TypeVar

import numpy as np

Described = TypeVar("Described", bound=type[enum.Enum])

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


def described(**descriptions: str) -> Callable[[Described], Described]:
    """Give every member of the decorated enum its description as `__doc__`, and list them all, with their
    numbers, in the class docstring (what help() shows). Every member must be described."""
    def describe(cls: Described) -> Described:
        members = cls.__members__
        assert set(descriptions) == set(members), f"{cls.__name__}: describe exactly {sorted(members)}"
        lines = []
        for name, member in members.items():
            member.__doc__ = descriptions[name]
            lines.append(f"    {name} = {member.value}: {descriptions[name]}")
        cls.__doc__ = f"{inspect.cleandoc(cls.__doc__ or '')}\n\nMembers:\n" + "\n".join(lines)
        return cls
    return describe


@described(
    NONE="no flag",
    LINKED="linked to the next row of the batch: the chain is created all or nothing",
)
class AccountFlags(enum.IntFlag):
    """Flags of an account row (`flags` of ACCOUNT_DTYPE, or `create_account(flags=...)`)."""

    NONE = 0
    LINKED = 1


@described(
    NONE="a plain transfer: posted at once",
    LINKED="linked to the next row of the batch: the chain is applied all or nothing",
    PENDING="reserve the amount (two-phase); resolved later by POST_PENDING, VOID_PENDING or its timeout",
    POST_PENDING="post the pending transfer `pending_id` (amount 0: all of it; less: a partial post)",
    VOID_PENDING="void the pending transfer `pending_id`: release its reservation",
)
class TransferFlags(enum.IntFlag):
    """Flags of a transfer row (`flags` of TRANSFER_DTYPE, or `transfer(flags=...)`); at most one of PENDING,
    POST_PENDING, VOID_PENDING."""

    NONE = 0
    LINKED = 1
    PENDING = 2
    POST_PENDING = 4
    VOID_PENDING = 8


@described(
    OK="created",
    LINKED_EVENT_FAILED="not created: another row of its linked chain failed",
    LINKED_CHAIN_OPEN="not created: the last row of the batch has LINKED, so its chain never closes",
    FLAGS_INVALID="flags has bits outside AccountFlags",
    ID_INVALID="id is 0 or 2**64 - 1",
    LEDGER_INVALID="ledger is 0",
    BALANCE_LIMITS_INVALID="not min_balance <= 0 <= max_balance",
    EXISTS_WITH_DIFFERENT_FIELDS="an account with this id exists with other fields; nothing changed",
    EXISTS="an account with this id and the same fields exists (a retry); nothing changed",
)
class AccountResult(enum.IntEnum):
    """The outcome of one account row, in batch order (docs/SEMANTICS.md, "Accounts"). OK is 0, so
    `results.any()` says whether any row failed."""

    OK = 0
    LINKED_EVENT_FAILED = 1
    LINKED_CHAIN_OPEN = 2
    FLAGS_INVALID = 3
    ID_INVALID = 4
    LEDGER_INVALID = 5
    BALANCE_LIMITS_INVALID = 6
    EXISTS_WITH_DIFFERENT_FIELDS = 7
    EXISTS = 8


@described(
    OK="applied",
    LINKED_EVENT_FAILED="not applied: another row of its linked chain failed",
    LINKED_CHAIN_OPEN="not applied: the last row of the batch has LINKED, so its chain never closes",
    FLAGS_INVALID="unknown flag bits, or more than one of PENDING / POST_PENDING / VOID_PENDING",
    ID_INVALID="id is 0 or 2**64 - 1",
    PENDING_ID_MUST_BE_ZERO="pending_id is set on a transfer that is not POST_PENDING or VOID_PENDING",
    PENDING_ID_REQUIRED="POST_PENDING or VOID_PENDING without a pending_id",
    PENDING_ID_INVALID="pending_id is 2**64 - 1",
    PENDING_ID_MUST_BE_DIFFERENT="pending_id is the transfer's own id",
    TIMEOUT_RESERVED_FOR_PENDING="timeout is set on a transfer that is not PENDING",
    EXISTS_WITH_DIFFERENT_FIELDS="a transfer with this id was applied with other fields; nothing changed",
    EXISTS="a transfer with this id and the same fields was applied (a retry); nothing changed",
    DEBIT_ACCOUNT_ID_INVALID="debit_account is 0 or 2**64 - 1",
    CREDIT_ACCOUNT_ID_INVALID="credit_account is 0 or 2**64 - 1",
    ACCOUNTS_MUST_BE_DIFFERENT="debit_account and credit_account are the same",
    AMOUNT_MUST_BE_POSITIVE="amount <= 0 (POST_PENDING / VOID_PENDING: amount < 0)",
    LEDGER_INVALID="ledger is 0",
    DEBIT_ACCOUNT_NOT_FOUND="no account debit_account",
    CREDIT_ACCOUNT_NOT_FOUND="no account credit_account",
    LEDGER_MISMATCH="the two accounts are in different ledgers, or ledger differs from theirs",
    OVERFLOW="a debit or credit counter would pass 2**63 - 1",
    INSUFFICIENT_FUNDS="the debit account's available balance would fall below its min_balance",
    EXCEEDS_MAX_BALANCE="the credit account's balance, counting pending credits, would pass its max_balance",
    PENDING_NOT_FOUND="no transfer pending_id",
    PENDING_TRANSFER_NOT_PENDING="transfer pending_id was not a PENDING transfer",
    PENDING_ALREADY_POSTED="the pending transfer was posted already",
    PENDING_ALREADY_VOIDED="the pending transfer was voided already",
    PENDING_EXPIRED="the pending transfer's timeout passed (it expired, or its deadline is at or before now)",
    PENDING_DIFFERENT_DEBIT_ACCOUNT="debit_account is set and is not the pending transfer's",
    PENDING_DIFFERENT_CREDIT_ACCOUNT="credit_account is set and is not the pending transfer's",
    EXCEEDS_PENDING_AMOUNT="POST_PENDING of more than the pending amount",
    PENDING_DIFFERENT_AMOUNT="VOID_PENDING with an amount that is neither 0 nor the pending amount",
)
class TransferResult(enum.IntEnum):
    """The outcome of one transfer row, in batch order (docs/SEMANTICS.md, "Transfers": the checks are made in
    the order of the numbers). OK is 0, so `results.any()` says whether any row failed."""

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


@described(
    NOT_FOUND="no transfer with this id was applied",
    POSTED="a plain transfer, or a POST_PENDING / VOID_PENDING transfer itself",
    PENDING="a PENDING transfer, reserved and not resolved yet",
    PENDING_POSTED="a PENDING transfer that was posted",
    PENDING_VOIDED="a PENDING transfer that was voided",
    PENDING_EXPIRED="a PENDING transfer whose timeout passed",
)
class TransferState(enum.IntEnum):
    """What `lookup_transfers` says about an id (the `state` field of TRANSFER_RECORD_DTYPE)."""

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
