"""A shard's JetStream stream (issue 14, docs/CLUSTER.md "Publishing and following a shard's stream"): the
primary publishes each committed batch as one message, byte for byte (Store.batch_bytes), fenced so that only one
writer can append; a standby follows the stream into its own store (Store.append_replicated checks every byte).

Headers of a message: `Nats-Msg-Id` (the batch range's start journal position), `Ledger-End-Position` (its end),
and on publish `Nats-Expected-Last-Sequence` (the fence: the server stores the message only if the stream's last
sequence is the one this publisher knows, so a second or stale publisher fails)."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

import nats
import nats.errors
import nats.js.errors
from nats.js.api import (ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType,
                         StreamConfig)

from ledger.cluster.connection import ConnectionOptions, connect_arguments
from ledger.cluster.names import (
    ACK_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    HEADER_END_POSITION,
    HEADER_EPOCH,
    HEADER_EXPECTED_LAST_SEQUENCE,
    HEADER_MESSAGE_ID,
    HEADER_NODE,
    JOURNAL_START_POSITION,
    MARKER_ID_PREFIX,
    MESSAGE_BYTES_MAX,
    REPLICAS_DEFAULT,
    REQUEST_TIMEOUT_S,
    WRONG_LAST_SEQUENCE_ERROR_CODE,
    check_shard,
    stream_name,
    subject,
)
from ledger.cluster.servers import MAX_PAYLOAD_BYTES
from ledger.errors import LedgerNotPrimaryError, LedgerReplicationError, LedgerTimeoutError

__all__ = ["LoopThread", "StreamFollower", "StreamPublisher", "check_shard", "ensure_stream", "header_int",
           "last_message", "marker_epoch", "stream_name", "subject"]


async def ensure_stream(js: Any, shard: str, replicas: int = REPLICAS_DEFAULT) -> Any:
    """Create shard `shard`'s stream if missing (file storage, `replicas` copies, limits retention with no limit
    but the message size, and discard NEW: a full stream refuses a publish rather than drop acknowledged
    batches); returns its StreamInfo."""
    assert 1 <= replicas <= 5, replicas
    config = StreamConfig(name=stream_name(shard), subjects=[subject(shard)], storage=StorageType.FILE,
                          num_replicas=replicas, retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.NEW,
                          max_msg_size=MAX_PAYLOAD_BYTES, max_msgs=-1, max_bytes=-1, max_age=0,
                          duplicate_window=120.0)
    try:
        return await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        return await js.add_stream(config)


def header_int(headers: dict[str, str] | None, name: str) -> int | None:
    """Header `name` of a message as a non-negative integer, or None when absent or not one."""
    value = (headers or {}).get(name)
    return int(value) if value is not None and value.isdigit() else None


def marker_epoch(headers: dict[str, str] | None) -> int | None:
    """The epoch of an epoch marker (Nats-Msg-Id `epoch-<N>`: the empty message a new primary publishes before it
    serves, docs/CLUSTER.md "Fencing and step-down"), or None for any other message."""
    value = (headers or {}).get(HEADER_MESSAGE_ID) or ""
    number = value[len(MARKER_ID_PREFIX):]
    return int(number) if value.startswith(MARKER_ID_PREFIX) and number.isdigit() else None


class LoopThread:
    """One background thread running an asyncio loop and holding one nats-py connection (and its JetStream
    context); `run` executes a coroutine there from any other thread."""

    def __init__(self, url: str, options: ConnectionOptions | None) -> None:
        self.url = url
        self.options = options or ConnectionOptions()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ledger-stream", daemon=True)
        self.connection: Any = None
        self.js: Any = None

    def start(self) -> None:
        """Start the thread and connect."""
        self.thread.start()
        self.run(self._connect(), CONNECT_TIMEOUT_S * 2)

    async def _connect(self) -> None:
        async def quiet(error: Exception) -> None:
            """nats-py logs each failed attempt with a traceback; the callers see the outcome."""
        self.connection = await nats.connect(**connect_arguments(self.url, self.options),
                                             connect_timeout=CONNECT_TIMEOUT_S, error_cb=quiet)
        self.js = self.connection.jetstream(timeout=REQUEST_TIMEOUT_S)

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        """Run `coroutine` on the loop and return its result; LedgerTimeoutError past timeout_s."""
        assert threading.current_thread() is not self.thread, "run() from the loop itself would deadlock"
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise LedgerTimeoutError(f"no answer from NATS within {timeout_s} s") from None

    def stop(self) -> None:
        """Close the connection, end every task of the loop (a subscription's reader, a follower) and the thread."""
        if self.thread.is_alive():
            try:
                self.run(self._shutdown(), REQUEST_TIMEOUT_S * 2)
            except Exception:
                pass   # the loop stops anyway; what was not closed goes with the process
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
        self.loop.close()

    async def _shutdown(self) -> None:
        if self.connection is not None:
            try:
                await asyncio.wait_for(self.connection.close(), REQUEST_TIMEOUT_S)
            except Exception:
                pass   # a server gone: nothing to flush to
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def last_message(js: Any, name: str, last_sequence: int) -> tuple[int, int, bytes]:
    """Stream `name`'s last batch, at or before message `last_sequence`: its journal range and bytes. Epoch markers
    after it are passed over (each must say the stream ends where that batch does); (E, E, b"") when only markers
    are left (E: their end position, the stream trimmed below them), (1, 1, b"") if the stream is empty."""
    sequence, marker_end = last_sequence, None
    while sequence > 0:
        try:
            message = await js.get_msg(name, sequence)
        except nats.js.errors.NotFoundError:
            if marker_end is None:
                raise
            break       # trimmed below this marker: the markers say where the stream ends
        if marker_epoch(message.headers) is None:
            return _batch_range(name, message, sequence, marker_end)
        end = header_int(message.headers, HEADER_END_POSITION)
        if end is None or marker_end not in (None, end):
            raise LedgerNotPrimaryError(f"stream {name}: epoch marker at sequence {sequence} says the stream ends "
                                        f"at journal position {end}, the marker after it {marker_end}")
        marker_end, sequence = end, sequence - 1
    end = marker_end or JOURNAL_START_POSITION
    return end, end, b""


def _batch_range(name: str, message: Any, sequence: int, marker_end: int | None) -> tuple[int, int, bytes]:
    """The journal range and bytes of batch message `sequence`, the last before any epoch markers (which said the
    stream ends at `marker_end`)."""
    start = header_int(message.headers, HEADER_MESSAGE_ID)
    end = header_int(message.headers, HEADER_END_POSITION)
    if start is None or end is None or not start < end:
        raise LedgerNotPrimaryError(f"stream {name}: its last message (sequence {sequence}) has no journal "
                                    f"range in {HEADER_MESSAGE_ID} and {HEADER_END_POSITION}: not a ledger batch")
    if marker_end not in (None, end):
        raise LedgerNotPrimaryError(f"stream {name}: the epoch marker after sequence {sequence} says the stream "
                                    f"ends at journal position {marker_end}, its last batch ends at {end}")
    return start, end, bytes(message.data or b"")


class StreamPublisher:
    """The publish hook of a primary (ledger.api.open_with_hooks(path, publish=publisher)) sending each committed
    batch range to shard `shard`'s stream. Use as a context manager; `attach(store)` after the open gives it the
    bytes (store.batch_bytes) and checks the stream ends where the store's journal does (a primary behind or
    ahead of its stream must not publish: LedgerNotPrimaryError). One round trip per batch for now (the hook
    waits for each ack; pipelining comes later). A refused publish (the fence: another publisher appended
    since), a duplicate or a timeout raises, which poisons the handle: nothing is acknowledged on doubt."""

    def __init__(self, url: str, shard: str, options: ConnectionOptions | None = None,
                 replicas: int = REPLICAS_DEFAULT, ack_timeout_s: float = ACK_TIMEOUT_S) -> None:
        self.shard = check_shard(shard)
        self.stream = stream_name(shard)
        self.subject = subject(shard)
        self.replicas = replicas
        self.ack_timeout_s = ack_timeout_s
        self.last_sequence = 0
        self.end_position = JOURNAL_START_POSITION
        self.store: Any = None
        self._last: tuple[int, int, bytes] = (JOURNAL_START_POSITION, JOURNAL_START_POSITION, b"")
        self._loop = LoopThread(url, options)

    def __enter__(self) -> StreamPublisher:
        self._loop.start()
        try:
            info = self._loop.run(ensure_stream(self._loop.js, self.shard, self.replicas), REQUEST_TIMEOUT_S)
            self.last_sequence = info.state.last_seq
            self._last = self._loop.run(last_message(self._loop.js, self.stream, self.last_sequence),
                                        REQUEST_TIMEOUT_S)
            self.end_position = self._last[1]
        except BaseException:
            self._loop.stop()
            raise
        return self

    def __exit__(self, *exception: object) -> None:
        self._loop.stop()

    def attach(self, store: Any) -> None:
        """Publish from `store` (the ledger's Store); LedgerNotPrimaryError if the stream does not end at its
        write position with the store's own last batch, byte for byte."""
        position = store.engine.write_position
        if position != self.end_position:
            relation = "behind" if position < self.end_position else "ahead of"
            raise LedgerNotPrimaryError(f"stream {self.stream} ends at journal position {self.end_position} "
                                        f"(sequence {self.last_sequence}), the store at {position}: the store "
                                        f"is {relation} its stream and may not publish")
        start, end, data = self._last
        if start < end and store.batch_bytes(start, end) != data:
            raise LedgerNotPrimaryError(f"stream {self.stream}: its last message (sequence {self.last_sequence}, "
                                        f"journal [{start}, {end})) is not the store's batch there: the store "
                                        f"diverged from its stream and may not publish")
        self.store = store

    def __call__(self, start: int, end: int) -> None:
        """The publish hook: send batches [start, end) and wait for the stream's ack."""
        if self.store is None:
            raise LedgerNotPrimaryError(f"stream {self.stream}: publish before attach(store)")
        if start != self.end_position:
            raise LedgerNotPrimaryError(f"stream {self.stream} ends at journal position {self.end_position}, "
                                        f"the batch starts at {start}")
        data = self.store.batch_bytes(start, end)
        if len(data) > MESSAGE_BYTES_MAX:
            raise LedgerNotPrimaryError(f"stream {self.stream}: batch [{start}, {end}) is {len(data)} bytes, "
                                        f"past the {MESSAGE_BYTES_MAX}-byte message limit")
        headers = {HEADER_MESSAGE_ID: str(start), HEADER_END_POSITION: str(end),
                   HEADER_EXPECTED_LAST_SEQUENCE: str(self.last_sequence)}
        ack = self._loop.run(self._publish(data, headers), self.ack_timeout_s + 1.0)
        if ack.duplicate or ack.seq != self.last_sequence + 1:
            # A duplicate ack names a message stored before under this start position, maybe another writer's.
            raise LedgerNotPrimaryError(f"stream {self.stream}: batch at journal position {start} acknowledged "
                                        f"as sequence {ack.seq} (duplicate {ack.duplicate}), expected "
                                        f"{self.last_sequence + 1}")
        self.last_sequence = ack.seq
        self.end_position = end

    async def _publish(self, data: bytes, headers: dict[str, str]) -> Any:
        try:
            return await self._loop.js.publish(self.subject, data, timeout=self.ack_timeout_s,
                                               stream=self.stream, headers=headers)
        except nats.js.errors.APIError as error:
            if error.err_code == WRONG_LAST_SEQUENCE_ERROR_CODE:
                raise LedgerNotPrimaryError(
                    f"stream {self.stream}: another publisher appended since sequence {self.last_sequence} "
                    f"(the server: {error.description}); this handle is no longer the primary") from None
            raise
        except nats.errors.TimeoutError:
            raise LedgerTimeoutError(f"stream {self.stream}: no ack within {self.ack_timeout_s} s; the batch "
                                     f"is in doubt") from None

    # -- the epoch marker (docs/CLUSTER.md "Fencing and step-down") --

    def publish_marker(self, epoch: int, node: str) -> int:
        """Publish the epoch marker of a new primary (after attach): an empty message with Nats-Msg-Id
        `epoch-<epoch>`, Ledger-Epoch, Ledger-Node, Ledger-End-Position (the stream's end journal position) and
        the fence, Nats-Expected-Last-Sequence: once it is stored, a publish of the old primary (which expects
        an earlier last sequence) fails. Returns its sequence. LedgerNotPrimaryError if the stream moved on
        since this publisher read its end (the old primary appended meanwhile: follow again and retry)."""
        assert self.store is not None, "publish_marker() after attach(store)"
        assert epoch > 0, epoch
        headers = {HEADER_MESSAGE_ID: f"{MARKER_ID_PREFIX}{epoch}", HEADER_EPOCH: str(epoch), HEADER_NODE: node,
                   HEADER_END_POSITION: str(self.end_position),
                   HEADER_EXPECTED_LAST_SEQUENCE: str(self.last_sequence)}
        ack = self._loop.run(self._publish_marker(headers), self.ack_timeout_s + 1.0)
        if ack.duplicate or ack.seq != self.last_sequence + 1:
            raise LedgerNotPrimaryError(f"stream {self.stream}: the marker of epoch {epoch} was acknowledged as "
                                        f"sequence {ack.seq} (duplicate {ack.duplicate}), expected "
                                        f"{self.last_sequence + 1}")
        self.last_sequence = ack.seq
        return int(ack.seq)

    async def _publish_marker(self, headers: dict[str, str]) -> Any:
        try:
            return await self._loop.js.publish(self.subject, b"", timeout=self.ack_timeout_s, stream=self.stream,
                                               headers=headers)
        except nats.js.errors.APIError as error:
            if error.err_code == WRONG_LAST_SEQUENCE_ERROR_CODE:
                raise LedgerNotPrimaryError(
                    f"stream {self.stream}: appended to since sequence {self.last_sequence} (the server: "
                    f"{error.description}): the epoch marker was not stored") from None
            raise
        except nats.errors.TimeoutError:
            raise LedgerTimeoutError(f"stream {self.stream}: no ack of the epoch marker within "
                                     f"{self.ack_timeout_s} s") from None


class StreamFollower:
    """Follows shard `shard`'s stream into `store` (a standby: store.follow()), from the message after the
    store's write position, calling store.append_replicated for each message in order. A message it refuses
    stops the follower: `error` keeps the LedgerReplicationError, nothing of it applied, nothing skipped.
    `positions` maps each applied message's end journal position to its stream sequence. An epoch marker changes
    no journal: it is checked (empty, at this store's write position) and passed over, and `epoch` / `primary`
    keep the last one's epoch and node."""

    def __init__(self, url: str, shard: str, store: Any, options: ConnectionOptions | None = None) -> None:
        self.stream = stream_name(shard)
        self.subject = subject(shard)
        self.store = store
        self.error: BaseException | None = None
        self.sequence = 0             # the last stream sequence the store holds (a refused one is named in `error`)
        self.positions: dict[int, int] = {}
        self.epoch = 0                # the last epoch marker's epoch and node (0 and None before any)
        self.primary: str | None = None
        self._changed = threading.Condition()
        self._loop = LoopThread(url, options)
        self._task: Any = None

    def start(self) -> None:
        """Connect and follow in the background."""
        assert self._task is None, "started already"
        self._loop.start()
        self._task = asyncio.run_coroutine_threadsafe(self._follow(), self._loop.loop)

    def stop(self) -> None:
        """Stop following and disconnect."""
        self._loop.stop()

    def follow_until(self, position: int | None = None, sequence: int | None = None,
                     timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        """Wait until the store reaches journal `position` or the stream `sequence` is applied (starting the
        follower if needed); raises the follower's error, or LedgerTimeoutError past timeout_s."""
        assert (position is None) != (sequence is None), "a position or a sequence"
        if self._task is None:
            self.start()

        def reached() -> bool:
            if position is not None:
                return self.store.engine.write_position >= position
            return self.sequence >= sequence   # type: ignore[operator]
        with self._changed:
            self._changed.wait_for(lambda: self.error is not None or reached(), timeout_s)
        if self.error is not None:
            raise self.error
        if not reached():
            raise LedgerTimeoutError(f"stream {self.stream}: not followed to position {position} / sequence "
                                     f"{sequence} within {timeout_s} s (at sequence {self.sequence})")

    async def _follow(self) -> None:
        try:
            first = await self._first_sequence()
            with self._changed:
                self.sequence = max(self.sequence, first - 1)   # the messages before it: in the store already
                self._changed.notify_all()
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)
            subscription = await self._loop.js.subscribe(self.subject, stream=self.stream, ordered_consumer=True,
                                                         config=config)
            while True:
                message = await subscription.next_msg(timeout=None)
                self._apply(message.metadata.sequence.stream, message.data, message.headers)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._set_error(error)

    def _apply(self, sequence: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        epoch = marker_epoch(headers)
        if epoch is not None:
            self._pass_marker(sequence, epoch, data, headers)
            return
        try:
            end = self.store.append_replicated(data)
        except LedgerReplicationError as error:
            raise LedgerReplicationError(f"stream {self.stream} message {sequence} refused: {error}") from error
        with self._changed:
            self.sequence = sequence
            self.positions[end] = sequence
            self._changed.notify_all()

    def _pass_marker(self, sequence: int, epoch: int, data: bytes, headers: dict[str, str] | None) -> None:
        """An epoch marker: nothing to apply, but it must be one (empty) and say the stream ends where this store's
        journal does (else the new primary and this standby disagree about the journal: refused)."""
        end = header_int(headers, HEADER_END_POSITION)
        position = self.store.engine.write_position
        if data or end != position:
            raise LedgerReplicationError(
                f"stream {self.stream} message {sequence} refused: an epoch marker (epoch {epoch}) must be empty "
                f"and at this standby's write position {position}; it holds {len(data or b'')} bytes and says "
                f"journal position {end}")
        with self._changed:
            self.sequence, self.epoch, self.primary = sequence, epoch, (headers or {}).get(HEADER_NODE)
            self._changed.notify_all()

    def _set_error(self, error: BaseException) -> None:
        with self._changed:
            self.error = error
            self._changed.notify_all()

    async def _first_sequence(self) -> int:
        """The sequence of the message starting at the store's write position, or the one after the last message
        if that ends there. A binary search over the Nats-Msg-Id headers (they grow with the sequence); a message
        without one (a forgery) makes it scan from the first message instead."""
        position = self.store.engine.write_position
        info = await self._loop.js.stream_info(self.stream)
        low, high = info.state.first_seq, info.state.last_seq
        if info.state.messages == 0 or (await self._range(high))[1] == position:
            return high + 1
        while low <= high:
            middle = (low + high) // 2
            start = (await self._range(middle))[0]
            if start is None:
                return await self._scan(info.state.first_seq, info.state.last_seq, position)
            if start == position:
                return middle
            low, high = (middle + 1, high) if start < position else (low, middle - 1)
        raise self._no_message(position)

    async def _scan(self, first: int, last: int, position: int) -> int:
        for sequence in range(first, last + 1):
            start, end = await self._range(sequence)
            if start == position:
                return sequence
            if end == position:
                return sequence + 1
        raise self._no_message(position)

    async def _range(self, sequence: int) -> tuple[int | None, int | None]:
        """Message `sequence`'s journal range from its headers; an epoch marker sits at its end position (an empty
        range), so the binary search's starts still grow with the sequence."""
        headers = (await self._loop.js.get_msg(self.stream, sequence)).headers
        end = header_int(headers, HEADER_END_POSITION)
        if marker_epoch(headers) is not None:
            return end, end
        return header_int(headers, HEADER_MESSAGE_ID), end

    def _no_message(self, position: int) -> LedgerReplicationError:
        return LedgerReplicationError(f"stream {self.stream} holds no message starting at journal position "
                                      f"{position} (this standby's write position)")
