# Hand-written stubs for the public API (the implementation is split between Python and the Cython core).
import datetime
import enum
import os
import threading
from typing import Any, Callable, Iterator, Literal, Mapping, NamedTuple, overload

import numpy as np
import numpy.typing as npt

__version__: str

ACCOUNT_DTYPE: np.dtype
TRANSFER_DTYPE: np.dtype
TRANSFER_RECORD_DTYPE: np.dtype
ACCOUNT_STATE_DTYPE: np.dtype
ID_INVALID_MAX: int
AMOUNT_MAX: int
BALANCE_MIN: int
BALANCE_MAX: int
BATCH_SIZE_MAX: int
EXPIRE_BATCH_MAX: int
TIMESTAMP_MAX: int

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
    NOT_FOUND = 0
    POSTED = 1
    PENDING = 2
    PENDING_POSTED = 3
    PENDING_VOIDED = 4
    PENDING_EXPIRED = 5

class LedgerError(Exception): ...
class LedgerClosedError(LedgerError): ...
class LedgerPoisonedError(LedgerClosedError): ...
class LedgerCorruptError(LedgerError): ...
class LedgerLockedError(LedgerError): ...
class LedgerFullError(LedgerError, OSError): ...
class LedgerBusyError(LedgerError): ...
class LedgerRejectedError(LedgerError): ...
class LedgerUnavailableError(LedgerError): ...
class LedgerTimeoutError(LedgerError): ...
class LedgerClockError(LedgerError): ...
class LedgerReplicationError(LedgerError): ...
class LedgerNotPrimaryError(LedgerError): ...
class LedgerHistoryUnavailableError(LedgerError): ...

class Account(NamedTuple):
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
    def balance(self) -> int: ...
    @property
    def available(self) -> int: ...

class IdGenerator:
    def __init__(self, node: int = 0, node_bits: int = 0) -> None: ...
    def __call__(self) -> int: ...
    def batch(self, count: int) -> npt.NDArray[np.uint64]: ...

Batch = npt.NDArray[Any] | Mapping[str, Any]
Durability = Literal["fsync", "os"]

class SnapshotInfo:
    path: str
    position: int
    timestamp: int
    accounts: int
    transfers: int
    bytes: int
    stall_seconds: float
    write_seconds: float
    def __init__(self, path: str, position: int, timestamp: int, accounts: int, transfers: int, bytes: int,
                 stall_seconds: float, write_seconds: float) -> None: ...

class SnapshotJob:
    def done(self) -> bool: ...
    def wait(self) -> SnapshotInfo: ...

class VerifyReport:
    ok: bool
    batches: int
    events: int
    accounts: int
    transfers: int
    seconds: float
    problems: list[str]
    snapshots: int
    def __init__(self, ok: bool, batches: int, events: int, accounts: int, transfers: int, seconds: float,
                 problems: list[str], snapshots: int = 0) -> None: ...
    @property
    def events_per_second(self) -> float: ...

class ScrubDamage:
    position: int           # the damaged batch's header position
    path: str | None        # its segment file (None: an in-memory ledger)
    byte_offset: int | None
    reason: str
    def __init__(self, position: int, path: str | None, byte_offset: int | None, reason: str) -> None: ...
    def to_dict(self) -> dict[str, Any]: ...

class ScrubReport:
    ok: bool
    batches: int
    records: int
    end_position: int       # the journal was checked from position 1 up to this one
    seconds: float
    damaged: list[ScrubDamage]
    def __init__(self, ok: bool, batches: int, records: int, end_position: int, seconds: float,
                 damaged: list[ScrubDamage]) -> None: ...
    @property
    def bytes(self) -> int: ...
    def to_dict(self) -> dict[str, Any]: ...

class Ledger:
    path: str | None
    durability: Literal["fsync", "os", "memory"]
    recovered_from: SnapshotInfo | None  # the snapshot this handle was opened from
    @property
    def closed(self) -> bool: ...
    def create_accounts(self, batch: Batch) -> npt.NDArray[np.uint8]: ...
    def create_account(self, id: int, ledger: int = 1, *, min_balance: int = 0, max_balance: int = ...,
                       flags: int = 0, user_data: int = 0) -> AccountResult: ...
    def transfers(self, batch: Batch) -> npt.NDArray[np.uint8]: ...
    def transfer(self, id: int, debit_account: int, credit_account: int, amount: int, *, ledger: int = 1,
                 code: int = 0, flags: int = 0, pending_id: int = 0, timeout: int = 0,
                 user_data: int = 0) -> TransferResult: ...
    def account(self, id: int) -> Account | None: ...
    def balance(self, id: int, at: Moment | None = None) -> int: ...
    def available(self, id: int) -> int: ...
    def history(self, id: int, since: Moment | None = None, until: Moment | None = None,
                limit: int | None = None) -> npt.NDArray[Any]: ...
    def explain(self, id: int, since: Moment | None = None, until: Moment | None = None) -> Explanation: ...
    @overload
    def snapshot(self, wait: Literal[True] = True, keep: int = 3) -> SnapshotInfo: ...
    @overload
    def snapshot(self, wait: Literal[False], keep: int = 3) -> SnapshotJob: ...
    @overload
    def snapshot(self, wait: bool, keep: int = 3) -> SnapshotInfo | SnapshotJob: ...
    def flush(self) -> None: ...
    def verify(self) -> VerifyReport: ...
    def scrub(self) -> ScrubReport:
        """Re-check every committed journal batch (header, checksum, hash chain) without building state; each
        damaged batch is listed with its file, byte offset and journal position. Safe on a read-only handle."""
        ...
    def accounts(self) -> npt.NDArray[Any]: ...
    def lookup_transfers(self, ids: npt.ArrayLike) -> npt.NDArray[Any]: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Ledger: ...
    def __exit__(self, *exc_info: object) -> None: ...

def accounts_batch(count: int) -> npt.NDArray[Any]: ...
def transfers_batch(count: int) -> npt.NDArray[Any]: ...
def open(path: str | os.PathLike[str] | None = None, create: bool = False, durability: Durability = "fsync", *,
         readonly: bool = False, clock: Callable[[], int] | None = None, segment_records_log2: int = 20,
         flush_interval_ms: int = 10, accounts_capacity: int = 0, transfers_capacity: int = 0,
         journal_records_reserved: int = 0) -> Ledger: ...

HISTORY_DTYPE: np.dtype
class EventKind(enum.IntEnum):
    ACCOUNT = 1
    TRANSFER = 2
    PENDING = 3
    POST = 4
    VOID = 5
    EXPIRE = 6
class At:
    ns: int | None
    position: int | None
    def __init__(self, ns: int | None = None, position: int | None = None) -> None: ...
    @classmethod
    def from_datetime(cls, moment: datetime.datetime) -> At: ...
    @classmethod
    def parse(cls, text: str) -> At: ...
Moment = int | datetime.datetime | At
class Counters(NamedTuple):
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    @property
    def balance(self) -> int: ...
    @property
    def available(self) -> int: ...
    def minus(self, other: Counters) -> Counters: ...
class Explanation:
    account_id: int
    first_position: int
    last_position: int
    opening: Counters
    closing: Counters
    rows: npt.NDArray[Any]
    problems: tuple[str, ...]
    def __init__(self, account_id: int, first_position: int, last_position: int, opening: Counters,
                 closing: Counters, rows: npt.NDArray[Any], problems: tuple[str, ...]) -> None: ...
    @property
    def ok(self) -> bool: ...
    @property
    def opening_balance(self) -> int: ...
    @property
    def closing_balance(self) -> int: ...
    @property
    def posted_total(self) -> int: ...
    def to_text(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
class Difference:
    explanations: tuple[Explanation, ...]
    difference: int
    def __init__(self, explanations: tuple[Explanation, ...], difference: int) -> None: ...
    @property
    def ok(self) -> bool: ...
    def to_text(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
def balance_at(handle: Ledger, id: int, at: Moment) -> int: ...
def account_at(handle: Ledger, id: int, at: Moment) -> Account: ...
def explain_difference(handle: Ledger, id_a: int, id_b: int | None = None, at_a: Moment | None = None,
                       at_b: Moment | None = None) -> Difference: ...

class Client:
    directory: str
    batch_rows_max: int
    def __init__(self, directory: str, timeout_ms: int = 30000, busy_timeout_ms: int = 5000,
                 writer_timeout_ms: int = 3000, spin_count: int = 2000, wait_slice_ms: int = 10) -> None: ...
    def transfers(self, batch: Batch) -> npt.NDArray[np.uint8]: ...
    def create_accounts(self, batch: Batch) -> npt.NDArray[np.uint8]: ...
    def transfer(self, id: int, debit_account: int, credit_account: int, amount: int, *, ledger: int = 1,
                 code: int = 0, flags: int = 0, pending_id: int = 0, timeout: int = 0,
                 user_data: int = 0) -> TransferResult: ...
    def create_account(self, id: int, ledger: int = 1, *, min_balance: int = 0, max_balance: int = ...,
                       flags: int = 0, user_data: int = 0) -> AccountResult: ...
    def account(self, id: int) -> Account | None: ...
    def balance(self, id: int) -> int: ...
    def available(self, id: int) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Client: ...
    def __exit__(self, *exc_info: object) -> None: ...

def connect(directory: str, *, timeout_ms: int = 30000, busy_timeout_ms: int = 5000, writer_timeout_ms: int = 3000,
            spin_count: int = 2000, wait_slice_ms: int = 10) -> Client: ...

EVENT_DTYPE: np.dtype
class Tailer:
    directory: str
    follow: bool
    interval_ms: int
    idle_timeout_ms: int | None
    max_events: int
    batches_read: int
    events_read: int
    last_timestamp: int
    def __init__(self, directory: str | os.PathLike[str], from_position: int = 0, *, follow: bool = True,
                 interval_ms: int = 5, idle_timeout_ms: int | None = None, max_events: int = 65536,
                 previous_checksum: int | None = None, stop: threading.Event | None = None) -> None: ...
    @property
    def position(self) -> int: ...
    @property
    def checksum(self) -> int: ...
    def poll(self) -> npt.NDArray[Any]: ...
    def __iter__(self) -> Iterator[npt.NDArray[Any]]: ...
    def __next__(self) -> npt.NDArray[Any]: ...
    def run(self, callback: Callable[[npt.NDArray[Any]], object]) -> int: ...
    def end_position(self) -> int: ...
    def lag_records(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Tailer: ...
    def __exit__(self, *exc_info: object) -> None: ...
@overload
def tail(directory: str | os.PathLike[str], from_position: int = 0, *, callback: None = None,
         stop: threading.Event | None = None, follow: bool = True, interval_ms: int = 5,
         idle_timeout_ms: int | None = None, max_events: int = 65536,
         previous_checksum: int | None = None) -> Tailer: ...
@overload
def tail(directory: str | os.PathLike[str], from_position: int = 0, *,
         callback: Callable[[npt.NDArray[Any]], object], stop: threading.Event | None = None, follow: bool = True,
         interval_ms: int = 5, idle_timeout_ms: int | None = None, max_events: int = 65536,
         previous_checksum: int | None = None) -> int: ...
