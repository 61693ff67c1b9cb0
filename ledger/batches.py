"""The shapes of what callers hand in and get back: the batch dtypes' defaults (accounts_batch,
transfers_batch), the check that turns a caller's batch into a C-contiguous array of the right dtype (as_batch,
shared by Ledger and the ring's Client), and the records reads return (Account, ACCOUNT_STATE_DTYPE). Below
ledger.api so that the ring, history and the store need not import the public face to use them."""
from __future__ import annotations

import operator
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from ledger.enums import ACCOUNT_DTYPE, BALANCE_MAX, BATCH_SIZE_MAX, TRANSFER_DTYPE

__all__ = ["ACCOUNT_STATE_DTYPE", "Account", "accounts_batch", "as_batch", "checked_count", "transfer_ids",
           "transfers_batch"]

# What Ledger.accounts() returns: every account with its counters.
ACCOUNT_STATE_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("ledger", "<u4"),
        ("flags", "<u2"),
        ("min_balance", "<i8"),
        ("max_balance", "<i8"),
        ("user_data", "<u8"),
        ("debits_posted", "<i8"),
        ("credits_posted", "<i8"),
        ("debits_pending", "<i8"),
        ("credits_pending", "<i8"),
        ("timestamp", "<u8"),
    ],
    align=True,
)


class Account(NamedTuple):
    """One account as of the moment it was read (a copy: it does not change afterwards)."""

    id: int
    ledger: int
    flags: int
    min_balance: int
    max_balance: int
    user_data: int
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    timestamp: int

    @property
    def balance(self) -> int:
        """credits_posted - debits_posted."""
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        """balance - debits_pending: what the account may still spend above its min_balance."""
        return self.credits_posted - self.debits_posted - self.debits_pending


def accounts_batch(count: int) -> np.ndarray:
    """`count` account rows with the defaults filled in: ledger 1, min_balance 0, max_balance int64 max.
    (A zero-filled array would mean "ledger 0, cap 0"; start from this instead.)"""
    batch = np.zeros(checked_count(count), ACCOUNT_DTYPE)
    batch["ledger"] = 1
    batch["max_balance"] = BALANCE_MAX
    return batch


def transfers_batch(count: int) -> np.ndarray:
    """`count` transfer rows with the defaults filled in: ledger 1, everything else 0."""
    batch = np.zeros(checked_count(count), TRANSFER_DTYPE)
    batch["ledger"] = 1
    return batch


def transfer_ids(ids: Any) -> np.ndarray:
    """lookup_transfers' ids (one integer or a 1-dimensional array of them, each >= 0) as a contiguous uint64
    array; ValueError or TypeError naming what is wrong. One check for the in-process Ledger and the clients."""
    keys = np.asarray(ids)
    if keys.ndim == 0:
        keys = keys.reshape(1)
    if keys.ndim != 1:
        raise ValueError(f"ids must be 1-dimensional, got shape {keys.shape}")
    if keys.size and keys.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {keys.dtype}")
    if keys.size and keys.dtype.kind == "i" and int(keys.min()) < 0:
        raise ValueError("ids must be >= 0")
    return np.ascontiguousarray(keys, dtype="<u8")


def checked_count(count: int) -> int:
    """`count` as an int within [0, BATCH_SIZE_MAX], or ValueError (TypeError if it is not an integer)."""
    count = operator.index(count)
    if not 0 <= count <= BATCH_SIZE_MAX:
        raise ValueError(f"batch size {count} is outside [0, BATCH_SIZE_MAX={BATCH_SIZE_MAX}]")
    return count


def as_batch(batch: Any, dtype: np.dtype, make: Callable[[int], np.ndarray], what: str) -> np.ndarray:
    """Check a caller's batch and return a C-contiguous array of `dtype` without copying when it already is one."""
    if isinstance(batch, Mapping):
        return _from_columns(batch, dtype, make, what)
    if not isinstance(batch, np.ndarray):
        raise TypeError(f"{what} must be a numpy array of ledger.{_dtype_name(dtype)} or a dict of columns, "
                        f"not {type(batch).__name__}")
    if batch.dtype != dtype:
        raise TypeError(f"{what} has dtype {batch.dtype}; expected ledger.{_dtype_name(dtype)} "
                        f"(build it with ledger.{what}_batch(n))")
    if batch.ndim != 1:
        raise ValueError(f"{what} must be 1-dimensional, got shape {batch.shape}")
    if not batch.flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous (a strided view?); pass np.ascontiguousarray(batch)")
    if batch.shape[0] > BATCH_SIZE_MAX:
        raise ValueError(f"{what} has {batch.shape[0]} rows; the limit is BATCH_SIZE_MAX={BATCH_SIZE_MAX} "
                         f"(a batch is one atomic journal write)")
    return batch


def _dtype_name(dtype: np.dtype) -> str:
    return "ACCOUNT_DTYPE" if dtype == ACCOUNT_DTYPE else "TRANSFER_DTYPE"


def _from_columns(columns: Mapping[str, Any], dtype: np.dtype, make: Callable[[int], np.ndarray],
                  what: str) -> np.ndarray:
    unknown = sorted(set(columns) - set(dtype.names))
    if unknown:
        raise ValueError(f"{what} columns {unknown} are not fields of ledger.{_dtype_name(dtype)} "
                         f"(fields: {', '.join(dtype.names)})")
    arrays = {name: np.asarray(value) for name, value in columns.items()}
    lengths = {name: array.shape for name, array in arrays.items()}
    shapes = set(lengths.values())
    if len(shapes) > 1:
        raise ValueError(f"{what} columns have different lengths: {lengths}")
    shape = shapes.pop() if shapes else (0,)
    if len(shape) != 1:
        raise ValueError(f"{what} columns must be 1-dimensional, got shape {shape}")
    batch = make(shape[0])
    for name, array in arrays.items():
        field = dtype.fields[name][0]
        if array.dtype.kind not in "iub":
            raise TypeError(f"{what} column {name!r} has dtype {array.dtype}; integers are required")
        if array.size:
            info = np.iinfo(field)
            low, high = int(array.min()), int(array.max())
            if low < info.min or high > info.max:
                raise ValueError(f"{what} column {name!r} has values outside {field} range "
                                 f"[{info.min}, {info.max}]: min {low}, max {high}")
        batch[name] = array
    return batch
