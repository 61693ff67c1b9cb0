"""Exceptions for misuse and for damaged or unavailable files. Outcomes of valid requests are result codes, not
exceptions (see ledger.enums)."""
from __future__ import annotations

__all__ = [
    "LedgerError",
    "LedgerClosedError",
    "LedgerCorruptError",
    "LedgerLockedError",
    "LedgerPoisonedError",
    "LedgerFullError",
]


class LedgerError(Exception):
    """Base class of every exception the ledger raises on purpose."""


class LedgerClosedError(LedgerError):
    """The handle was closed; open the ledger again."""


class LedgerPoisonedError(LedgerClosedError):
    """A write to the journal could not be made durable; the handle refuses further work. Reopen to recover."""


class LedgerCorruptError(LedgerError):
    """The journal or a snapshot failed a checksum, the hash chain or an integrity check before its tail."""


class LedgerLockedError(LedgerError):
    """Another process holds the writer lock of this data directory."""


class LedgerFullError(LedgerError, OSError):
    """The journal could not grow (disk full or a configured limit); the batch was not applied."""
