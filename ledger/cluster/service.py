"""A node's request service over NATS (docs/CLUSTER.md, "Requests over NATS"): it answers the clients of
ledger/cluster/client.py from a Ledger handle.

`Service(ledger_handle, url, shard, options, primary=True)`: `start()` subscribes, the primary to
`ledger.request.<shard>` (commands and reads) and to `ledger.read.<shard>`, a standby to the read subject only
(in the queue group READ_QUEUE_GROUP: one node answers each read); `stop()` unsubscribes first (new requests go to
the next primary, or find no responders and are retried by their client), answers what it accepted, and closes.
A node starts a Service when it becomes primary and stops it when it steps down.

The asyncio loop only decodes and queues (bounded: SERVICE_QUEUE_REQUESTS_MAX; past it a request answers
LedgerBusyError, which clients retry). One worker thread runs the requests on the Ledger, because a replicated
write waits for the stream's acknowledgement: transfer (or account) requests waiting together are joined into
one Ledger.transfers (create_accounts) call, of at most COALESCED_ROWS_MAX rows, i.e. one replicated batch, and
its result codes are split back to each request. A request whose last row is LINKED only ever ends a joined call.
Errors answer with the exception's class name and message; the client raises the same class again."""
from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from typing import Any

import numpy as np

from ledger.cluster.connection import ConnectionOptions
from ledger.cluster.names import (
    ACCOUNT_ID_MIN,
    COALESCED_ROWS_MAX,
    CONNECT_TIMEOUT_S,
    MESSAGE_BYTES_MAX,
    READ_QUEUE_GROUP,
    SERVICE_QUEUE_REQUESTS_MAX,
    SERVICE_STOP_TIMEOUT_S,
    check_shard,
    read_subject,
    request_subject,
)
from ledger.cluster.protocol import (
    WRITE_METHODS,
    Request,
    RequestRefused,
    decode_moment,
    decode_request,
    encode_error,
    encode_reply,
    is_linked_open,
)
from ledger.cluster.stream import LoopThread
from ledger.errors import LedgerBusyError, LedgerError

__all__ = ["Service", "accounts_in_range"]

TAKE_WAIT_S = 0.05   # the idle worker looks this often whether it should stop
ACCOUNT_ID_MAX = 2**64 - 1


def accounts_in_range(ledger_handle: Any, first: Any, last: Any) -> int:
    """How many accounts of `ledger_handle` (a Ledger) have an id in [first, last], both included: a count over
    the engine's live id array under its lock (one pass of numpy, no copy of the accounts). TypeError / ValueError
    naming a bound that is not an account id, or first > last."""
    for name, value in (("first", first), ("last", last)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"accounts_in_range: {name} must be an integer account id, got {value!r}")
        if not ACCOUNT_ID_MIN <= value <= ACCOUNT_ID_MAX:
            raise ValueError(f"accounts_in_range: {name} {value} is not an account id "
                             f"[{ACCOUNT_ID_MIN}, {ACCOUNT_ID_MAX}]")
    if first > last:
        raise ValueError(f"accounts_in_range: first {first} is above last {last}")
    engine = ledger_handle.store.engine
    with engine:   # the views are live: no batch may grow (move) them while they are read
        ids = engine.account_arrays()[1]["id"]
        return int(np.count_nonzero((ids >= np.uint64(first)) & (ids <= np.uint64(last))))


@dataclasses.dataclass
class _Job:
    """An accepted request and the subject its reply goes to (None: the sender wants none)."""
    request: Request
    reply: str | None


class Service:
    """Answers a shard's requests from `ledger_handle` (a ledger.Ledger). See the module docstring."""

    def __init__(self, ledger_handle: Any, url: str, shard: str, options: ConnectionOptions | None = None,
                 primary: bool = True, queue_requests_max: int = SERVICE_QUEUE_REQUESTS_MAX) -> None:
        """url: the NATS servers (comma-separated); options: their authentication and TLS; primary: whether
        this node answers commands (the request subject) or only reads (the read subject)."""
        assert 1 <= queue_requests_max <= SERVICE_QUEUE_REQUESTS_MAX, queue_requests_max
        self.ledger = ledger_handle
        self.url = url
        self.shard = check_shard(shard)
        self.options = options
        self.primary = primary
        self.queue_requests_max = queue_requests_max
        self._thread: LoopThread | None = None
        self._worker: threading.Thread | None = None
        self._queue: queue.Queue[_Job] = queue.Queue(queue_requests_max)
        self._stopping = threading.Event()
        self._subscriptions: list[Any] = []
        # What it did, for tests and status: requests accepted, refused (bad or busy), Ledger write calls made
        # (each one replicated batch) and the rows they carried.
        self.requests = 0
        self.refused = 0
        self.core_calls = 0
        self.rows = 0

    @property
    def running(self) -> bool:
        """Whether the service is started and not stopped."""
        return self._thread is not None and not self._stopping.is_set()

    def start(self) -> None:
        """Connect, start the worker and subscribe: requests are answered when it returns."""
        assert self._thread is None, "the service is running already"
        self._queue = queue.Queue(self.queue_requests_max)
        self._stopping.clear()
        thread = LoopThread(self.url, self.options)
        thread.start()
        self._thread = thread
        self._worker = threading.Thread(target=self._work, name=f"ledger-service-{self.shard}", daemon=True)
        self._worker.start()
        try:
            thread.run(self._subscribe(), CONNECT_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    async def _subscribe(self) -> None:
        assert self._thread is not None
        connection = self._thread.connection
        if self.primary:
            self._subscriptions.append(await connection.subscribe(request_subject(self.shard),
                                                                  cb=self._on_request))
        self._subscriptions.append(await connection.subscribe(read_subject(self.shard), queue=READ_QUEUE_GROUP,
                                                              cb=self._on_read))
        await connection.flush(CONNECT_TIMEOUT_S)   # the server has the subscriptions before start() returns

    async def _unsubscribe(self) -> None:
        assert self._thread is not None
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            try:
                # Drain, not unsubscribe: the requests the server delivered already are still queued (and
                # answered) rather than dropped, which would leave their callers waiting out an attempt.
                await asyncio.wait_for(subscription.drain(), CONNECT_TIMEOUT_S)
            except Exception:
                pass   # a connection gone has no subscriptions left

    def stop(self) -> None:
        """Unsubscribe (clients retry elsewhere), answer every request accepted, close. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        try:
            thread.run(self._unsubscribe(), CONNECT_TIMEOUT_S * 2)
        except LedgerError:
            pass   # unanswered: the connection is closed below anyway
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(SERVICE_STOP_TIMEOUT_S)
            self._worker = None
        self._thread = None
        thread.stop()   # after the worker: its last replies are published on this connection

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the loop's side: decode and queue --

    async def _on_request(self, message: Any) -> None:
        self._accept(message, writes_allowed=True)

    async def _on_read(self, message: Any) -> None:
        self._accept(message, writes_allowed=False)

    def _accept(self, message: Any, writes_allowed: bool) -> None:
        try:
            request = decode_request(message.headers, message.data)
            if request.method in WRITE_METHODS and not writes_allowed:
                raise RequestRefused("LedgerNotPrimaryError", f"{request.method} is a command: send it to "
                                                              f"{request_subject(self.shard)}")
            self._queue.put_nowait(_Job(request, message.reply or None))
        except RequestRefused as refused:
            self.refused += 1
            self._reply_now(message.reply, *encode_error(refused))
        except queue.Full:
            self.refused += 1
            self._reply_now(message.reply, *encode_error(LedgerBusyError(
                f"the service of shard {self.shard} holds {self.queue_requests_max} requests; nothing of this "
                f"one was applied: retry")))
        else:
            self.requests += 1

    def _reply_now(self, subject: str | None, headers: dict[str, str], body: bytes) -> None:
        """Reply from the loop itself (a refusal)."""
        if subject and self._thread is not None:
            asyncio.get_running_loop().create_task(self._thread.connection.publish(subject, body,
                                                                                    headers=headers))

    def _reply(self, job: _Job, headers: dict[str, str], body: bytes) -> None:
        """Reply from the worker thread: the publish is queued on the loop, not waited for."""
        thread = self._thread
        if job.reply and thread is not None:
            asyncio.run_coroutine_threadsafe(thread.connection.publish(job.reply, body, headers=headers),
                                             thread.loop)

    # -- the worker's side: run on the Ledger --

    def _work(self) -> None:
        carried: _Job | None = None
        while True:
            job = carried if carried is not None else self._take()
            carried = None
            if job is None:
                if self._stopping.is_set() and self._queue.empty():
                    return
                continue
            if job.request.method in WRITE_METHODS:
                group, carried = self._gather(job)
                self._run_writes(group)
            else:
                self._run_read(job)

    def _take(self) -> _Job | None:
        try:
            return self._queue.get(timeout=TAKE_WAIT_S)
        except queue.Empty:
            return None

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """`first` and the requests of the same method queued behind it, up to COALESCED_ROWS_MAX rows (and
        never past one whose last row is LINKED); also the request taken that did not fit, if any."""
        group = [first]
        assert first.request.rows is not None
        rows = first.request.rows.shape[0]
        while not is_linked_open(group[-1].request.rows):
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            assert job.request.rows is not None
            if job.request.method != first.request.method or rows + job.request.rows.shape[0] > COALESCED_ROWS_MAX:
                return group, job
            group.append(job)
            rows += job.request.rows.shape[0]
        return group, None

    def _run_writes(self, group: list[_Job]) -> None:
        """One Ledger call for the group's rows, its codes split back to each request."""
        parts = [job.request.rows for job in group]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        try:
            codes = getattr(self.ledger, group[0].request.method)(rows)
            position = self.ledger.store.engine.write_position
        except Exception as error:
            for job in group:
                self._reply(job, *encode_error(error))
            return
        finally:
            self.core_calls += 1
            self.rows += rows.shape[0]
        begin = 0
        for job, part in zip(group, parts):
            end = begin + part.shape[0]
            self._reply(job, *encode_reply(position, codes[begin:end].tobytes()))
            begin = end

    def _run_read(self, job: _Job) -> None:
        engine = self.ledger.store.engine
        try:
            with engine:   # the answer and its position are of one moment: no batch lands in between
                position = engine.write_position
                headers, body = self._read(job.request, position)
        except Exception as error:
            headers, body = encode_error(error)
        self._reply(job, headers, body)

    def _read(self, request: Request, position: int) -> tuple[dict[str, str], bytes]:
        arguments = request.arguments
        if request.method == "account":
            account = self.ledger.account(arguments.get("id"))
            return encode_reply(position, result=None if account is None else list(account), with_result=True)
        if request.method == "lookup_transfers":
            return encode_reply(position, self.ledger.lookup_transfers(request.rows).tobytes())
        if request.method == "accounts_in_range":
            count = accounts_in_range(self.ledger, arguments.get("first"), arguments.get("last"))
            return encode_reply(position, result=count, with_result=True)
        assert request.method == "history", request.method
        rows = self.ledger.history(arguments.get("id"), since=decode_moment(arguments.get("since")),
                                   until=decode_moment(arguments.get("until")), limit=arguments.get("limit"))
        if rows.nbytes > MESSAGE_BYTES_MAX:
            raise ValueError(f"the history asked for is {rows.shape[0]} rows ({rows.nbytes} bytes), more than one "
                             f"reply holds ({MESSAGE_BYTES_MAX} bytes): page it with limit= and until=")
        return encode_reply(position, rows.tobytes())

