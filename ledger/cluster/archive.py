"""A shard's snapshots in its JetStream object store bucket, and rejoining from them (issue 14, docs/CLUSTER.md
"Rejoin and retention").

The primary uploads each snapshot it writes (`upload_snapshot`) to bucket `LEDGER_SNAPSHOTS_<shard>`, object name
= the snapshot's file name (`snapshot-<P:016d>.snapshot`, so names order by position), its position in header
`Ledger-Snapshot-Position`. `prune` keeps the newest SNAPSHOTS_KEPT and then trims the stream (`trim_stream`)
below the first message at or after the OLDEST snapshot kept, never past it: whoever holds a snapshot kept, or a
journal at or after the oldest one, can still catch up from the stream.

`rejoin` makes a data directory followable: one missing, empty, or behind what the stream still holds is built
from the newest snapshot in the bucket whose own checks pass (ledger.rebuild.restore_from_snapshot: a journal that
begins at that snapshot, docs/FORMAT.md "Journal base"); a StreamFollower then follows from its position. A
damaged object is skipped with a warning. Every call is bounded (REQUEST_TIMEOUT_S, or the transfer's own bound).

Pending transfers from before a snapshot: each upload records its oldest still-pending transfer's event position
(header Ledger-Pending-Position); trimming keeps the stream from the batch holding it, and `rejoin` writes the
batches from there up to the base back into the rebuilt journal, so they can still be posted, voided or expired.
ClusterNode (ledger/cluster/node.py) calls all this itself: rejoin at start and when its follower finds the stream
trimmed past it; upload and prune after each of its primary's snapshots."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import tempfile
import time
import warnings
from typing import Any, Coroutine

import nats.js.errors
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType

from ledger.cluster.connection import ConnectionOptions
from ledger.cluster.names import (
    HEADER_END_POSITION,
    HEADER_MESSAGE_ID,
    HEADER_PART,
    HEADER_PENDING_POSITION,
    HEADER_SNAPSHOT_POSITION,
    JOURNAL_START_POSITION,
    REPLICAS_DEFAULT,
    REQUEST_TIMEOUT_S,
    SNAPSHOTS_KEPT,
    snapshot_bucket,
    stream_name,
)
from ledger.cluster.stream import LoopThread, header_int, marker_epoch, message_start
from ledger.enums import TransferState
from ledger.errors import LedgerCorruptError
from ledger.format import (POSITION_BITS, POSITION_MASK, RECORD_SIZE, SEGMENT_HEADER, SEGMENT_HEADER_BYTES,
                           segment_name)
from ledger.rebuild import restore_from_snapshot
from ledger.snapshot import read_snapshot
from ledger.store import open_store

__all__ = ["RejoinResult", "behind_async", "download_async", "download_newest", "first_at_or_after",
           "journal_position", "list_uploaded", "prune", "prune_async", "rejoin", "rejoin_async", "trim_async",
           "trim_stream", "upload_async", "upload_snapshot", "uploaded"]

SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX = "snapshot-", ".snapshot"
TRANSFER_TIMEOUT_S = 600.0   # one snapshot's upload or download (gigabytes over a slow link)
HASH_PIECE_BYTES = 16 << 20
BATCH_CHECKSUM_OFFSET = 40   # a batch header record's checksum field (docs/FORMAT.md "Batch header (kind 15)")


@dataclasses.dataclass(frozen=True)
class RejoinResult:
    """What `rejoin` did: `built` (the directory was built from the snapshot at `position`), or not (`position` is
    the journal position the directory was already at, or None when there is neither directory nor snapshot: the
    node starts from genesis). `replaced`: where an old directory that could no longer catch up was moved."""

    built: bool
    position: int | None
    replaced: str | None = None


def _position_of(name: str) -> int | None:
    """The position in an object name `snapshot-<P>.snapshot`, None for any other name."""
    digits = name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)]
    if name.startswith(SNAPSHOT_PREFIX) and name.endswith(SNAPSHOT_SUFFIX) and digits.isdigit():
        return int(digits)
    return None


def oldest_pending(arrays: dict[str, Any]) -> int | None:
    """The journal position of the event of the oldest transfer still pending in a snapshot's state (its
    transfer table: bits 0..39 the event's position, 40..47 its TransferState), None if none is pending."""
    slots = arrays["transfer_slots"]
    values = slots["value"][slots["key"] != 0]
    pending = values[((values >> POSITION_BITS) & 0xFF) == TransferState.PENDING] & POSITION_MASK
    return int(pending.min()) if pending.size else None


def _file_digest(path: str) -> bytes:
    """The SHA-256 of a file's bytes (what the object store keeps as an object's digest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(HASH_PIECE_BYTES):
            digest.update(piece)
    return digest.digest()


def _object_digest(info: Any) -> bytes | None:
    """An object's SHA-256 from its info ("SHA-256=" and URL-safe base64), None if it has none."""
    text = info.digest or ""
    if not text.upper().startswith("SHA-256="):
        return None
    return base64.urlsafe_b64decode(text[len("SHA-256="):])


async def _bucket(js: Any, shard: str, replicas: int, create: bool) -> Any:
    """Shard `shard`'s snapshot bucket (created if missing and `create`), or None if missing."""
    try:
        return await js.object_store(snapshot_bucket(shard))
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
        config = ObjectStoreConfig(bucket=snapshot_bucket(shard), storage=StorageType.FILE, replicas=replicas)
        return await js.create_object_store(snapshot_bucket(shard), config=config)


async def uploaded(js: Any, shard: str) -> list[tuple[int, str]]:
    """(position, object name) of the snapshots in shard `shard`'s bucket, newest first."""
    bucket = await _bucket(js, shard, 1, create=False)
    if bucket is None:
        return []
    try:
        infos = await bucket.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:
        return []   # an empty bucket
    except TimeoutError as error:   # nats.errors.TimeoutError is one
        # nats-py's listing waits for its watcher's end-of-data marker, which a bucket whose first object is
        # being uploaded that moment may not send in time. Nothing listed is safe: the node follows the stream
        # from its own position, and one the stream was trimmed past comes back here (ClusterNode._rejoin_trimmed).
        warnings.warn(f"ledger: the snapshot bucket of shard {shard} was not listed ({error!r}): no snapshot "
                      f"used this time", RuntimeWarning, stacklevel=2)
        return []
    found = [(_position_of(info.name), info.name) for info in infos if not info.deleted]
    return sorted(((position, name) for position, name in found if position is not None), reverse=True)


async def upload_async(js: Any, shard: str, snapshot_path: str, replicas: int = REPLICAS_DEFAULT) -> bool:
    """Put the snapshot file into shard `shard`'s bucket under its file name; False (a no-op) if the same bytes
    are there already. The file's own checks must pass first: a damaged snapshot is never uploaded."""
    name = os.path.basename(snapshot_path)
    position = _position_of(name)
    if position is None:
        raise ValueError(f"{snapshot_path}: not a snapshot file name ({SNAPSHOT_PREFIX}<position>{SNAPSHOT_SUFFIX})")
    scalars, arrays, _ = read_snapshot(snapshot_path)   # raises LedgerCorruptError: its checksums and state hash
    if not await _stream_holds(js, shard, scalars):
        raise ValueError(f"{snapshot_path}: stream {stream_name(shard)} holds no batch ending at journal position "
                         f"{position} with this snapshot's last checksum: its journal was never acknowledged (a "
                         f"primary that stepped down since, or another shard's): not uploaded")
    pending = oldest_pending(arrays)
    bucket = await _bucket(js, shard, replicas, create=True)
    digest = _file_digest(snapshot_path)
    try:
        if _object_digest(await bucket.get_info(name)) == digest:
            return False
    except nats.js.errors.ObjectNotFoundError:
        pass
    headers = {HEADER_SNAPSHOT_POSITION: str(position)}
    if pending is not None:
        headers[HEADER_PENDING_POSITION] = str(pending)
    meta = ObjectMeta(name=name, headers=headers)
    with open(snapshot_path, "rb") as file:
        await bucket.put(name, file, meta=meta)
    return True


async def _stream_holds(js: Any, shard: str, scalars: dict[str, int]) -> bool:
    """Whether shard `shard`'s stream holds the snapshot's last batch: a message (not a marker) ending at its
    position whose data has, at that batch's header, the snapshot's last checksum. A snapshot of batches the
    stream never acknowledged (journaled by a primary just before it stepped down) must not seed a rejoin."""
    position, header_position = scalars["write_position"], scalars["last_header_position"]
    if position == JOURNAL_START_POSITION:
        return True
    name = stream_name(shard)
    sequence, state = await first_at_or_after(js, shard, position)
    sequence = min(sequence, state.last_seq + 1) - 1
    while sequence >= max(1, state.first_seq):
        message = await js.get_msg(name, sequence)
        if marker_epoch(message.headers) is None:
            break
        sequence -= 1
    else:
        return False
    headers = message.headers or {}
    part = headers.get(HEADER_PART, "1/1").split("/")
    if header_int(headers, HEADER_END_POSITION) != position or not part[0].isdigit():
        return False
    first = sequence - int(part[0]) + 1
    pieces = [bytes((await js.get_msg(name, number)).data or b"") for number in range(first, sequence)]
    data = b"".join(pieces) + bytes(message.data or b"")
    start = message_start((await js.get_msg(name, first)).headers) if first != sequence else message_start(headers)
    if start is None or not start <= header_position < position:
        return False
    offset = (header_position - start) * RECORD_SIZE + BATCH_CHECKSUM_OFFSET
    return int.from_bytes(data[offset:offset + 8], "little") == scalars["last_checksum"]


async def download_async(js: Any, shard: str, directory: str) -> tuple[int, str] | None:
    """Download the newest snapshot of shard `shard`'s bucket whose own checks pass into a new file in
    `directory`: (position, path), or None if the bucket has none. A damaged one is skipped with a warning."""
    bucket = await _bucket(js, shard, 1, create=False)
    for position, name in await uploaded(js, shard):
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".download", dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                await bucket.get(name, writeinto=file)
                file.flush()
                os.fsync(file.fileno())
            scalars, _, _ = read_snapshot(path)
            if scalars["write_position"] != position:
                raise LedgerCorruptError(f"holds journal position {scalars['write_position']}, its name says "
                                         f"{position}")
            return position, path
        except (LedgerCorruptError, ValueError, OSError, nats.js.errors.Error) as error:
            os.unlink(path)
            warnings.warn(f"ledger: snapshot {name} of bucket {snapshot_bucket(shard)} skipped (damaged): {error}",
                          RuntimeWarning, stacklevel=2)
    return None


async def _message_start(js: Any, name: str, sequence: int) -> int:
    """The journal position message `sequence` starts at: its Nats-Msg-Id for a batch; for an epoch marker (an
    empty message, Msg-Id epoch-N) its Ledger-End-Position, the stream's end when it was published. Both grow
    with the sequence, so a binary search over this finds a position."""
    headers = (await js.get_msg(name, sequence)).headers
    start = header_int(headers, HEADER_MESSAGE_ID)
    if start is None:
        start = header_int(headers, HEADER_END_POSITION)
    if start is None:
        raise LedgerCorruptError(f"stream {name} message {sequence}: neither a journal position in "
                                 f"{HEADER_MESSAGE_ID} nor in {HEADER_END_POSITION}: not a ledger message")
    return start


async def first_at_or_after(js: Any, shard: str, position: int) -> tuple[int, Any]:
    """(the sequence of the first message of shard `shard`'s stream starting at or after journal `position`, or
    the last sequence + 1 if none does; the stream's state)."""
    name = stream_name(shard)
    state = (await js.stream_info(name)).state
    low, high = state.first_seq, state.last_seq + 1
    if state.messages == 0:
        return high, state
    while low < high:   # the first sequence in [low, high) whose start is >= position
        middle = (low + high) // 2
        if await _message_start(js, name, middle) >= position:
            high = middle
        else:
            low = middle + 1
    return low, state


async def trim_async(js: Any, shard: str) -> int:
    """Purge shard `shard`'s stream below the first message at or after the OLDEST snapshot in its bucket, never
    past it, nor past the batch holding the oldest still-pending transfer of a snapshot kept (a rejoin writes it
    back), and never its last message (a follower's start search needs one to say where the stream ends).
    Returns the stream's first sequence after. No snapshot in the bucket: nothing is purged."""
    snapshots = await uploaded(js, shard)
    name = stream_name(shard)
    if not snapshots:
        return (await js.stream_info(name)).state.first_seq
    oldest = snapshots[-1][0]
    sequence, state = await first_at_or_after(js, shard, oldest)
    pending = [position for position in await _pending_positions(js, shard, snapshots) if position < oldest]
    if pending:   # kept from the batch holding the oldest pending transfer: a rejoin writes those back
        holding, _ = await first_at_or_after(js, shard, min(pending))
        sequence = min(sequence, holding - 1)
    keep_from = min(sequence, state.last_seq)
    if state.messages and keep_from > state.first_seq:
        await js.purge_stream(name, seq=keep_from)
    return max(keep_from, state.first_seq)


async def _pending_positions(js: Any, shard: str, snapshots: list[tuple[int, str]]) -> list[int]:
    """The oldest-pending positions (header Ledger-Pending-Position) of these uploaded snapshots that have one."""
    bucket = await _bucket(js, shard, 1, create=False)
    found = []
    for _, name in snapshots:
        position = header_int((await bucket.get_info(name)).headers, HEADER_PENDING_POSITION)
        if position is not None:
            found.append(position)
    return found


def _write_records(journal: str, records_log2: int, start: int, data: bytes) -> None:
    """Write records [start, start + len(data) / 64) into the segments of `journal` (a rebuilt directory's, whose
    segments up to the base exist, zero), at their positions, and fsync them."""
    position, view = start, memoryview(data)
    while view:
        index = position >> records_log2
        count = min(((index + 1) << records_log2) - position, len(view) // RECORD_SIZE)
        fd = os.open(os.path.join(journal, segment_name(index)), os.O_WRONLY)
        try:
            os.pwrite(fd, view[:count * RECORD_SIZE],
                      SEGMENT_HEADER_BYTES + (position - (index << records_log2)) * RECORD_SIZE)
            os.fsync(fd)
        finally:
            os.close(fd)
        position, view = position + count, view[count * RECORD_SIZE:]


async def _write_back_pending(js: Any, shard: str, directory: str, pending: int, base: int) -> int:
    """Write the batches of shard `shard`'s stream from the one holding journal position `pending` (the oldest
    transfer still pending in the base snapshot) up to `base` into the rebuilt `directory`'s journal, at their
    positions (before the base: history there, the pending transfers' events readable, so they can be posted,
    voided or expired). Returns the batches written; 0 with a warning when the stream no longer holds them."""
    name, journal = stream_name(shard), os.path.join(directory, "journal")
    with open(os.path.join(journal, segment_name(0)), "rb") as file:
        records_log2 = SEGMENT_HEADER.unpack(file.read(SEGMENT_HEADER.size))[3]
    sequence, state = await first_at_or_after(js, shard, pending)
    sequence -= 1
    if sequence < max(1, state.first_seq):
        warnings.warn(f"ledger: stream {name} no longer holds the batch of the pending transfer at journal "
                      f"position {pending}: it cannot be posted, voided or expired on {directory}",
                      RuntimeWarning, stacklevel=2)
        return 0
    written, start, pieces = 0, None, []
    for sequence in range(sequence, state.last_seq + 1):
        message = await js.get_msg(name, sequence)
        headers = message.headers or {}
        part = headers.get(HEADER_PART, "1/1").split("/")
        if marker_epoch(headers) is not None:
            pieces = []
            continue
        if part[0] == "1":
            start, pieces = message_start(headers), []
        pieces.append(bytes(message.data or b""))
        if part[0] != part[-1]:
            continue
        if start is None or start >= base:
            break
        _write_records(journal, records_log2, start, b"".join(pieces))
        written += 1
    return written


async def prune_async(js: Any, shard: str, kept: int = SNAPSHOTS_KEPT) -> list[str]:
    """Delete all but the newest `kept` snapshots of shard `shard`'s bucket, then trim its stream below the oldest
    kept (trim_async). Returns the names deleted."""
    assert kept >= 1, kept
    snapshots = await uploaded(js, shard)
    bucket = await _bucket(js, shard, 1, create=False)
    deleted = []
    for _, name in snapshots[kept:]:
        await bucket.delete(name)
        deleted.append(name)
    await trim_async(js, shard)
    return deleted


async def behind_async(js: Any, shard: str, position: int) -> bool:
    """Whether shard `shard`'s stream was trimmed past journal `position`: its first message (not sequence 1)
    starts after it, so a journal there can no longer catch up from the stream (it must rejoin). False for a
    stream never trimmed, and for a position at or after the first message (reconciling handles one ahead)."""
    name = stream_name(shard)
    state = (await js.stream_info(name)).state
    if state.first_seq <= 1 or state.messages == 0:
        return False
    return position < await _message_start(js, name, state.first_seq)


async def _can_follow(js: Any, shard: str, position: int) -> bool:
    """Whether a follower can start at journal `position`: a message of the stream starts there, or its last
    message ends there, or the stream never held anything and `position` is the journal's start."""
    sequence, state = await first_at_or_after(js, shard, position)
    name = stream_name(shard)
    if state.messages == 0:
        return state.last_seq == 0 and position == JOURNAL_START_POSITION
    if sequence <= state.last_seq:
        return await _message_start(js, name, sequence) == position
    return header_int((await js.get_msg(name, state.last_seq)).headers, HEADER_END_POSITION) == position


def journal_position(directory: str) -> int | None:
    """The write position of the ledger in `directory`, None if there is none (missing, or empty)."""
    if not os.path.isdir(os.path.join(directory, "journal")):
        if os.path.isdir(directory) and os.listdir(directory):
            raise ValueError(f"{directory}: neither empty nor a ledger data directory; rejoin will not touch it")
        return None
    store = open_store(directory, readonly=True)
    with store.engine:
        position = int(store.engine.write_position)
        store.close()
    return position


async def rejoin_async(js: Any, directory: str, shard: str) -> RejoinResult:
    """Make `directory` a data directory a StreamFollower of shard `shard` can follow: kept as it is if the
    stream goes on from its position; else (missing, empty, or behind what the stream still holds) built from
    the newest good snapshot of the bucket (ledger.rebuild.restore_from_snapshot), an old directory moved aside
    to `<directory>.replaced-<ns>` (kept: it may hold what no other node has). No snapshot: nothing is done."""
    directory = os.path.abspath(directory)
    position = journal_position(directory)
    if position is not None and await _can_follow(js, shard, position):
        return RejoinResult(False, position)
    parent = os.path.dirname(directory)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    found = await download_async(js, shard, parent)
    if found is None:
        return RejoinResult(False, position)
    snapshot_position, path = found
    replaced = None
    try:
        if position is not None:
            replaced = f"{directory}.replaced-{time.time_ns()}"
            os.rename(directory, replaced)
            warnings.warn(f"ledger: {directory} (journal position {position}) cannot catch up from stream "
                          f"{stream_name(shard)}; moved to {replaced} and rebuilt from the snapshot at "
                          f"{snapshot_position}", RuntimeWarning, stacklevel=2)
        elif os.path.isdir(directory):
            os.rmdir(directory)   # empty (checked above): the build renames a complete directory into place
        await asyncio.get_running_loop().run_in_executor(None, restore_from_snapshot, path, directory)
    finally:
        os.unlink(path)
    bucket = await _bucket(js, shard, 1, create=False)
    info = await bucket.get_info(f"{SNAPSHOT_PREFIX}{snapshot_position:016d}{SNAPSHOT_SUFFIX}")
    pending = header_int(info.headers, HEADER_PENDING_POSITION)
    if pending is not None and pending < snapshot_position:
        await _write_back_pending(js, shard, directory, pending, snapshot_position)
    return RejoinResult(True, snapshot_position, replaced)


def _run(url: str, options: ConnectionOptions | None, coroutine: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
    """Run `coroutine(js)` on a connection of its own, closed after."""
    loop = LoopThread(url, options)
    try:
        loop.start()
        return loop.run(coroutine(loop.js), timeout_s)
    finally:
        loop.stop()


def upload_snapshot(url: str, shard: str, snapshot_path: str, options: ConnectionOptions | None = None,
                    replicas: int = REPLICAS_DEFAULT) -> bool:
    """Upload one snapshot file to shard `shard`'s bucket (upload_async); False if it was there already."""
    return _run(url, options, lambda js: upload_async(js, shard, snapshot_path, replicas), TRANSFER_TIMEOUT_S)


def list_uploaded(url: str, shard: str, options: ConnectionOptions | None = None) -> list[tuple[int, str]]:
    """(position, object name) of shard `shard`'s uploaded snapshots, newest first."""
    return _run(url, options, lambda js: uploaded(js, shard), REQUEST_TIMEOUT_S)


def download_newest(url: str, shard: str, directory: str,
                    options: ConnectionOptions | None = None) -> tuple[int, str] | None:
    """Download the newest good snapshot into a new file in `directory` (download_async): (position, path)."""
    return _run(url, options, lambda js: download_async(js, shard, directory), TRANSFER_TIMEOUT_S)


def trim_stream(url: str, shard: str, options: ConnectionOptions | None = None) -> int:
    """Purge shard `shard`'s stream below the oldest uploaded snapshot (trim_async); its first sequence after."""
    return _run(url, options, lambda js: trim_async(js, shard), REQUEST_TIMEOUT_S)


def prune(url: str, shard: str, kept: int = SNAPSHOTS_KEPT, options: ConnectionOptions | None = None) -> list[str]:
    """Keep the newest `kept` snapshots of the bucket, delete the rest, trim the stream (prune_async)."""
    return _run(url, options, lambda js: prune_async(js, shard, kept), REQUEST_TIMEOUT_S)


def rejoin(directory: str, url: str, shard: str, options: ConnectionOptions | None = None) -> RejoinResult:
    """rejoin_async on a connection of its own: call at node start, before opening `directory` and following."""
    return _run(url, options, lambda js: rejoin_async(js, directory, shard), TRANSFER_TIMEOUT_S)
