"""A shard's JetStream stream (issue 14, docs/CLUSTER.md "Publishing and following a shard's stream"): the
primary publishes each committed batch as one message, byte for byte (Store.batch_bytes), fenced so that only one
writer can append; a standby follows the stream into its own store (Store.append_replicated checks every byte).

Headers of a message: `Nats-Msg-Id` (the batch range's start journal position), `Ledger-End-Position` (its end),
and on publish `Nats-Expected-Last-Sequence` (the fence: the server stores the message only if the stream's last
sequence is the one this publisher knows, so a second or stale publisher fails). Publishing is pipelined (up to
PUBLISH_IN_FLIGHT_MAX messages unacknowledged, in order on one connection); a range larger than one message is
split into runs of whole batches, a single batch larger than one message into parts (`Ledger-Part: k/n`) that
the follower joins before applying."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import secrets
import threading
from typing import Any, Coroutine

import nats
import nats.js.errors
from nats.js.api import (ConsumerConfig, DeliverPolicy, DiscardPolicy, Header, PubAck, RetentionPolicy,
                         StorageType, StreamConfig)

from ledger.cluster.connection import ConnectionOptions, connect_arguments
from ledger.cluster.names import (
    ACK_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    HEADER_END_POSITION,
    HEADER_EPOCH,
    HEADER_EXPECTED_LAST_SEQUENCE,
    HEADER_MESSAGE_ID,
    HEADER_NODE,
    HEADER_PART,
    JOURNAL_START_POSITION,
    MARKER_ID_PREFIX,
    MESSAGE_BYTES_MAX,
    NO_RESPONDERS_RETRY_S,
    NO_RESPONDERS_STATUS,
    PUBLISH_EXISTING_BATCHES_MAX,
    PUBLISH_IN_FLIGHT_MAX,
    REPLICAS_DEFAULT,
    REQUEST_TIMEOUT_S,
    STREAM_READY_RETRY_S,
    STREAM_READY_TIMEOUT_S,
    WRONG_LAST_SEQUENCE_ERROR_CODE,
    check_shard,
    stream_name,
    subject,
)
from ledger.cluster.servers import MAX_PAYLOAD_BYTES
from ledger.errors import LedgerNotPrimaryError, LedgerReplicationError, LedgerTimeoutError
from ledger.format import RECORD_SIZE

logger = logging.getLogger(__name__)

__all__ = ["LoopThread", "StreamFollower", "StreamPublisher", "check_shard", "ensure_stream", "header_int",
           "last_message", "marker_epoch", "message_start", "ready_stream", "stream_name", "subject"]


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


async def ready_stream(js: Any, shard: str, replicas: int = REPLICAS_DEFAULT,
                       timeout_s: float = STREAM_READY_TIMEOUT_S) -> Any:
    """ensure_stream, then wait until the stream answers a publish through this connection; its StreamInfo.
    Right after an R3 stream is created its Raft group may still be electing (a timeout, a 503, no leader), and
    once it has a leader the servers may not have learned yet that it takes the subject: a publish then gets "no
    responders". The probe publish expects an impossible last sequence, so the stream refuses it by its fence
    and stores nothing. LedgerTimeoutError past timeout_s, naming what was missing."""
    loop = asyncio.get_running_loop()
    deadline, missing = loop.time() + timeout_s, "answer"
    while loop.time() < deadline:
        try:
            info = await ensure_stream(js, shard, replicas)
            if info.cluster is not None and info.cluster.leader is None:
                missing = "a Raft leader"
            else:
                await js.publish(subject(shard), b"", stream=stream_name(shard), timeout=REQUEST_TIMEOUT_S,
                                 headers={HEADER_EXPECTED_LAST_SEQUENCE: str(2**62)})
                raise LedgerReplicationError(f"stream {stream_name(shard)} stored a publish expecting last "
                                             f"sequence 2**62: it does not check the fence")
        except nats.js.errors.APIError as error:
            if error.err_code == WRONG_LAST_SEQUENCE_ERROR_CODE:
                return await js.stream_info(stream_name(shard))
            if not isinstance(error, nats.js.errors.ServiceUnavailableError):
                raise
            missing = "a Raft leader"
        except nats.js.errors.NoStreamResponseError:
            missing = "responders on its subject"
        except nats.errors.TimeoutError:
            missing = "answer"
        await asyncio.sleep(STREAM_READY_RETRY_S)
    raise LedgerTimeoutError(f"stream {stream_name(shard)}: not ready within {timeout_s} s (no {missing})")


def message_start(headers: dict[str, str] | None) -> int | None:
    """The journal position a message's range starts at: the Nats-Msg-Id of a whole message, the number before
    the first '.' of part 1 of a split batch (`<start>.1.<publisher>`); None for a later part (it starts no
    batch), a marker or a forgery."""
    part = (headers or {}).get(HEADER_PART)
    if part is None:
        return header_int(headers, HEADER_MESSAGE_ID)
    value = (headers or {}).get(HEADER_MESSAGE_ID, "").split(".")[0]
    return int(value) if part.startswith("1/") and value.isdigit() else None


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
            return await _batch_range(js, name, message, sequence, marker_end)
        end = header_int(message.headers, HEADER_END_POSITION)
        if end is None or marker_end not in (None, end):
            raise LedgerNotPrimaryError(f"stream {name}: epoch marker at sequence {sequence} says the stream ends "
                                        f"at journal position {end}, the marker after it {marker_end}")
        marker_end, sequence = end, sequence - 1
    end = marker_end or JOURNAL_START_POSITION
    return end, end, b""


async def _batch_range(js: Any, name: str, message: Any, last_sequence: int,
                       marker_end: int | None) -> tuple[int, int, bytes]:
    """The journal range and bytes of batch message `sequence`, the last before any epoch markers (which said the
    stream ends at `marker_end`)."""
    sequence = last_sequence
    data = bytes(message.data or b"")
    start = message_start(message.headers)
    end = header_int(message.headers, HEADER_END_POSITION)
    part = (message.headers or {}).get(HEADER_PART, "").split("/")
    if len(part) == 2 and part[0] == part[1] and part[0].isdigit() and 1 < int(part[0]) <= last_sequence:
        # The last part of a split batch: the batch is its parts joined, the first one naming its start.
        first = await js.get_msg(name, last_sequence - int(part[0]) + 1)
        start = message_start(first.headers)
        earlier = [bytes((await js.get_msg(name, sequence)).data or b"")
                   for sequence in range(last_sequence - int(part[0]) + 2, last_sequence)]
        data = b"".join([bytes(first.data or b""), *earlier, data])
    if start is None or end is None or not start < end:
        raise LedgerNotPrimaryError(f"stream {name}: its last message (sequence {sequence}) has no journal "
                                    f"range in {HEADER_MESSAGE_ID} and {HEADER_END_POSITION}: not a ledger batch")
    if marker_end not in (None, end):
        raise LedgerNotPrimaryError(f"stream {name}: the epoch marker after sequence {sequence} says the stream "
                                    f"ends at journal position {marker_end}, its last batch ends at {end}")
    return start, end, data


class _Message:
    """One message a publisher sent: its bytes and headers, the sequence its fence expects last, the journal
    position its range ends at, the Future to resolve once it is settled (the last message of a send), and its
    outcome once its ack (or error) arrived."""
    __slots__ = ("data", "headers", "expected", "end", "future", "arrived", "outcome", "sent", "deadline")

    def __init__(self, data: bytes, headers: dict[str, str], end: int) -> None:
        self.data = data
        self.headers = headers
        self.expected = 0
        self.end = end
        self.future: concurrent.futures.Future | None = None
        self.arrived = False
        self.outcome: Any = None
        self.sent = False        # written once at least (a resend after "no responders" writes it again)
        self.deadline = 0.0      # the loop's time by which its ack must arrive (its first write + the ack timeout)


class StreamPublisher:
    """The publish hook of a primary (ledger.api.open_with_hooks(path, publish=publisher)) sending each committed
    batch range to shard `shard`'s stream. Use as a context manager; `attach(store)` after the open gives it the
    bytes (store.batch_bytes) and checks the stream ends where the store's journal does (a primary behind or
    ahead of its stream must not publish: LedgerNotPrimaryError).

    Pipelined: `send(start, end)` publishes without waiting and returns a Future resolved with the stream's ack
    (the commit pipeline waits for it outside the engine's lock, ledger/commit.py); at most PUBLISH_IN_FLIGHT_MAX
    messages are unacknowledged (send waits for room). Each message carries Nats-Expected-Last-Sequence = the
    last acknowledged sequence + the messages in flight before it, so the fence holds for every one; messages
    leave in send order (one connection, one sending task), and Futures resolve in that order. A refused publish
    (the fence: another publisher appended), a duplicate, or a timeout (in doubt) fails its Future, and every
    later one fails too, naming the first failure: the pipeline poisons the handle, nothing is acknowledged on
    doubt. `__call__(start, end)` is send and wait. A range larger than one message is split (`messages`)."""

    def __init__(self, url: str, shard: str, options: ConnectionOptions | None = None,
                 replicas: int = REPLICAS_DEFAULT, ack_timeout_s: float = ACK_TIMEOUT_S) -> None:
        self.shard = check_shard(shard)
        self.stream = stream_name(shard)
        self.subject = subject(shard)
        self.replicas = replicas
        self.ack_timeout_s = ack_timeout_s
        self.last_sequence = 0        # the last sequence acknowledged
        self.end_position = JOURNAL_START_POSITION   # the journal position acknowledged messages reach
        self.in_flight_max_seen = 0   # the most messages ever unacknowledged at once (tests, benchmarks)
        self.resent = 0               # writes again after "no responders" (tests)
        self.store: Any = None
        self.epoch = 0                # of the primary publishing (its marker's), in Ledger-Epoch of every batch
        self.node: str | None = None  # that primary's node name, in Ledger-Node
        self.failure: BaseException | None = None   # the first failed message's error: every later one fails
        self._last: tuple[int, int, bytes] = (JOURNAL_START_POSITION, JOURNAL_START_POSITION, b"")
        self._loop = LoopThread(url, options)
        # In the ids of parts: another publisher's parts of a batch at the same start (a new primary's, after this
        # one died between parts) are not duplicates of these for the server.
        self._instance = secrets.token_hex(6)
        self._send_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(PUBLISH_IN_FLIGHT_MAX)
        self._in_flight = 0
        self._sent_sequence = 0       # the sequence the last message sent gets, if every one before is stored
        self._sent_end = JOURNAL_START_POSITION
        self._queue: asyncio.Queue | None = None    # the sending task's (loop thread only)
        self._writing: asyncio.Lock | None = None   # held by each write: messages leave in order (loop thread only)
        self._order: collections.deque[_Message] = collections.deque()   # sent, not yet settled (loop thread only)
        self._waiting: dict[str, tuple[_Message, asyncio.TimerHandle]] = {}   # by reply token (loop thread only)
        self._token = 0
        self._reply_prefix = ""

    def __enter__(self) -> StreamPublisher:
        self._loop.start()
        try:
            info = self._loop.run(ready_stream(self._loop.js, self.shard, self.replicas),
                                  STREAM_READY_TIMEOUT_S + REQUEST_TIMEOUT_S)
            self.last_sequence = self._sent_sequence = info.state.last_seq
            self._last = self._loop.run(last_message(self._loop.js, self.stream, self.last_sequence),
                                        REQUEST_TIMEOUT_S)
            self.end_position = self._sent_end = self._last[1]
            self._loop.run(self._start_sender(), REQUEST_TIMEOUT_S)
        except BaseException:
            self._loop.stop()
            raise
        return self

    def __exit__(self, *exception: object) -> None:
        self._loop.stop()
        # The loop is stopped: what was still in flight is in doubt, and nobody may wait for it forever.
        for message in self._order:
            self._resolve(message, LedgerTimeoutError(f"stream {self.stream}: the publisher stopped before the "
                                                      f"message ending at journal position {message.end} was "
                                                      f"acknowledged; it is in doubt"))
        self._order.clear()

    def attach(self, store: Any, publish_journal: bool = False) -> None:
        """Publish from `store` (the ledger's Store); LedgerNotPrimaryError if the stream does not end at its
        write position with the store's own last batch, byte for byte. With publish_journal, a store ahead of a
        stream that holds no batch (a ledger made before it was clustered) first publishes its whole journal
        (publish_existing), so that standbys can follow from position 1."""
        position = store.engine.write_position
        if publish_journal and position > self.end_position == JOURNAL_START_POSITION and self._last[2] == b"":
            self.store = store
            self.publish_existing(position)
            return
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

    def publish_existing(self, end: int) -> None:
        """Publish the attached store's journal [1, end), pipelined, in runs of whole batches of at most one
        message each (a batch larger than a message in parts), and wait for the last ack; raises what fails
        it (the publisher is then poisoned)."""
        assert self.store is not None and self._sent_end == JOURNAL_START_POSITION, "from an empty stream only"
        engine, start, future = self.store.engine, JOURNAL_START_POSITION, None
        while start < end:
            with engine:
                headers = engine.batch_headers(start, end, PUBLISH_EXISTING_BATCHES_MAX)
            run_start = start
            for header_position, _, count in headers:
                batch_end = header_position + 1 + count
                if (batch_end - run_start) * RECORD_SIZE > MESSAGE_BYTES_MAX and header_position > run_start:
                    future = self.send(run_start, header_position)
                    run_start = header_position
                start = batch_end
            if not headers:
                raise LedgerReplicationError(f"journal [{start}, {end}) holds no committed batch to publish")
            future = self.send(run_start, start)
        try:
            if future is not None:
                future.result(self.ack_timeout_s * 2 + 1.0)
        except concurrent.futures.TimeoutError:
            raise LedgerTimeoutError(f"stream {self.stream}: no ack for the existing journal's last range in "
                                     f"time; it is in doubt") from None
        logger.info("stream %s: published the existing journal [%d, %d) of a ledger made before its stream",
                    self.stream, JOURNAL_START_POSITION, end)

    def __call__(self, start: int, end: int) -> None:
        """The blocking publish hook: send(start, end) and wait for its ack (raises what fails it)."""
        future = self.send(start, end)
        try:
            future.result(self.ack_timeout_s * 2 + 1.0)   # its own timeout, and that of a message before it
        except concurrent.futures.TimeoutError:
            raise LedgerTimeoutError(f"stream {self.stream}: no ack for journal [{start}, {end}) in time; the "
                                     f"batch is in doubt") from None

    def send(self, start: int, end: int) -> concurrent.futures.Future:
        """Publish the committed batches [start, end) (the range after the last one sent) without waiting for
        the ack: returns a Future resolved with the PubAck of its last message, or failed with
        LedgerNotPrimaryError (the fence, a duplicate) or LedgerTimeoutError (no ack in time: in doubt); once
        one failed, every later one fails too. Waits while PUBLISH_IN_FLIGHT_MAX messages are unacknowledged
        (LedgerTimeoutError past ack_timeout_s). Raises LedgerNotPrimaryError before attach() or on a gap."""
        with self._send_lock:
            if self.store is None:
                raise LedgerNotPrimaryError(f"stream {self.stream}: publish before attach(store)")
            if start != self._sent_end:
                raise LedgerNotPrimaryError(f"stream {self.stream}: the last range sent ends at journal position "
                                            f"{self._sent_end}, the batch starts at {start}")
            future: concurrent.futures.Future = concurrent.futures.Future()
            if self.failure is not None:
                self._sent_end = end      # failed as sent: the next range follows it, and fails too
                future.set_exception(self._after_failure(start))
                return future
            messages = self.messages(start, end, self.store.batch_bytes(start, end))
            messages[-1].future = future
            for message in messages:
                if not self._slots.acquire(timeout=self.ack_timeout_s):
                    self._fail_waiting(future, start, end)
                    return future
                self._in_flight += 1
                self.in_flight_max_seen = max(self.in_flight_max_seen, self._in_flight)
                message.expected = self._sent_sequence
                message.headers[HEADER_EXPECTED_LAST_SEQUENCE] = str(message.expected)
                self._sent_sequence += 1
                self._loop.loop.call_soon_threadsafe(self._enqueue, message)
            self._sent_end = end
            return future

    def messages(self, start: int, end: int, data: bytes) -> list[_Message]:
        """The messages that carry journal [start, end) (its bytes `data`): one when it fits MESSAGE_BYTES_MAX;
        else one per run of whole batches that fits, and a single batch too large for one message as parts
        (Ledger-Part: k/n) the follower joins again."""
        if len(data) <= MESSAGE_BYTES_MAX:
            return [_Message(data, self._headers(str(start), end), end)]
        engine = self.store.engine
        with engine:
            headers = engine.batch_headers(start, end, end - start)
        messages: list[_Message] = []
        run_start = start
        for header_position, _, count in headers:
            batch_end = header_position + 1 + count
            if (batch_end - run_start) * RECORD_SIZE > MESSAGE_BYTES_MAX and header_position > run_start:
                messages += self._run(run_start, header_position, start, data)   # the run before this batch
                run_start = header_position
        return messages + self._run(run_start, end, start, data)

    def _run(self, run_start: int, run_end: int, start: int, data: bytes) -> list[_Message]:
        """The message(s) of whole batches [run_start, run_end) out of `data` (journal from `start`): parts when
        it is one batch larger than a message."""
        body = data[(run_start - start) * RECORD_SIZE:(run_end - start) * RECORD_SIZE]
        if len(body) <= MESSAGE_BYTES_MAX:
            return [_Message(body, self._headers(str(run_start), run_end), run_end)]
        count = -(-len(body) // MESSAGE_BYTES_MAX)
        size = -(-len(body) // count)
        return [_Message(body[index * size:(index + 1) * size],
                         self._headers(f"{run_start}.{index + 1}.{self._instance}", run_end,
                                       f"{index + 1}/{count}"),
                         run_end)
                for index in range(count)]

    def _headers(self, message_id: str, end: int, part: str | None = None) -> dict[str, str]:
        """A batch message's headers: its id and end position (and part), and the publishing primary's epoch and
        node (a follower refuses a batch of an epoch below the last marker's)."""
        headers = {HEADER_MESSAGE_ID: message_id, HEADER_END_POSITION: str(end)}
        if part is not None:
            headers[HEADER_PART] = part
        headers[HEADER_EPOCH] = str(self.epoch)
        if self.node is not None:
            headers[HEADER_NODE] = self.node
        return headers

    def _after_failure(self, start: int) -> BaseException:
        failure = self.failure
        assert failure is not None
        return type(failure)(f"stream {self.stream}: the message at journal position {start} is not "
                             f"published: an earlier one failed ({failure})")

    def _fail_waiting(self, future: concurrent.futures.Future, start: int, end: int) -> None:
        """No room in flight within ack_timeout_s: the publisher fails (what was sent of the range may be
        stored: in doubt)."""
        error = LedgerTimeoutError(f"stream {self.stream}: {PUBLISH_IN_FLIGHT_MAX} messages unacknowledged for "
                                   f"{self.ack_timeout_s} s; the batch at journal position {start} is in doubt")
        self.failure = self.failure or error
        self._sent_end = end             # failed as sent: every later send fails
        if not future.done():
            future.set_exception(error)

    # -- the loop thread: one task writes the messages in order, acks settle them in order --

    async def _start_sender(self) -> None:
        """The sending task, and one subscription for every ack (reply subject <inbox>.<token>, as nats-py's own
        publish_async does; its error path raises inside its callback instead of failing the publish)."""
        self._queue = asyncio.Queue()
        self._writing = asyncio.Lock()
        self._reply_prefix = self._loop.connection.new_inbox() + "."
        await self._loop.connection.subscribe(self._reply_prefix + "*", cb=self._reply)
        asyncio.ensure_future(self._sender())

    def _enqueue(self, message: _Message) -> None:
        assert self._queue is not None
        self._order.append(message)
        self._queue.put_nowait(message)

    async def _sender(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            message = await self._queue.get()
            if self.failure is not None:
                self._arrived(message, None)      # never written after a failure: it fails as a later one
                continue
            message.deadline = loop.time() + self.ack_timeout_s
            message.headers[Header.EXPECTED_STREAM] = self.stream
            assert self._writing is not None
            async with self._writing:
                await self._write(message)

    async def _write(self, message: _Message) -> None:
        """Write `message` with a new reply token, its ack due by its deadline (under self._writing: in order)."""
        loop = asyncio.get_running_loop()
        self._token += 1
        token = str(self._token)
        self._waiting[token] = (message, loop.call_later(max(0.0, message.deadline - loop.time()),
                                                         self._timed_out, token))
        message.sent = True
        try:
            await self._loop.connection.publish(self.subject, message.data, reply=self._reply_prefix + token,
                                                headers=message.headers)
        except Exception as error:
            if self._waiting.pop(token, None) is not None:
                self._arrived(message, error)

    async def _reply(self, reply: Any) -> None:
        entry = self._waiting.pop(reply.subject[len(self._reply_prefix):], None)
        if entry is None:
            return                # timed out already, or written again since
        message, timer = entry
        timer.cancel()
        if not reply.data and (reply.headers or {}).get(Header.STATUS) == NO_RESPONDERS_STATUS:
            # No server took it (no stream has learned the subject yet): nothing is stored, so it is sent again
            # while its ack timeout allows; past it, it fails as in doubt like any other.
            if asyncio.get_running_loop().time() + NO_RESPONDERS_RETRY_S < message.deadline:
                asyncio.ensure_future(self._write_again_from(message))
                return
        try:
            outcome = json.loads(reply.data) if reply.data else {"error": {"description": "no stream responded"}}
        except ValueError as error:
            outcome = error
        self._arrived(message, outcome)

    async def _write_again_from(self, message: _Message) -> None:
        """Write `message` and every message written after it again, in order, after NO_RESPONDERS_RETRY_S. None of
        those later ones can be stored (each expects the one before it stored first: the fence), so their replies
        to the earlier writes are dropped (their tokens forgotten) and only the new writes' count."""
        assert self._writing is not None
        async with self._writing:
            order = list(self._order)
            if message not in order:
                return            # settled meanwhile (the publisher stopping)
            again = [later for later in order[order.index(message):] if later.sent]
            for token, (waiting, timer) in list(self._waiting.items()):
                if waiting in again:
                    del self._waiting[token]
                    timer.cancel()
            for later in again:
                later.arrived, later.outcome = False, None
            self.resent += 1
            await asyncio.sleep(NO_RESPONDERS_RETRY_S)
            for later in again:
                await self._write(later)

    def _timed_out(self, token: str) -> None:
        entry = self._waiting.pop(token, None)
        if entry is not None:
            self._arrived(entry[0], TimeoutError())

    def _arrived(self, message: _Message, outcome: Any) -> None:
        """Message `message`'s ack or error arrived: settle every message from the oldest on that has one."""
        message.arrived, message.outcome = True, outcome
        order = self._order
        while order and order[0].arrived:
            head = order.popleft()
            self._resolve(head, self._problem(head))
            self._in_flight -= 1
            self._slots.release()

    def _problem(self, message: _Message) -> BaseException | None:
        """What is wrong with a settled message (None: stored as expected, and the publisher's state moves on)."""
        if self.failure is not None:
            return self._after_failure(int(message.headers[HEADER_MESSAGE_ID].split(".")[0]))
        outcome, start = message.outcome, message.headers[HEADER_MESSAGE_ID]
        error = outcome.get("error") if isinstance(outcome, dict) else None
        if error is not None and error.get("err_code") == WRONG_LAST_SEQUENCE_ERROR_CODE:
            problem: BaseException = LedgerNotPrimaryError(
                f"stream {self.stream}: another publisher appended since sequence {message.expected} (the "
                f"server: {error.get('description')}); this handle is no longer the primary")
        elif isinstance(outcome, TimeoutError):
            problem = LedgerTimeoutError(f"stream {self.stream}: no ack within {self.ack_timeout_s} s; the batch "
                                         f"at journal position {start} is in doubt")
        elif isinstance(outcome, BaseException) or error is not None or not isinstance(outcome, dict):
            problem = LedgerTimeoutError(f"stream {self.stream}: the publish of the batch at journal position "
                                         f"{start} failed ({error or outcome!r}); it is in doubt")
        elif outcome.get("duplicate") or outcome.get("seq") != message.expected + 1:
            # A duplicate ack names a message stored before under this start position, maybe another writer's.
            problem = LedgerNotPrimaryError(f"stream {self.stream}: batch at journal position {start} "
                                            f"acknowledged as sequence {outcome.get('seq')} (duplicate "
                                            f"{bool(outcome.get('duplicate'))}), expected {message.expected + 1}")
        else:
            self.last_sequence = outcome["seq"]
            self.end_position = message.end
            return None
        self.failure = problem
        return problem

    @staticmethod
    def _resolve(message: _Message, problem: BaseException | None) -> None:
        future = message.future
        if future is None or future.done():
            return
        if problem is None:
            future.set_result(PubAck.from_response(message.outcome))
        else:
            future.set_exception(problem)

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
        self.last_sequence = self._sent_sequence = ack.seq
        self.epoch, self.node = epoch, node       # every batch from now on says who published it
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
        self.position = store.engine.write_position   # the store's write position after the last message applied
        self.positions: dict[int, int] = {}
        self.epoch = 0                # the last epoch marker's epoch and node (0 and None before any)
        self.primary: str | None = None
        self._changed = threading.Condition()
        self._loop = LoopThread(url, options)
        self._task: Any = None
        self._parts: list[bytes] = []             # the parts of a batch split over messages, so far
        self._parts_key: tuple[Any, ...] = ()     # (start, end, parts) of that batch

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
            # The follower's own counters, set together once a message is applied (the store's write position
            # moves inside append_replicated, before `positions` and `sequence` say so).
            if position is not None:
                return self.position >= position
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
            first, epoch = await self._start_epoch(await self._first_sequence())
            with self._changed:
                self.sequence = max(self.sequence, first - 1)   # the messages before it: in the store already
                self.position = self.store.engine.write_position
                self.epoch = max(self.epoch, epoch)
                self._changed.notify_all()
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)
            subscription = await self._loop.js.subscribe(self.subject, stream=self.stream, ordered_consumer=True,
                                                         config=config)
            while True:
                message = await subscription.next_msg(timeout=None)
                data = self._joined(message.metadata.sequence.stream, message.headers, message.data)
                epoch = marker_epoch(message.headers)
                self._check_epoch(message.metadata.sequence.stream, epoch, message.headers)
                if epoch is not None:
                    self._pass_marker(message.metadata.sequence.stream, epoch, message.data, message.headers)
                elif data is not None:
                    self._apply(message.metadata.sequence.stream, data)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._set_error(error)

    def _joined(self, sequence: int, headers: dict[str, str] | None, data: bytes) -> bytes | None:
        """The batch bytes message `sequence` completes: its data, or for a part (Ledger-Part: k/n) None until
        part n, then the parts joined. Parts out of order, missing or of different batches are refused
        (LedgerReplicationError): nothing of them is applied."""
        part = (headers or {}).get(HEADER_PART)
        parts = self._parts
        if part is None and (headers or {}).get(HEADER_MESSAGE_ID, "").startswith(MARKER_ID_PREFIX):
            if parts:   # a new primary took over mid-batch: its parts before were never acknowledged
                logger.warning("stream %s message %d: an epoch marker after %d parts of the batch %s; those "
                               "parts (never acknowledged) are dropped", self.stream, sequence, len(parts),
                               self._parts_key)
                self._parts = []
            return None
        if part is None:
            if parts:
                raise LedgerReplicationError(f"stream {self.stream} message {sequence} refused: a whole message "
                                             f"while the batch {self._parts_key} has {len(parts)} parts only: "
                                             f"parts missing")
            return data
        index, count = (int(number) if number.isdigit() else 0 for number in (part.split("/") + ["", ""])[:2])
        start = (headers or {}).get(HEADER_MESSAGE_ID, "").split(".")[0]
        key = (start, (headers or {}).get(HEADER_END_POSITION), count)
        if not 1 <= index <= count or (index == 1) != (not parts) or (parts and key != self._parts_key) \
                or index != len(parts) + 1:
            raise LedgerReplicationError(f"stream {self.stream} message {sequence} refused: part {part!r} of the "
                                         f"batch (start, end, parts) {key}, after {len(parts)} parts of "
                                         f"{self._parts_key}: parts out of order, missing or mixed")
        self._parts_key = key
        parts.append(bytes(data))
        if index < count:
            return None
        self._parts = []
        return b"".join(parts)

    def _apply(self, sequence: int, data: bytes) -> None:
        try:
            end = self.store.append_replicated(data)
        except LedgerReplicationError as error:
            raise LedgerReplicationError(f"stream {self.stream} message {sequence} refused: {error}") from error
        with self._changed:
            self.sequence, self.position = sequence, end
            self.positions[end] = sequence
            self._changed.notify_all()

    def _check_epoch(self, sequence: int, marker: int | None, headers: dict[str, str] | None) -> None:
        """Refuse a message of an epoch below the last marker's (a batch's Ledger-Epoch, none counting as 0; a
        marker's own epoch): a stale primary's batch cannot follow a newer marker, the fence refuses it, so such
        a message was put there by something else (a forger, a publisher that skips the fence)."""
        epoch = marker if marker is not None else header_int(headers, HEADER_EPOCH) or 0
        if epoch < self.epoch:
            what = "epoch marker" if marker is not None else "batch"
            raise LedgerReplicationError(
                f"stream {self.stream} message {sequence} refused by the epoch check: a {what} of epoch {epoch} "
                f"(node {(headers or {}).get(HEADER_NODE)}) after the marker of epoch {self.epoch} (node "
                f"{self.primary}); a primary's batch cannot follow a newer primary's marker past the fence")

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

    async def _start_epoch(self, first: int) -> tuple[int, int]:
        """Where to start, moved back over the epoch markers right before `first` that sit at the store's write
        position (they are passed again, so `epoch` knows them), and the epoch of the message before that (a
        marker's, or a batch's Ledger-Epoch: the store holds it): the epoch check's floor from the start."""
        position = self.store.engine.write_position
        while first > 1:
            try:
                headers = (await self._loop.js.get_msg(self.stream, first - 1)).headers
            except nats.js.errors.NotFoundError:
                return first, 0            # trimmed: nothing before to know an epoch from
            epoch = marker_epoch(headers)
            if epoch is None or header_int(headers, HEADER_END_POSITION) != position:
                return first, epoch if epoch is not None else header_int(headers, HEADER_EPOCH) or 0
            first -= 1
        return first, 0

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
        if marker_epoch(headers) is not None:
            end = header_int(headers, HEADER_END_POSITION)
            return end, end
        part = (headers or {}).get(HEADER_PART, "1/1").split("/")
        # A part k > 1 has no start of its own (its Nats-Msg-Id is <start>.<k>); only the last one ends a batch.
        end = header_int(headers, HEADER_END_POSITION) if part[0] == part[-1] else None
        return message_start(headers), end

    def _no_message(self, position: int) -> LedgerReplicationError:
        return LedgerReplicationError(f"stream {self.stream} holds no message starting at journal position "
                                      f"{position} (this standby's write position): the journal diverged from "
                                      f"the stream (another history, or another shard's) or is ahead of it")
