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
    "LedgerBusyError",
    "LedgerRejectedError",
    "LedgerUnavailableError",
    "LedgerTimeoutError",
    "LedgerClockError",
    "LedgerReplicationError",
    "LedgerNotPrimaryError",
]


class LedgerError(Exception):
    """Base class of every exception the ledger raises on purpose."""


class LedgerClosedError(LedgerError):
    """The handle was closed; open the ledger again."""


class LedgerPoisonedError(LedgerClosedError):
    """A write to the journal could not be made durable, or a journal segment could not be created (other than
    for lack of room); the handle refuses further work. Reopen to recover."""


class LedgerCorruptError(LedgerError):
    """The journal or a snapshot failed a checksum, the hash chain or an integrity check before its tail."""


class LedgerLockedError(LedgerError):
    """Another process holds the writer lock of this data directory."""


class LedgerFullError(LedgerError, OSError):
    """The journal could not grow (disk full or a configured limit); the batch was not applied, and the handle
    stays usable: retry once there is room."""


class LedgerBusyError(LedgerError):
    """The command ring stayed full past the client's busy timeout; nothing of the batch was applied."""


class LedgerRejectedError(LedgerError):
    """The writer refused a ring call whole because one of its slots was malformed (a process that does not follow
    the ring protocol wrote into it); nothing of the call was applied. Retrying with the same ids is safe."""


class LedgerUnavailableError(LedgerError):
    """The writer process (`ledger serve`) is not running or stopped answering. The batch may or may not have
    been applied: retry with the same transfer ids once it is back (EXISTS means it was applied)."""


class LedgerTimeoutError(LedgerError):
    """No answer within the client's timeout. The batch may still be applied: retry with the same ids."""


class LedgerClockError(LedgerError):
    """The clock reads a time the ledger cannot stamp events with: negative, or so late that an event of the call
    would pass TIMESTAMP_MAX (2**63 - 1 ns). Nothing of the call was applied; the handle stays usable."""


class LedgerReplicationError(LedgerError):
    """A standby refused replicated journal batches (Store.append_replicated): they are not the next whole
    committed batches of this journal (a duplicate, a gap, damage in transit, another writer's batches). The
    message names the check, the journal position and what was expected against what was found. Nothing of the
    refused batch was applied or kept in the journal; the standby stays usable for the correct next batch."""


class LedgerNotPrimaryError(LedgerError):
    """This handle may not publish to its shard's stream (ledger.cluster.stream): another publisher wrote to the
    stream since (the single-writer fence, Nats-Expected-Last-Sequence, refused the batch), or the stream ends
    at another journal position than this store. The message names the stream and the sequences or positions.
    The batch refused was not acknowledged and the handle is poisoned: it is no longer the primary."""


class LedgerHistoryUnavailableError(LedgerError):
    """A read of a journal record before the position this data directory's journal begins at: the node rejoined
    its cluster from a snapshot (docs/FORMAT.md "Journal base"), so the records before that snapshot's position are
    on other nodes, not here. The message names the position. Read the history from a node that has it."""
